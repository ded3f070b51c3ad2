"""Issue 12, defect 1 as a client sees it: bursts of wrk clients that go away
with requests in flight (wrk drops its connections when its time is up;
against a slow body every connection is mid-response, against a queue before
the head) must not change a healthy backend's state - the circuit stays
closed, and the next requests are answered 200 (before defect 1's fix the
circuit opened: 503 for 30 s).  Uploads given up: test_load_upload_aborts.py.
"""

from __future__ import annotations

import requests

from bench.common import wrk


def test_wrk_hangups_leave_a_healthy_backend_alone(load_stack):
    node = load_stack.node
    for _ in range(2):
        # issue 12's reproduction: wrk -t2 -c50 -d3s ends with its 50 connections' requests in flight
        wrk(node.url("/pass/small.txt"), 3, threads=2, connections=50)
        wrk(node.url("/pass/slow.bin"), 1, threads=1, connections=20)  # every response cut mid-body
        wrk(node.url("/pass/queued.txt"), 1, threads=1, connections=20)  # ~all cut before their head
    assert set(load_stack.circuits().values()) == {"closed"}, node.admin("/targets")
    with requests.Session() as s:
        statuses = [s.get(node.url("/pass/small.txt"), timeout=30).status_code for _ in range(20)]
    assert statuses == [200] * 20
    assert "circuit of target" not in node.log_text()
