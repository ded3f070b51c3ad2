"""Group commit (harmony.storage.groupcommit) and the store's batched write path.

The rule under test: a caller is told "durable" only after the batch holding its
instance has fsynced its folder and committed its rows; a failed batch fails every
caller in it and touches nothing acknowledged before; concurrent ingests share
batches (fewer commits than instances); a lone writer is committed at once.

The first tests drive :class:`GroupCommit` in memory: reactor-driven with Deferreds
standing in for the storage threads, and with thread leaders on the test's thread;
the others run the real store (sqlite and PostgreSQL) with fsync on, and one drives a real ``storescu`` -> ``dicom_scp`` -> ``local_archive``.
"""

from __future__ import annotations

import threading

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from harmony.storage import store as store_module
from harmony.storage.errors import StorageFailure
from harmony.storage.groupcommit import GroupCommit
from tests.sf_helpers import make_instances


class FakeThreads:
    """``run(fn, entries)`` that records each batch and fires only when told."""

    def __init__(self):
        self.batches: list[list] = []
        self.pending: list[defer.Deferred] = []

    def run(self, fn, entries):
        self.batches.append(list(entries))
        d = defer.Deferred()
        self.pending.append(d)
        return d

    def finish(self, index=-1):
        d = self.pending[index]
        d.callback([f"durable:{e}" for e in self.batches[index]])

    def fail(self, index=-1, error=None):
        self.pending[index].errback(error or StorageFailure("fsync failed: I/O error"))


def test_a_lone_writer_is_committed_at_once_and_told_only_after_its_commit():
    fake = FakeThreads()
    gc = GroupCommit(fake.run, None)
    results = []
    gc.submit("a").addCallback(results.append)
    assert fake.batches == [["a"]]  # no waiting for company: idle means commit now
    assert results == []            # not durable until the batch says so
    fake.finish()
    assert results == ["durable:a"]
    assert not gc.busy


def test_what_arrives_during_a_commit_shares_the_next_one():
    fake = FakeThreads()
    gc = GroupCommit(fake.run, None)
    results = []
    for name in "abcdef":
        gc.submit(name).addCallback(results.append)
    assert fake.batches == [["a"]]
    fake.finish(0)
    assert results == ["durable:a"]
    assert fake.batches[1] == list("bcdef")
    assert results == ["durable:a"]  # b-f wait for their own commit
    fake.finish(1)
    assert results == [f"durable:{n}" for n in "abcdef"]
    assert (gc.batches, gc.entries, gc.largest) == (2, 6, 5)  # 2 commits for 6 instances


def test_submissions_from_a_callers_callback_join_the_next_batch():
    fake = FakeThreads()
    gc = GroupCommit(fake.run, None)
    gc.submit("a").addCallback(lambda _: gc.submit("a2"))
    gc.submit("b").addCallback(lambda _: gc.submit("b2"))
    fake.finish(0)
    assert fake.batches[1] == ["b", "a2"]  # a2 was queued while a's batch was still in flight
    fake.finish(1)
    assert fake.batches[2] == ["b2"]


def test_a_failed_batch_fails_every_caller_in_it_and_nothing_acknowledged_before():
    fake = FakeThreads()
    gc = GroupCommit(fake.run, None)
    outcome = {}

    def track(name):
        gc.submit(name).addCallbacks(lambda r: outcome.__setitem__(name, r),
                                     lambda f: outcome.__setitem__(name, f.trap(StorageFailure)))
    for name in "abc":
        track(name)
    fake.finish(0)
    fake.fail(1)
    assert outcome == {"a": "durable:a", "b": StorageFailure, "c": StorageFailure}
    assert gc.failed_batches == 1
    # The committer carries on: the next writer commits normally.
    track("d")
    assert fake.batches[2] == ["d"]
    fake.finish(2)
    assert outcome["d"] == "durable:d"


