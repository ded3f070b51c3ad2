"""Plain threads for the store's jobs that report back by themselves, woken through an eventfd.

The store's ingest jobs (place and commit instances) and its index queries
(C-FIND/QIDO) each finish with their own ``reactor.callFromThread``, so they
need neither a Deferred nor Twisted's ``ThreadPool``, whose ``callInThread``
goes through a coordinator, a team and a worker queue per job (~7 % of a
C-STORE's GIL-holding samples, bench/ingest "C-STORE CPU per instance,
session 7").

How a job wakes a thread was measured twice.  Twisted's pool notifies a
``Condition``, and ``queue.SimpleQueue.put`` releases a lock: both with the GIL
held, and on this two-core machine the woken thread preempted the reactor right
there -- 27 % of the reactor's GIL-holding samples of a study search (py-spy
``--gil``, bench/archive), 17 % of a C-STORE ingest's for ``SimpleQueue.put``
(bench/ingest, "Merged build, session 8 end").  ``os.eventfd_write`` lets go of
the GIL for the system call, so the woken thread takes it at once (the journal's
writer wakes the same way, harmony.storage.journal): C-STORE CPU per instance
1.40-1.45 against 1.58-1.65 ms with ``SimpleQueue`` in the same rounds.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Callable

from twisted.python.failure import Failure

from harmony.compat.spin import watch_threads
from harmony.log import get_logger

log = get_logger("harmony.storage.threads")

#: The job that ends the thread taking it.
_STOP = (None, ())


class WokenThreads:
    """*size* plain threads running ``fn(*args)`` jobs in the order given.

    Jobs wait in a deque.  A thread that finds none goes to sleep on an
    ``EFD_SEMAPHORE`` eventfd made at each start, counted as asleep; a job is
    appended and a sleeper claimed under one lock, and only a claimed sleeper is
    woken (one ``write``), so a thread busy with the job before finds the next
    one itself.  Under four associations the one thread placing held instances
    was busy for most jobs, and the reactor's ``eventfd_write`` per C-STORE -
    the GIL let go and taken back, often after the busy thread's turn - was
    ~10 % of its profile (bench/ingest, "C-STORE, session 13").  A woken thread
    that finds the job taken meanwhile sleeps again.

    *idle*, if given, is called by a thread that finished a job and found no
    other waiting, and by each thread as it stops, as ``idle(pending)`` with
    *pending* a function saying how many jobs have come since: work kept off the
    jobs' way (the store's spare temp files and WAL checkpoints, and the commit
    of what a job held for the next one)."""

    def __init__(self, size: int, name: str, idle: Callable[[Callable[[], int]], object] | None = None):
        self.size = max(1, size)
        self.name = name
        self.idle = idle
        self._jobs: collections.deque = collections.deque()
        self._threads: list[threading.Thread] = []
        self._event: int | None = None
        self._lock = threading.Lock()
        #: Threads asleep on the eventfd that no job has claimed yet (under _jobs_lock).
        self._asleep = 0
        self._jobs_lock = threading.Lock()

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        with self._lock:
            if self._threads:
                return
            self._event = event = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_SEMAPHORE)
            self._threads = [threading.Thread(target=self._work, args=(event,), name=f"{self.name}-{i}",
                                              daemon=True) for i in range(self.size)]
            for thread in self._threads:
                thread.start()
        watch_threads(self)   # the reactor does not spin while one of these works

    @property
    def working(self) -> int:
        """How many of the threads run (or were woken for) a job: read without the lock."""
        return len(self._threads) - self._asleep

    def call(self, fn, *args) -> None:
        """Run ``fn(*args)`` on one of the threads (started first if need be)."""
        if not self._threads:
            self.start()
        with self._jobs_lock:
            self._jobs.append((fn, args))
            if not self._asleep:
                return
            self._asleep -= 1
        os.eventfd_write(self._event, 1)

    def pending(self) -> int:
        """How many jobs wait for a thread."""
        return len(self._jobs)

    def _work(self, event: int) -> None:
        jobs, idle, pending, lock = self._jobs, self.idle, self.pending, self._jobs_lock
        while True:
            with lock:
                if jobs:
                    fn, args = jobs.popleft()
                else:
                    self._asleep += 1
                    fn = args = None
            if args is None:
                os.eventfd_read(event)
                continue
            if fn is None:
                if idle is not None:   # (a job may have held work for one queued after it: see GroupCommit.hold)
                    idle(pending)
                return
            try:
                fn(*args)
                if idle is not None and not jobs:
                    idle(pending)
            except Exception:  # noqa: BLE001 - jobs report their own errors; this is a bug's last stop
                log.failure("storage: a {name} job failed", Failure(), name=self.name)

    def stop(self) -> None:
        """Finish the jobs queued, then end the threads."""
        with self._lock:
            threads, self._threads = self._threads, []
            event, self._event = self._event, None
            with self._jobs_lock:
                for _ in threads:
                    self._jobs.append(_STOP)
                asleep, self._asleep = self._asleep, 0
            if asleep:
                os.eventfd_write(event, asleep)
        for thread in threads:
            thread.join()
        if event is not None:
            os.close(event)
