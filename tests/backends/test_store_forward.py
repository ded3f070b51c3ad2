"""Store-and-forward: persistent queue, backoff, ordering, dead letters, restart.

Real sqlite store, real threads, real HTTP targets on 127.0.0.1 reached through
the real ``http`` backend; time for backoff comes from ``task.Clock``.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, task
from twisted.internet.task import deferLater
from twisted.web.server import Site

from harmony.backends.http import HttpBackend
from harmony.backends.store_forward import StoreForwardBackend
from harmony.endpoints.base import HttpEndpointBase
from harmony.envelope import RequestEnvelope
from harmony.pipeline import Pipeline
from harmony.state import DicomRequestFacts, RequestState
from harmony.storage import queue as q
from harmony.storage.admin import QueuesResource
from harmony.storage.forward import TargetSettings
from tests.harness import listen
from tests.sf_helpers import PortHold, ScriptedTarget, make_instances


class Rig:
    """A store_forward backend over a fresh store, delivering to HTTP targets."""

    def __init__(self, make_store, root, targets: dict, clock, **target_opts):
        self.clock = clock
        self.store = make_store(root, min_free_bytes=0)
        self.http = {name: HttpBackend(name, [url], reactor, timeout=5) for name, url in targets.items()}
        settings = [TargetSettings(name, **target_opts) for name in targets]
        self.backend = StoreForwardBackend("sf", self.store, settings, clock=clock, rnd=lambda: 1.0)
        self.backend.bind_backends(self.http)
        self.forward = self.backend.forward
        self.pipeline = Pipeline("ingest", [], [self.backend])

    async def start(self):
        self.forward.startService()
        await self.forward.ready()

    async def ingest(self, path):
        request = RequestEnvelope(method="POST", metadata={"dimse_op": "C-STORE"},
                                  state=RequestState(dicom=DicomRequestFacts(instance=_instance(path))))
        response = await self.pipeline.handle(request, HttpEndpointBase("test"))
        assert response.status == 200 and response.state.dimse_status == 0
        return response

    async def settle(self):
        """Everything due now has been attempted."""
        await self.forward.idle()

    async def rows(self, target):
        return await self.store.read(lambda c: c.execute(
            "SELECT sop_uid, state, attempts FROM queue WHERE target=? ORDER BY id", (target,)).fetchall())

    async def stop(self):
        await self.forward.stopService()
        for b in self.http.values():
            await b.close()
        self.store.close()


def scrape(*services) -> dict:
    """Metrics as Prometheus would read them: exposition text, parsed back."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from harmony.storage.metrics import register_metrics
    registry = CollectorRegistry()
    register_metrics(registry, services)
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _instance(path):
    from harmony.dicom.results import DicomInstance
    return DicomInstance(path=path)


def instances(tmp_path, n, study=5):
    return make_instances(tmp_path, n, study, patient_id="SFPAT")


@pytest.fixture
def serve():
    ports = []

    def start(resource):
        port = listen(resource)
        ports.append(port)
        return f"http://127.0.0.1:{port.getHost().port}/"

    yield start
    for p in ports:
        pytest_twisted.blockon(p.stopListening())


