"""harmony.compat.spin: the reactor's bounded poll before it sleeps, and when it stands back."""

from __future__ import annotations

import gc
import os
import select
import socket
import threading
import time

import pytest

from harmony.compat import spin
from harmony.compat import twisted as compat
from harmony.storage.threads import WokenThreads


class _Pool:
    def __init__(self, working=0):
        self.working = working


@pytest.fixture(autouse=True)
def watched_here(monkeypatch):
    """Only the pools and rings a test registers are watched (others' stores may still be open)."""
    monkeypatch.setattr(spin, "_watched", spin.WeakMembers())
    monkeypatch.setattr(spin, "_awaited", spin.WeakMembers())


class _Ring:
    def __init__(self, pending=0):
        self.pending = pending


@pytest.fixture
def epoll():
    ep = select.epoll()
    a, b = socket.socketpair()
    ep.register(b.fileno(), select.EPOLLIN)
    yield ep, a
    for s in (a, b):
        s.close()
    ep.close()


@pytest.fixture
def loadavg(tmp_path, monkeypatch):
    """A /proc/loadavg the test writes: "running/total" is its fourth field."""
    path = tmp_path / "loadavg"

    def write(running: int):
        path.write_text(f"0.10 0.20 0.30 {running}/200 12345\n")
    write(1)
    return path, write


def _spinner(ep, window, loadavg_path=None, reactor=None):
    spinner = spin.PollSpin.make(ep.fileno(), window, reactor)
    assert spinner is not None
    if loadavg_path is not None:
        os.close(spinner._loadavg)
        spinner._loadavg = os.open(loadavg_path, os.O_RDONLY)
    return spinner


def _counting(spinner, then=None):
    """The spinner's epoll_wait, counted (and *then* run at each call)."""
    calls = []
    real = spinner._epoll_wait

    def counted(*args):
        calls.append(args)
        if then is not None:
            then(len(calls))
        return real(*args)
    spinner._epoll_wait = counted
    return calls


def test_an_event_ready_ends_the_spin_at_once(epoll, loadavg):
    ep, peer = epoll
    spinner = _spinner(ep, 5.0, loadavg[0])
    calls = _counting(spinner)
    peer.send(b"x")
    assert spinner.wait(-1) is True
    assert len(calls) == 1
    # Level-triggered: the event is still there for the reactor's own poll.
    assert ep.poll(0)
    spinner.close()


def test_an_event_that_comes_during_the_spin_ends_it(epoll, loadavg):
    ep, peer = epoll
    spinner = _spinner(ep, 5.0, loadavg[0])
    calls = _counting(spinner, then=lambda n: n == 50 and peer.send(b"x"))
    assert spinner.wait(-1) is True
    assert len(calls) == 50   # the 50th poll, made just after the send, found it
    spinner.close()


def test_nothing_ready_spins_out_the_window_or_the_shorter_timeout(epoll, loadavg):
    ep, _peer = epoll
    spinner = _spinner(ep, 0.003, loadavg[0])
    began = time.perf_counter()
    assert spinner.wait(-1) is False
    assert time.perf_counter() - began >= 0.003
    calls = _counting(spinner)
    assert spinner.wait(0.0) is False and not calls   # a timeout of 0: no spin at all
    began = time.perf_counter()
    assert spinner.wait(0.001) is False
    assert calls and time.perf_counter() - began >= 0.001
    spinner.close()


def test_no_spin_while_another_of_our_threads_works(epoll, loadavg):
    ep, _peer = epoll
    spinner = _spinner(ep, 5.0, loadavg[0])
    calls = _counting(spinner)
    busy = _Pool(working=1)
    spin.watch_threads(busy)
    try:
        assert spinner.wait(-1) is False and not calls
        busy.working = 0
        spinner.window = 0.001
        assert spinner.wait(-1) is False and calls
    finally:
        busy.working = 0


def test_the_reactors_own_thread_pool_counts(epoll, loadavg):
    ep, _peer = epoll

    class Reactor:
        threadpool = _Pool(working=[None])
    spinner = _spinner(ep, 5.0, loadavg[0], reactor=Reactor())
    calls = _counting(spinner)
    assert spinner.wait(-1) is False and not calls


