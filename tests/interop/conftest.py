"""Fixtures of the interop suite: real peers on 127.0.0.1 around a Harmony
run under twistd, in the two shapes a site deploys.

- ``archive``: the shipped ``etc/`` config as it is (ports rewritten), loaded
  with the shared corpus by DCMTK's storescu, with an Orthanc as its client.
- ``router``: ``dicom_scp`` -> ``dicom_scu`` in front of a second Orthanc (the
  PACS, loaded with the corpus); the client Orthanc is the C-MOVE destination.
  The same node serves DICOMweb over the PACS (``dicomweb`` endpoint ->
  ``dicomweb_bridge`` -> the same ``dicom_scu``) at ``/bridge``.

Both are shared by the run: tests store fresh UIDs, and a test that retrieves
into the client Orthanc empties it first (``support.clear``).

Each client Orthanc knows Harmony both as a DICOM modality (``harmony``) and
as a DICOMweb server (``harmony``), and the PACS directly (``pacs``) when
there is one, so every answer through Harmony can be compared with the same
client's answer without it.
"""

from __future__ import annotations

import shutil

import attr
import pytest

from tests.dicomweb_helpers import bridge_pipeline
from tests.interop.data import make_charsets, make_compressed
from tests.dimse_helpers import scp_pipeline, scu_backend
from tests.interop.support import Node, storescu
from tests.peers import Orthanc, free_port


@attr.s(auto_attribs=True)
class Stack:
    """Harmony (``node``), its client Orthanc, and the PACS behind it (router only)."""

    node: object
    client: Orthanc
    scp_port: int
    web_url: str
    pacs: Orthanc | None = None
    movescu_port: int | None = None  # the router's C-MOVE destination MOVESCU


@pytest.fixture(scope="session")
def compressed(tmp_path_factory):
    """One study, one instance per compressed transfer syntax (DCMTK-made); see data.COMPRESSED."""
    return make_compressed(tmp_path_factory.mktemp("compressed"))


@pytest.fixture(scope="session")
def charsets(tmp_path_factory):
    """One patient per character set (see data.CHARSETS)."""
    return make_charsets(tmp_path_factory.mktemp("charsets"))


def client_orthanc(folder, *, harmony_dimse: int | None = None, harmony_web: str | None = None,
                   pacs: Orthanc | None = None, aet: str = "ORTHANC") -> Orthanc:
    """An Orthanc acting as a client of Harmony (UTF-8 by default, as modern sites run it)."""
    modalities, servers = {}, {}
    if harmony_dimse:
        modalities["harmony"] = ("HARMONY", "127.0.0.1", harmony_dimse)
    if pacs is not None:
        modalities["pacs"] = (pacs.aet, "127.0.0.1", pacs.dicom_port)
        servers["pacs"] = [pacs.dicomweb_url + "/"]
    if harmony_web:
        servers["harmony"] = [harmony_web.rstrip("/") + "/"]
    return Orthanc(folder, aet=aet, modalities=modalities,
                   extra_config={"DefaultEncoding": "Utf8", "DicomWeb": {"Servers": servers}})


@pytest.fixture(scope="session")
def archive(tmp_path_factory, corpus):
    """The default ``etc/`` archive under twistd, holding the corpus, and a client Orthanc."""
    from tests.test_default_config import copy_etc
    from tests.sf_helpers import HarmonyProcess
    root = tmp_path_factory.mktemp("archive")
    ports = copy_etc(root / "etc")

    def new_ports():
        shutil.rmtree(root / "etc")
        ports.update(copy_etc(root / "etc"))
        return ports.values()

    node = HarmonyProcess(root / "etc", ports.values(), reconfigure=new_ports)
    node.config = root / "etc" / "harmony.toml"
    client = None
    try:
        node.start()  # the ports it listens on are final only now
        client = client_orthanc(root / "client", harmony_dimse=ports["scp"],
                                harmony_web=f"http://127.0.0.1:{ports['http']}/dicomweb")
        client.start()
        storescu(ports["scp"], (i.path for i in corpus))
        yield Stack(node=node, client=client, scp_port=ports["scp"],
                    web_url=f"http://127.0.0.1:{ports['http']}/dicomweb")
    finally:
        if client is not None:
            client.stop()
        node.stop()