class Leaders:
    """Thread leaders in memory: ``commit_batch`` runs on the offering "thread" (the
    test's), ``tell`` queues reactor calls until :meth:`deliver`, and the commit
    thread ``run`` starts for the reactor's submissions runs when told to."""

    def __init__(self, max_batch=128, during=None, fail=()):
        self.batches: list[list] = []
        self.told: list = []
        self.started: list = []
        self.during = during or {}   # batch number -> what arrives while it commits
        self.fail = set(fail)
        self.gc = GroupCommit(self.started.append, self.commit, tell=lambda fn, *a: self.told.append((fn, a)),
                              max_batch=max_batch)

    def commit(self, entries):
        n = len(self.batches)
        self.batches.append(list(entries))
        self.during.pop(n, lambda: None)()
        if n in self.fail:
            raise StorageFailure("fsync failed: I/O error")
        return [f"durable:{e}" for e in entries]

    def offer(self, entry, results) -> defer.Deferred:
        d = defer.Deferred()
        d.addBoth(lambda r: results.__setitem__(entry, r))
        self.gc.offer(entry, d)
        return d

    def deliver(self):
        told, self.told = self.told, []
        for fn, args in told:
            fn(*args)
        return len(told)


def test_a_lone_offer_is_committed_on_the_offering_thread_and_told_after_its_commit():
    rig = Leaders()
    results: dict = {}
    rig.offer("a", results)
    assert rig.batches == [["a"]] and rig.started == []  # no other thread, no hop through the reactor
    assert results == {}                                  # told on the reactor, not from the thread
    assert rig.deliver() == 1
    assert results == {"a": "durable:a"} and not rig.gc.busy
    assert (rig.gc.batches, rig.gc.entries) == (1, 1)


def test_offers_during_a_commit_queue_and_the_leader_commits_them_next_with_one_wake_up():
    results: dict = {}
    rig = Leaders(during={0: lambda: [rig.offer(name, results) for name in "bcd"]})
    rig.offer("a", results)   # the leader: b, c and d offered by other threads while it committed "a"
    assert rig.batches == [["a"], ["b", "c", "d"]]  # the followers only queued: the leader committed them
    assert results == {}
    assert rig.deliver() == 2   # one reactor call per batch, not per instance
    assert results == {n: f"durable:{n}" for n in "abcd"}
    assert (rig.gc.batches, rig.gc.entries, rig.gc.largest) == (2, 4, 3)
    assert not rig.gc.busy


def test_a_failed_leader_batch_fails_its_callers_and_the_leader_carries_on():
    results: dict = {}
    rig = Leaders(during={0: lambda: [rig.offer(name, results) for name in "bc"]}, fail={1})
    rig.offer("a", results)
    rig.deliver()
    assert results["a"] == "durable:a"
    assert all(results[n].check(StorageFailure) for n in "bc")
    assert rig.gc.failed_batches == 1 and not rig.gc.busy
    rig.offer("d", results)
    rig.deliver()
    assert results["d"] == "durable:d"


def test_held_entries_wait_for_the_next_offer_and_are_committed_with_it():
    """A thread with more placements queued behind its own holds each entry: no commit
    until the last placement is offered, then one commit of all of them."""
    rig = Leaders()
    results: dict = {}
    for name in "ab":
        d = defer.Deferred()
        d.addBoth(lambda r, name=name: results.__setitem__(name, r))
        rig.gc.hold(name, d)
    assert rig.batches == [] and rig.gc.busy   # queued, not committed, not told
    rig.offer("c", results)
    assert rig.batches == [["a", "b", "c"]]
    assert rig.deliver() == 1 and results == {n: f"durable:{n}" for n in "abc"}


