"""harmony.dicom.ul.acceptor.BalancedPort: a shared DIMSE listener spreads connections over the processes.

Two ports adopted from one listening socket in this process stand for two
processes (slot 0 the main process, slot 1 a worker), each with its own handle
on one shared count: the reactor wakes both for the same waiting connections,
as the kernel wakes every process.  The connections are made (the kernel
completes them into the backlog) before either port reads, so what each port
takes is decided by the accept loop alone, not by timing.  bench/ingest
measures the same with real worker processes (associations per pid).
"""

from __future__ import annotations

import os
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor

from harmony.dicom.ul.acceptor import AcceptorLimits, AcceptorSettings, BalancedPort, SharedAssociationCount


class Counting(protocol.Factory):
    """Counts each connection in the shared count the way AcceptorFactory does (admit),
    and fires *all_in* once *expected* connections were taken by any of the factories."""

    def __init__(self, shared: SharedAssociationCount, taken: list, expected: int, all_in: defer.Deferred):
        self.settings = AcceptorSettings("HARMONY", [], AcceptorLimits())
        self.settings.share_counts(shared)
        self.taken = taken
        self.expected = expected
        self.all_in = all_in
        self.mine = 0

    def buildProtocol(self, addr):
        assert self.settings.admit(addr.host) is True
        self.mine += 1
        self.taken.append(self)
        if len(self.taken) == self.expected:
            reactor.callLater(0, self.all_in.callback, None)  # after this wake-up's other accepts
        return protocol.Protocol()


@pytest.fixture
def listener():
    """A listening socket, a shared count for two processes, and a way to clean up."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    main = SharedAssociationCount.create(2, max_connections=16)
    worker = SharedAssociationCount(os.dup(main.fd), 2, 1)
    ports: list = []
    clients: list = []
    yield sock, (main, worker), ports, clients
    for c in clients:
        c.close()
    for p in ports:
        p.stopListening()
    worker.close()
    main.close()
    sock.close()


def adopt(sock, shared, factory, ports) -> BalancedPort:
    port = BalancedPort._fromListeningDescriptor(reactor, sock.fileno(), sock.family, factory)
    port.startListening()
    port.share(shared)
    ports.append(port)
    return port


def connect_now(sock, n: int, clients: list) -> None:
    """*n* connections completed by the kernel and waiting in the backlog, none accepted yet."""
    for _ in range(n):
        c = socket.create_connection(sock.getsockname(), timeout=5)
        clients.append(c)


@pytest_twisted.ensureDeferred
async def test_four_waiting_connections_go_two_to_each_process(listener):
    """Twisted's port accepts every waiting connection in one wake-up: the first process
    to wake took all four (the 4 + 0 of bench/ingest's associations per pid)."""
    sock, (main, worker), ports, clients = listener
    taken: list = []
    all_in: defer.Deferred = defer.Deferred()
    first = Counting(main, taken, 4, all_in)
    second = Counting(worker, taken, 4, all_in)
    connect_now(sock, 4, clients)
    adopt(sock, main, first, ports)
    adopt(sock, worker, second, ports)
    await all_in
    assert (first.mine, second.mine) == (2, 2), f"accepted {first.mine} + {second.mine}"
    assert main.connections() == 4


@pytest_twisted.ensureDeferred
async def test_a_process_that_does_not_accept_delays_a_connection_but_never_loses_it(listener):
    """A serving process that stops accepting (busy, or stopped with SIGSTOP) makes the
    other wait YIELD_SECS at most before it takes the connection itself."""
    sock, (main, worker), ports, clients = listener
    worker.serving(True)  # counted as serving, but its port never reads
    taken: list = []
    all_in: defer.Deferred = defer.Deferred()
    alone = Counting(main, taken, 4, all_in)
    connect_now(sock, 4, clients)
    started = reactor.seconds()
    adopt(sock, main, alone, ports)
    await all_in
    assert alone.mine == 4
    # Three of the four were left to the other process first, each for YIELD_SECS; after
    # those three take-backs the port stops waiting for a process that does not accept.
    assert reactor.seconds() - started >= 3 * BalancedPort.YIELD_SECS
    assert ports[0]._others_not_accepting_until > started


def test_a_dead_or_stopped_process_is_not_waited_for(listener):
    _, (main, worker), _, _ = listener
    assert main.admit("127.0.0.1", 16, 16)
    assert not main.busier_than_another(), "a slot nobody serves is not left connections"
    worker.serving(True)
    assert main.busier_than_another() and not worker.busier_than_another()
    main.clear(1)  # the worker died: the main process stops leaving it connections at once
    assert not main.busier_than_another()
