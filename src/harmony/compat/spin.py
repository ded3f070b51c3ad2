"""The reactor polls a little before it sleeps: a wake-up on this machine kind costs ~65 us.

A serving process's reactor that finds nothing to do sleeps in ``epoll_wait``; its
virtual CPU then halts (``cpuidle`` here is ``haltpoll`` with
``guest_halt_poll_ns = 0``: no polling in the guest), and the next packet wakes it
through the hypervisor.  Traced on a proxied C-FIND (``perf`` on the three
processes' system calls and switches, bench/dimse "C-FIND, ninth pass"): from the
client's ``send`` to Harmony's ``epoll_wait`` returning took 60-70 us; Harmony's
own work between that read and its request to the PACS took about as long.  A
proxy pays that hop twice a request where the client talking to the PACS
directly pays it once, and the ratio row of issue 13 counts it.

So, after the reactor handled events, :class:`PollSpin` keeps asking the kernel
for more, without a timeout, for up to *window* seconds before the reactor
blocks: the client's next request (its turnaround was 100-200 us) or a thread's
report usually arrives inside it.  HAProxy's ``busy-polling`` does the same for
the same reason ("when running inside virtual machines ... 30 to 100
microseconds"), but for good; Go's scheduler spins a thread briefly before
parking it.  Here it is bounded, and it stands back whenever the spin would take
something from somebody:

- **another of this process's threads is working** (:func:`watch_threads`: the
  store's threads and its flushes behind the answers, the folder journal's
  writer and commit threads - not its flusher, which nothing waits for -, the
  DICOM and storage thread pools, the reactor's own).  Each ``epoll_wait``
  through the ``select`` module lets go of the GIL, and a thread running
  Python lost it to the spinning reactor at each of its own system calls: one association into ``local_archive``
  went 5-9 % slower that way.  So the spin calls ``epoll_wait`` through
  ``ctypes.PyDLL``, keeping the GIL - and then a thread that must report back
  (``callFromThread`` needs the GIL) waits out the spin: the journal's writer,
  not watched at first, made one association into ``storage_dir`` 11 %
  slower for 0.4 ms more CPU an instance, the spin delaying the very answer
  it waited for.  The spin does not start while a watched thread works;
- **every CPU is taken**: ``/proc/loadavg``'s count of runnable tasks (this
  thread included) is above the CPUs this process may use - spinning would then
  only slow whoever waits for one (four associations, or Orthanc beside us).

Both are checked before the spin, the CPUs again every :data:`CHECK_EVERY` polls
of it.  An idle process never spins: the window starts only after events were
handled.  During ingest a store thread or a round of flushes works nearly all
the time, so the reactor seldom spins there (one association into
``local_archive``: 2,961 of 3,000 waits stood back).

The window also learns, as the kernel's own ``haltpoll`` governor does: a spin
that found nothing, followed by an event within the limit, doubles it (a longer
spin would have caught that one); :data:`SHRINK_AFTER` spins in a row that found
nothing and were not followed by an event within the limit halve it, down to
none.  Traffic whose gaps outlast the limit (an upstream slower than the window,
a client that thinks between requests) stops paying CPU for spins that catch
nothing, while a C-FIND client's next request, a gap of 100-200 us every other
wait, keeps the whole window.
One wait is certain to end soon: a write of ours in flight in the kernel (the
folder journal's, through harmony.compat.uring: :func:`await_completions`).
While one is, the spin lasts up to :data:`AWAITED_FACTOR` times the limit
whatever it has learnt (its completion, a data write and a cache flush, took
0.15-0.8 ms here, longer than the limit), is not learnt from, and gives the
CPU up (``sched_yield``) at each poll: the write's flush may run on a kernel
worker queued on this very CPU, and a spin that kept the CPU from it delayed
the completion it waited for to the scheduler's next tick.  Nothing of ours
needs the GIL meanwhile, which is why the journal went to a ring for it
(bench/dimse, "storage_dir, sixth pass").

``[proxy] poll_spin_us`` sets the window at start (a reload does not change
it); 0 turns it off (docs/configuration.md).
Linux only; anything missing (``/proc``, ``epoll_wait`` in libc) means no spin.
"""

from __future__ import annotations

import ctypes
import os
import time
import weakref
from typing import Protocol


class _Working(Protocol):
    @property
    def working(self) -> object:
        """Truthy while one of its threads runs a job (Twisted's ``ThreadPool.working``
        list, :class:`harmony.storage.threads.WokenThreads`' count)."""


class _Pending(Protocol):
    @property
    def pending(self) -> int:
        """Operations submitted to the kernel and not yet reaped (harmony.compat.uring)."""


class WeakMembers:
    """Objects kept weakly, read as a tuple of weak references.

    Read on every reactor wait: iterating a ``WeakSet`` (its copy and iteration guard)
    cost 2.6 us for seven pools, a tuple of references 0.45 us.  Adding is rare (a store
    or a ring opening); a member collected drops out through its reference's callback."""

    def __init__(self):
        self.refs: tuple[weakref.ref, ...] = ()

    def add(self, member) -> None:
        if any(ref() is member for ref in self.refs):
            return
        self.refs = self.refs + (weakref.ref(member, self._gone),)

    def _gone(self, ref: weakref.ref) -> None:
        self.refs = tuple(r for r in self.refs if r is not ref)


_watched = WeakMembers()


def watch_threads(pool: _Working) -> None:
    """Let *pool* hold the reactor's spin off while one of its threads works (kept weakly)."""
    _watched.add(pool)


_awaited = WeakMembers()


