"""DICOM TLS: Harmony's SCP with client-certificate checking, and the
``dicom_scu`` backend speaking TLS to it (HTTP -> SCU/TLS -> SCP/TLS -> SCU -> Orthanc)."""

import json

import pytest_twisted
from pydicom.dataset import Dataset

from tests.dimse_helpers import canonical, direct_find, scu_backend
from tests.harness import MINIMAL_MAIN, http_pipeline, start_harmony, write_config
from tests.peers import free_port
from tests.endpoints.test_dicom_scp_peers import SCP_AET, run
from tests.tls_certs import make_pki

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


# --------------------------------------------------------------------------- our SCU against DCMTK's TLS SCP

def tls_store_pipeline(name: str, port: int, ca, cert: str) -> str:
    """TOML: HTTP at /*name* -> a ``dicom_scu`` backend *name* storing to STORESCP over TLS."""
    return (http_pipeline(name, f"/{name}", f"{name}_in", name, "") + scu_backend(name, "STORESCP", port)
            + f'use_tls = true\ntls_ca = "{ca}"\nconnect_timeout_secs = 5\nacse_timeout_secs = 5\n{cert}\n')


class TlsStorescp:
    """DCMTK ``storescp +tls``: its own certificate, and (its default) a client
    certificate signed by *ca* required of every peer."""

    def __init__(self, folder, key, cert, ca):
        import subprocess

        from tests.peers import DCMTK, peer_env, port_open, require, wait_for
        require(DCMTK["storescp"])
        self.folder = folder
        folder.mkdir(parents=True)
        self.port = free_port()
        self.log = open(folder.parent / "storescp-tls.log", "wb")
        self.proc = subprocess.Popen([DCMTK["storescp"], "+tls", str(key), str(cert), "+cf", str(ca),
                                      "--require-peer-cert", "--fork", "--aetitle", "STORESCP", "-od", str(folder),
                                      str(self.port)], stdout=self.log, stderr=subprocess.STDOUT, env=peer_env())
        wait_for(lambda: port_open(self.port), 30, "storescp +tls", self.proc)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest_twisted.ensureDeferred
async def test_scu_stores_to_dcmtk_storescp_over_tls_and_a_wrong_ca_fails_fast(tmp_path):
    import time

    import treq
    from pydicom import dcmread

    from tests.dicom_data import make_instance, save
    pki = make_pki(tmp_path / "pki")
    stranger = make_pki(tmp_path / "stranger")  # another CA: trusts nothing storescp has
    storescp = TlsStorescp(tmp_path / "received", pki["server"][0], pki["server"][1], pki["ca"])
    client = f'tls_cert = "{pki["client"][1]}"\ntls_key = "{pki["client"][0]}"'
    stranger_client = f'tls_cert = "{stranger["client"][1]}"\ntls_key = "{stranger["client"][0]}"'
    pipes = "".join(tls_store_pipeline(name, storescp.port, ca, cert) for name, ca, cert in (
        ("good", pki["ca"], client),                 # both certificates check out
        ("wrongca", stranger["ca"], client),         # we cannot verify storescp's certificate
        ("nocert", pki["ca"], ""),                   # storescp requires ours
        ("othercert", pki["ca"], stranger_client)))  # ours is signed by a CA storescp does not know
    path = write_config(tmp_path, MINIMAL_MAIN, {"p": pipes})
    running = await start_harmony(path)
    instance = save(make_instance(patient_id="TLS"), tmp_path / "in.dcm")
    body = instance.read_bytes()
    try:
        resp = await treq.post(running.url("/good?dimse_op=C-STORE"), body,
                               headers={"Content-Type": ["application/dicom"]})
        assert resp.code == 200, await resp.text()
        received = [p for p in storescp.folder.rglob("*") if p.is_file()]
        assert len(received) == 1
        assert dcmread(received[0]).SOPInstanceUID == dcmread(instance).SOPInstanceUID

        for name in ("wrongca", "nocert", "othercert"):
            started = time.monotonic()
            resp = await treq.post(running.url(f"/{name}?dimse_op=C-STORE"), body,
                                   headers={"Content-Type": ["application/dicom"]})
            text = await resp.text()
            assert resp.code in (502, 503), (name, resp.code, text)
            assert resp.headers.getRawHeaders("content-type")[0].startswith("application/problem+json")
            assert time.monotonic() - started < 10, f"{name}: the refusal took as long as a timeout"
            backend = running.service.runtime.backends[name]
            state = backend.target_pool.snapshot()["targets"][0]
            assert state["failures_total"] >= 1 and state["last_error"], (name, state)
            # The cause is named where the operator looks: the answer and the target's last error.
            assert "TLS handshake failed" in text and "TLS handshake failed" in state["last_error"], (state, text)
            if name == "wrongca":
                assert "certificate verify failed" in text, text
        assert len([p for p in storescp.folder.rglob("*") if p.is_file()]) == 1
    finally:
        await running.stop()
        storescp.stop()
