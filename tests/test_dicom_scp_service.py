"""The DIMSE endpoint as a configured service: started from TOML by twistd
with no HTTP network, listed by ``harmony routes``, stopped promptly; and
middleware, cancellation and the persistent C-MOVE receiver in a pipeline."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest_twisted

from tests.dimse_middleware import OnlyPatient
from tests.harness import start_harmony, write_config
from tests.peers import DCMTK, free_port, peer_env
from tests.endpoints.test_dicom_scp_peers import SCP_AET, find, run

BIN = Path(sys.executable).parent

DIMSE_ONLY = """
[proxy]
id = "dimse-only"
log_level = "info"

[storage.options]
path = "var"

[pipelines.router]
endpoints = ["scp"]
middleware = {middleware}
backends = ["pacs"]

[endpoints.scp]
service = "dicom"
[endpoints.scp.options]
local_aet = "HARMONY"
bind_addr = "127.0.0.1"
port = {scp_port}
enable_find = true
enable_get = true

[backends.pacs]
service = "dicom"
[backends.pacs.options]
aet = "{aet}"
host = "127.0.0.1"
port = {port}
dimse_retrieve_mode = "{mode}"
incoming_store_port = {store_port}
persistent_store_scp = true
"""


def dimse_only(tmp_path, orthanc, *, middleware="[]", mode="get", store_port=None):
    scp_port = free_port()
    text = DIMSE_ONLY.format(scp_port=scp_port, aet=orthanc.aet, port=orthanc.dicom_port, middleware=middleware,
                             mode=mode, store_port=store_port or free_port())
    if middleware != "[]":
        text += '\n[middleware_types.only_patient]\nmodule = "tests.dimse_middleware:OnlyPatient"\n' \
                '[middleware.only]\nservice = "only_patient"\n'
    return write_config(tmp_path, text), scp_port


def test_twistd_runs_a_dimse_only_config_and_stops_promptly(tmp_path, orthanc):
    orthanc.add_modality("harmony_scu", "HARMONY_SCU", free_port())
    orthanc.add_modality("findscu", "FINDSCU", free_port())
    path, scp_port = dimse_only(tmp_path, orthanc)
    routes = subprocess.run([str(BIN / "harmony"), "routes", "-c", str(path)], capture_output=True, text=True)
    assert routes.returncode == 0, routes.stderr
    assert any(f"dimse:127.0.0.1:{scp_port} aet=HARMONY" in line and "scp" in line and "router" in line
               for line in routes.stdout.splitlines()), routes.stdout
    proc = subprocess.Popen([str(BIN / "twistd"), "-n", "--pidfile=", "harmony", "-c", str(path)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "dicom_scp scp listening" in line:
                break
        r = subprocess.run([DCMTK["findscu"], "-v", "-S", "-aet", "FINDSCU", "-aec", SCP_AET, "-k",
                            "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "127.0.0.1", str(scp_port)],
                           capture_output=True, env=peer_env(), timeout=60)
        assert b"Received Final Find Response (Success)" in r.stderr, r.stderr
        assert r.stderr.count(b"(Pending)") == 4  # one per study
    finally:
        proc.send_signal(signal.SIGTERM)
        # ae.shutdown runs before reactor shutdown; without it this waits ~30 s on pynetdicom threads
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Server Shut Down." in out


@pytest_twisted.ensureDeferred
async def test_middleware_sees_and_edits_dimse_requests(tmp_path, orthanc):
    orthanc.add_modality("harmony_scu", "HARMONY_SCU", free_port())
    orthanc.add_modality("findscu", "FINDSCU", free_port())
    OnlyPatient.seen.clear()
    path, scp_port = dimse_only(tmp_path, orthanc, middleware='["only"]')
    running = await start_harmony(path)
    try:
        keys = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientID"]
        everything, _ = await find(orthanc.dicom_port, orthanc.aet, "-S", keys, tmp_path / "direct")
        narrowed, _ = await find(scp_port, SCP_AET, "-S", keys, tmp_path / "proxied")
        assert len(everything) == 4 and len(narrowed) == 1
        assert json.loads(narrowed[0])["00100020"]["Value"] == ["PAT002"]
        md = OnlyPatient.seen[-1]
        assert md["protocol"] == "dimse" and md["dimse_op"] == "C-FIND" and md["calling_aet"] == "FINDSCU"
        assert md["called_aet"] == "HARMONY" and md["query_level"] == "STUDY"
        assert md["sop_class_uid"] == "1.2.840.10008.5.1.4.1.2.2.1"
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_getscu_through_a_move_mode_backend(tmp_path, orthanc):
    """SCP C-GET served by a backend that retrieves by C-MOVE into its
    persistent C-STORE SCP: two requests, one receiver."""
    store_port = free_port()
    orthanc.add_modality("harmony_scu", "HARMONY_SCU", store_port)
    path, scp_port = dimse_only(tmp_path, orthanc, mode="move", store_port=store_port)
    running = await start_harmony(path)
    try:
        for n in (1, 2):
            out = tmp_path / f"get{n}"
            out.mkdir()
            r = await run("getscu", "-S", "-aec", SCP_AET, "-od", out, "-k", "QueryRetrieveLevel=SERIES",
                          "-k", "StudyInstanceUID=1.2.826.0.1.3680043.10.543.1.4",
                          "-k", "SeriesInstanceUID=1.2.826.0.1.3680043.10.543.1.4.2", "127.0.0.1", scp_port)
            assert r.returncode == 0, r.stderr
            assert len(list(out.iterdir())) == 3
        backend = running.service.runtime.backends["pacs"]
        assert backend._store_scp is not None  # persistent_store_scp keeps it up between moves
    finally:
        await running.stop()
    assert backend._store_scp is None


SLOW = """
[proxy]
id = "cancel"

