"""Issue 12, defect 13 as a client sees it: curl uploads (chunked, to a
passthrough in front of Orthanc, which waits for whole bodies) given up by
curl's own ``--max-time`` halfway through must not count against the
upstream: its circuit stays closed and the next request is answered (before
defect 13's fix the circuit opened).
"""

from __future__ import annotations

import subprocess

import requests

from tests.peers import require

CURL = "/usr/bin/curl"


def test_curl_uploads_cut_midway_leave_the_upstream_alone(load_stack):
    node = load_stack.node
    uploads = []
    for _ in range(6):  # more than the circuit's default 5 consecutive failures
        p = subprocess.Popen([require(CURL), "-sS", "-o", "/dev/null", "--max-time", "1", "-X", "POST",
                              "-H", "Content-Type: application/dicom",
                              "-T", "-", node.url("/orthanc/instances")],
                             stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdin.write(b"\0" * 65536)  # a first part of the body; the rest never comes
        p.stdin.flush()
        uploads.append(p)
    for p in uploads:
        assert p.wait(30) == 28, p.stderr.read()  # 28: curl gave up at --max-time, mid-body
        p.stdin.close()
        p.stderr.close()
    assert set(load_stack.circuits("upload_up").values()) == {"closed"}, node.admin("/targets")
    r = requests.get(node.url("/orthanc/system"), timeout=30)
    assert r.status_code == 200 and r.json()["Name"]
    assert "circuit of target" not in node.log_text()
