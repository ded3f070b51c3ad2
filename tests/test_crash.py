"""Kill -9 tests: a real ``twistd harmony`` process ingesting (HTTP Part-10
POSTs, DCMTK ``storescu`` C-STOREs, or STOW-RS through the ``dicomweb_bridge``)
into ``store_forward`` is killed with
SIGKILL at random moments - during ingest and during delivery - and
restarted, while its forward target (Orthanc) is down at first.  Every
instance that got Success/200 must end up in Orthanc, once; nothing that was
never sent appears there; nothing is dead-lettered.

Plain synchronous tests: they drive processes, not the reactor.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request

from pydicom import dcmread

from tests.peers import DCMTK, Orthanc, free_port, peer_env, wait_for
from tests.dicomweb_helpers import multipart
from tests.sf_helpers import (HarmonyProcess, PortHold, dimse_toml, ingest_config, make_instances, sops_in,
                              stow_forward_toml)

N_INSTANCES = 500
KILLS_DURING_INGEST = 4
SF_OPTIONS = """
backoff_initial_seconds = 0.1
backoff_max_seconds = 0.5
max_attempts = 1000000"""
class Rig:
    """Orthanc (down until :meth:`target_up`) and a Harmony process forwarding to it."""

    def __init__(self, tmp_path, protocol: str, n: int = N_INSTANCES):
        seed = int(os.environ.get("HARMONY_CRASH_SEED", "0")) or random.randrange(1, 2**31)
        print(f"kill points from HARMONY_CRASH_SEED={seed}")  # shown on failure: rerun with it to reproduce
        self.rnd = random.Random(seed)
        self.orthanc = Orthanc(tmp_path / "orthanc")
        self.hold = PortHold(self.orthanc.dicom_port if protocol == "dimse" else self.orthanc.http_port)
        self.http_port, self.dimse_port = free_port(), free_port()
        self.folder = tmp_path / "harmony"
        self.folder.mkdir()
        if protocol == "dimse":
            extra = dimse_toml(self.dimse_port, "sf", self.orthanc.aet, self.orthanc.dicom_port)
            text = ingest_config(self.orthanc.url, port=self.http_port, sf_options=SF_OPTIONS, extra=extra)
            text = text.replace('forward_to = ["orthanc"]', 'forward_to = ["pacs"]')
            ports = [self.http_port, self.dimse_port]
        elif protocol == "stow":
            # STOW-RS in, delivered by STOW-RS (the dicomweb backend) to Orthanc's DICOMweb plugin.
            text = (f'[network.default.http]\nbind_address = "127.0.0.1"\nbind_port = {self.http_port}\n'
                    + stow_forward_toml('["cloud"]', sf_options=SF_OPTIONS)
                    + f'\n[backends.cloud]\nservice = "dicomweb"\n[backends.cloud.options]\n'
                      f'base_url = "{self.orthanc.dicomweb_url}"\n')
            ports = [self.http_port]
        else:
            text = ingest_config(self.orthanc.url, port=self.http_port, sf_options=SF_OPTIONS)
            ports = [self.http_port]
        (self.folder / "harmony.toml").write_text(text)
        self.harmony = HarmonyProcess(self.folder, ports)
        self.files = make_instances(tmp_path / "in", n, 66, patient_id="CRASH", series=5, size=8)
        self.sops = {str(p): str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.files}

    def kill_soon(self, within: float):
        # Kill the process running *now*: a timer that fires late must never hit
        # the process a restart has just started (that would be a kill nobody
        # planned, and could land inside HarmonyProcess.start's readiness wait).
        proc = self.harmony.proc
        timer = threading.Timer(self.rnd.uniform(0, within), self.harmony.kill, kwargs={"proc": proc})
        timer.start()
        return timer

    def after_kill(self, timer):
        """Wait until *timer*'s kill has happened and, when no request noticed it yet (a
        timer that fired late, between requests), restart: the next planned kill is then
        armed on its own, new and listening process, never on the one already killed."""
        if timer is None:
            return
        timer.join()
        if self.harmony.proc.poll() is not None:
            self.harmony.start()

    def target_up_and_kill_while_draining(self):
        self.hold.release()
        self.orthanc.start()
        time.sleep(self.rnd.uniform(0.05, 0.5))  # a random kill moment, not synchronisation
        self.harmony.kill()
        self.harmony.start()

    def check(self, acked: set, sent: set):
        wait_for(lambda: acked <= set(sops_in(self.orthanc)), 120, "every acknowledged instance in Orthanc")
        in_orthanc = sops_in(self.orthanc)
        assert len(in_orthanc) == len(set(in_orthanc)), "an instance is in Orthanc twice"
        assert set(in_orthanc) <= sent, "Orthanc holds an instance nobody sent"
        db = sqlite3.connect(self.folder / "store" / "index.sqlite")
        try:
            states = dict(db.execute("SELECT state, count(*) FROM queue GROUP BY state").fetchall())
            indexed = {r[0] for r in db.execute("SELECT sop_uid FROM instances")}
        finally:
            db.close()
        assert states.get("dead", 0) == 0
        assert acked <= indexed

    def close(self):
        self.harmony.kill()
        self.hold.release()
        self.orthanc.stop()


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


def test_http_ingest_killed_at_random_points_loses_nothing_acknowledged(tmp_path):
    rig = Rig(tmp_path, "http")
    url = f"http://127.0.0.1:{rig.http_port}/ingest"
    acked, sent = set(), set()
    try:
        rig.harmony.start()
        # Each planned kill lands on its own process: the previous kill has happened and
        # its restart is listening (HarmonyProcess.start checks the new pid) before the next
        # one is armed, however late a loaded machine runs the kill timer.
        kills = sorted(rig.rnd.sample(range(20, N_INSTANCES - 20, 3), KILLS_DURING_INGEST))
        pending = None
        for n, path in enumerate(rig.files):
            if kills and n == kills[0]:
                kills.pop(0)
                rig.after_kill(pending)
                pending = rig.kill_soon(0.02)  # inside the next request: fsync, rename, commit...
            sop = rig.sops[str(path)]
            sent.add(sop)
            status = post(url, path.read_bytes())
            if status == 200:
                acked.add(sop)
            else:
                assert status is None, f"unexpected HTTP {status}"
                rig.harmony.kill()
                rig.harmony.start()
        rig.after_kill(pending)
        assert rig.harmony.starts == 1 + KILLS_DURING_INGEST
        assert len(acked) >= N_INSTANCES - KILLS_DURING_INGEST
        rig.target_up_and_kill_while_draining()
        rig.check(acked, sent)
    finally:
        rig.close()


def storescu(port: int, files) -> list[tuple[str, bool]]:
    """Send *files* on one association; (file, got Success) for each file storescu tried."""
    r = subprocess.run([DCMTK["storescu"], "-v", "-aec", "HARMONY", "127.0.0.1", str(port), *map(str, files)],
                       capture_output=True, env=peer_env(), timeout=300)
    tried, current = [], None
    for line in r.stderr.decode(errors="replace").splitlines():
        if "Sending file: " in line:
            current = line.split("Sending file: ", 1)[1].strip()
            tried.append([current, False])
        elif "Received Store Response (Success)" in line and tried:
            tried[-1][1] = True
    return [(f, ok) for f, ok in tried]


def storescu_until_all_acked(rig, associations: int, kill_rounds: int, within: float) -> tuple[set, set]:
    """Send every file on *associations* concurrent storescu runs, round after round (a
    modality resends what got no Success), killing Harmony at a random moment within
    *within* seconds of each of the first *kill_rounds* rounds; (acknowledged, sent) SOPs."""
    acked, sent = set(), set()
    remaining = [str(p) for p in rig.files]
    rounds = 0
    while remaining:
        rounds += 1
        killing = rounds <= kill_rounds
        if killing:
            rig.kill_soon(within)
        shares = [remaining[i::associations] for i in range(associations)]
        with concurrent.futures.ThreadPoolExecutor(associations) as pool:
            outcomes = [o for share in pool.map(lambda s: storescu(rig.dimse_port, s), shares) for o in share]
        for f, ok in outcomes:
            sent.add(rig.sops[f])
            if ok:
                acked.add(rig.sops[f])
        remaining = [f for f in remaining if rig.sops[f] not in acked]
        if killing:
            rig.harmony.proc.wait(30)  # the kill timer may still be pending
            rig.harmony.start()
        assert rounds < 20, "storescu made no progress"
    return acked, sent


def test_storescu_ingest_killed_at_random_points_loses_nothing_acknowledged(tmp_path):
    """The issue's crash test over DIMSE: a modality (storescu) resends what got no Success."""
    rig = Rig(tmp_path, "dimse")
    try:
        rig.harmony.start()
        acked, sent = storescu_until_all_acked(rig, 1, KILLS_DURING_INGEST, 1.5)
        assert len(acked) == N_INSTANCES
        assert rig.harmony.starts >= 2  # at least one kill while storescu was sending
        rig.target_up_and_kill_while_draining()
        rig.check(acked, sent)
    finally:
        rig.close()