def test_no_spin_when_every_cpu_is_taken_and_it_stops_when_they_become_so(epoll, loadavg):
    path, write = loadavg
    ep, _peer = epoll
    spinner = _spinner(ep, 5.0, path)
    cpus = len(os.sched_getaffinity(0))
    write(cpus + 1)
    calls = _counting(spinner)
    assert spinner.wait(-1) is False and not calls
    write(cpus)
    calls = _counting(spinner, then=lambda n: n == 10 and write(cpus + 1))
    assert spinner.wait(-1) is False
    # Stopped at the first look after the CPUs were taken, not at the end of 5 s.
    assert len(calls) == spin.CHECK_EVERY


def test_an_unreadable_load_means_no_spin(epoll, tmp_path):
    ep, _peer = epoll
    garbled = tmp_path / "loadavg"
    garbled.write_text("nonsense\n")
    spinner = _spinner(ep, 5.0, garbled)
    calls = _counting(spinner)
    assert spinner.wait(-1) is False and not calls


def test_the_window_grows_when_a_longer_spin_would_have_caught_the_event(epoll, loadavg):
    ep, _peer = epoll
    spinner = _spinner(ep, 0.0003, loadavg[0])
    spinner.window = 0.0
    assert spinner.wait(-1) is False          # a window of none: no poll, but it learns
    spinner.slept(0.0001, woken=True)         # the event came 100 us later: within the limit
    assert spinner.window == spin.GROW_FROM
    spinner.window = 0.0002
    spinner.wait(-1)
    spinner.slept(0.00025, woken=True)
    assert spinner.window == 0.0003           # doubled, held at the limit


def test_the_window_halves_after_spins_in_a_row_that_nothing_would_have_caught(epoll, loadavg):
    ep, peer = epoll
    spinner = _spinner(ep, 0.0003, loadavg[0])
    spinner.window = 0.0001
    for gap, woken in [(0.002, True)] * (spin.SHRINK_AFTER - 1) + [(0.5, False)]:
        assert spinner.wait(-1) is False
        spinner.slept(gap, woken)
    assert spinner.window == 0.00005
    # A spin that catches its event starts the count again.
    for _ in range(spin.SHRINK_AFTER - 1):
        spinner.wait(-1)
        spinner.slept(0.002, True)
    peer.send(b"x")
    assert spinner.wait(-1) is True
    _drain(ep)
    spinner.wait(-1)
    spinner.slept(0.002, True)
    assert spinner.window == 0.00005
    # Halved below half of GROW_FROM: none at all.
    for _ in range(spin.SHRINK_AFTER * 2):
        spinner.wait(-1)
        spinner.slept(0.002, True)
    assert spinner.window == 0.0


def test_a_wait_that_stood_back_teaches_nothing(epoll, loadavg):
    path, write = loadavg
    ep, _peer = epoll
    spinner = _spinner(ep, 0.0003, path)
    spinner.window = 0.0001
    write(len(os.sched_getaffinity(0)) + 1)
    for _ in range(spin.SHRINK_AFTER * 2):
        assert spinner.wait(-1) is False
        spinner.slept(0.002, True)
    spinner.slept(0.0001, True)
    assert spinner.window == 0.0001


def _drain(ep):
    """Read what made the registered end ready, so the next spin finds nothing."""
    for fd, _event in ep.poll(0):
        os.read(fd, 100)


def test_no_spinner_for_a_window_of_zero(epoll):
    ep, _peer = epoll
    assert spin.PollSpin.make(ep.fileno(), 0.0) is None


def test_watched_pools_are_held_weakly():
    pool, other = _Pool(working=1), _Pool(working=0)
    spin.watch_threads(pool)
    spin.watch_threads(other)
    spin.watch_threads(pool)          # watched once, however often it asks
    assert len(spin._watched.refs) == 2
    assert spin.threads_working()
    del pool
    gc.collect()
    assert not spin.threads_working()
    assert [ref() for ref in spin._watched.refs] == [other]


def test_awaited_rings_are_held_weakly():
    ring = _Ring(pending=1)
    spin.await_completions(ring)
    assert spin.completions_awaited()
    del ring
    gc.collect()
    assert not spin.completions_awaited() and spin._awaited.refs == ()