def sop(path) -> str:
    from pydicom import dcmread
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest_twisted.ensureDeferred
async def test_poison_instance_is_dead_lettered_and_replayable(new_store, tmp_path, serve):
    files = instances(tmp_path, 6)
    poison = sop(files[2])
    accept = {"poison": False}
    target = ScriptedTarget(lambda s, n: 409 if s == poison and not accept["poison"] else 200)
    clock = task.Clock()
    rig = Rig(new_store, tmp_path / "store", {"pacs": serve(target)}, clock, order=q.ROTATE, concurrency=2)
    await rig.start()
    try:
        for f in files:
            await rig.ingest(f)
        await rig.settle()
        assert sorted(target.stored) == sorted(sop(f) for f in files if sop(f) != poison)
        rows = {s: (state, attempts) for s, state, attempts in await rig.rows("pacs")}
        assert rows[poison] == (q.DEAD, 1)  # 409 is permanent: no pointless retries
        # The operator's view, through the management resource on a real port.
        admin = serve(QueuesResource([rig.forward]))
        overview = json.loads(await (await treq.get(admin)).content())
        assert overview["targets"]["pacs"]["dead"] == 1 and overview["targets"]["pacs"]["delivered"] == 5
        dead = json.loads(await (await treq.get(admin + "pacs/dead")).content())["entries"]
        assert [e["sop_instance_uid"] for e in dead] == [poison] and "409" in dead[0]["last_error"]
        # Purge needs confirmation; retry replays it once the target accepts it.
        refused = await treq.delete(admin + "pacs/dead")
        assert refused.code == 400
        assert "confirm" in json.loads(await refused.content())["detail"]
        accept["poison"] = True
        retried = json.loads(await (await treq.post(admin + f"pacs/retry?id={dead[0]['id']}")).content())
        assert retried == {"target": "pacs", "retried": 1}
        await rig.settle()
        assert target.stored == {sop(f): 1 for f in files}  # every instance exactly once
        assert (await treq.get(admin + "nosuch/dead")).code == 404
        await rig.forward.stats()
        metrics = scrape(rig.forward)
        assert metrics[("harmony_store_forward_queue_entries", (("state", "delivered"), ("target", "pacs")))] == 6
        assert metrics[("harmony_store_forward_queue_entries", (("state", "dead"), ("target", "pacs")))] == 0
        assert metrics[("harmony_store_forward_attempts_total", (("outcome", "dead"), ("target", "pacs")))] == 1
        assert metrics[("harmony_store_forward_attempts_total", (("outcome", "delivered"), ("target", "pacs")))] == 6
        assert metrics[("harmony_storage_instances_stored_total", (("store", "store"),))] == 6
        assert metrics[("harmony_storage_free_bytes", (("store", "store"),))] > 0
    finally:
        await rig.stop()


@pytest_twisted.ensureDeferred
async def test_transient_failures_back_off_exponentially(new_store, tmp_path, serve):
    target = ScriptedTarget(lambda s, n: 503 if n < 3 else 200)
    clock = task.Clock()
    clock.advance(1_000_000)
    rig = Rig(new_store, tmp_path / "store", {"pacs": serve(target)}, clock, backoff_initial=1.0, backoff_max=3.0,
              max_attempts=10)
    await rig.start()
    try:
        [f] = instances(tmp_path, 1)
        await rig.ingest(f)
        await rig.settle()
        assert len(target.seen) == 1
        for delay in (1.0, 2.0, 3.0):  # 1, 2, then capped at backoff_max
            clock.advance(delay - 0.001)
            await rig.settle()
            assert len(target.seen) == 1 + (1.0, 2.0, 3.0).index(delay), "retried before its backoff"
            clock.advance(0.001)
            await rig.settle()
        assert len(target.seen) == 4 and target.stored == {sop(f): 1}
        assert [r[1:] for r in await rig.rows("pacs")] == [(q.DELIVERED, 4)]
    finally:
        await rig.stop()


@pytest_twisted.ensureDeferred
async def test_jitter_spreads_retries():
    settings = TargetSettings("t", backoff_initial=10.0, backoff_max=1000.0, jitter=0.5)
    assert settings.backoff(1, 0.0) == 5.0 and settings.backoff(1, 1.0) == 10.0
    assert settings.backoff(3, 0.5) == 30.0  # 40 s, randomised down to 75 %


