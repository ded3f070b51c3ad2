"""dicom_scp against hostile and faulty peers (issue 13's attack run, one test per defect).

Each attack runs twice, with the same test body: against Harmony in this
process on the reactor, and against a real ``twistd`` with ``[proxy] workers = 2``
(the main process and a worker serving one port, counting ``max_associations``
and the connection caps in a file they share).  The attackers are plain sockets
in worker threads.  After each attack the listener must be as it was: no
connection left open, the association limit and the per-source cap exactly as
configured (a count leaked by a silent connection or a storm would refuse
too early), and real DCMTK ``echoscu`` and ``storescu`` served at once by every
process.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import time
from contextlib import ExitStack, contextmanager

import pytest
import pytest_twisted
from pynetdicom import build_context
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.sop_class import Verification
from twisted.internet import defer, threads

from harmony.dicom.ul import pdu
from harmony.dicom.ul.requestor import request_primitive
from tests.dicom_data import UID_ROOT, make_instance, save
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.peers import free_port, wait_for
from tests.test_workers_dimse import Workers, frozen, server_side_connections

ECHOSCU = "/usr/bin/echoscu"
STORESCU = "/usr/bin/storescu"
#: Per-source cap of the listener under attack: above every attack's own count
#: from 127.0.0.1 (at most 110 at once), so only a leaked count reaches it.
PER_SOURCE = 120

SCP = """
[pipelines.dimse]
endpoints = ["scp"]
backends = ["b"]
[endpoints.scp]
service = "dicom_scp"
[endpoints.scp.options]
local_aet = "HARMONY"
bind_addr = "127.0.0.1"
port = {port}
max_associations = {max_associations}
max_connections_per_source = {per_source}
acse_timeout_secs = {acse}
max_pdu_size = 16384
enable_store = true
storage_dir = "{storage}"
[backends.b]
service = "echo"
"""


def associate_rq(called="HARMONY", calling="ATTACKER") -> bytes:
    primitive = request_primitive(calling, called, [build_context(Verification)])
    return A_ASSOCIATE_RQ(primitive).encode()


def echoscu(port: int) -> tuple[int, str]:
    done = subprocess.run([ECHOSCU, "-to", "5", "-ta", "5", "-aec", "HARMONY", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30, env=dict(os.environ, TCP_NODELAY="1"))
    return done.returncode, done.stderr


def storescu(port: int, files) -> tuple[int, str]:
    done = subprocess.run([STORESCU, "-v", "-to", "5", "-ta", "5", "-aec", "HARMONY", "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, TCP_NODELAY="1"))
    stored = done.stderr.count("Received Store Response (Success)")
    return (done.returncode if stored == len(files) else 1), done.stderr


def read_until_closed(sock: socket.socket, limit_secs: float = 10.0) -> bytes:
    sock.settimeout(limit_secs)
    out = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return out
            out += data
    except (socket.timeout, ConnectionResetError):
        return out


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_secs(pid: int) -> float:
    """User + system CPU of *pid* so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def highest_fd(pid: int) -> int:
    return max(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))


