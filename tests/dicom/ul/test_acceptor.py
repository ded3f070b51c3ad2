"""harmony.dicom.ul.acceptor: the listener's limits, alone and shared by worker processes.

The shared counts are a file every process maps; here two handles on one file
stand for two processes (slot 0 the main process, slot 1 a worker).  Each
handle locks through its own open file description, so one excludes the other
even in one process: the tests below hold the lock with one handle and show
that the other never waits for it on the reactor (a task.Clock drives the
retries), and that a process killed with -9 drops it.
tests/test_dicom_scp_hostile.py runs the attacks against a real ``workers = 2``
twistd.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from harmony.dicom.ul import pdu
from harmony.dicom.ul.acceptor import AcceptorLimits, CountBusy, SharedAssociationCount
from harmony.dicom.ul.association import CLOSED, ESTABLISHED
from tests.dicom.ul.memory import acceptor, connect, pump, requestor


@pytest.fixture
def pair():
    main = SharedAssociationCount.create(2, max_connections=8)
    worker = SharedAssociationCount(os.dup(main.fd), 2, 1)
    yield main, worker
    worker.close()
    main.close()


def test_connection_caps_are_one_limit_across_the_processes(pair):
    main, worker = pair
    assert main.admit("10.0.0.1", 8, 3) and worker.admit("10.0.0.1", 8, 3) and main.admit("10.0.0.1", 8, 3)
    # Three from one source on the port, however they were spread: a fourth is refused by either process.
    assert not worker.admit("10.0.0.1", 8, 3)
    assert not main.admit("10.0.0.1", 8, 3)
    assert worker.admit("10.0.0.2", 8, 3)
    assert main.from_source("10.0.0.1") == worker.from_source("10.0.0.1") == 3
    assert main.connections() == 4
    # The total cap counts every process too.
    for host in ("10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"):
        assert worker.admit(host, 8, 3)
    assert not main.admit("10.0.0.7", 8, 3)
    worker.release("10.0.0.1")
    assert main.from_source("10.0.0.1") == 2
    assert main.admit("10.0.0.1", 8, 3)


def test_a_dead_workers_connections_stop_counting(pair):
    main, worker = pair
    for _ in range(3):
        assert worker.admit("10.0.0.1", 8, 3)
    assert main.admit("10.0.0.2", 8, 3) and worker.admit("10.0.0.2", 8, 3)
    worker.set(2)
    main.clear(1)      # the worker was killed with -9: nothing of it was released
    assert main.total() == 0 and main.connections() == 1
    assert main.from_source("10.0.0.1") == 0 and main.from_source("10.0.0.2") == 1
    assert main.admit("10.0.0.1", 8, 3)


def test_the_source_table_stays_exact_through_churn():
    """Many sources coming and going (backward-shift removal, no tombstones): every
    count stays exact and the table empties when every connection has closed."""
    shared = SharedAssociationCount.create(1, max_connections=64)
    rng = random.Random(13)
    live: dict[str, int] = {}
    try:
        for _ in range(5000):
            host = f"10.0.{rng.randrange(4)}.{rng.randrange(60)}"
            if live.get(host) and rng.random() < 0.55:
                shared.release(host)
                live[host] -= 1
            elif shared.admit(host, 64, 2):
                live[host] = live.get(host, 0) + 1
            else:
                assert live.get(host, 0) == 2 or sum(live.values()) == 64
        for host, count in live.items():
            assert shared.from_source(host) == count
        for host, count in live.items():
            for _ in range(count):
                shared.release(host)
        assert shared.connections() == 0
        assert all(shared._key_at(i) == bytes(16) for i in range(shared.entries))
    finally:
        shared.close()


def test_the_factory_refuses_over_the_shared_caps_and_gives_back_on_close(pair):
    main, worker = pair
    limits = AcceptorLimits(max_connections=8, max_connections_per_source=2)
    _, in_main = acceptor(limits)
    _, in_worker = acceptor(limits)
    in_main.settings.share_counts(main)
    in_worker.settings.share_counts(worker)
    a, ta = connect(in_main, "10.0.0.9")
    b, tb = connect(in_worker, "10.0.0.9")
    assert a is not None and b is not None
    assert connect(in_main, "10.0.0.9")[0] is None      # each process alone holds one: the port holds two
    assert in_worker.refused == 0 and in_main.refused == 1
    tb.loseConnection()
    b.connectionLost()
    assert worker.from_source("10.0.0.9") == 1
    assert connect(in_main, "10.0.0.9")[0] is not None


def test_what_a_process_held_before_sharing_counts():
    _, factory = acceptor(AcceptorLimits(max_connections=8, max_connections_per_source=2))
    connect(factory, "10.0.0.9")
    connect(factory, "10.0.0.9")
    shared = SharedAssociationCount.create(2, max_connections=8)
    try:
        factory.settings.share_counts(shared)
        assert shared.from_source("10.0.0.9") == 2
        assert connect(factory, "10.0.0.9")[0] is None
    finally:
        shared.close()


def test_a_full_source_table_refuses_rather_than_fails():
    """Sized for twice max_connections' sources; a limit raised past it (a reload) refuses, never raises."""
    shared = SharedAssociationCount.create(1, max_connections=4)
    try:
        assert all(shared.admit(f"10.1.0.{i}", 1000, 1) for i in range(shared.entries))
        assert not shared.admit("10.2.0.1", 1000, 1)
        shared.release("10.1.0.3")
        assert shared.admit("10.2.0.1", 1000, 1)
    finally:
        shared.close()


