"""``[proxy] workers = N`` with a ``dicom_scp`` listener: a real twistd whose
worker processes serve the same DIMSE port, DCMTK ``storescu`` as the
modalities, Orthanc as the forward target.

Proves: a worker serves the shared port on its own (the main process frozen),
``max_associations`` is one limit across the processes (and a worker killed
with -9 gives its associations back), and C-STORE ingest from four concurrent
associations across two processes, with the worker killed -9 while they send,
files every acknowledged instance exactly once, indexed and delivered once.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import signal
import sqlite3
import struct
import subprocess
import threading
from contextlib import contextmanager

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from harmony.dicom.ul.acceptor import SharedAssociationCount
from tests.peers import DCMTK, Orthanc, free_port, peer_env, wait_for
from tests.sf_helpers import HarmonyProcess, PortHold, dimse_toml, ingest_config, make_instances, sops_in

pytestmark = pytest.mark.peers

N_INSTANCES = 240
ASSOCIATIONS = 4
SERVING = re.compile(r"worker 1 \(pid (\d+)\) serving .*dimse:scp")


class Workers(HarmonyProcess):
    """twistd with ``workers = 2``; knows its worker's pid from the log."""

    def worker_pid(self, after: int = 0) -> int:
        """The pid of worker 1, once a (re)started one serves (the *after*-th and later log lines)."""
        log = self.folder / f"twistd-{self.starts}.log"
        found: list[int] = []

        def serving():
            found[:] = [int(m[1]) for m in SERVING.finditer(log.read_text(errors="replace"))]
            return len(found) > after

        wait_for(serving, 60, "worker 1 serving the DIMSE port", self.proc)
        return found[-1]

    def wait_log(self, text: str, count: int = 1) -> None:
        """Until *text* is in the log *count* times (the main process logged what the test caused)."""
        log = self.folder / f"twistd-{self.starts}.log"
        wait_for(lambda: log.read_text(errors="replace").count(text) >= count, 60, repr(text), self.proc)


def storescu(port: int, files) -> list[tuple[str, bool]]:
    """One association sending *files*: (file, got Success) for each file storescu tried."""
    r = subprocess.run([DCMTK["storescu"], "-v", "-aec", "HARMONY", "127.0.0.1", str(port), *map(str, files)],
                       capture_output=True, env=peer_env(), timeout=300)
    tried: list[list] = []
    for line in r.stderr.decode(errors="replace").splitlines():
        if "Sending file: " in line:
            tried.append([line.split("Sending file: ", 1)[1].strip(), False])
        elif "Received Store Response (Success)" in line and tried:
            tried[-1][1] = True
    return [(f, ok) for f, ok in tried]


def echo(port: int) -> bool:
    return _echoscu(port).returncode == 0


def echo_answer(port: int) -> str:
    """What DCMTK echoscu reports (its stderr): "Association Rejected:" with the result and
    reason of an A-ASSOCIATE-RJ, "Peer aborted Association" for an A-ABORT or a cut connection.

    Not pynetdicom: its requestor reports a rejection that comes back quickly as an abort
    when its ACSE thread runs late (``_negotiate_as_requestor`` reads ``_is_connected``
    after the DUL thread has already read the A-ASSOCIATE-RJ and closed its socket): one
    fifth association in 4-8 runs on a busy machine, the RJ on the wire each time."""
    r = _echoscu(port)
    return r.stderr.decode(errors="replace") + f"(exit {r.returncode})"


def _echoscu(port: int) -> subprocess.CompletedProcess:
    return subprocess.run([DCMTK["echoscu"], "-aec", "HARMONY", "127.0.0.1", str(port)], capture_output=True,
                          env=peer_env(), timeout=60)


def stopped(pid: int) -> bool:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("T", "t")


