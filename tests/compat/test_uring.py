"""harmony.compat.uring: the reactor's io_uring, against the running kernel.

This machine kind's kernel offers io_uring; a kernel that refuses it fails these
tests rather than skipping them (the journal would then never use its ring here).
"""

from __future__ import annotations

import errno
import mmap
import os
import select

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from harmony.compat import uring


def _ring() -> uring.Ring:
    ring = uring.Ring.make()
    assert ring is not None, "io_uring refused by this kernel (or HARMONY_URING=0)"
    return ring


def _wait(ring: uring.Ring, results: list, count: int) -> None:
    while len(results) < count:
        assert select.select([ring.fileno()], [], [], 10)[0], "no completion within 10 s"
        ring.reap()


def test_a_write_at_an_offset_with_flags(tmp_path):
    ring = _ring()
    path = tmp_path / "a"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    results: list[int] = []
    ring.write(fd, b"hello", 3, os.RWF_DSYNC, results.append)
    assert ring.pending == 1
    _wait(ring, results, 1)
    assert results == [5] and ring.pending == 0
    assert path.read_bytes() == b"\0\0\0hello"
    os.close(fd)
    ring.close()


def test_a_failure_comes_back_as_minus_errno(tmp_path):
    ring = _ring()
    results: list[int] = []
    ring.write(987654, b"x", 0, 0, results.append)   # no such descriptor
    read_only = os.open(tmp_path / "r", os.O_RDONLY | os.O_CREAT)
    ring.write(read_only, b"x", 0, 0, results.append)
    _wait(ring, results, 2)
    assert sorted(results) == sorted([-errno.EBADF, -errno.EBADF])
    os.close(read_only)
    ring.close()


def test_an_aligned_buffer_written_directly(tmp_path):
    """What the folder journal writes: page-aligned memory, O_DIRECT, RWF_DSYNC."""
    ring = _ring()
    path = tmp_path / "log"
    path.write_bytes(bytes(16384))
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    buffer = mmap.mmap(-1, 8192)
    buffer[:] = b"z" * 8192
    results: list[int] = []
    ring.write(fd, memoryview(buffer)[:4096], 4096, os.RWF_DSYNC, results.append)
    _wait(ring, results, 1)
    assert results == [4096]
    assert path.read_bytes() == bytes(4096) + b"z" * 4096 + bytes(8192)
    os.close(fd)
    ring.close()


def test_a_full_ring_and_a_closed_one_refuse_at_once(tmp_path):
    ring = uring.Ring.make(entries=2)
    assert ring is not None
    results: list[int] = []
    fd = os.open(tmp_path / "a", os.O_RDWR | os.O_CREAT)
    for _ in range(2):   # not reaped: both still count
        ring.write(fd, b"x", 0, 0, results.append)
    with pytest.raises(OSError) as refused:
        ring.write(fd, b"x", 0, 0, results.append)
    assert refused.value.errno == errno.EBUSY
    _wait(ring, results, 2)
    ring.close()
    with pytest.raises(OSError) as closed:
        ring.write(fd, b"x", 0, 0, results.append)
    assert closed.value.errno == errno.EBADF
    assert ring.reap() == 0
    os.close(fd)


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("HARMONY_URING", "0")
    assert uring.Ring.make() is None
    monkeypatch.setenv("HARMONY_URING", "1")
    ring = uring.Ring.make()
    assert ring is not None
    ring.close()


@pytest_twisted.ensureDeferred
async def test_the_reactor_reaps_completions_when_the_eventfd_is_readable(tmp_path):
    ring = _ring()
    reader = uring.RingReader(ring, reactor)
    reactor.addReader(reader)
    fd = os.open(tmp_path / "a", os.O_RDWR | os.O_CREAT)
    try:
        done: defer.Deferred = defer.Deferred()
        ring.write(fd, b"abc", 0, os.RWF_DSYNC, done.callback)
        assert await done == 3
        assert (tmp_path / "a").read_bytes() == b"abc"
    finally:
        reactor.removeReader(reader)
        os.close(fd)
        ring.close()