@pytest.mark.parametrize("order", [q.FIFO, q.ROTATE])
@pytest_twisted.ensureDeferred
async def test_ordering_with_a_failing_head(new_store, tmp_path, serve, order):
    """fifo: nothing overtakes a failing head until it is dead; rotate: the rest flows."""
    files = instances(tmp_path, 4)
    head = sop(files[0])
    target = ScriptedTarget(lambda s, n: 503 if s == head else 200)
    clock = task.Clock()
    rig = Rig(new_store, tmp_path / "store", {"pacs": serve(target)}, clock, order=order, backoff_initial=1.0,
              max_attempts=3, concurrency=1)
    await rig.start()
    try:
        for f in files:
            await rig.ingest(f)
        await rig.settle()
        if order == q.FIFO:
            assert target.stored == {}
            for _ in range(3):
                clock.advance(2.0)
                await rig.settle()
            assert sorted(target.stored) == sorted(sop(f) for f in files[1:])
            assert target.seen[:3] == [head] * 3
        else:
            assert sorted(target.stored) == sorted(sop(f) for f in files[1:])
        states = {s: st for s, st, _ in await rig.rows("pacs")}
        assert states[head] == (q.DEAD if order == q.FIFO else q.PENDING)
    finally:
        await rig.stop()


@pytest_twisted.ensureDeferred
async def test_queue_survives_restart_and_redelivers_interrupted(new_store, tmp_path, serve, dead_port):
    """Rows left 'delivering' by a crash go back to pending at start-up."""
    files = instances(tmp_path, 3)
    down_port = dead_port  # nothing listens: connection refused
    clock = task.Clock()
    rig = Rig(new_store, tmp_path / "store", {"pacs": f"http://127.0.0.1:{down_port}/"}, clock, backoff_initial=60.0)
    await rig.start()
    for f in files:
        await rig.ingest(f)
    await rig.settle()
    assert [r[1] for r in await rig.rows("pacs")] == [q.PENDING] * 3
    # Simulate a crash in the middle of a delivery, the others waiting out a backoff.
    await rig.store.write(lambda c: c.execute("UPDATE queue SET next_attempt_at=500000"))
    # (leased to this node, as a claim leaves it: on a shared queue a restarted
    # node takes back its own leases at once, the others' only when they expire)
    await rig.store.write(lambda c: c.execute("UPDATE queue SET state='delivering', lease_owner=?, "
                                              "lease_until=900000 WHERE id=(SELECT min(id) FROM queue)",
                                              (rig.store.node,)))
    await rig.stop()

    target = ScriptedTarget()
    clock2 = task.Clock()
    rig2 = Rig(new_store, tmp_path / "store", {"pacs": serve(target)}, clock2, backoff_initial=60.0)
    await rig2.start()
    try:
        await rig2.settle()
        # The interrupted delivery is due at once; the others still wait out their backoff.
        assert target.stored == {sop(files[0]): 1}
        clock2.advance(500_000)
        rig2.forward.wake()
        await rig2.settle()
        assert target.stored == {sop(f): 1 for f in files}
    finally:
        await rig2.stop()


@pytest_twisted.ensureDeferred
async def test_unreachable_target_pauses_the_whole_queue(new_store, tmp_path, serve):
    """Connection refused says nothing about the instance: the queue waits (with
    backoff) instead of trying every other instance against a dead target."""
    files = instances(tmp_path, 4)
    hold = PortHold()
    clock = task.Clock()
    rig = Rig(new_store, tmp_path / "store", {"pacs": f"http://127.0.0.1:{hold.port}/"}, clock, backoff_initial=10.0,
              concurrency=1)
    try:
        for f in files:  # queued before the service runs: one claim sees all four
            await rig.store.put_file(f, enqueue=["pacs"], now=0.0)
        await rig.start()
        await rig.settle()
        assert sum(r[2] for r in await rig.rows("pacs")) == 1
        clock.advance(9.9)
        rig.forward.wake()  # a new instance arriving: still paused
        await rig.settle()
        assert sum(r[2] for r in await rig.rows("pacs")) == 1
        clock.advance(0.1)
        await rig.settle()
        assert sum(r[2] for r in await rig.rows("pacs")) == 2  # one probe per pause, 20 s next
        assert scrape(rig.forward)[("harmony_store_forward_paused", (("target", "pacs"),))] == 1
        hold.release()
        target = ScriptedTarget()  # the target comes back on its port
        back = reactor.listenTCP(hold.port, Site(target), interface="127.0.0.1")
        try:
            assert await rig.forward.kick("pacs") == 4  # the operator's /wake: resume now
            await rig.settle()
            assert sorted(target.stored) == sorted(sop(f) for f in files)
        finally:
            await back.stopListening()
    finally:
        hold.release()
        await rig.stop()