@pytest.fixture
def clocked_pair():
    """Two counts on one file, retrying on a task.Clock: *holder* stands for a process
    stopped inside its counting, *waiter* for the process whose reactor must go on."""
    clock = Clock()
    holder = SharedAssociationCount.create(2, max_connections=8, reactor=clock)
    waiter = SharedAssociationCount(os.dup(holder.fd), 2, 1, reactor=clock)
    yield clock, holder, waiter
    waiter.close()
    holder.close()


def results(d) -> list:
    out: list = []
    d.addBoth(out.append)
    return out


def test_a_locked_count_answers_later_and_in_order_never_blocking(clocked_pair):
    clock, holder, waiter = clocked_pair
    assert waiter.admit("10.0.0.1", 8, 3) is True          # free: answered at once
    assert holder.try_lock()
    assert not waiter.try_lock()                           # one process excludes the other
    admitted = waiter.admit("10.0.0.1", 8, 3)              # returns at once: nothing waits on the lock
    waiter.release("10.0.0.1")                             # queued behind it, in order
    reserved = waiter.reserve(1)
    got, got_reserved = results(admitted), results(reserved)
    for _ in range(20):
        clock.advance(0.02)
    assert got == [] and got_reserved == [] and waiter.connections() == 1
    holder.unlock()
    clock.advance(0.02)
    assert got == [True] and got_reserved == [True]
    assert waiter.connections() == 1 and waiter.from_source("10.0.0.1") == 1 and waiter.total() == 1
    assert waiter.admit("10.0.0.2", 8, 3) is True         # the queue is empty again: at once


def test_a_count_locked_too_long_refuses_and_never_counts(clocked_pair):
    clock, holder, waiter = clocked_pair
    assert holder.try_lock()
    got = results(waiter.admit("10.0.0.1", 8, 3))
    clock.advance(SharedAssociationCount.LOCK_WAIT_SECS - 0.01)
    assert got == []
    clock.advance(0.02)
    assert isinstance(got[0], Failure) and got[0].check(CountBusy)
    assert f"locked by another process (pid {os.getpid()})" in str(got[0].value)
    holder.unlock()
    clock.advance(0.05)
    assert waiter.connections() == 0 and waiter.from_source("10.0.0.1") == 0
    assert not clock.getDelayedCalls()                     # no retry left spinning


def test_a_process_killed_with_9_inside_the_count_drops_the_lock(clocked_pair):
    _, holder, waiter = clocked_pair
    child = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys\n"
         f"fd = os.open('/proc/{os.getpid()}/fd/{holder.fd}', os.O_RDWR)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\nsys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        assert not waiter.try_lock()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdin.close()
        child.stdout.close()
    assert waiter.try_lock()
    waiter.unlock()


def shared_acceptor(clock, count, limits=None):
    _, factory = acceptor(limits or AcceptorLimits(max_connections=8, max_connections_per_source=4))
    factory.reactor = clock
    factory.settings.share_counts(count)
    return factory