def test_woken_threads_say_when_one_of_them_works():
    threads = WokenThreads(2, "test-spin")
    started, release = threading.Event(), threading.Event()
    threads.call(lambda: (started.set(), release.wait(10)))
    try:
        assert started.wait(10)
        assert threads.working >= 1 and spin.threads_working()
    finally:
        release.set()
        threads.stop()
    assert not threads.working and not spin.threads_working()


def test_lean_poll_spins_before_it_sleeps_and_keeps_the_timeout(monkeypatch):
    """With a spin, what arrives during it is dispatched; what is ready at once
    never waits for it; a timer's timeout still bounds the whole wait."""
    from twisted.internet.epollreactor import EPollReactor

    reactor = EPollReactor()
    waits = []
    real_make = spin.PollSpin.make

    def make(fd, window, r=None):
        spinner = real_make(fd, window, r)
        real_wait = spinner.wait

        def wait(timeout):
            waits.append(timeout)
            return real_wait(timeout)
        spinner.wait = wait
        spinner._threads_free = lambda: True
        spinner._cpus_free = lambda: True
        return spinner
    monkeypatch.setattr(compat.PollSpin, "make", staticmethod(make))
    try:
        assert compat.lean_poll(reactor, spin=0.002)
        a, b = socket.socketpair()
        reader = _Reader(b)
        reactor.addReader(reader)
        a.send(b"ready")
        reactor.doIteration(1)
        assert reader.read == [b"ready"] and waits == []   # ready at once: no spin
        began = time.perf_counter()
        reactor.doIteration(0.05)
        elapsed = time.perf_counter() - began
        assert waits == [0.05] and elapsed >= 0.05   # spun 2 ms, then slept out the rest
        threading.Timer(0.0, lambda: a.send(b"later")).start()
        reactor.doIteration(5)
        assert reader.read[-1:] == [b"later"]
        for s in (a, b):
            s.close()
    finally:
        reactor._poller.close()


class _Reader:
    def __init__(self, sock):
        self.sock = sock
        self.read: list[bytes] = []

    def fileno(self):
        return self.sock.fileno()

    def logPrefix(self):
        return "reader"

    def doRead(self):
        self.read.append(self.sock.recv(100))

    def connectionLost(self, reason):
        pass


def test_a_write_in_flight_spins_longer_than_the_window_yields_and_teaches_nothing(epoll, loadavg, monkeypatch):
    ep, peer = epoll
    spinner = _spinner(ep, 0.0003, loadavg[0])
    spinner.window = 0.0   # learnt down to none: only the awaited write makes it spin
    ring = _Ring(pending=1)
    spin.await_completions(ring)
    yields = []
    monkeypatch.setattr(spin.os, "sched_yield", lambda: yields.append(1))
    began = time.perf_counter()
    assert spinner.wait(-1) is False
    assert time.perf_counter() - began >= 0.0003 * spin.AWAITED_FACTOR
    assert len(yields) > 10   # the CPU offered at each poll, to a kernel worker the write may need
    spinner.slept(0.0001, woken=True)
    assert spinner.window == 0.0   # not learnt from
    calls = _counting(spinner, then=lambda n: n == 20 and peer.send(b"x"))
    assert spinner.wait(-1) is True and len(calls) == 20   # its completion ends the spin
    _drain(ep)
    ring.pending = 0
    yields.clear()
    assert spinner.wait(-1) is False and not yields   # nothing in flight: the learnt window, none
    spinner.close()


def test_a_write_in_flight_does_not_spin_past_the_other_rules(epoll, loadavg):
    path, write = loadavg
    ep, _peer = epoll
    spinner = _spinner(ep, 0.0003, path)
    spin.await_completions(_ring := _Ring(pending=1))
    calls = _counting(spinner)
    busy = _Pool(working=1)
    spin.watch_threads(busy)
    assert spinner.wait(-1) is False and not calls   # a thread of ours works
    busy.working = 0
    write(len(os.sched_getaffinity(0)) + 1)
    assert spinner.wait(-1) is False and not calls   # every CPU taken
    assert spinner.wait(0.0) is False and not calls
    spinner.close()