@pytest_twisted.ensureDeferred
async def test_duplicate_ingest_queues_once_and_retention_expires_history(new_store, tmp_path, serve):
    target = ScriptedTarget()
    clock = task.Clock()
    clock.advance(1_000_000)
    rig = Rig(new_store, tmp_path / "store", {"pacs": serve(target)}, clock)
    rig.forward.delivered_retention = 3600
    await rig.start()
    # The start-up claim is over before the row exists (else it could take the
    # row before its instance is stored: a race of this test, not of ingest).
    await rig.settle()
    try:
        [f] = instances(tmp_path, 1)
        await rig.store.write(q.enqueue, sop(f), ["pacs"], clock.seconds())  # queued twice before it is sent
        await rig.ingest(f)
        await rig.settle()
        assert target.stored == {sop(f): 1}
        clock.advance(3601)
        await rig.forward.housekeeping()
        assert await rig.rows("pacs") == []
    finally:
        await rig.stop()


@pytest_twisted.ensureDeferred
async def test_relay_mode_forgets_instances_once_every_target_has_them(new_store, tmp_path, serve):
    """delete_after_delivery: a pure relay keeps a file only while some target still needs it."""
    a, b = ScriptedTarget(), ScriptedTarget(lambda s, n: 409)
    clock = task.Clock()
    rig = Rig(new_store, tmp_path / "store", {"a": serve(a), "b": serve(b)}, clock)
    rig.forward.delete_after_delivery = True
    await rig.start()
    try:
        [f] = instances(tmp_path, 1)
        stored = (await rig.ingest(f)).state.stored_instance
        await rig.settle()
        assert a.stored == {sop(f): 1} and stored.path.exists()  # b refused it: kept for a replay
        b.rules = lambda s, n: 200
        await rig.forward.retry("b")
        await rig.settle()
        await rig.store.run(lambda: None)  # the clean-up runs on the storage threads after the record
        assert b.stored == {sop(f): 1}
        assert not stored.path.exists()
        assert await rig.store.run(rig.store.get_sync, sop(f)) is None
    finally:
        await rig.stop()


@pytest_twisted.ensureDeferred
async def test_shutdown_does_not_wait_for_a_hung_target(new_store, tmp_path):
    """A target that never answers must not hold up stopService; the
    interrupted delivery is sent again after the restart."""
    from tests.dimse_helpers import silent_peer
    hung = silent_peer()
    clock = task.Clock()
    rig = Rig(new_store, tmp_path / "store", {"pacs": f"http://127.0.0.1:{hung.getHost().port}/"}, clock)
    try:
        await rig.start()
        [f] = instances(tmp_path, 1)
        await rig.ingest(f)
        await rig.store.run(lambda: None)
        drainer = rig.forward.drainers["pacs"]
        while drainer.claiming:  # the claim is a storage-thread round trip
            await rig.store.run(lambda: None)
        assert len(drainer.in_flight) == 1
        await rig.forward.stopService()  # returns without the target ever answering
        assert [r[1] for r in await rig.rows("pacs")] == [q.DELIVERING]
    finally:
        await rig.stop()
        await hung.stopListening()