def test_concurrent_associations_killed_at_random_points_lose_nothing_acknowledged(tmp_path):
    """Four associations at once, so instances are committed in shared batches (group
    commit): a kill -9 inside a batch loses nothing any association heard Success for."""
    n = 240
    rig = Rig(tmp_path, "dimse", n=n)
    try:
        rig.harmony.start()
        acked, sent = storescu_until_all_acked(rig, 4, 2, 1.0)
        assert len(acked) == n
        rig.target_up_and_kill_while_draining()
        rig.check(acked, sent)
    finally:
        rig.close()


def stow(url: str, files) -> tuple[list[str], list[str]] | None:
    """One STOW-RS request; the SOP Instance UIDs its ReferencedSOPSequence and
    FailedSOPSequence list, or None when there was no answer (Harmony killed
    mid-request)."""
    body, ctype = multipart([f.read_bytes() for f in files])
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": ctype, "Accept": "application/dicom+json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            doc = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"unexpected HTTP {e.code}: {e.read()[:300]!r}") from None
    except (urllib.error.URLError, ConnectionError, OSError, ValueError):
        return None  # killed mid-request (or mid-answer): nothing is acknowledged
    return tuple([e["00081155"]["Value"][0] for e in doc.get(tag, {}).get("Value", [])]
                 for tag in ("00081199", "00081198"))


