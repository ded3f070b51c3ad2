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

Two ways to run the batches:

- *Reactor-driven* (no ``tell``): the reactor hands each batch to ``run`` (a
  storage thread) and queues what arrives meanwhile for the next one.
- *Thread leaders* (``tell`` = ``reactor.callFromThread``): a storage thread that
  has just placed an instance offers it (:meth:`~GroupCommit.offer`).  Finding no
  commit running, that thread becomes the leader and commits it at once (the
  lone writer: no hop through the reactor or another thread), then goes on
  committing whatever other threads offered meanwhile, batch after batch, until
  nothing is waiting.  A thread finding a commit running only queues its entry
  and returns to placing.  Each batch's callers are told with one
  ``callFromThread``.  With four associations the reactor-driven way cost each
  instance two more thread hand-offs (placed -> reactor -> commit thread ->
  reactor): 30 % more CPU per instance than with one association
  (bench/ingest, "C-STORE CPU per instance, session 7").

A thread that knows more placements are queued behind its own (one thread
placing the instances of several associations in turn) holds its entry
(:meth:`~GroupCommit.hold`): queued, not led, so the placement after it leads
one commit of both.  A thread that finds nothing more to place kicks
(:meth:`~GroupCommit.kick`) whatever is still held.
"""

from __future__ import annotations

import threading

from twisted.internet import defer
from twisted.python.failure import Failure

#: Instances per commit at most (a batch is one transaction: keep it short).
MAX_BATCH = 128


class GroupCommit:
    """Batches entries for *commit_batch* (see the module docstring).

    ``commit_batch(entries)`` makes every entry durable at once and returns one
    result per entry, in order, or raises to fail them all.  Reactor-driven,
    ``run(fn, *args)`` returns a Deferred of ``fn(*args)`` run on a storage
    thread.  With thread leaders (*tell*: ``reactor.callFromThread``), ``run(fn)``
    starts ``fn()`` on the commit thread (a Deferred or None; raising refuses)
    for what the reactor submits, and storage threads :meth:`offer` theirs.
    """

    def __init__(self, run, commit_batch, *, max_batch: int = MAX_BATCH, tell=None):
        self._run = run
        self._commit_batch = commit_batch
        self._tell = tell
        self.max_batch = max_batch
        #: (entry, waiter): a waiter is told with callback(result) or errback(failure), on the reactor.
        self._queue: list[tuple[object, defer.Deferred | _Slot]] = []
        self._busy = False
        #: Guards _busy and the queue (storage threads offer and lead).
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

    def submit(self, entry) -> defer.Deferred:
        """(Reactor.) Queue *entry*; fires with its result once its batch has committed."""
        d: defer.Deferred = defer.Deferred()
        self._enqueue([(entry, d)])
        return d

    def submit_many(self, entries: list) -> defer.Deferred:
        """(Reactor.) Queue *entries* together (the instances of one STOW-RS request): they
        join the same batch (up to ``max_batch``), so the request waits for one
        commit, not one per instance.  Fires with their results, in order, once
        committed; fails if their batch does."""
        if not entries:
            return defer.succeed([])
        group = _Group(len(entries))
        self._enqueue([(entry, _Slot(group, i)) for i, entry in enumerate(entries)])
        return group.done

    def offer(self, entry, waiter) -> None:
        """(A storage thread; thread leaders only.) Queue *entry*, whose *waiter*
        (a Deferred) is told on the reactor once its batch has committed; if no
        commit is running, this thread commits it now, and whatever is offered
        meanwhile after it (:meth:`_lead`)."""
        with self._lock:
            self._queue.append((entry, waiter))
            if self._busy:
                return
            self._busy = True
        self._lead()

    def hold(self, entry, waiter) -> None:
        """(A storage thread; thread leaders only.) Queue *entry* without leading a
        commit: the caller has more placements queued behind this one, and the one
        that places the last of them leads (:meth:`offer`) or kicks (:meth:`kick`).
        Led at once, each entry of a thread placing four associations' instances in
        turn was a commit of its own (bench/ingest, "C-STORE, session 9")."""
        with self._lock:
            self._queue.append((entry, waiter))

    def kick(self) -> None:
        """(A storage thread; thread leaders only.) Commit what is held, on this thread,
        unless a commit is running (its leader takes it next) or nothing waits."""
        with self._lock:
            if self._busy or not self._queue:
                return
            self._busy = True
        self._lead()

    def offer_many(self, entries: list, done: defer.Deferred) -> None:
        """(A storage thread; thread leaders only.) :meth:`offer` for entries placed
        together (a STOW-RS request's instances): they join the same batch (up to
        ``max_batch``), and *done* is told on the reactor with their results in order,
        or with their batch's failure."""
        group = _Group(len(entries), done)
        items = [(entry, _Slot(group, i)) for i, entry in enumerate(entries)]
        with self._lock:
            self._queue.extend(items)
            if self._busy:
                return
            self._busy = True
        self._lead()

    def _enqueue(self, items: list) -> None:
        with self._lock:
            self._queue.extend(items)
            if self._busy:
                return
            self._busy = True
        if self._tell is None:
            self._commit_next()
            return
        try:
            running = self._run(self._lead)
        except Exception:  # noqa: BLE001 - a refusal to run (a closed store) fails what waits, like a commit would
            running = defer.fail()
        if isinstance(running, defer.Deferred):
            running.addErrback(self._refused)

    def _refused(self, failure) -> None:
        """(Reactor.) The commit thread could not run: fail whatever waits."""
        with self._lock:
            batch, self._queue = self._queue, []
            self._busy = False
        if batch:
            self._told(batch, None, failure)

    def _lead(self) -> None:
        """(The leading thread.) Commit batches until nothing is waiting."""
        while True:
            with self._lock:
                batch = self._queue[:self.max_batch]
                del self._queue[:self.max_batch]
                if not batch:
                    self._busy = False
                    return
            results, failure = None, None
            try:
                results = self._commit_batch([entry for entry, _ in batch])
                if len(results) != len(batch):  # a broken commit_batch must not leave callers waiting forever
                    results, failure = None, Failure(RuntimeError(f"{len(results)} results for {len(batch)} entries"))
            except Exception:  # noqa: BLE001 - the batch's failure is every caller's in it
                failure = Failure()
            self._tell(self._told, batch, results, failure)

    def _told(self, batch, results, failure) -> None:
        """(Reactor.) A thread leader's batch is over: tell its callers."""
        if failure is not None:
            self.failed_batches += 1
            for _, waiter in batch:
                waiter.errback(failure)
            return
        self.batches += 1
        self.entries += len(batch)
        self.largest = max(self.largest, len(batch))
        for (_, waiter), result in zip(batch, results, strict=True):
            waiter.callback(result)

    # -- reactor-driven

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

    def __init__(self, n: int, done: defer.Deferred | None = None):
        self.done: defer.Deferred = defer.Deferred() if done is None else done
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