def test_queue_rows_for_repeated_copies(queue_conn):
    """The queue's SQL on each real database: a copy arriving while
    queued, while being delivered, and after being dead-lettered."""
    conn = queue_conn

    def rows():
        return conn.execute("SELECT state, attempts, dirty FROM queue ORDER BY id").fetchall()

    q.enqueue(conn, "1.2.3", ["t"], 0.0)
    q.enqueue(conn, "1.2.3", ["t"], 1.0)  # queued twice: one row
    assert rows() == [(q.PENDING, 0, 0)]
    [(row_id, _sop, attempts)], _ = q.claim(conn, "t", q.ROTATE, 4, 2.0)
    q.enqueue(conn, "1.2.3", ["t"], 3.0)  # a newer copy while the old one is on the wire
    assert rows() == [(q.DELIVERING, 1, 1)]
    q.delivered(conn, row_id, 4.0)
    assert rows() == [(q.PENDING, 0, 0)]  # so it is sent again
    [(row_id, _sop, _a)], _ = q.claim(conn, "t", q.ROTATE, 4, 5.0)
    q.delivered(conn, row_id, 6.0)
    q.enqueue(conn, "1.2.3", ["t"], 7.0)  # after delivery: a new row, the old one is history
    assert rows() == [(q.DELIVERED, 1, 0), (q.PENDING, 0, 0)]
    [(row_id, _sop, _a)], _ = q.claim(conn, "t", q.ROTATE, 4, 8.0)
    assert q.failed(conn, row_id, "refused", 9.0, retry_at=None) == q.DEAD
    q.enqueue(conn, "1.2.3", ["t"], 10.0)  # the modality sends it again: revived
    assert rows()[-1] == (q.PENDING, 0, 0)
    assert q.claim(conn, "t", q.FIFO, 4, 10.0)[0][0][1] == "1.2.3"


def test_settles_in_one_statement_on_each_database(queue_conn):
    """Several deliveries marked at once (q.delivered_many), each as q.delivered
    would: a row with a newer copy goes back to pending, a row whose lease passed
    to another node is not ours to settle."""
    conn = queue_conn
    for sop in ("1", "2", "3", "4"):
        q.enqueue(conn, sop, ["t"], 0.0)
    rows = q.claim(conn, "t", q.ROTATE, 4, 1.0, node="A", lease=30)[0]
    ids = {sop: row_id for row_id, sop, _n in rows}
    q.enqueue(conn, "2", ["t"], 2.0)                          # a newer copy of "2" while on the wire
    conn.execute("UPDATE queue SET lease_owner='B' WHERE id=?", (ids["3"],))   # "3" was taken over
    assert q.delivered_many(conn, [ids["4"], ids["3"], ids["2"], ids["1"]], 5.0, "A") == [True, False, True, True]
    states = dict(conn.execute("SELECT sop_uid, state FROM queue").fetchall())
    assert states == {"1": q.DELIVERED, "2": q.PENDING, "3": q.DELIVERING, "4": q.DELIVERED}


def test_message_items_on_each_database(queue_conn):
    """HL7 message items (kind + payload row) through the same queue SQL on both databases."""
    conn = queue_conn
    mid = q.enqueue_message(conn, q.HL7V2, b"MSH|^~\\&|A\r", '{"hl7.control_id": "1"}', ["t"], 0.0)
    kind, body, metadata = q.load_message(conn, q.message_key(mid))
    assert (kind, type(body), body, metadata) == (q.HL7V2, bytes, b"MSH|^~\\&|A\r", '{"hl7.control_id": "1"}')
    [(row_id, key, _n)], _ = q.claim(conn, "t", q.FIFO, 1, 1.0)
    assert key == q.message_key(mid)
    assert q.failed(conn, row_id, "AR", 2.0, retry_at=None) == q.DEAD
    [entry] = q.dead_entries(conn, "t")
    assert (entry["kind"], entry["item"], entry["hl7.control_id"]) == (q.HL7V2, key, "1")
    assert q.purge(conn, "t") == 1
    assert q.load_message(conn, key) is None  # forgotten with its last queue row


def test_dead_letter_filters_on_each_database(queue_conn):
    """The management API's dead-letter filters (harmony.storage.admin) are the same SQL on both databases."""
    from harmony.storage.admin import DeadFilter, count_dead, purge_matching, retry_matching, select_dead
    conn = queue_conn
    for sop, error in (("1.1", "HTTP 409: Conflict"), ("1.2", "DIMSE status 0xA900"), ("1.3", "http 409 again")):
        q.enqueue(conn, sop, ["t"], 0.0)
        [(row_id, _s, _n)], _ = q.claim(conn, "t", q.ROTATE, 1, 1.0)
        q.failed(conn, row_id, error, 2.0, retry_at=None)
    conflict = DeadFilter(error="409")
    assert [e["sop_instance_uid"] for e in select_dead(conn, "t", conflict, 10, 0)] == ["1.1", "1.3"]
    assert count_dead(conn, "t", conflict) == 2
    assert retry_matching(conn, "t", DeadFilter(error="a900"), 3.0) == 1
    assert purge_matching(conn, "t", conflict) == 2
    assert count_dead(conn, "t", DeadFilter()) == 0


