"""The one thread boundary of Harmony's DICOM code.

DIMSE runs on the reactor (:mod:`harmony.dicom.ul`); what must not -- reading
a received instance with pydicom to validate it, transcoding pixel data,
copying a file durably (fsync) -- goes through :func:`run`, on one bounded
thread pool of its own, so a burst of large instances cannot starve the
reactor's default pool (DNS, other blocking callers) and the number of
threads stays fixed however many associations are open.
"""

from __future__ import annotations

from twisted.internet import threads
from twisted.python.threadpool import ThreadPool

from harmony.compat.spin import watch_threads

#: Enough to keep both cores and the disk busy; more only adds contention.
POOL_SIZE = 6

_pool: ThreadPool | None = None


def _get_pool(reactor) -> ThreadPool:
    global _pool
    if _pool is None:
        _pool = ThreadPool(minthreads=0, maxthreads=POOL_SIZE, name="harmony-dicom")
        _pool.start()
        watch_threads(_pool)   # the reactor does not spin while one of these works
        reactor.addSystemEventTrigger("during", "shutdown", _stop)
    return _pool


def _stop():
    global _pool
    pool, _pool = _pool, None
    if pool is not None:
        pool.stop()


def run(reactor, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on the DICOM thread pool; a Deferred of its result."""
    return threads.deferToThreadPool(reactor, _get_pool(reactor), fn, *args, **kwargs)