def test_a_kick_commits_what_is_held_unless_nothing_is_or_a_leader_will():
    rig = Leaders()
    rig.gc.kick()                    # nothing held: no commit
    assert rig.batches == [] and not rig.gc.busy
    results: dict = {}
    d = defer.Deferred()
    d.addBoth(lambda r: results.__setitem__("a", r))
    rig.gc.hold("a", d)              # the placement it was held for failed: the thread kicks
    rig.gc.kick()
    assert rig.batches == [["a"]]
    rig.deliver()
    assert results == {"a": "durable:a"} and not rig.gc.busy

    def during_first_commit():       # another thread holds and kicks while a leader commits
        held = defer.Deferred()
        held.addBoth(lambda r: results.__setitem__("c", r))
        rig.gc.hold("c", held)
        rig.gc.kick()
        assert len(rig.batches) == 2  # the kick did not commit: the leader takes "c" next
    rig.during[1] = during_first_commit
    rig.offer("b", results)
    assert rig.batches[1:] == [["b"], ["c"]]
    rig.deliver()
    assert results["c"] == "durable:c" and not rig.gc.busy


def test_entries_offered_together_share_one_batch_and_their_group_is_told_once():
    """offer_many (a STOW-RS request placed on one storage thread): an idle committer commits
    the whole group on the offering thread at once (offer each would commit the first alone);
    offered during another commit, the group waits for the next batch whole; a failed batch
    fails the group once."""
    told: list = []
    groups = []
    rig = Leaders(during={0: lambda: groups.append(offer_group(list("cd")))}, fail={2})

    def offer_group(entries):
        done = defer.Deferred()
        done.addBoth(told.append)
        rig.gc.offer_many(entries, done)
        return done

    offer_group(list("ab"))
    assert rig.batches == [["a", "b"], ["c", "d"]] and told == []  # the leader went on to the next group
    assert rig.deliver() == 2
    assert told == [["durable:a", "durable:b"], ["durable:c", "durable:d"]] and not rig.gc.busy
    offer_group(list("ef"))
    rig.deliver()
    assert len(told) == 3 and told[2].check(StorageFailure)
    assert (rig.gc.batches, rig.gc.entries, rig.gc.failed_batches) == (2, 4, 1)


def test_reactor_submissions_start_a_leader_on_the_commit_thread():
    rig = Leaders(max_batch=2)
    group: list = []
    rig.gc.submit_many(list("abc")).addCallback(group.append)
    alone = []
    rig.gc.submit("d").addCallback(alone.append)
    assert len(rig.started) == 1 and rig.batches == []  # one leader started, nothing committed on the reactor
    rig.started[0]()   # the commit thread runs it: batches of at most 2 until nothing waits
    assert rig.batches == [["a", "b"], ["c", "d"]]
    rig.deliver()
    assert group == [["durable:a", "durable:b", "durable:c"]] and alone == ["durable:d"]
    assert not rig.gc.busy


def test_a_commit_thread_refusing_to_run_fails_what_waits():
    def closed(fn):
        raise StorageFailure("the store is closed")
    gc = GroupCommit(closed, None, tell=lambda fn, *a: fn(*a))
    failures = []
    gc.submit("a").addErrback(failures.append)
    assert failures and failures[0].check(StorageFailure)
    assert not gc.busy


def test_batches_are_capped():
    fake = FakeThreads()
    gc = GroupCommit(fake.run, None, max_batch=3)
    for i in range(8):
        gc.submit(i)
    fake.finish(0)
    assert fake.batches[1] == [1, 2, 3]
    fake.finish(1)
    assert fake.batches[2] == [4, 5, 6]


def test_a_store_refusing_to_run_fails_the_batch():
    def closed(fn, entries):
        raise StorageFailure("the store is closed")
    gc = GroupCommit(closed, None)
    failures = []
    gc.submit("a").addErrback(failures.append)
    assert failures and failures[0].check(StorageFailure)
    assert not gc.busy


# ---------------------------------------------------------------------- the real store


@pytest.fixture
def files(tmp_path):
    return make_instances(tmp_path / "in", 24, 61, patient_id="GC", size=16)


@pytest.fixture
def store(tmp_path, new_store):
    s = new_store(tmp_path / "store", min_free_bytes=0, fsync=True)
    yield s
    s.close()