@pytest_twisted.ensureDeferred
async def test_no_claim_before_start_up_recovery_so_nothing_is_delivered_twice(new_store, tmp_path, serve):
    """An ingest that lands while start-up recovery is still queued (a loaded machine:
    the listener is up, the recovery transaction not yet run) must not be claimed:
    recovery would put its 'delivering' row back to pending and it would go out twice
    (seen once as 4 deliveries of 3 instances in tests/test_queue_admin.py)."""
    from twisted.internet import defer
    files = instances(tmp_path, 1)
    target = ScriptedTarget()
    rig = Rig(new_store, tmp_path / "store", {"pacs": serve(target)}, task.Clock())
    real_bookkeep = rig.store.bookkeep
    held: list = []

    def bookkeep(fn, *args, **kwargs):
        if fn is q.recover:  # recovery waits until the test lets it run
            d = defer.Deferred()
            held.append(lambda: real_bookkeep(fn, *args, **kwargs).chainDeferred(d))
            return d
        return real_bookkeep(fn, *args, **kwargs)

    rig.store.bookkeep = bookkeep
    rig.forward.startService()
    try:
        await rig.ingest(files[0])  # wakes the queue, recovery still pending
        await rig.forward.drainers["pacs"].idle()  # any claim (and delivery) it started is over
        assert [r[1] for r in await rig.rows("pacs")] == [q.PENDING], "claimed before start-up recovery"
        held.pop()()
        await rig.forward.idle()
        assert [r[1] for r in await rig.rows("pacs")] == [q.DELIVERED]
        assert target.stored == {sop(files[0]): 1}
        assert rig.forward.attempts[("pacs", "delivered")] == 1
    finally:
        await rig.stop()


@pytest_twisted.ensureDeferred
async def test_deliveries_ending_together_settle_in_one_transaction(new_store, tmp_path, serve):
    """Group commit of settles: while one delivery's mark commits, the others that
    end meanwhile wait and go into the next transaction together.  Until its batch
    commits a row stays 'delivering' (a crash then delivers it again: at least once)."""
    from twisted.internet import defer

    from harmony.storage.groupcommit import GroupCommit
    files = instances(tmp_path, 4)
    target = ScriptedTarget()
    rig = Rig(new_store, tmp_path / "store", {"pacs": serve(target)}, task.Clock(), order=q.ROTATE, concurrency=4)
    gate: defer.Deferred = defer.Deferred()
    batches: list[list[int]] = []

    def gated_run(fn, row_ids):
        batches.append(list(row_ids))
        if len(batches) == 1:   # the first mark waits: the deliveries ending meanwhile queue behind it
            return gate.addCallback(lambda _: rig.store.run(fn, row_ids))
        return rig.store.run(fn, row_ids)
    rig.forward.settles = GroupCommit(gated_run, rig.forward._settle_batch)
    for f in files:
        await rig.ingest(f)
    await rig.start()
    try:
        while len(target.stored) < 4 or len(rig.forward.settles._queue) < 3:
            await deferLater(reactor, 0.01)
        assert [s for _sop, s, _n in await rig.rows("pacs")] == [q.DELIVERING] * 4   # nothing settled yet
        gate.callback(None)
        await rig.settle()
        assert [len(b) for b in batches] == [1, 3]
        assert [(s, n) for _sop, s, n in await rig.rows("pacs")] == [(q.DELIVERED, 1)] * 4
        assert sorted(target.stored.values()) == [1, 1, 1, 1]
    finally:
        await rig.stop()
