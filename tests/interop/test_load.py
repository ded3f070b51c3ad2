"""Real load against Harmony, by wrk, DCMTK and requests at once: a mixed soak
(HTTP passthrough to nginx by wrk, C-STORE and C-FIND by DCMTK, QIDO-RS by
requests) with zero errors and flat memory (the Harmony process's RSS sampled
throughout).

The soak lasts ``HARMONY_SOAK_SECS`` seconds, 20 by default so that the suite
stays fast; issue 12's 60 s figure is ``HARMONY_SOAK_SECS=60`` (figures in
docs/interop.md).  Client hang-ups under load: test_load_aborts.py, test_load_upload_aborts.py.
"""

from __future__ import annotations

import os
import threading
import time

import requests

from bench.common import wrk
from tests.dicom_data import make_instance, save, uid
from tests.interop.load_peers import RssSampler
from tests.interop.support import dcmtk

SOAK_SECS = int(os.environ.get("HARMONY_SOAK_SECS", "20"))
#: RSS may grow this much between the warm part of the soak and its end (allocator
#: noise and caches filling); a leak at soak rates exceeds it within seconds.
MAX_GROWTH_MIB = 12


class Loop(threading.Thread):
    """Runs *step* until *deadline*; counts successes and keeps the first failures."""

    def __init__(self, step, deadline: float):
        super().__init__(daemon=True)
        self.step, self.deadline = step, deadline
        self.ok, self.failures = 0, []

    def run(self):
        while time.monotonic() < self.deadline:
            try:
                self.step()
                self.ok += 1
            except Exception as e:  # noqa: BLE001 - every failure is a finding, kept for the report
                self.failures.append(repr(e)[:300])


def test_mixed_soak(load_stack, tmp_path):
    stack, node = load_stack, load_stack.node
    files = [save(make_instance(patient_id="IOPSOAK", study_uid=uid(7, 6), series_uid=uid(7, 6, 1),
                                sop_uid=uid(7, 6, 1, i), instance_number=i, seed=i), tmp_path / f"{i}.dcm")
             for i in range(1, 4)]

    def store_and_find():
        r = dcmtk("storescu", "-aec", "HARMONY", "127.0.0.1", stack.scp_port, *files)
        assert r.returncode == 0, r.stderr
        r = dcmtk("findscu", "-v", "-S", "-aec", "HARMONY", "-k", "QueryRetrieveLevel=SERIES",
                  "-k", f"StudyInstanceUID={uid(7, 6)}", "-k", "SeriesInstanceUID", "127.0.0.1", stack.scp_port)
        log = (r.stdout + r.stderr).decode(errors="replace")
        assert r.returncode == 0 and "Received Final Find Response (Success)" in log, log

    session = requests.Session()

    def qido():
        r = session.get(node.url("/dicomweb/instances"), params={"PatientID": "IOPSOAK"}, timeout=30)
        assert r.status_code == 200 and len(r.json()) == 3, (r.status_code, r.text[:200])

    store_and_find()  # the study exists before QIDO asks for it
    sampler = RssSampler(node.proc.pid)
    sampler.start()
    deadline = time.monotonic() + SOAK_SECS
    loops = {"dimse": Loop(store_and_find, deadline), "qido": Loop(qido, deadline)}
    for loop in loops.values():
        loop.start()
    # wrk runs past the loops' deadline so its own end (it drops connections in
    # flight) never overlaps them; one thread, 8 connections: the 2 cores stay shared.
    http = wrk(node.url("/pass/small.txt"), SOAK_SECS + 1, threads=1, connections=8)
    for loop in loops.values():
        loop.join(timeout=120)
    memory = sampler.finish()
    figures = {"secs": SOAK_SECS, "http_requests": http["total"], "http_rps": http["rps"],
               "http_p99_ms": http["p99_ms"], "http_errors": http["errors"], "dimse_cycles": loops["dimse"].ok,
               "qido": loops["qido"].ok, **memory}
    print("\nsoak figures:", figures)
    assert http["total"] > 0 and http["errors"] == 0, http
    for name, loop in loops.items():
        assert loop.ok > 0 and not loop.failures, (name, loop.failures[:3])
    assert memory["growth_mib"] <= MAX_GROWTH_MIB, figures