def hold_first_commit_until_all_placed(store, n):
    """Make the first batch wait (on its storage thread, the leader) until all *n*
    instances are placed and the others queued behind it: batching without timing
    luck.  The leader may be one of the *n* (its own offer is still running) or a
    thread still finishing an earlier loop (then it may take several at once)."""
    cond = threading.Condition()
    offering = threading.local()
    counts = {"entered": 0, "queued": 0}
    real_offer, real_commit = store.committer.offer, store._commit_placed_sync
    first = []

    def offer(entry, waiter):
        with cond:
            counts["entered"] += 1
        offering.inside = True
        try:
            real_offer(entry, waiter)   # a follower's returns once queued (a leader's after its commits)
        finally:
            offering.inside = False
        with cond:
            counts["queued"] += 1
            cond.notify_all()

    def commit(batch, **kw):
        if not first:
            first.append(batch)
            leading = 1 if getattr(offering, "inside", False) else 0
            with cond:
                assert cond.wait_for(lambda: counts["entered"] == n and counts["queued"] == n - leading, 60)
        return real_commit(batch, **kw)

    store.committer.offer = offer
    store._commit_placed_sync = commit
    return first   # [the first batch] once it ran


@pytest_twisted.ensureDeferred
async def test_concurrent_ingests_share_commits(store, files):
    hold_first_commit_until_all_placed(store, len(files))
    stored = await defer.gatherResults([store.put_file(f) for f in files])
    assert len({s.sop_instance_uid for s in stored}) == len(files)
    assert store.committer.entries == len(files)
    assert store.committer.batches == 2  # the first instance alone, then all the others in one
    assert (await store.run(store.counts_sync))["instances"] == len(files)


def _held(store, f):
    from harmony.dicom.results import DicomInstance
    data = f.read_bytes()
    return DicomInstance(path=store.root / "none", data=[data], size=len(data))


@pytest_twisted.ensureDeferred
async def test_instances_held_in_memory_are_placed_on_one_thread_and_share_commits(store, files):
    """Small C-STOREs of several associations: one thread places them in turn, each held
    for the next one queued, the last committing all of them at once; a refused one
    among them does not strand what was held before it."""
    gate = threading.Event()
    store.held_threads.call(gate.wait)          # the instances queue up behind this job, as in a burst
    placed_on: set = set()
    real_place = store._place_bytes_sync

    def place(*a, **k):
        placed_on.add(threading.current_thread().name)
        return real_place(*a, **k)
    store._place_bytes_sync = place
    bad = _held(store, files[0])
    bad.data = [b"not DICOM at all"]
    ds = [store.put_instance(_held(store, f)) for f in files[:6]] + [store.put_instance(bad)]
    gate.set()
    outcomes = await defer.DeferredList(ds, consumeErrors=True)
    assert [ok for ok, _ in outcomes] == [True] * 6 + [False]
    assert placed_on == {"harmony-storage-ingest-held-0"}
    assert (store.committer.batches, store.committer.entries) == (1, 6)   # held, then kicked after the refusal
    assert (await store.run(store.counts_sync))["instances"] == 6


