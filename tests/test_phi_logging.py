"""PHI stays out of the log at info level, end to end: a synthetic patient is
stored by C-STORE, then looked up by DICOMweb QIDO (PatientName, PatientID and
PatientBirthDate in the query string) and by DIMSE C-FIND through Harmony
(findscu from DCMTK), with log_level = "info".  No event in the log names the
patient, the query values or the birth date."""

from __future__ import annotations

import pytest_twisted
import treq
from twisted.logger import formatEvent, globalLogPublisher

from tests.dicom_data import make_instance
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.peers import free_port
from tests.endpoints.test_dicom_scp_peers import run

NAME, PID, DOB = "PHIPROBE^ZELDA", "PHIPID4711", "19121231"
SECRETS = ["PHIPROBE", "ZELDA", PID, DOB]

PIPELINES = """
[pipelines.archive]
endpoints = ["archive_scp"]
backends = ["archive"]
[endpoints.archive_scp]
service = "dicom_scp"
[endpoints.archive_scp.options]
local_aet = "ARCHIVE"
bind_addr = "127.0.0.1"
port = {archive_port}
enable_store = true
enable_find = true
enable_get = true
[backends.archive]
service = "local_archive"

[pipelines.front]
endpoints = ["front_scp"]
backends = ["pacs"]
[endpoints.front_scp]
service = "dicom_scp"
[endpoints.front_scp.options]
local_aet = "FRONT"
bind_addr = "127.0.0.1"
port = {front_port}
enable_find = true

[pipelines.web]
networks = ["default"]
endpoints = ["web"]
middleware = ["bridge"]
backends = ["pacs"]
[endpoints.web]
service = "dicomweb"
[endpoints.web.options]
path_prefix = "/dicomweb"
[middleware.bridge]
type = "dicomweb_bridge"

[backends.pacs]
service = "dicom_scu"
[backends.pacs.options]
aet = "ARCHIVE"
host = "127.0.0.1"
port = {archive_port}
local_aet = "HARMONY"
"""


@pytest_twisted.ensureDeferred
async def test_qido_and_cfind_leave_no_phi_in_the_info_log(tmp_path):
    archive_port, front_port = free_port(), free_port()
    main = MINIMAL_MAIN.replace('log_level = "debug"', 'log_level = "info"')
    assert 'log_level = "info"' in main
    path = write_config(tmp_path, main, {"p": PIPELINES.format(archive_port=archive_port, front_port=front_port)})
    ds = make_instance(patient_id=PID, patient_name=NAME)
    ds.PatientBirthDate = DOB
    dcm = tmp_path / "probe.dcm"
    ds.save_as(dcm, enforce_file_format=True)

    events = []
    globalLogPublisher.addObserver(events.append)
    running = await start_harmony(path)
    try:
        r = await run("storescu", "-aec", "ARCHIVE", "127.0.0.1", archive_port, dcm)
        assert r.returncode == 0, r.stderr
        resp = await treq.get(running.url(f"/dicomweb/studies?PatientName=PHIPROBE*&PatientID={PID}"
                                          f"&PatientBirthDate={DOB}&includefield=PatientBirthDate"))
        body = await resp.content()
        assert resp.code == 200 and PID.encode() in body  # the query did find the patient
        r = await run("findscu", "-v", "-S", "-aet", "FINDSCU", "-aec", "FRONT",
                      "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientName=PHIPROBE*", "-k", f"PatientID={PID}",
                      "-k", f"PatientBirthDate={DOB}", "127.0.0.1", front_port)
        assert PID.encode() in r.stderr and b"Final Find Response (Success)" in r.stderr, r.stderr
    finally:
        await running.stop()
        globalLogPublisher.removeObserver(events.append)

    harmony_events = [e for e in events if str(e.get("log_namespace", "")).startswith("harmony")]
    assert any(e.get("log_namespace") == "harmony.access" for e in harmony_events)  # the log did record requests
    text = "\n".join(f"{formatEvent(e)} {e!r}" for e in events)
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, [line for line in text.splitlines() if any(s in line for s in leaked)][:5]
