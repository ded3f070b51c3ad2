"""Plain threads for the store's jobs that report back by themselves.

The store's ingest jobs (place and commit an instance) and its index queries
(C-FIND/QIDO) each finish with their own ``reactor.callFromThread``, so they
need neither a Deferred nor Twisted's ``ThreadPool``, whose ``callInThread``
goes through a coordinator, a team and a worker queue per job (~7 % of a
C-STORE's GIL-holding samples, bench/ingest "C-STORE CPU per instance,
session 7").  One loop serves both; they differ only in how a job wakes a
thread, and each way was chosen by measurement:

- :class:`QueuedThreads` (ingest): a ``queue.SimpleQueue``, whose ``put`` wakes
  a thread only when one is waiting.
- :class:`WokenThreads` (queries): an ``EFD_SEMAPHORE`` eventfd.  Twisted's
  pool notifies a ``Condition``, a lock release made with the GIL held, and on
  this two-core machine the woken thread preempted the reactor in it -- 27 % of
  the reactor's GIL-holding samples of a study search (py-spy ``--gil``,
  bench/archive).  ``os.eventfd_write`` lets go of the GIL for the system call,
  so the woken reader takes it at once (the journal's writer wakes the same
  way, harmony.storage.journal), and queries never wait behind ingest work.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
from typing import Callable

from twisted.python.failure import Failure

from harmony.log import get_logger

log = get_logger("harmony.storage.threads")

#: The job that ends the thread taking it.
_STOP = (None, ())


class JobThreads:
    """*size* plain threads running ``fn(*args)`` jobs in the order given; a
    subclass says how a job is handed over (:meth:`_open` makes what the threads
    of one start share, :meth:`_put`, :meth:`_take`, :meth:`_close` use it).

    *idle*, if given, is called by a thread that finished a job and found no
    other waiting, as ``idle(pending)`` with *pending* a function saying how many
    jobs have come since: work kept off the jobs' way (the store's spare temp
    files)."""

    def __init__(self, size: int, name: str, idle: Callable[[Callable[[], int]], object] | None = None):
        self.size = max(1, size)
        self.name = name
        self.idle = idle
        self._threads: list[threading.Thread] = []
        self._handle = None
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        with self._lock:
            if self._threads:
                return
            self._handle = handle = self._open()
            self._threads = [threading.Thread(target=self._work, args=(handle,), name=f"{self.name}-{i}",
                                              daemon=True) for i in range(self.size)]
            for thread in self._threads:
                thread.start()

    def call(self, fn, *args) -> None:
        """Run ``fn(*args)`` on one of the threads (started first if need be)."""
        if not self._threads:
            self.start()
        self._put(self._handle, (fn, args))

    def _work(self, handle) -> None:
        take, idle, pending = self._take, self.idle, self.pending
        while True:
            fn, args = take(handle)
            if fn is None:
                return
            try:
                fn(*args)
                if idle is not None and not pending():
                    idle(pending)
            except Exception:  # noqa: BLE001 - jobs report their own errors; this is a bug's last stop
                log.failure("storage: a {name} job failed", Failure(), name=self.name)

    def stop(self) -> None:
        """Finish the jobs queued, then end the threads."""
        with self._lock:
            threads, self._threads = self._threads, []
            handle, self._handle = self._handle, None
            for _ in threads:
                self._put(handle, _STOP)
        for thread in threads:
            thread.join()
        if threads:
            self._close(handle)

    def pending(self) -> int:
        """How many jobs wait for a thread."""
        raise NotImplementedError

    def _open(self):
        raise NotImplementedError

    def _put(self, handle, job) -> None:
        raise NotImplementedError

    def _take(self, handle):
        raise NotImplementedError

    def _close(self, handle) -> None:
        pass


class QueuedThreads(JobThreads):
    """Jobs handed over through a ``queue.SimpleQueue`` (the store's ingest threads)."""

    def __init__(self, size: int, name: str, idle=None):
        super().__init__(size, name, idle)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()

    def pending(self) -> int:
        return self._jobs.qsize()

    def _open(self):
        return self._jobs

    def _put(self, handle, job) -> None:
        self._jobs.put(job)

    def _take(self, handle):
        return self._jobs.get()


class WokenThreads(JobThreads):
    """Jobs in a deque, each counted on an ``EFD_SEMAPHORE`` eventfd (one a start):
    one job wakes one thread, and a job is appended before its count is written,
    so a thread that has read a count always finds a job (the store's query
    threads)."""

    def __init__(self, size: int, name: str, idle=None):
        super().__init__(size, name, idle)
        self._jobs: collections.deque = collections.deque()

    def pending(self) -> int:
        return len(self._jobs)

    def _open(self):
        return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_SEMAPHORE)

    def _put(self, handle, job) -> None:
        self._jobs.append(job)
        os.eventfd_write(handle, 1)

    def _take(self, handle):
        os.eventfd_read(handle)
        return self._jobs.popleft()

    def _close(self, handle) -> None:
        os.close(handle)