@pytest_twisted.ensureDeferred
async def test_a_placement_held_for_a_job_that_never_offers_is_committed_by_the_idle_thread(store, files):
    """Held for a queued job that does not place (the thread's stop, say): the thread's
    idle hook commits it (the stop runs the hook too: test_threads)."""
    gate = threading.Event()
    store.held_threads.call(gate.wait)
    d = store.put_instance(_held(store, files[0]))
    real_pending = store.held_threads.pending
    store.held_threads.pending = lambda: max(real_pending(), 1)   # as if its stop were already queued
    gate.set()
    stored = await d
    assert stored.path.exists() and store.committer.entries == 1
    store.held_threads.pending = real_pending


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("journal", [False, True], ids=["flushes", "journal"])
async def test_nobody_is_told_durable_before_its_fsyncs_and_commit(store, files, monkeypatch, journal):
    """The three flushes of an instance overlap (its data, its folder entry, its
    rows), and its caller hears "durable" only once all three have finished - or,
    journaled (its bytes in its committed in_flight row), once its commit is done,
    the row kept until the file's own flushes have finished."""
    store.journal = journal and store.journal  # (PostgreSQL never journals)
    journal = store.journal
    events = []
    lock = threading.Lock()

    def log(*event):
        with lock:
            events.append(event)

    store.open_sync()
    await store.recovered  # the start-up scan (a new store: "unknown") must not race the ingest below
    real_fsync_dir, real_fdatasync, real_write = store_module.fsync_dir, store_module.fdatasync_file, store.write_sync
    monkeypatch.setattr(store_module, "fsync_dir", lambda folder: (real_fsync_dir(folder), log("dir", folder)))
    monkeypatch.setattr(store_module, "fdatasync_file", lambda path: (real_fdatasync(path), log("data", path)))
    real_syncfs = store_module._syncfs
    monkeypatch.setattr(store_module, "_syncfs", lambda fd: (real_syncfs(fd), log("syncfs")))

    def write_sync(fn, *args, **kwargs):
        result = real_write(fn, *args, **kwargs)
        log("committed")
        return result
    store.write_sync = write_sync
    staged = []
    for f in files:  # owned staging files: the move path (link to a new name, data synced with the commit)
        s = store.root / "staged" / f.name
        s.parent.mkdir(parents=True, exist_ok=True)
        s.write_bytes(f.read_bytes())
        staged.append(s)
    hold_first_commit_until_all_placed(store, len(files))
    from harmony.dicom.results import DicomInstance

    def acked(stored):
        log("acked", stored.path)
        return stored
    await defer.gatherResults([store.put_instance(DicomInstance(path=s, owned=True)).addCallback(acked)
                               for s in staged])
    acks = [i for i, e in enumerate(events) if e[0] == "acked"]
    assert len(acks) == len(files)
    await threads.deferToThread(store.flushes_done_sync)
    for i in acks:
        path = events[i][1]
        assert path.exists()
        before = events[:i]
        assert ("committed",) in before, f"acknowledged before its commit: {before}"
        if not journal:
            assert ("dir", path.parent) in before, f"acknowledged before its folder fsync: {before}"
            assert ("data", path) in before, f"acknowledged before its data sync: {before}"
    # one folder fsync per batch and folder, not one per instance, and one data sync per instance;
    # journaled, behind the answers: one syncfs a round for all of it (batches in one round share it)
    folders = {e[1] for e in events if e[0] == "dir"}
    dir_syncs = len([e for e in events if e[0] == "dir"])
    data_syncs = len([e for e in events if e[0] == "data"])
    assert store.committer.batches == 2
    if journal:
        assert (dir_syncs, data_syncs) == (0, 0) and 1 <= events.count(("syncfs",)) <= 2
    else:
        assert dir_syncs == 2 * len(folders) and data_syncs == len(files) and ("syncfs",) not in events
    # and every instance is on record as in flight until its flushes are done
    rows = await store.read(lambda c: c.execute("SELECT count(*), count(data) FROM in_flight").fetchone())
    # The first batch's row is forgotten in the second batch's transaction - once its flushes are done,
    # which, journaled, may be after that transaction (they finish behind the acknowledgement).
    assert rows[0] == len(files) - 1 or (journal and rows[0] == len(files)), rows
    assert rows[1] == (rows[0] if journal else 0)