def count_is_free(pid: int) -> bool:
    """Whether the listener's shared count (the file the processes map) is unlocked, tried
    through a description of our own as another process would (never waiting), and no
    process is named in it as the lock's holder (SharedAssociationCount.holder)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        # An unnamed temporary file (O_TMPFILE: "/tmp/#<inode> (deleted)"), known by its header.
        try:
            if not os.readlink(f"/proc/{pid}/fd/{fd}").endswith("(deleted)"):
                continue
            probe = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
        except OSError:
            continue
        if os.pread(probe, 8, 0) != SharedAssociationCount.MAGIC:
            os.close(probe)
            continue
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            holder = struct.unpack("<q", os.pread(probe, 8, SharedAssociationCount.HOLDER_AT))[0]
        except BlockingIOError:
            return False
        finally:
            os.close(probe)
        return holder == 0
    raise AssertionError(f"process {pid} maps no shared count file")  # a probe that finds nothing proves nothing


@contextmanager
def frozen(pids):
    """SIGSTOP *pids*: only the other processes accept meanwhile.  A process is never left
    stopped inside its few microseconds of counting under the shared count's lock: the
    others would then refuse every connection after waiting for it (that is the product's
    answer to a stuck process, not what these attacks test), so such a stop is undone
    and made again."""
    for _ in range(1000):
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: all(stopped(pid) for pid in pids), 10, "the frozen processes stopping")
        if all(count_is_free(pid) for pid in pids):
            break
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    else:
        raise AssertionError("the shared count stayed locked")
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def server_side_connections(port: int) -> int:
    """Accepted TCP connections on *port* the server has not closed yet (any state
    but LISTEN and TIME_WAIT, read from /proc/net/tcp*): an association the client
    released still counts against max_associations until its process sees the close."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] not in ("0A", "06"):
                count += 1
    return count


def associate(port: int):
    ae = AE(ae_title="WORKERTEST")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 30
    return ae.associate("127.0.0.1", port, ae_title="HARMONY")


@pytest.fixture
def rig(tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc")
    # The forward target is down until the end; both its ports are held so that
    # nothing (a storescu's ephemeral port) can take them meanwhile.
    hold = [PortHold(orthanc.dicom_port), PortHold(orthanc.http_port)]
    http_port, dimse_port = free_port(), free_port()
    folder = tmp_path / "harmony"
    folder.mkdir()
    extra = dimse_toml(dimse_port, "sf", orthanc.aet, orthanc.dicom_port).replace(
        "enable_store = true", "enable_store = true\nmax_associations = 4")
    text = ingest_config(orthanc.url, port=http_port, extra=extra,
                         sf_options="backoff_initial_seconds = 0.1\nbackoff_max_seconds = 0.5\n"
                                    "max_attempts = 1000000")
    text = text.replace('forward_to = ["orthanc"]', 'forward_to = ["pacs"]').replace(
        'log_level = "info"', 'log_level = "info"\nworkers = 2')
    (folder / "harmony.toml").write_text(text)
    harmony = Workers(folder, [http_port, dimse_port])
    harmony.dimse_port = dimse_port
    try:
        yield harmony, orthanc, hold, tmp_path
    finally:
        harmony.stop()
        for h in hold:
            h.release()
        orthanc.stop()


def test_the_worker_serves_the_dimse_port_and_max_associations_counts_every_process(rig):
    harmony, _, _, _ = rig
    harmony.start()
    port = harmony.dimse_port
    worker = harmony.worker_pid()
    with frozen([harmony.proc.pid]):
        assert echo(port), "the worker alone did not answer C-ECHO on the shared port"
    with frozen([worker]):
        assert echo(port), "the main process alone did not answer C-ECHO"
    # Both processes running: each sees its C-ECHO association's close and stops
    # counting it before the limit is probed (a process frozen first, or one that
    # reads a new association before the old close, would count it still).
    wait_for(lambda: server_side_connections(port) == 0, 30, "the C-ECHO associations to be closed by Harmony")

    # Two associations held by the worker, two by the main process: the limit
    # (4) is reached across the processes, so a fifth is refused whichever
    # process accepts it (each process alone holds only 2).
    held = []
    try:
        with frozen([harmony.proc.pid]):
            held += [associate(port) for _ in range(2)]
        with frozen([worker]):
            held += [associate(port) for _ in range(2)]
        assert all(a.is_established for a in held)
        for _ in range(3):
            # Not accepted, and refused the way a client can tell (A-ASSOCIATE-RJ, "local limit
            # exceeded"), not cut off: DCMTK's answer is in the message, since a CI failure here
            # is read from this line alone.
            answer = echo_answer(port)
            assert "Association Rejected" in answer and "Local Limit Exceeded" in answer, \
                f"a fifth association with max_associations = 4 was not rejected as busy: {answer!r}"
        # The worker dies with its two associations: they stop counting, and
        # the main process accepts again before the worker is even back.
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: all(not a.is_alive() or a.is_aborted for a in held[:2]), 30,
                 "the dead worker's associations to end")
        harmony.wait_log("worker 1 exited unexpectedly")  # the main process has seen it go
        again = associate(port)
        assert again.is_established, "the dead worker's associations still count against the limit"
        again.release()
    finally:
        for a in held:
            if a.is_established:
                a.release()


