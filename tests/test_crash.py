"""Kill -9 test: a real ``twistd harmony`` process ingesting over HTTP is killed
with SIGKILL at random moments (during ingest and during delivery) and
restarted, while its forward target (Orthanc) is down at first.  Every instance
that got a 200 must end up in Orthanc, once; nothing never sent appears there.

Plain synchronous test: it drives processes, not the reactor.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.dicom_data import UID_ROOT, make_instance, save
from tests.peers import Orthanc, free_port, port_open, wait_for

N_INSTANCES = 500
KILLS_DURING_INGEST = 4
TWISTD = str(Path(sys.executable).with_name("twistd"))


class HarmonyProcess:
    def __init__(self, folder: Path, config: Path):
        self.folder = folder
        self.config = config
        self.proc = None
        self.starts = 0

    def start(self, port: int):
        self.starts += 1
        log = open(self.folder / f"twistd-{self.starts}.log", "wb")
        self.proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "harmony", "-c", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        wait_for(lambda: port_open(port), 60, "harmony (twistd)", self.proc)

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)


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
    port = free_port()
    folder = tmp_path / "harmony"
    folder.mkdir()
    config = folder / "harmony.toml"
    config.write_text(textwrap.dedent(f"""
        [proxy]
        id = "crash"
        log_level = "info"

        [network.default.http]
        bind_address = "127.0.0.1"
        bind_port = {port}

        [storage.options]
        path = "store"
        min_free_mb = 0

        [endpoints.ingest]
        service = "http"
        path_prefix = "/ingest"

        [backends.sf]
        service = "store_forward"
        forward_to = ["orthanc"]
        backoff_initial_seconds = 0.1
        backoff_max_seconds = 0.5
        max_attempts = 1000000

        [backends.orthanc]
        service = "http"
        base_url = "{orthanc.url}/instances"

        [pipelines.ingest]
        endpoints = ["ingest"]
        backends = ["sf"]
        """))
    bodies = []
    for i in range(1, N_INSTANCES + 1):
        ds = make_instance(patient_id="CRASH", study_uid=f"{UID_ROOT}66.1", series_uid=f"{UID_ROOT}66.1.{i % 5}",
                           sop_uid=f"{UID_ROOT}66.1.{i % 5}.{i}", instance_number=i, rows=8, cols=8)
        bodies.append((str(ds.SOPInstanceUID), save(ds, tmp_path / "in" / f"{i}.dcm").read_bytes()))
    harmony = HarmonyProcess(folder, config)
    url = f"http://127.0.0.1:{port}/ingest"
    acked, unanswered = set(), set()
    try:
        harmony.start(port)
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
                harmony.start(port)
        assert len(acked) >= N_INSTANCES - KILLS_DURING_INGEST
        orthanc.start()
        # One more kill while the queue drains into Orthanc.
        time.sleep(rnd.uniform(0.05, 0.5))  # a random kill moment, not synchronisation
        harmony.kill()
        harmony.start(port)

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
        orthanc.stop()


def sops_in(orthanc) -> list[str]:
    return [i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.rest("GET", "/instances?expand")]