@pytest_twisted.ensureDeferred
async def test_a_failed_commit_fails_its_batch_and_loses_nothing(tmp_path, new_store, files):
    store = new_store(tmp_path / "store", min_free_bytes=0, fsync=True)
    try:
        first = await defer.gatherResults([store.put_file(f) for f in files[:4]])
        await store.recovered   # the start-up scan of a new store must not race the commits counted below
        held = hold_first_commit_until_all_placed(store, len(files) - 4)
        real_write = store.write_sync
        calls = []

        def failing_once(fn, *args, **kwargs):
            calls.append(fn)
            if len(calls) == 2:  # the second batch (all but one of the rest)
                raise StorageFailure("disk I/O error")
            return real_write(fn, *args, **kwargs)
        store.write_sync = failing_once
        outcomes = await defer.DeferredList([store.put_file(f) for f in files[4:]], consumeErrors=True)
        ok = [r for good, r in outcomes if good]
        failed = [r for good, r in outcomes if not good]
        first_batch = len(held[0])
        assert len(ok) == first_batch and len(failed) == len(files) - 4 - first_batch
        assert all(f.check(StorageFailure) for f in failed)
        assert store.counters["refused_failed"] == len(failed)
        counts = await store.run(store.counts_sync)
        assert counts["instances"] == 4 + first_batch  # the acknowledged ones, nothing else
        assert all(s.path.exists() for s in first + ok)
    finally:
        store.close()
    # Files of the failed batch are in place without rows: the store knows it was not
    # a clean stop, and the next open indexes them (never acknowledged, but not lost).
    reopened = new_store(tmp_path / "store", min_free_bytes=0, fsync=True)
    try:
        await threads.deferToThread(reopened.open_sync)
        assert reopened.recovery.reason == "unclean"
        assert (await reopened.run(reopened.counts_sync))["instances"] == len(files)
    finally:
        reopened.close()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("journal", [False, True], ids=["flushes", "journal"])
async def test_a_failed_folder_fsync_fails_the_batch(tmp_path, new_store, files, monkeypatch, journal):
    """Its rows committed alongside, the instance is refused (never acknowledged)
    and left on record as in flight: the next start checks its file.  Journaled,
    it was acknowledged at its commit (its bytes are in its row): the next start
    writes its file again from the row."""
    store = new_store(tmp_path / "store", min_free_bytes=0, fsync=True)
    store.journal = journal = journal and store.journal  # (PostgreSQL never journals)
    real = store_module.fsync_dir

    def broken(folder):
        if "instances" in str(folder):
            raise OSError(5, "Input/output error")
        return real(folder)

    def broken_syncfs(fd):   # journaled, the folder's sync behind the answer is the round's syncfs
        raise OSError(5, "Input/output error")
    try:
        await threads.deferToThread(store.open_sync)
        monkeypatch.setattr(store_module, "fsync_dir", broken)
        monkeypatch.setattr(store_module, "_syncfs", broken_syncfs)
        if journal:
            await store.put_file(files[0])
        else:
            with pytest.raises(StorageFailure):
                await store.put_file(files[0])
            assert store.counters["refused_failed"] == 1
        in_flight = await store.read(lambda c: c.execute("SELECT count(*) FROM in_flight").fetchone()[0])
        assert in_flight == 1
    finally:
        store.close()
    monkeypatch.setattr(store_module, "fsync_dir", real)
    assert not (store.root / store._markers[0]).exists()  # not a clean stop: the next start checks
    reopened = new_store(tmp_path / "store", min_free_bytes=0, fsync=True)
    try:
        await threads.deferToThread(reopened.open_sync)
        found = reopened.recovery
        assert (found.reason, found.in_flight, found.in_flight_removed) == ("unclean", 1, 0)
        assert found.in_flight_rewritten == (1 if journal else 0)
        assert (await reopened.run(reopened.counts_sync))["instances"] == 1  # its file is whole: kept
        assert await reopened.read(lambda c: c.execute("SELECT count(*) FROM in_flight").fetchone()[0]) == 0
    finally:
        reopened.close()


def test_a_group_submitted_together_shares_one_batch_even_when_the_committer_is_idle():
    fake = FakeThreads()
    gc = GroupCommit(fake.run, None)
    results = []
    gc.submit_many(["a", "b", "c"]).addCallback(results.append)
    assert fake.batches == [["a", "b", "c"]]  # submit() each would have committed "a" alone first
    fake.finish()
    assert results == [["durable:a", "durable:b", "durable:c"]]
    failures = []
    gc.submit_many(["d", "e"]).addErrback(failures.append)
    fake.fail()
    assert failures[0].check(StorageFailure)  # the batch's own error, not a FirstError wrapper
    assert gc.submit_many([]).result == []