def await_completions(source: _Pending) -> None:
    """Let *source*'s operations in flight in the kernel (an io_uring's: its ``pending``
    count) make the reactor spin up to :data:`AWAITED_FACTOR` times its window for
    their completion (kept weakly)."""
    _awaited.add(source)


def completions_awaited() -> bool:
    """Whether an awaited source has an operation in flight (a hint, read without locks)."""
    for ref in _awaited.refs:
        source = ref()
        if source is not None and source.pending:
            return True
    return False


def threads_working() -> bool:
    """Whether a thread of a watched pool is running a job now (read without locks:
    a hint, as the spin needs)."""
    for ref in _watched.refs:
        pool = ref()
        if pool is not None and pool.working:
            return True
    return False


#: Polls of a spin (~1 us each) between two looks at the CPUs (~2 us a look).
CHECK_EVERY = 32
#: Spins in a row that caught nothing within the limit before the window is halved.
SHRINK_AFTER = 4
#: While an operation of ours is in flight in the kernel (:func:`await_completions`), the
#: spin lasts up to this many times the limit: its completion is certain and is what the
#: reactor waits for (a journal write with its data sync: 0.25-0.8 ms here).
AWAITED_FACTOR = 4
#: Where a window grows from (and below half of which it is none), seconds.
GROW_FROM = 50e-6


class PollSpin:
    """``wait(timeout)``: poll *epoll_fd* without sleeping for up to the window."""

    def __init__(self, epoll_fd: int, window: float, reactor=None):
        self.epoll_fd = epoll_fd
        #: The longest spin (``[proxy] poll_spin_us``), and the one made now (learnt).
        self.limit = self.window = window
        #: Spins in a row that caught nothing within the limit.
        self._misses = 0
        #: Whether the last wait spun (or would have, with a window of none): what
        #: :meth:`slept` learns from; a wait that stood back teaches nothing.
        self._spun = False
        #: The reactor whose own thread pool (if it made one) counts as a watched pool.
        self._reactor = reactor
        self._cpus = len(os.sched_getaffinity(0))
        self._loadavg = os.open("/proc/loadavg", os.O_RDONLY | os.O_CLOEXEC)
        self._epoll_wait = ctypes.PyDLL(None).epoll_wait
        # Room for one event (12 bytes on x86-64, 16 where it is not packed): the spin
        # only asks whether something is ready; level-triggered, it stays ready for the
        # reactor's own poll.
        self._event = ctypes.create_string_buffer(16)

    @classmethod
    def make(cls, epoll_fd: int, window: float, reactor=None) -> PollSpin | None:
        """A spinner, or ``None`` where this system cannot have one (or *window* is 0)."""
        if window <= 0:
            return None
        try:
            return cls(epoll_fd, window, reactor)
        except (OSError, AttributeError):
            return None

    def close(self) -> None:
        os.close(self._loadavg)

    def _threads_free(self) -> bool:
        """No other thread of ours works."""
        if threads_working():
            return False
        pool = getattr(self._reactor, "threadpool", None)
        return pool is None or not pool.working

    def _cpus_free(self) -> bool:
        """No runnable task (this thread counted) would wait for a CPU."""
        try:
            running = int(os.pread(self._loadavg, 64, 0).split()[3].split(b"/")[0])
        except (OSError, ValueError, IndexError):
            return False
        return running <= self._cpus

    def wait(self, timeout: float) -> bool:
        """Spin up to the window (or *timeout*, if shorter and not negative); True as
        soon as an event is ready, False when the window passed or the spin stood back."""
        self._spun = False
        if timeout == 0 or not self._threads_free() or not self._cpus_free():
            return False
        window = self.window
        awaited = completions_awaited()
        yield_cpu = os.sched_yield
        if awaited:
            window = self.limit * AWAITED_FACTOR   # not learnt from: an answer is on its way
        else:
            self._spun = True
        window = window if timeout < 0 else min(window, timeout)
        if window <= 0:
            return False
        clock = time.perf_counter
        end = clock() + window
        epoll_wait, fd, event = self._epoll_wait, self.epoll_fd, self._event
        polls = 0
        while clock() < end:
            if epoll_wait(fd, event, 1, 0) > 0:
                if self._spun:
                    self._misses = 0
                return True
            polls += 1
            if awaited:
                # The completion may need a kernel worker queued on this very CPU (a direct
                # write's flush runs on a per-CPU workqueue): a spin that keeps the CPU from
                # it delays what it waits for until the scheduler's tick - p90 1.6 ms
                # against 0.6 without the spin (bench/dimse "storage_dir, sixth pass").
                yield_cpu()
            # Only the CPUs are looked at again: our threads take work from the reactor's
            # callbacks (or went on with what they had, and then the spin never began),
            # and the reactor runs none while it spins.
            if polls % CHECK_EVERY == 0 and not self._cpus_free():
                self._spun = False
                return False
        return False

    def slept(self, idle: float, woken: bool) -> None:
        """After a :meth:`wait` that caught nothing, the reactor slept: *idle* seconds
        from the spin's start until an event (*woken*) or its timeout.  Grows the
        window when a longer spin would have caught the event, halves it after
        :data:`SHRINK_AFTER` such waits in a row when none would have."""
        if not self._spun:
            return
        if woken and idle <= self.limit:
            self.window = min(self.limit, max(self.window * 2, GROW_FROM))
            self._misses = 0
            return
        self._misses += 1
        if self._misses >= SHRINK_AFTER:
            self._misses = 0
            half = self.window / 2
            self.window = half if half >= GROW_FROM / 2 else 0.0
