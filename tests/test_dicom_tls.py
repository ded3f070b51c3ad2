"""DICOM TLS: Harmony's SCP with client-certificate checking, and the
``dicom_scu`` backend speaking TLS to it (HTTP -> SCU/TLS -> SCP/TLS -> SCU -> Orthanc)."""

import json

import pytest_twisted

from tests.dimse_helpers import canonical, direct_find
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.peers import free_port
from tests.test_dicom_scp import SCP_AET, run
from tests.tls_certs import make_pki
from pydicom.dataset import Dataset

CONFIG = """
[pipelines.router]
endpoints = ["scp"]
backends = ["pacs"]

[endpoints.scp]
service = "dicom_scp"
[endpoints.scp.options]
local_aet = "HARMONY"
bind_addr = "127.0.0.1"
port = {scp_port}
enable_find = true
tls_cert = "{server_crt}"
tls_key = "{server_key}"
tls_ca = "{ca}"

[backends.pacs]
service = "dicom_scu"
[backends.pacs.options]
aet = "{aet}"
host = "127.0.0.1"
port = {port}

[pipelines.http]
networks = ["default"]
endpoints = ["q"]
backends = ["tls_scu"]

[endpoints.q]
service = "http"
[endpoints.q.options]
path_prefix = "/q"

[backends.tls_scu]
service = "dicom_scu"
[backends.tls_scu.options]
aet = "HARMONY"
host = "127.0.0.1"
port = {scp_port}
use_tls = true
tls_cert = "{client_crt}"
tls_key = "{client_key}"
tls_ca = "{ca}"
"""


@pytest_twisted.ensureDeferred
async def test_tls_scp_requires_a_client_certificate(tmp_path, orthanc):
    orthanc.add_modality("harmony_scu", "HARMONY_SCU", free_port())
    pki = make_pki(tmp_path / "pki")
    scp_port = free_port()
    path = write_config(tmp_path, MINIMAL_MAIN, {"p": CONFIG.format(
        scp_port=scp_port, aet=orthanc.aet, port=orthanc.dicom_port, ca=pki["ca"],
        server_key=pki["server"][0], server_crt=pki["server"][1],
        client_key=pki["client"][0], client_crt=pki["client"][1])})
    running = await start_harmony(path)
    try:
        r = await run("echoscu", "+tls", pki["client"][0], pki["client"][1], "+cf", pki["ca"],
                      "-aec", SCP_AET, "127.0.0.1", scp_port)
        assert r.returncode == 0, r.stderr
        r = await run("echoscu", "+tla", "+cf", pki["ca"], "-aec", SCP_AET, "127.0.0.1", scp_port)
        assert r.returncode != 0  # no client certificate: the TLS handshake fails
        r = await run("echoscu", "-aec", SCP_AET, "127.0.0.1", scp_port)
        assert r.returncode != 0  # plain TCP to a TLS port

        import treq
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = ""
        ident.PatientID = ""
        resp = await treq.post(running.url("/q"), json.dumps(
            {"dimse_op": "C-FIND", "identifier": ident.to_json_dict()}).encode(),
            headers={"Content-Type": ["application/json"]})
        assert resp.code == 200
        got = await resp.json()
        from twisted.internet import threads
        expected = await threads.deferToThread(direct_find, "127.0.0.1", orthanc.dicom_port, orthanc.aet, ident)
        assert canonical(got) == canonical(expected) and len(got) == 4
    finally:
        await running.stop()
