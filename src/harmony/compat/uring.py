"""A small io_uring for the reactor: durable writes it does not wait for, on no thread of ours.

Why it exists: an instance C-STOREd into ``storage_dir`` is answered once its bytes
are durable in the folder journal's log (harmony.storage.journal): one
``pwritev2(RWF_DSYNC)``, a data write and a disk cache flush, 0.25-0.45 ms here.
The reactor must not block on it, so a writer thread made it - and every instance
then crossed two thread hand-offs (the reactor waking the writer, the writer
waking the reactor through ``callFromThread``) and the GIL passed back and forth
around them.  On this machine kind a wake-up of a sleeping thread costs 60-70 us
(harmony.compat.spin), and the thread that reports back needs the GIL, so the
reactor could not even poll for it.  Measured (bench/dimse/store_dir.py, one
association): the same work made inline on the reactor, blocking it, took 22 %
less time an instance - the price of the hand-offs, and the gain on offer if the
waiting can be taken from the thread without giving it to the reactor.

io_uring does that: the reactor submits the write with ``RWF_DSYNC`` and goes on;
the kernel makes it (a direct write goes to the device at once, its cache flush
runs on a kernel worker, and neither needs the GIL) and posts its completion,
which wakes the reactor through an eventfd in its ``epoll`` set - or which the
reactor's spin finds, because nothing of ours is working while it waits.

Only what the journal needs is here: ``write`` at an offset with flags; one
submission per call (``io_uring_enter``), completions reaped when the eventfd is
readable.  The rings are shared memory written with plain
stores, which is correct where the CPU keeps stores in order (x86-64, as
liburing's own barriers are plain there); elsewhere, or where the kernel refuses
io_uring (``ENOSYS``, ``EPERM`` in a container, ``kernel.io_uring_disabled``),
:meth:`Ring.make` returns ``None`` and the caller keeps its thread.
``HARMONY_URING=0`` turns it off (A/B runs, or a kernel one distrusts).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
from collections.abc import Callable

from twisted.internet.abstract import FileDescriptor

_SETUP, _ENTER, _REGISTER = 425, 426, 427   # x86-64 system call numbers
_REGISTER_EVENTFD = 4
_OFF_SQES = 0x10000000
_FEAT_SINGLE_MMAP = 1
_OP_WRITE = 23
#: A submission queue entry: opcode, flags, ioprio, fd, off/addr2, addr, len, op flags,
#: user_data, buf_index, personality, splice_fd_in, addr3, pad (linux/io_uring.h).
_SQE = struct.Struct("<BBHiQQIIQHHiQQ")
_CQE = struct.Struct("<QiI")
_U32 = struct.Struct("<I")


class _Params(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("sq_thread_cpu", ctypes.c_uint32),
                ("sq_thread_idle", ctypes.c_uint32), ("features", ctypes.c_uint32),
                ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                # head, tail, ring_mask, ring_entries, flags, dropped, array, resv1; user_addr
                ("sq_off", ctypes.c_uint32 * 8), ("sq_user_addr", ctypes.c_uint64),
                # head, tail, ring_mask, ring_entries, overflow, cqes, flags, resv1; user_addr
                ("cq_off", ctypes.c_uint32 * 8), ("cq_user_addr", ctypes.c_uint64)]


def enabled() -> bool:
    """Whether ``HARMONY_URING`` allows a ring (anything but ``0``; default on)."""
    return os.environ.get("HARMONY_URING", "1") != "0"


class Ring:
    """One io_uring; :meth:`write` calls back ``done(result)`` (bytes written or
    ``-errno``) from :meth:`reap`, which the reactor runs when :meth:`fileno` (an
    eventfd) is readable (:class:`RingReader`)."""

    def __init__(self, entries: int = 64):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        params = _Params()
        fd = self._libc.syscall(_SETUP, entries, ctypes.byref(params))
        if fd < 0:
            raise OSError(ctypes.get_errno(), "io_uring_setup")
        self._fd = fd
        self._event = -1
        try:
            if not params.features & _FEAT_SINGLE_MMAP:
                raise OSError(errno.ENOSYS, "io_uring without a single ring mapping (kernel before 5.4)")
            sq, cq = params.sq_off, params.cq_off
            self._sq_head, self._sq_tail, self._sq_array = sq[0], sq[1], sq[6]
            self._cq_head, self._cq_tail, self._cqes = cq[0], cq[1], cq[5]
            size = max(sq[6] + params.sq_entries * 4, cq[5] + params.cq_entries * _CQE.size)
            self._ring = mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._sqes = mmap.mmap(fd, params.sq_entries * _SQE.size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=_OFF_SQES)
            self._sq_mask = _U32.unpack_from(self._ring, sq[2])[0]
            self._cq_mask = _U32.unpack_from(self._ring, cq[2])[0]
            self._sq_entries = params.sq_entries
            self._event = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            event = ctypes.c_int(self._event)
            if self._libc.syscall(_REGISTER, fd, _REGISTER_EVENTFD, ctypes.byref(event), 1) < 0:
                raise OSError(ctypes.get_errno(), "io_uring_register(EVENTFD)")
        except BaseException:
            self.close()
            raise
        #: user_data -> (done, what the kernel reads from until then: kept alive here).
        self._pending: dict[int, tuple[Callable[[int], None], object]] = {}
        self._next = 1

    @classmethod
    def make(cls, entries: int = 64) -> Ring | None:
        """A ring, or ``None`` where this process cannot have one (see the module docstring)."""
        if not enabled() or platform.machine() not in ("x86_64", "AMD64") or not hasattr(os, "eventfd"):
            return None
        try:
            return cls(entries)
        except (OSError, AttributeError, ValueError):
            return None

    def fileno(self) -> int:
        return self._event

    @property
    def pending(self) -> int:
        """Operations submitted and not yet reaped."""
        return len(self._pending)

    def close(self) -> None:
        """Release the ring (operations in flight finish in the kernel; nobody is told)."""
        for name in ("_sqes", "_ring"):
            mapping = getattr(self, name, None)
            if mapping is not None:
                mapping.close()
                setattr(self, name, None)
        if self._event >= 0:
            os.close(self._event)
            self._event = -1
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._pending = {}

    def write(self, fd: int, data: bytes | memoryview, offset: int, flags: int,
              done: Callable[[int], None]) -> None:
        """``pwritev2(fd, [data], offset, flags)`` by the kernel; ``done(bytes written or -errno)``.
        *data*: bytes, or a writable buffer (memory aligned for ``O_DIRECT``); either is
        held until the write is done.  A short write is the caller's to finish (as a
        ``pwrite``'s would be)."""
        if self._fd < 0:
            raise OSError(errno.EBADF, "the io_uring is closed")
        if len(self._pending) >= self._sq_entries:
            raise OSError(errno.EBUSY, "the io_uring is full")
        keep: object
        if isinstance(data, bytes):
            keep, address = data, ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
        else:
            keep = (ctypes.c_char * len(data)).from_buffer(data)
            address = ctypes.addressof(keep)
        ring = self._ring
        tail = _U32.unpack_from(ring, self._sq_tail)[0]
        index = tail & self._sq_mask
        key = self._next
        self._next = key + 1 if key < 2 ** 62 else 1
        _SQE.pack_into(self._sqes, index * _SQE.size, _OP_WRITE, 0, 0, fd, offset, address, len(data), flags,
                       key, 0, 0, 0, 0, 0)
        _U32.pack_into(ring, self._sq_array + 4 * index, index)
        # The entry is written before the tail moves: plain stores stay in order on x86-64.
        _U32.pack_into(ring, self._sq_tail, (tail + 1) & 0xFFFFFFFF)
        self._pending[key] = (done, keep)
        while True:
            submitted = self._libc.syscall(_ENTER, self._fd, 1, 0, 0, None, 0)
            if submitted >= 0:
                break
            error = ctypes.get_errno()
            if error != errno.EINTR:
                del self._pending[key]
                _U32.pack_into(ring, self._sq_tail, tail)   # withdrawn: the kernel took nothing
                raise OSError(error, "io_uring_enter")

    def reap(self) -> int:
        """Call back every completed operation; returns how many."""
        ring = self._ring
        if ring is None:
            return 0
        try:
            os.eventfd_read(self._event)
        except BlockingIOError:
            pass
        head = _U32.unpack_from(ring, self._cq_head)[0]
        reaped = 0
        while True:
            tail = _U32.unpack_from(ring, self._cq_tail)[0]
            if head == tail:
                break
            key, result, _flags = _CQE.unpack_from(ring, self._cqes + _CQE.size * (head & self._cq_mask))
            head = (head + 1) & 0xFFFFFFFF
            _U32.pack_into(ring, self._cq_head, head)
            entry = self._pending.pop(key, None)
            reaped += 1
            if entry is not None:
                entry[0](result)
                if self._ring is not ring:   # closed by that callback: the rest is nobody's
                    break
        return reaped


class RingReader(FileDescriptor):
    """The reactor's side of a :class:`Ring`: its eventfd in the reactor's poll set, the
    completions reaped when it is readable."""

    def __init__(self, ring: Ring, reactor=None):
        super().__init__(reactor)
        self.ring = ring

    def fileno(self) -> int:
        return self.ring.fileno()

    def doRead(self):
        self.ring.reap()

    def logPrefix(self) -> str:
        return "io_uring"