class InProcess:
    """Harmony on this process's reactor (tests.harness)."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.running = None

    async def start(self, max_associations: int, acse: float) -> "InProcess":
        self.port = free_port()
        self.max_associations = max_associations
        self.running = await start_harmony(write_config(self.tmp_path, MINIMAL_MAIN, {"scp": SCP.format(
            port=self.port, max_associations=max_associations, acse=acse, per_source=PER_SOURCE,
            storage=self.tmp_path / "received")}))
        return self

    def pids(self) -> list[int]:
        return [os.getpid()]

    @contextmanager
    def descriptors_held(self, count: int):
        """*count* more open descriptors in the Harmony process (socket pairs here)."""
        held = [socket.socketpair() for _ in range((count + 1) // 2)]
        try:
            yield
        finally:
            for a, b in held:
                a.close()
                b.close()

    def each_process(self):
        """Run the body once per process, the others frozen (one process: once)."""
        yield os.getpid()

    async def stop(self):
        if self.running is not None:
            await self.running.stop()


class TwoWorkers(InProcess):
    """``twistd`` with ``[proxy] workers = 2``: the main process and worker 1 share the port."""

    async def start(self, max_associations: int, acse: float) -> "TwoWorkers":
        self.port, http_port = free_port(), free_port()
        self.max_associations = max_associations
        main = MINIMAL_MAIN.replace('log_level = "debug"', 'log_level = "info"\nworkers = 2').replace(
            "bind_port = 0", f"bind_port = {http_port}")
        folder = self.tmp_path / "harmony"
        write_config(folder, main, {"scp": SCP.format(port=self.port, max_associations=max_associations,
                                                      acse=acse, per_source=PER_SOURCE,
                                                      storage=self.tmp_path / "received")})
        self.http_port = http_port
        self.running = Workers(folder, [http_port, self.port])
        await threads.deferToThread(self.running.start)
        self.worker = await threads.deferToThread(self.running.worker_pid)
        return self

    def pids(self) -> list[int]:
        return [self.running.proc.pid, self.worker]

    @contextmanager
    def descriptors_held(self, count: int):
        """*count* idle HTTP connections held by each process (the others frozen while
        it accepts its share), as the attack run's 1,500 idle HTTP clients were.  Opened
        in steps the process keeps up with: past the listen backlog (50) the kernel
        drops SYNs, and each dropped one costs a 1 s retransmission."""
        with ExitStack() as stack:
            for pid in self.pids():
                with frozen([p for p in self.pids() if p != pid]):
                    base = len(os.listdir(f"/proc/{pid}/fd"))
                    for opened in range(0, count, 40):
                        step = min(40, count - opened)
                        for _ in range(step):
                            stack.enter_context(socket.create_connection(("127.0.0.1", self.http_port)))
                        wait_for(lambda pid=pid, n=base + opened + step: len(os.listdir(f"/proc/{pid}/fd")) >= n,
                                 30, f"process {pid} accepting its HTTP connections")
            yield

    def each_process(self):
        for pid in self.pids():
            with frozen([p for p in self.pids() if p != pid]):
                yield pid

    async def stop(self):
        if self.running is not None:
            await threads.deferToThread(self.running.stop)


@pytest.fixture(params=[InProcess, TwoWorkers], ids=["one-process", "workers-2"])
def listener(request, tmp_path):
    made = request.param(tmp_path)
    yield made
    pytest_twisted.blockon(defer.ensureDeferred(made.stop()))


@pytest.fixture(scope="module")
def instances(tmp_path_factory):
    """Three small synthetic instances for the legitimate storescu."""
    folder = tmp_path_factory.mktemp("legit")
    return [save(make_instance(patient_id="HOSTILE", study_uid=f"{UID_ROOT}1313.1", series_uid=f"{UID_ROOT}1313.1.1",
                               sop_uid=f"{UID_ROOT}1313.1.1.{i}", instance_number=i, rows=8, cols=8, seed=i),
                 folder / f"{i}.dcm") for i in range(1, 4)]


def limits_hold(listener) -> None:
    """Blocking: Harmony has closed every connection, and both limits are exactly as
    configured across its processes: *max_associations* associations are accepted and
    one more is refused; PER_SOURCE connections are accepted and one more is closed
    at once.  A count leaked by an attack would refuse earlier."""
    port = listener.port
    wait_for(lambda: server_side_connections(port) == 0, 30, "Harmony closing every connection")
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(listener.max_associations + 1)]
    try:
        answers = []
        for s in socks:
            s.sendall(associate_rq())
            s.settimeout(10)
            answers.append(s.recv(6)[:1])
        assert answers == [b"\x02"] * listener.max_associations + [b"\x03"], answers
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: server_side_connections(port) == 0, 30, "Harmony closing the associations")
    # One more than the cap: exactly one is closed without a word.  Which one is the
    # processes' affair: each decides the connections it accepted, in its own order.
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(PER_SOURCE + 1)]

    def closed() -> list[bytes]:
        found = []
        for s in socks:
            try:
                found.append(s.recv(16, socket.MSG_DONTWAIT | socket.MSG_PEEK))
            except BlockingIOError:
                pass
        return found
    try:
        wait_for(lambda: closed(), 10, "the connection over the per-source cap closed")
        assert closed() == [b""], "not exactly one connection over the per-source cap was closed"
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: server_side_connections(port) == 0, 30, "Harmony closing the connections")


async def served(listener, files) -> None:
    """Real DCMTK C-ECHO and C-STORE are served by every process of the listener."""
    await threads.deferToThread(limits_hold, listener)

    def each():
        for pid in listener.each_process():
            code, err = echoscu(listener.port)
            assert code == 0, f"process {pid}: {err}"
            code, err = storescu(listener.port, files)
            assert code == 0, f"process {pid}: {err}"

    await threads.deferToThread(each)


@pytest_twisted.ensureDeferred
async def test_associations_work_with_more_than_1024_open_descriptors(listener, instances):
    """Defect 1: pynetdicom's select() failed every association past ~1,024 fds."""
    await listener.start(max_associations=10, acse=30)
    with listener.descriptors_held(1100):
        assert all(highest_fd(pid) > 1024 for pid in listener.pids())
        await served(listener, instances)