def test_a_group_split_over_capped_batches_fails_once_if_one_of_them_fails():
    fake = FakeThreads()
    gc = GroupCommit(fake.run, None, max_batch=2)
    outcomes = []
    gc.submit_many(list("abcde")).addBoth(outcomes.append)
    assert fake.batches == [["a", "b"]]
    fake.finish(0)
    assert fake.batches[1] == ["c", "d"] and outcomes == []  # not told before every entry committed
    fake.fail(1)
    assert len(outcomes) == 1 and outcomes[0].check(StorageFailure)
    fake.finish(2)  # the last entry's batch commits after the group was failed: told nobody twice
    assert len(outcomes) == 1 and gc.entries == 3 and not gc.busy


@pytest_twisted.ensureDeferred
async def test_put_instances_commits_a_group_once_and_refuses_only_the_bad_one(store, files, tmp_path):
    """The parts of one STOW-RS request: staged files moved into place, one commit for
    the group, an invalid one refused alone, each outcome in order."""
    from twisted.python.failure import Failure

    from harmony.dicom.results import DicomInstance
    from harmony.storage.errors import InvalidInstance
    staged = []
    for f in files[:5]:
        s = tmp_path / "staged" / f.name
        s.parent.mkdir(parents=True, exist_ok=True)
        s.write_bytes(f.read_bytes())
        staged.append(s)
    staged[2].write_bytes(b"not DICOM")
    outcomes = await store.put_instances([DicomInstance(path=s, owned=True) for s in staged])
    assert [type(o) for o in outcomes] == [DicomInstance, DicomInstance, Failure, DicomInstance, DicomInstance]
    assert outcomes[2].check(InvalidInstance)
    assert store.committer.batches == 1 and store.committer.entries == 4
    assert (await store.run(store.counts_sync))["instances"] == 4
    assert [s.exists() for s in staged] == [False, False, False, False, False]  # moved in, or released
    assert all(o.path.exists() for o in outcomes if not isinstance(o, Failure))
    assert (store.counters["stored"], store.counters["refused_invalid"]) == (4, 1)


@pytest_twisted.ensureDeferred
async def test_held_instances_are_placed_and_committed_with_one_hand_off_and_no_second_scan(store, files,
                                                                                              monkeypatch):
    """A STOW-RS request held in memory: its instances go to the store as bytes with the scan
    the bridge made; the store files them from those bytes without scanning again, on one
    storage thread (never its thread pool: no answer through the reactor between placing and
    committing), in one commit, a bad one refused alone.  A closed store refuses every one."""
    from twisted.python.failure import Failure

    from harmony.dicom.rawscan import scan_bytes
    from harmony.dicom.results import DicomInstance
    from harmony.storage.errors import InvalidInstance
    scans: list = []
    monkeypatch.setattr(store_module, "scan_bytes", lambda data, *a: scans.append(1) or scan_bytes(data, *a))
    monkeypatch.setattr(store, "run", lambda *a, **k: pytest.fail("put_instances went through the pool"))
    datas = [f.read_bytes() for f in files[:4]]
    held = [DicomInstance(path=store.root / "none", data=[d], parsed=(None, scan_bytes(d)), size=len(d))
            for d in datas]
    held.insert(1, DicomInstance(path=store.root / "none", data=[b"not DICOM at all"], size=16))
    outcomes = await store.put_instances(held)
    assert [type(o) for o in outcomes] == [DicomInstance, Failure, DicomInstance, DicomInstance, DicomInstance]
    assert outcomes[1].check(InvalidInstance)
    assert scans == [1]   # only the part that came without a scan
    assert store.committer.batches == 1 and store.committer.entries == 4
    stored = [o for o in outcomes if not isinstance(o, Failure)]
    assert sorted(o.path.read_bytes() for o in stored) == sorted(datas)
    store.close()
    refused = await store.put_instances([DicomInstance(path=store.root / "none", data=[datas[0]], size=9)])
    assert len(refused) == 1 and refused[0].check(StorageFailure)
