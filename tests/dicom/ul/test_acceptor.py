"""harmony.dicom.ul.acceptor: the listener's limits, alone and shared by worker processes.

The shared counts are a file every process maps; here two handles on one file
stand for two processes (slot 0 the main process, slot 1 a worker).  The
record lock only excludes other processes, so what these tests prove is the
counting; tests/test_dicom_scp_hostile.py runs the attacks against a real
``workers = 2`` twistd.
"""

from __future__ import annotations

import os
import random

import pytest

from harmony.dicom.ul.acceptor import AcceptorLimits, SharedAssociationCount
from tests.dicom.ul.memory import acceptor, connect


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