@pytest_twisted.ensureDeferred
async def test_oversized_pdu_is_cut_at_its_header(listener, instances):
    """Defect 2: a PDU declaring 0xFFFFFFFF is refused before its body is read."""
    await listener.start(max_associations=10, acse=30)
    port = listener.port

    def attack(established: bool):
        with socket.create_connection(("127.0.0.1", port)) as s:
            if established:
                s.sendall(associate_rq())
                reply = s.recv(65536)
                assert reply[:1] == b"\x02", reply[:16]          # A-ASSOCIATE-AC
            s.sendall(struct.pack(">BxI", pdu.P_DATA_TF if established else pdu.A_ASSOCIATE_RQ, 0xFFFFFFFF))
            sent = 0
            chunk = b"\0" * 65536
            start = time.monotonic()
            try:
                while sent < 64 * 1024 * 1024 and time.monotonic() - start < 10:
                    s.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            answer = read_until_closed(s)
            return sent, answer

    before = {pid: rss_kib(pid) for pid in listener.pids()}
    for established in (False, True):
        for _ in listener.each_process():
            sent, answer = await threads.deferToThread(attack, established)
            assert sent < 64 * 1024 * 1024, "Harmony kept reading an oversized PDU"
            assert answer.startswith(b"\x07"), answer[:16]                  # A-ABORT ...
            assert answer[9] == 0x06                                        # ... invalid PDU parameter value
    assert all(rss_kib(pid) - kib < 32 * 1024 for pid, kib in before.items())
    await served(listener, instances)


@pytest_twisted.ensureDeferred
async def test_silent_connections_neither_hold_slots_nor_burn_cpu(listener, instances):
    """Defect 3: 12 connections that never associated locked out a limit of 10."""
    await listener.start(max_associations=2, acse=2)
    port = listener.port
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    try:
        cpu_before = {pid: cpu_secs(pid) for pid in listener.pids()}
        code, err = await threads.deferToThread(echoscu, port)
        assert code == 0, err                                          # served while 50 sockets say nothing
        # ... and they are cut after the ACSE timeout with an A-ABORT.
        answers = await threads.deferToThread(lambda: [read_until_closed(s, 10) for s in silent])
        assert all(a.startswith(b"\x07") for a in answers)
        # Nothing polls while they wait: the CPU spent is the echo's, not 50 spinning sockets'.
        assert all(cpu_secs(pid) - cpu < 1.5 for pid, cpu in cpu_before.items())
    finally:
        for s in silent:
            s.close()
    await served(listener, instances)


