"""Issue 12, defect 7: Orthanc 1.10 retrieves only by C-MOVE, so the default
``etc/`` archive must accept C-MOVE.  The test leaves ``enable_move`` to the
shipped config and only names the destination (this run's Orthanc) the
documented way, a ``move_destinations`` entry of the archive's ``dicom_scp``
endpoint.  Before defect 7's fix Orthanc reported "C-MOVE command is not
supported".
"""

from __future__ import annotations

import re

import pytest

from tests.dicom_data import uid
from tests.interop.conftest import client_orthanc
from tests.interop.support import clear, orthanc_ok, orthanc_sops, storescu
from tests.sf_helpers import HarmonyProcess


def name_destination(etc, aet: str, port: int):
    """Name *aet* at 127.0.0.1:*port* in the archive endpoint's move_destinations:
    its line replaced when the shipped table has one, else added (with the table if needed)."""
    path = etc / "pipelines" / "archive.toml"
    text = path.read_text()
    entry = f'{aet} = "127.0.0.1:{port}"'
    table = "[endpoints.archive_scp.options.move_destinations]"
    text, replaced = re.subn(rf"^{aet}\s*=.*$", entry, text, flags=re.M)
    if not replaced:
        if table in text:
            text = text.replace(table + "\n", table + "\n" + entry + "\n", 1)
        else:
            assert not re.search(r"^\s*move_destinations\s*=", text, re.M), "inline move_destinations: extend this"
            text += f"\n{table}\n{entry}\n"
    path.write_text(text)


@pytest.fixture(scope="module")
def movable_archive(tmp_path_factory, corpus):
    from tests.test_default_config import copy_etc
    root = tmp_path_factory.mktemp("archive-move")
    ports = copy_etc(root / "etc")
    client = client_orthanc(root / "client", harmony_dimse=ports["scp"])
    name_destination(root / "etc", client.aet, client.dicom_port)
    node = HarmonyProcess(root / "etc", ports.values())
    node.config = root / "etc" / "harmony.toml"
    try:
        node.start()
        client.start()
        storescu(ports["scp"], (i.path for i in corpus))
        yield client
    finally:
        client.stop()
        node.stop()


def test_orthanc_retrieves_from_default_archive(movable_archive, corpus):
    study = uid(1, 3)  # the study with the RLE instance
    clear(movable_archive)
    q = orthanc_ok(movable_archive, "POST", "/modalities/harmony/query",
                   {"Level": "Study", "Query": {"StudyInstanceUID": study}})
    orthanc_ok(movable_archive, "POST", f"/queries/{q['ID']}/retrieve",
               {"TargetAet": movable_archive.aet, "Synchronous": True})
    assert {i.sop_uid for i in corpus if i.study_uid == study} <= orthanc_sops(movable_archive)


def test_orthanc_moves_series_from_default_archive(movable_archive, corpus):
    series = uid(1, 4, 2)
    clear(movable_archive)
    orthanc_ok(movable_archive, "POST", "/modalities/harmony/move",
               {"Level": "Series", "TargetAet": movable_archive.aet, "Synchronous": True,
                "Resources": [{"StudyInstanceUID": uid(1, 4), "SeriesInstanceUID": series}]})
    assert {i.sop_uid for i in corpus if i.series_uid == series} <= orthanc_sops(movable_archive)
