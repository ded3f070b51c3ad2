"""One real gateway for the DICOM real-world tests (issue 12, defects 4-9).

``gateway`` is a Harmony with

- the archive: ``dicom_scp`` AE ``HARMONY`` (echo/store/find/get/move, Orthanc
  as the one named C-MOVE destination) and DICOMweb at ``/dicomweb``, both over
  the ``local_archive``;
- a relay: ``dicom_scp`` AE ``RELAY`` (store/find) -> ``dicom_scu`` ->
  Orthanc, and DICOMweb at ``/pacs`` -> ``dicomweb_bridge`` -> the same
  ``dicom_scu``;
- a second relay: ``dicom_scp`` AE ``PLAIN`` -> ``dicom_scu`` -> DCMTK's
  ``storescp``, which accepts uncompressed transfer syntaxes only (and
  another, ``MOVESCP``, as the archive's second C-MOVE destination: storescp
  serves one association at a time);

and a real Orthanc that knows Harmony's AEs (so it may query and retrieve from
the archive, and Harmony may query it).  Tests use fresh UIDs, so they share
both processes without disturbing each other.
"""

from __future__ import annotations

import pytest
import pytest_twisted

from tests.dicomweb_helpers import ARCHIVE_BACKEND, bridge_pipeline
from tests.dimse_helpers import scp_pipeline, scu_backend
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.peers import Orthanc, Storescp, free_port


def gateway_toml(archive_port: int, relay_port: int, plain_port: int, orthanc: Orthanc, storescp: Storescp,
                 movescp: Storescp) -> str:
    destinations = f"""[endpoints.archive_scp.options.move_destinations]
{orthanc.aet} = "127.0.0.1:{orthanc.dicom_port}"
{movescp.aet} = "127.0.0.1:{movescp.port}"
"""
    return (MINIMAL_MAIN + ARCHIVE_BACKEND + scp_pipeline("archive", "HARMONY", archive_port, "archive", ("store", "find", "get", "move"), destinations)
            + scp_pipeline("relay", "RELAY", relay_port, "pacs", ("store", "find"))
            + scu_backend("pacs", orthanc.aet, orthanc.dicom_port)
            + scp_pipeline("plain", "PLAIN", plain_port, "plain")
            + scu_backend("plain", storescp.aet, storescp.port)
            + bridge_pipeline("archive_web", "archive", "/dicomweb") + bridge_pipeline("pacs_web", "pacs", "/pacs"))


class Gateway:
    def __init__(self, harmony, orthanc, storescp, movescp, archive_port, relay_port, plain_port):
        self.harmony, self.orthanc, self.storescp, self.movescp = harmony, orthanc, storescp, movescp
        self.archive_port, self.relay_port, self.plain_port = archive_port, relay_port, plain_port

    @property
    def store(self):
        return self.harmony.service.runtime.backends["archive"].store

    def url(self, path=""):
        return self.harmony.url(path)


@pytest.fixture(scope="session")
def gateway(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gateway")
    archive_port, relay_port, plain_port = free_port(), free_port(), free_port()
    storescp = Storescp(folder / "storescp" / "in").start()
    movescp = Storescp(folder / "movescp" / "in", aet="MOVESCP").start()
    orthanc = Orthanc(folder / "orthanc", modalities={
        "harmony": ("HARMONY", "127.0.0.1", archive_port),
        "harmony_scu": ("HARMONY_SCU", "127.0.0.1", 1),
        "findscu": ("FINDSCU", "127.0.0.1", 1),
    }, extra_config={"DefaultEncoding": "Utf8"})  # Orthanc answers in Latin-1 otherwise, losing Greek
    try:
        orthanc.start()
        cfg = write_config(folder / "harmony", gateway_toml(archive_port, relay_port, plain_port, orthanc, storescp,
                                                          movescp))
        harmony = pytest_twisted.blockon(start_harmony(cfg))
    except BaseException:
        orthanc.stop()
        storescp.stop()
        movescp.stop()
        raise
    yield Gateway(harmony, orthanc, storescp, movescp, archive_port, relay_port, plain_port)
    pytest_twisted.blockon(harmony.stop())
    orthanc.stop()
    storescp.stop()
    movescp.stop()
