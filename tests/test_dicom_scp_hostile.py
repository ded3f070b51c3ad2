"""dicom_scp against hostile and faulty peers (issue 13's attack run, one test per defect).

Harmony runs in this process on the reactor; the attackers are plain sockets in
worker threads, and a real DCMTK ``echoscu``/``storescu`` checks after each
attack that legitimate associations are still served at once.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time

import pytest_twisted
from pynetdicom import build_context
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.sop_class import Verification
from twisted.internet import threads

from harmony.dicom.ul import pdu
from harmony.dicom.ul.requestor import request_primitive
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.peers import free_port

ECHOSCU = "/usr/bin/echoscu"

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
acse_timeout_secs = {acse}
max_pdu_size = 16384
[backends.b]
service = "echo"
"""


def associate_rq(called="HARMONY", calling="ATTACKER") -> bytes:
    primitive = request_primitive(calling, called, [build_context(Verification)])
    return A_ASSOCIATE_RQ(primitive).encode()


def echoscu(port: int) -> tuple[int, str]:
    import subprocess
    done = subprocess.run([ECHOSCU, "-to", "5", "-ta", "5", "-aec", "HARMONY", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30, env=dict(os.environ, TCP_NODELAY="1"))
    return done.returncode, done.stderr


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


async def scp(tmp_path, max_associations=10, acse=30):
    port = free_port()
    running = await start_harmony(write_config(tmp_path, MINIMAL_MAIN, {"scp": SCP.format(
        port=port, max_associations=max_associations, acse=acse)}))
    return running, port


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@pytest_twisted.ensureDeferred
async def test_associations_work_with_more_than_1024_open_descriptors(tmp_path):
    """Defect 1: pynetdicom's select() failed every association past ~1,024 fds."""
    running, port = await scp(tmp_path)
    held = [socket.socketpair() for _ in range(700)]     # 1,400 descriptors in this process
    try:
        assert max(s.fileno() for pair in held for s in pair) > 1024
        code, err = await threads.deferToThread(echoscu, port)
        assert code == 0, err
    finally:
        for a, b in held:
            a.close()
            b.close()
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_oversized_pdu_is_cut_at_its_header(tmp_path):
    """Defect 2: a PDU declaring 0xFFFFFFFF is refused before its body is read."""
    running, port = await scp(tmp_path)

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

    before = rss_kib()
    for established in (False, True):
        sent, answer = await threads.deferToThread(attack, established)
        assert sent < 64 * 1024 * 1024, "Harmony kept reading an oversized PDU"
        assert answer.startswith(b"\x07"), answer[:16]                  # A-ABORT ...
        assert answer[9] == 0x06                                        # ... invalid PDU parameter value
    assert rss_kib() - before < 32 * 1024
    code, err = await threads.deferToThread(echoscu, port)
    assert code == 0, err
    await running.stop()


@pytest_twisted.ensureDeferred
async def test_silent_connections_neither_hold_slots_nor_burn_cpu(tmp_path):
    """Defect 3: 12 connections that never associate locked out a limit of 10."""
    running, port = await scp(tmp_path, max_associations=2, acse=2)
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    try:
        cpu_before = time.process_time()
        code, err = await threads.deferToThread(echoscu, port)
        assert code == 0, err                                          # served while 50 sockets say nothing
        # ... and they are cut after the ACSE timeout with an A-ABORT.
        answers = await threads.deferToThread(lambda: [read_until_closed(s, 10) for s in silent])
        assert all(a.startswith(b"\x07") for a in answers)
        # Nothing polls while they wait: the CPU spent is the echo's, not 50 spinning sockets'.
        assert time.process_time() - cpu_before < 1.5
    finally:
        for s in silent:
            s.close()
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_association_burst_every_request_answered(tmp_path):
    """Defect 4: 110 associations against a limit of 10 - each gets an A-ASSOCIATE-AC or -RJ at once."""
    running, port = await scp(tmp_path, max_associations=10)

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
    code, err = await threads.deferToThread(echoscu, port)
    assert code == 0, err
    await running.stop()


@pytest_twisted.ensureDeferred
async def test_garbage_and_truncated_requests_leave_memory_flat(tmp_path):
    """Defect 5: 500 connections of random bytes or truncated A-ASSOCIATE-RQs."""
    running, port = await scp(tmp_path, acse=2)
    rq = associate_rq()
    rng = random.Random(13)

    def storm():
        closed = 0
        for batch in range(5):
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

    before = rss_kib()
    assert await threads.deferToThread(storm) == 500
    assert rss_kib() - before < 32 * 1024
    scp_endpoint = running.service.runtime.endpoints["scp"]
    assert scp_endpoint.factory.settings.connections == 0
    code, err = await threads.deferToThread(echoscu, port)
    assert code == 0, err
    await running.stop()