def test_cstore_across_two_processes_with_a_worker_killed_stores_each_acknowledged_instance_once(rig):
    harmony, orthanc, hold, tmp_path = rig
    seed = int(os.environ.get("HARMONY_CRASH_SEED", "0")) or random.randrange(1, 2**31)
    print(f"kill moments from HARMONY_CRASH_SEED={seed}")
    rnd = random.Random(seed)
    files = [str(p) for p in make_instances(tmp_path / "in", N_INSTANCES, 71, patient_id="WORKERS", series=4,
                                            size=8)]
    sops = {f: str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    harmony.start()
    acked: set[str] = set()
    sent: set[str] = set()
    remaining = list(files)
    rounds = kills = 0
    while remaining:
        rounds += 1
        assert rounds < 15, "storescu made no progress"
        starts = harmony.worker_pid(after=kills)
        timer = None
        if rounds <= 2:
            kills += 1
            timer = threading.Timer(rnd.uniform(0.1, 1.0), os.kill, (starts, signal.SIGKILL))
            timer.start()
        shares = [remaining[i::ASSOCIATIONS] for i in range(ASSOCIATIONS)]
        results: list = []

        def send(share, into=results):
            into.extend(storescu(harmony.dimse_port, share))

        threads = [threading.Thread(target=send, args=(s,)) for s in shares if s]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if timer is not None:
            timer.join()  # killed, if not during this round's sends then right after them
            harmony.wait_log("worker 1 exited unexpectedly", count=kills)
        for f, ok in results:
            sent.add(sops[f])
            if ok:
                acked.add(sops[f])
        remaining = [f for f in remaining if sops[f] not in acked]
    assert len(acked) == N_INSTANCES
    log = (harmony.folder / f"twistd-{harmony.starts}.log").read_text(errors="replace")
    assert "worker 1 exited unexpectedly" in log

    db = sqlite3.connect(harmony.folder / "store" / "index.sqlite")
    try:
        indexed = [r[0] for r in db.execute("SELECT sop_uid FROM instances")]
        queued = [r[0] for r in db.execute("SELECT sop_uid FROM queue WHERE target='pacs'")]
        paths = [r[0] for r in db.execute("SELECT relpath FROM instances")]
    finally:
        db.close()
    assert set(indexed) >= acked and len(indexed) == len(set(indexed))
    assert sorted(queued) == sorted(set(queued)), "an instance was queued twice for the same target"
    assert acked <= set(queued)
    store = harmony.folder / "store"
    assert all((store / "instances" / p).is_file() or (store / p).is_file() for p in paths)

    for h in hold:
        h.release()
    orthanc.start()
    wait_for(lambda: acked <= set(sops_in(orthanc)), 120, "every acknowledged instance in Orthanc")
    harmony.stop()
    in_orthanc = sops_in(orthanc)
    assert len(in_orthanc) == len(set(in_orthanc)), "an instance reached Orthanc twice"
    assert set(in_orthanc) <= sent
    assert "Traceback" not in log
