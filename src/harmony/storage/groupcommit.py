"""Group commit: one fsync round and one index transaction for many instances.

Why it exists: an instance may be acknowledged (C-STORE Success, listed in a
STOW answer) only once it is durable - its file fsynced and renamed into
place, the folder entry fsynced, its index and queue rows committed.  Done one
instance at a time under the index write lock, every instance waited for its
own folder fsync and its own ``synchronous=FULL`` commit, so four associations
ingested no faster than one (the disk's flush latency was the whole cost; the
process held the GIL ~3 % of the time).

The rule is the classic one from database logs: a lone writer commits at once
(no timer, so no added latency when idle); whatever arrives while a commit is
in flight waits and goes into the *next* commit, all together.  Batches grow
exactly as much as commits are slower than arrivals.  Each caller's Deferred
fires only when the batch holding its instance has committed; a batch that
fails fails every caller in it (none of them was acknowledged) and nothing
committed earlier is touched.

Runs on the reactor; the batch itself runs wherever *run* sends it (the
store's commit thread).  A lone writer goes faster still: finding the
committer idle, the storage thread that placed the instance commits it at once
(:meth:`GroupCommit.claim`), saving a round trip through the reactor and
another thread (on this busy 2-core machine each such hop cost milliseconds).
"""

from __future__ import annotations

import threading

from twisted.internet import defer
from twisted.python.failure import Failure

#: Instances per commit at most (a batch is one transaction: keep it short).
MAX_BATCH = 128


class GroupCommit:
    """Batches entries for *commit_batch* (see the module docstring).

    ``run(fn, *args)`` returns a Deferred of ``fn(*args)`` (run on a storage
    thread); ``commit_batch(entries)`` makes every entry durable at once and
    returns one result per entry, in order, or raises to fail them all.

    A writer already on a storage thread may :meth:`claim` an idle committer
    and commit its own entry inline - the lone-writer case, which then skips a
    round trip through the reactor - and reports with :meth:`inline_done`.
    Everything else runs on the reactor.
    """

    def __init__(self, run, commit_batch, *, max_batch: int = MAX_BATCH):
        self._run = run
        self._commit_batch = commit_batch
        self.max_batch = max_batch
        self._queue: list[tuple[object, defer.Deferred | _Slot]] = []
        self._busy = False
        #: Guards _busy and the queue's emptiness against claim() from a storage thread.
        self._lock = threading.Lock()
        #: Committed batches, committed entries, failed batches, largest batch (metrics and tests).
        self.batches = 0
        self.entries = 0
        self.failed_batches = 0
        self.largest = 0

    @property
    def busy(self) -> bool:
        """A commit is in flight or entries are waiting for one."""
        return self._busy or bool(self._queue)

    def claim(self) -> bool:
        """(Any thread.) True if no commit is running or waiting: the caller then
        commits its entry itself and must call :meth:`inline_done` on the reactor
        afterwards; meanwhile submissions queue for the next batch."""
        with self._lock:
            if self._busy or self._queue:
                return False
            self._busy = True
            return True

    def inline_done(self, ok: bool) -> None:
        """(Reactor.) The claimed, inline commit of one entry is over."""
        if ok:
            self.batches += 1
            self.entries += 1
            self.largest = max(self.largest, 1)
        else:
            self.failed_batches += 1
        self._after()

    def submit(self, entry) -> defer.Deferred:
        """Queue *entry*; fires with its result once its batch has committed."""
        d: defer.Deferred = defer.Deferred()
        with self._lock:
            self._queue.append((entry, d))
            start = not self._busy
            self._busy = True
        if start:
            self._commit_next()
        return d

    def submit_many(self, entries: list) -> defer.Deferred:
        """Queue *entries* together (the instances of one STOW-RS request): they
        join the same batch (up to ``max_batch``), so the request waits for one
        commit, not one per instance.  Fires with their results, in order, once
        committed; fails if their batch does."""
        if not entries:
            return defer.succeed([])
        group = _Group(len(entries))
        with self._lock:
            self._queue.extend((entry, _Slot(group, i)) for i, entry in enumerate(entries))
            start = not self._busy
            self._busy = True
        if start:
            self._commit_next()
        return group.done

    def _commit_next(self) -> None:
        with self._lock:
            batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
        self.largest = max(self.largest, len(batch))
        try:
            running = self._run(self._commit_batch, [entry for entry, _ in batch])
        except Exception:  # noqa: BLE001 - a refusal to run (a closed store) fails the batch like a commit would
            running = defer.fail()
        running.addCallbacks(self._committed, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))

    def _committed(self, results, batch) -> None:
        if len(results) != len(batch):  # a broken commit_batch must not leave callers waiting forever
            self._failed(Failure(RuntimeError(f"{len(results)} results for {len(batch)} entries")), batch)
            return
        self.batches += 1
        self.entries += len(batch)
        # Callers are told while _busy is still set: whatever their callbacks
        # submit joins the queue and goes into the next batch together.
        for (_, d), result in zip(batch, results, strict=True):
            d.callback(result)
        self._after()

    def _failed(self, failure, batch) -> None:
        self.failed_batches += 1
        for _, d in batch:
            d.errback(failure)
        self._after()

    def _after(self) -> None:
        with self._lock:
            more = bool(self._queue)
            self._busy = more
        if more:
            self._commit_next()


class _Group:
    """Entries submitted together: one Deferred for all of them (a Deferred and a
    gatherResults per instance were a tenth of a STOW-RS request's reactor time)."""

    __slots__ = ("done", "results", "left")

    def __init__(self, n: int):
        self.done: defer.Deferred = defer.Deferred()
        self.results: list = [None] * n
        self.left = n


class _Slot:
    """One entry of a :class:`_Group` in the queue, told like a caller's Deferred."""

    __slots__ = ("group", "index")

    def __init__(self, group: _Group, index: int):
        self.group = group
        self.index = index

    def callback(self, result) -> None:
        group = self.group
        group.results[self.index] = result
        group.left -= 1
        if group.left == 0 and not group.done.called:
            group.done.callback(group.results)

    def errback(self, failure) -> None:
        # A group split over batches (over max_batch) fails as a whole if any of them does.
        if not self.group.done.called:
            self.group.done.errback(failure)