def test_a_connection_waits_unread_for_its_admission_then_associates(clocked_pair):
    clock, holder, waiter = clocked_pair
    factory = shared_acceptor(clock, waiter)
    assert holder.try_lock()
    server, st = connect(factory, "10.0.0.9")
    assert server is not None and server.admission is not None
    client, ct = requestor(clock)
    pump(client, ct, server, st)                           # its A-ASSOCIATE-RQ is kept, not answered
    assert st.value() == b"" and client.state != ESTABLISHED
    holder.unlock()
    clock.advance(0.01)
    pump(client, ct, server, st)
    assert server.state == client.state == ESTABLISHED
    assert waiter.from_source("10.0.0.9") == 1 and waiter.total() == 1


def test_an_association_request_waits_for_the_count_and_is_refused_busy_after_the_wait(clocked_pair):
    clock, holder, waiter = clocked_pair
    factory = shared_acceptor(clock, waiter)
    server, st = connect(factory, "10.0.0.9")             # admitted at once
    assert server.admission is None
    assert holder.try_lock()
    client, ct = requestor(clock)
    pump(client, ct, server, st)
    assert st.value() == b""                               # no answer while the count is locked
    clock.advance(SharedAssociationCount.LOCK_WAIT_SECS + 0.1)
    assert st.value() == pdu.associate_rj(0x02, 0x03, 0x02)  # A-ASSOCIATE-RJ, transient, local limit
    assert server.state == CLOSED
    server.connectionLost()
    holder.unlock()
    clock.advance(0.05)
    assert waiter.total() == 0 and waiter.connections() == 0


def test_a_connection_refused_after_the_wait_is_closed_and_gives_nothing_back(clocked_pair):
    clock, holder, waiter = clocked_pair
    factory = shared_acceptor(clock, waiter)
    assert waiter.admit("10.0.0.9", 8, 4) is True          # another connection of ours, counted
    assert holder.try_lock()
    server, st = connect(factory, "10.0.0.9")
    clock.advance(SharedAssociationCount.LOCK_WAIT_SECS + 0.1)
    assert st.value() == b"" and st.disconnecting          # closed without a word, as over a cap
    assert server.state == CLOSED
    server.connectionLost()
    holder.unlock()
    clock.advance(0.05)
    assert waiter.from_source("10.0.0.9") == 1             # the refused one was never counted


def test_a_connection_over_the_cap_after_a_wait_is_closed_as_at_once(clocked_pair):
    clock, holder, waiter = clocked_pair
    factory = shared_acceptor(clock, waiter, AcceptorLimits(max_connections=8, max_connections_per_source=1))
    assert holder.admit("10.0.0.9", 8, 1) is True          # the other process holds the source's one
    assert holder.try_lock()
    server, st = connect(factory, "10.0.0.9")
    holder.unlock()
    clock.advance(0.01)
    assert st.value() == b"" and st.disconnecting and server.state == CLOSED
    server.connectionLost()
    assert waiter.from_source("10.0.0.9") == 1


def test_a_connection_gone_before_its_admission_gives_back_what_was_counted(clocked_pair):
    clock, holder, waiter = clocked_pair
    factory = shared_acceptor(clock, waiter)
    assert holder.try_lock()
    server, st = connect(factory, "10.0.0.9")
    server.connectionLost()                                # the peer left while it waited
    holder.unlock()
    clock.advance(0.01)
    assert waiter.connections() == 0 and waiter.from_source("10.0.0.9") == 0


def test_an_oversized_pdu_is_refused_at_its_header_while_the_count_is_locked(clocked_pair):
    """Bytes that arrive while the admission waits are kept, at most an A-ASSOCIATE-RQ's
    worth; a header declaring more is answered as it would be at once: A-ABORT, reason 0x06."""
    import struct
    clock, holder, waiter = clocked_pair
    factory = shared_acceptor(clock, waiter)
    assert holder.try_lock()
    server, st = connect(factory, "10.0.0.9")
    server.dataReceived(struct.pack(">BxI", pdu.A_ASSOCIATE_RQ, 0xFFFFFFFF))
    for _ in range(5):
        server.dataReceived(bytes(65536))
    assert st.value() == pdu.abort(source=0x02, reason=0x06) and server.state == CLOSED
    holder.unlock()