[backend_types.one_then_wait]
module = "tests.dimse_backends:OneThenWait"

[pipelines.p]
endpoints = ["scp"]
backends = ["slow"]

[endpoints.scp]
service = "dicom_scp"
[endpoints.scp.options]
local_aet = "HARMONY"
bind_addr = "127.0.0.1"
port = {port}
enable_find = true
enable_move = true
move_destinations = {{ STORESCP = "127.0.0.1:{dest_port}" }}

[backends.slow]
service = "one_then_wait"
[backends.slow.options]
file = "{file}"
"""


@pytest_twisted.ensureDeferred
async def test_cancel_reaches_a_backend_that_is_still_working(tmp_path, corpus):
    """C-CANCEL while the backend has more to give: the SCP notices it without
    waiting for the backend, cancels the stream, answers Cancel (0xFE00), and
    the instance it had staged is released."""
    from tests.dimse_backends import OneThenWait
    from tests.peers import Storescp
    OneThenWait.cancelled.clear()
    dest = Storescp(tmp_path / "dest").start()
    port = free_port()
    source = tmp_path / "one.dcm"
    source.write_bytes(corpus[0].path.read_bytes())
    running = await start_harmony(write_config(tmp_path, SLOW.format(port=port, dest_port=dest.port, file=source)))
    try:
        r = await run("findscu", "-v", "-S", "-aet", "FINDSCU", "-aec", SCP_AET, "--cancel", "1",
                      "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID", "127.0.0.1", port)
        assert b"Received Final Find Response (Cancel: MatchingTerminatedDueToCancelRequest)" in r.stderr, r.stderr
        assert r.stderr.count(b"(Pending)") == 1
        r = await run("movescu", "-v", "-S", "-aec", SCP_AET, "-aem", "STORESCP", "--cancel", "1",
                      "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3", "127.0.0.1", port)
        assert b"Received Final Move Response (Cancel" in r.stderr, r.stderr
        assert len(dest.files()) == 1
        assert OneThenWait.cancelled == ["C-FIND", "C-MOVE"]
        assert not Path(str(source) + ".copy").exists()  # the staged instance was released
    finally:
        await running.stop()
        dest.stop()


NOT_DICOM = """
[proxy]
id = "limits"

[pipelines.p]
endpoints = ["scp"]
backends = ["echo"]

[endpoints.scp]
service = "dicom_scp"
[endpoints.scp.options]
local_aet = "HARMONY"
bind_addr = "127.0.0.1"
port = {port}
enable_find = true
max_associations = 1

[backends.echo]
service = "echo"
"""


@pytest_twisted.ensureDeferred
async def test_association_limit(tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification
    from twisted.internet import threads
    port = free_port()
    running = await start_harmony(write_config(tmp_path, NOT_DICOM.format(port=port)))
    try:
        ae = AE("HOLDER")
        ae.add_requested_context(Verification)
        held = await threads.deferToThread(ae.associate, "127.0.0.1", port, ae_title=SCP_AET)
        assert held.is_established
        try:
            r = await run("echoscu", "-v", "-aec", SCP_AET, "127.0.0.1", port)
            assert r.returncode != 0 and b"Local Limit Exceeded" in r.stderr, r.stderr
        finally:
            await threads.deferToThread(held.release)
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_non_dicom_backend_is_a_failure_not_an_empty_answer(tmp_path):
    port = free_port()
    running = await start_harmony(write_config(tmp_path, NOT_DICOM.format(port=port)))
    try:
        r = await run("findscu", "-d", "-S", "-aec", SCP_AET, "-k", "QueryRetrieveLevel=STUDY",
                      "127.0.0.1", port)
        assert b"Received Final Find Response" in r.stderr, r.stderr
        assert b"0xc000" in r.stderr.split(b"Received Final Find Response", 1)[1]
    finally:
        await running.stop()