@pytest_twisted.ensureDeferred
async def test_association_burst_every_request_answered(listener, instances):
    """Defect 4: 110 associations against a limit of 10 - each gets an A-ASSOCIATE-AC or -RJ at once."""
    await listener.start(max_associations=10, acse=30)
    port = listener.port

    def burst():
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(110)]
        try:
            for s in socks:
                s.sendall(associate_rq())
            answers = []
            for s in socks:
                s.settimeout(10)
                answers.append(s.recv(6)[:1])
            return answers
        finally:
            for s in socks:
                s.close()

    answers = await threads.deferToThread(burst)
    assert answers.count(b"\x02") == 10                    # the limit, held because we keep them open
    assert answers.count(b"\x03") == 100                   # A-ASSOCIATE-RJ for every other one
    await served(listener, instances)


@pytest_twisted.ensureDeferred
async def test_garbage_and_truncated_requests_leave_memory_flat(listener, instances):
    """Defect 5: 500 connections of random bytes or truncated A-ASSOCIATE-RQs."""
    await listener.start(max_associations=10, acse=2)
    port = listener.port
    rq = associate_rq()
    rng = random.Random(13)

    def storm():
        closed = 0
        for _ in range(5):
            socks = []
            for i in range(100):
                s = socket.create_connection(("127.0.0.1", port))
                if i % 2:
                    s.sendall(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4096))))
                else:
                    s.sendall(rq[:rng.randint(1, len(rq) - 1)])
                socks.append(s)
            for s in socks:
                read_until_closed(s, 10)
                s.close()
                closed += 1
        return closed

    before = {pid: rss_kib(pid) for pid in listener.pids()}
    assert await threads.deferToThread(storm) == 500
    assert all(rss_kib(pid) - kib < 32 * 1024 for pid, kib in before.items())
    await served(listener, instances)



def how_it_ends(sock: socket.socket, more: bytes) -> tuple[bytes, str]:
    """What *sock* receives until the listener's FIN, and how the connection ends when we
    then send *more* and close our side: "FIN" when the listener took it all and closed in
    order, "RST" when it was reset (a listener that stopped reading is reset by its kernel:
    a socket closed with unread bytes answers with a RST).  A Linux reader sees no RST that
    follows a FIN through ``recv``, hence the state and pending error of the socket."""
    sock.settimeout(10)
    answer = b""
    try:
        while data := sock.recv(65536):
            answer += data
        sock.sendall(more)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return answer, "RST"
    wait_for(lambda: sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 7, 10,  # TCP_CLOSE
             "the connection to close")
    return answer, "RST" if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) else "FIN"


@pytest_twisted.ensureDeferred
async def test_a_rejection_or_abort_ends_in_order_while_the_peer_is_still_sending(tmp_path, instances):
    """After its A-ASSOCIATE-RJ or A-ABORT, Harmony reads on (and drops) what the peer still
    sends, until the peer closes (PS3.8 Sta13).  It used to stop reading at once, and a socket
    closed with unread bytes ends in a RST, which destroys what was sent and not yet delivered
    (on Windows also what was delivered and not yet read): the peer saw a reset, not our answer.
    One process only: a listener waiting on the count its processes share holds at most one
    A-ASSOCIATE-RQ's worth of bytes (the workers' own refusal, tested above)."""
    listener = await InProcess(tmp_path).start(max_associations=1, acse=30)
    port = listener.port
    in_flight = pdu.pdata(1, 0x00, b"\0" * 16000) * 16        # 256 KB the peer sends without waiting

    def attack():
        with socket.create_connection(("127.0.0.1", port)) as held:
            held.sendall(associate_rq())
            assert held.recv(65536)[:1] == b"\x02"                   # A-ASSOCIATE-AC: the limit (1) reached
            with socket.create_connection(("127.0.0.1", port)) as busy:
                busy.sendall(associate_rq() + in_flight)
                rejected = how_it_ends(busy, in_flight)
            held.sendall(pdu.pdata(99, 0x03, b"\0" * 16) + in_flight)   # context 99 was never accepted
            aborted = how_it_ends(held, in_flight)
        return rejected, aborted

    try:
        rejected, aborted = await threads.deferToThread(attack)
        assert rejected == (pdu.associate_rj(2, 3, 2), "FIN"), rejected
        assert aborted == (pdu.abort(2, 6), "FIN"), aborted
        await served(listener, instances)
    finally:
        await listener.stop()
