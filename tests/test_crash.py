"""Kill -9 test: a real ``twistd harmony`` process ingesting over HTTP is killed
with SIGKILL at random moments (during ingest and during delivery) and
restarted, while its forward target (Orthanc) is down at first.  Every instance
that got a 200 must end up in Orthanc, once; nothing never sent appears there.

Plain synchronous test: it drives processes, not the reactor.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
import urllib.error
import urllib.request

from tests.peers import Orthanc, free_port, wait_for
from tests.sf_helpers import HarmonyProcess, PortHold, ingest_config, make_instances

N_INSTANCES = 500
KILLS_DURING_INGEST = 4


def post(url: str, data: bytes) -> int | None:
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/dicom"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError, OSError):
        return None  # killed mid-request: no answer is not a Success


def test_sigkill_at_random_points_loses_nothing_acknowledged(tmp_path):
    rnd = random.Random(int(os.environ.get("HARMONY_CRASH_SEED", "0")) or None)
    orthanc = Orthanc(tmp_path / "orthanc")  # ports chosen; started only later (an outage)
    hold = PortHold(orthanc.http_port)
    port = free_port()
    folder = tmp_path / "harmony"
    folder.mkdir()
    (folder / "harmony.toml").write_text(ingest_config(orthanc.url, port=port, sf_options="""
backoff_initial_seconds = 0.1
backoff_max_seconds = 0.5
max_attempts = 1000000"""))
    bodies = [(sop_of(p), p.read_bytes()) for p in make_instances(tmp_path / "in", N_INSTANCES, 66, patient_id="CRASH",
                                                                   series=5, size=8)]
    harmony = HarmonyProcess(folder, [port])
    url = f"http://127.0.0.1:{port}/ingest"
    acked, unanswered = set(), set()
    try:
        harmony.start()
        kills = sorted(rnd.sample(range(20, N_INSTANCES - 20), KILLS_DURING_INGEST))
        for n, (sop, body) in enumerate(bodies):
            if kills and n == kills[0]:
                kills.pop(0)
                # Kill at a random moment inside the next request (fsync, rename, commit...).
                threading.Timer(rnd.uniform(0, 0.02), harmony.kill).start()
            status = post(url, body)
            if status == 200:
                acked.add(sop)
            else:
                assert status is None, f"unexpected HTTP {status}"
                unanswered.add(sop)
                harmony.kill()
                harmony.start()
        assert len(acked) >= N_INSTANCES - KILLS_DURING_INGEST
        hold.release()
        orthanc.start()
        # One more kill while the queue drains into Orthanc.
        time.sleep(rnd.uniform(0.05, 0.5))  # a random kill moment, not synchronisation
        harmony.kill()
        harmony.start()

        assert harmony.starts == 1 + KILLS_DURING_INGEST + 1

        def delivered():
            return acked <= set(sops_in(orthanc))

        wait_for(delivered, 120, "every acknowledged instance in Orthanc")
        in_orthanc = sops_in(orthanc)
        assert len(in_orthanc) == len(set(in_orthanc)), "an instance is in Orthanc twice"
        assert set(in_orthanc) <= acked | unanswered, "Orthanc holds an instance nobody sent"
        # The queue agrees: nothing dead, nothing lost.
        db = sqlite3.connect(folder / "store" / "index.sqlite")
        try:
            states = dict(db.execute("SELECT state, count(*) FROM queue GROUP BY state").fetchall())
            indexed = {r[0] for r in db.execute("SELECT sop_uid FROM instances")}
        finally:
            db.close()
        assert states.get("dead", 0) == 0
        assert acked <= indexed
    finally:
        harmony.kill()
        hold.release()
        orthanc.stop()


def sop_of(path) -> str:
    from pydicom import dcmread
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def sops_in(orthanc) -> list[str]:
    return [i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.rest("GET", "/instances?expand")]