def unstorable(folder, n: int) -> dict:
    """*n* DICOM files with a valid, unique SOPInstanceUID but an invalid
    StudyInstanceUID: STOW must list each as failed, and nothing may deliver it."""
    import warnings
    from pathlib import Path

    from tests.dicom_data import UID_ROOT, make_instance, save
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UID, which is the point
        for i in range(1, n + 1):
            sop = f"{UID_ROOT}67.1.1.{i}"
            out[save(make_instance(patient_id="CRASHBAD", study_uid="1.2.3.x67", series_uid=f"{UID_ROOT}67.1.1",
                                   sop_uid=sop, rows=8, cols=8), Path(folder) / f"bad-{i}.dcm")] = sop
    return out


def test_stow_ingest_killed_at_random_points_loses_nothing_acknowledged(tmp_path):
    """The issue's crash test over STOW-RS: every instance listed in a
    ReferencedSOPSequence reaches Orthanc exactly once; a client resends a
    request that got no answer.  Each request also carries one part the store
    must refuse: it is listed as failed, and never claimed or delivered."""
    rig = Rig(tmp_path, "stow")
    url = f"http://127.0.0.1:{rig.http_port}/dicomweb/studies"
    acked, sent = set(), set()
    batches = [rig.files[i:i + 10] for i in range(0, N_INSTANCES, 10)]
    bad = list(unstorable(tmp_path / "bad", len(batches)).items())
    kills = set(rig.rnd.sample(range(2, len(batches) - 2), KILLS_DURING_INGEST))
    try:
        rig.harmony.start()
        for n, batch in enumerate(batches):
            tries = 0
            while True:
                tries += 1
                assert tries < 10, "STOW made no progress"
                killing = n in kills
                if killing:
                    kills.discard(n)
                    rig.kill_soon(0.2)  # inside this request: parts parsed, written, committed...
                sent.update(rig.sops[str(f)] for f in batch)
                bad_file, bad_sop = bad[n]
                answer = stow(url, [*batch, bad_file])
                listed = None if answer is None else answer[0]
                if answer is not None:
                    assert sorted(listed) == sorted(rig.sops[str(f)] for f in batch)
                    assert answer[1] == [bad_sop]
                    acked.update(listed)
                if killing or listed is None:
                    rig.harmony.proc.wait(30)  # the kill timer may still be pending
                    rig.harmony.start()
                if listed is not None:
                    break
        assert len(acked) == N_INSTANCES
        assert rig.harmony.starts == 1 + KILLS_DURING_INGEST
        rig.target_up_and_kill_while_draining()
        rig.check(acked, sent)  # Orthanc holds only what was sent valid: no refused part
    finally:
        rig.close()
