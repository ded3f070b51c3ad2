"""Threads for the index's C-FIND/QIDO queries, woken through an eventfd.

A study search from ``local_archive`` is a few hundred microseconds of sqlite on a
storage thread, and handing it over cost more than that: Twisted's thread pool
wakes its worker by notifying a ``Condition``, a lock release made with the GIL
held, and on this two-core machine the woken thread preempted the reactor in it
-- 27 % of the reactor's GIL-holding samples of a study search (py-spy ``--gil``,
bench/archive).  ``os.eventfd_write`` lets go of the GIL for the system call, so
the woken reader can take it at once (the journal's writer wakes the same way,
harmony.storage.journal).  The jobs report back by themselves
(``reactor.callFromThread``), so there is no Deferred or coordinator per query,
and queries never wait behind ingest work on the storage pool.
"""

from __future__ import annotations

import collections
import os
import threading

from twisted.python.failure import Failure

from harmony.log import get_logger

log = get_logger("harmony.storage.readers")


class WokenThreads:
    """*size* plain threads running ``fn(*args)`` jobs in the order given.

    The eventfd counts as a semaphore (``EFD_SEMAPHORE``): each job adds one and
    each read takes one, so one job wakes one thread; a job is appended before its
    count is written, so a thread that has read a count always finds a job."""

    def __init__(self, size: int, name: str):
        self.size = max(1, size)
        self.name = name
        self._jobs: collections.deque = collections.deque()
        self._event: int | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        with self._lock:
            if self._threads:
                return
            self._event = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_SEMAPHORE)
            self._threads = [threading.Thread(target=self._work, args=(self._event,), name=f"{self.name}-{i}",
                                              daemon=True) for i in range(self.size)]
            for thread in self._threads:
                thread.start()

    def call(self, fn, *args) -> None:
        """Run ``fn(*args)`` on one of the threads (started first if need be)."""
        if not self._threads:
            self.start()
        self._jobs.append((fn, args))
        os.eventfd_write(self._event, 1)

    def _work(self, event: int) -> None:
        jobs = self._jobs
        while True:
            os.eventfd_read(event)
            fn, args = jobs.popleft()
            if fn is None:
                return
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - jobs report their own errors; this is a bug's last stop
                log.failure("storage: a query job failed", Failure())

    def stop(self) -> None:
        """Finish the jobs queued, then end the threads."""
        with self._lock:
            threads, self._threads = self._threads, []
            event, self._event = self._event, None
        if event is None:
            return
        for _ in threads:
            self._jobs.append((None, ()))
            os.eventfd_write(event, 1)
        for thread in threads:
            thread.join()
        os.close(event)