def router_toml(scp_port: int, pacs: Orthanc, client: Orthanc, movescu_port: int) -> str:
    """dicom_scp HARMONY (echo/find/get/move/store) -> dicom_scu to *pacs*; the
    C-MOVE destinations are the client Orthanc and DCMTK's movescu (``MOVESCU``
    on *movescu_port*); DICOMweb over the same PACS at /bridge."""
    destinations = f'{client.aet} = "127.0.0.1:{client.dicom_port}"\nMOVESCU = "127.0.0.1:{movescu_port}"\n'
    return (scp_pipeline("router", "HARMONY", scp_port, "pacs", ("find", "get", "move", "store"),
                         "[endpoints.router_scp.options.move_destinations]\n" + destinations)
            + scu_backend("pacs", pacs.aet, pacs.dicom_port) + bridge_pipeline("bridge", "pacs", "/bridge"))


@pytest.fixture(scope="session")
def router(tmp_path_factory, corpus):
    """Orthanc (client) -> Harmony dicom_scp -> dicom_scu -> Orthanc (PACS, holding the corpus)."""
    root = tmp_path_factory.mktemp("router")
    pacs = Orthanc(root / "pacs", aet="PACS", extra_config={"DefaultEncoding": "Utf8"})
    # Orthanc answers C-FIND/C-GET only to callers it lists: Harmony's SCU, and the client (the oracle).
    pacs.modalities = {"harmony": ("HARMONY_SCU", "127.0.0.1", 1), "client": ("ORTHANC", "127.0.0.1", 1)}
    node = None
    client = None
    try:
        pacs.start()
        pacs.upload(i.path for i in corpus)
        for attempt in range(3):
            # Another process may take one of these "free" ports before Harmony listens
            # (it then exits): pick them all again rather than talk to a stranger.
            scp_port, http_port, movescu_port = free_port(), free_port(), free_port()
            client = client_orthanc(root / f"client{attempt}", harmony_dimse=scp_port, pacs=pacs,
                                    harmony_web=f"http://127.0.0.1:{http_port}/bridge")
            node = Node(root / f"harmony{attempt}", router_toml(scp_port, pacs, client, movescu_port),
                        dimse_ports=[scp_port], http_port=http_port)
            try:
                node.start()
                break
            except RuntimeError:
                if "CannotListenError" not in node.log_text() or attempt == 2:
                    raise
        client.start()
        yield Stack(node=node, client=client, scp_port=scp_port, web_url=node.url("/bridge"), pacs=pacs,
                    movescu_port=movescu_port)
    finally:
        for peer in (client, node, pacs):
            if peer is not None:
                peer.stop()


@pytest.fixture(scope="session")
def gzip_upstreams(tmp_path_factory):
    """Orthanc and nginx answering gzip (see gzip_peers.py)."""
    from tests.interop.gzip_peers import start_upstreams
    yield from start_upstreams(tmp_path_factory.mktemp("gzip"))


@pytest.fixture(scope="session")
def gzip_proxy(tmp_path_factory, gzip_upstreams):
    """Harmony proxying FHIR, HTTP and DICOMweb to the gzip upstreams."""
    from tests.interop.gzip_peers import start_proxy
    node = start_proxy(tmp_path_factory.mktemp("gzip-proxy"), gzip_upstreams)
    yield node
    node.stop()


@pytest.fixture(scope="module")
def load_stack(tmp_path_factory):
    """Harmony with a passthrough to a healthy nginx and a small archive (see load_peers.py)."""
    from tests.interop.load_peers import LoadStack
    stack = LoadStack(tmp_path_factory.mktemp("load"))
    yield stack
    stack.stop()
