"""The store-and-forward queue shared by several nodes on one real PostgreSQL.

What a cluster needs beyond one node (issue 15): claims as time-limited
leases, so a dead node's in-flight work goes to the others when its leases
expire; rotate claims that never hand one row to two nodes (``FOR UPDATE
SKIP LOCKED``: the row lock is the claim, not a version counter compared
later - dcm4chee's race); fifo order kept across nodes (a per-target lock:
SKIP LOCKED alone would skip a locked head and hand out the second row); the
"target unreachable" pause shared; pruners that do not deadlock.

Nodes are separate connections (SQL tests) or separate StoreForward services
with their own InstanceStore and node name over one database and one folder
(the shared-filesystem deployment); time is a ``task.Clock``.
"""

from __future__ import annotations

import io
import threading

import psycopg
import pytest
import pytest_twisted
from pydicom import dcmread
from twisted.internet import reactor, task
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from harmony.backends.http import HttpBackend
from harmony.backends.store_forward import StoreForwardBackend
from harmony.storage import index as idx
from harmony.storage import queue as q
from harmony.storage.database import PgConnection, PostgresDatabase
from harmony.storage.forward import TargetSettings
from harmony.storage.store import InstanceStore
from tests.harness import listen
from tests.sf_helpers import make_instances


@pytest.fixture
def dsn(postgres):
    return postgres.new_database()


def connect(dsn) -> PgConnection:
    return PgConnection(psycopg.connect(dsn, autocommit=True))


@pytest.fixture
def nodes(dsn):
    """Two bare connections (node A, node B) on a fresh queue."""
    a, b = connect(dsn), connect(dsn)
    a.executescript(idx.PG_SCHEMA + q.PG_SCHEMA)
    yield a, b
    a.raw.close()
    b.raw.close()


def states(conn, target="t"):
    return conn.execute("SELECT sop_uid, state, lease_owner FROM queue WHERE target=? ORDER BY id",
                        (target,)).fetchall()


def test_rotate_claims_in_open_transactions_never_share_a_row(nodes):
    a, b = nodes
    q.enqueue(a, "1", ["t"], 0.0)
    q.enqueue(a, "2", ["t"], 0.0)
    q.enqueue(a, "3", ["t"], 0.0)
    with a.raw.transaction():
        rows_a, _ = q.claim(a, "t", q.ROTATE, 2, 1.0, node="A", lease=30)
        # B claims while A's transaction (and its row locks) is still open:
        # it skips A's rows instead of waiting for them or taking them too.
        with b.raw.transaction():
            rows_b, _ = q.claim(b, "t", q.ROTATE, 2, 1.0, node="B", lease=30)
    assert [r[1] for r in rows_a] == ["1", "2"]
    assert [r[1] for r in rows_b] == ["3"]
    assert states(a) == [("1", q.DELIVERING, "A"), ("2", q.DELIVERING, "A"), ("3", q.DELIVERING, "B")]


def test_a_dead_nodes_lease_is_taken_over_when_it_expires(nodes):
    a, b = nodes
    q.enqueue(a, "1", ["t"], 0.0)
    [(row_id, _sop, _n)], _ = q.claim(a, "t", q.ROTATE, 4, 1.0, node="A", lease=30)
    # A "dies" here.  Within its lease nobody else touches the row...
    assert q.claim(b, "t", q.ROTATE, 4, 30.0, node="B", lease=30) == ([], 31.0)
    # ...after it, B takes it.
    [(row_b, _sop, attempts)], _ = q.claim(b, "t", q.ROTATE, 4, 31.0, node="B", lease=30)
    assert (row_b, attempts) == (row_id, 2)
    # A comes back and reports its (late) delivery: not recorded, the row is B's.
    assert q.delivered(a, row_id, 32.0, "A") is False
    assert q.delivered(b, row_id, 33.0, "B") is True
    assert states(a) == [("1", q.DELIVERED, None)]


def test_renewed_leases_are_not_taken(nodes):
    a, b = nodes
    q.enqueue(a, "1", ["t"], 0.0)
    [(row_id, _s, _n)], _ = q.claim(a, "t", q.ROTATE, 4, 1.0, node="A", lease=30)
    assert q.renew(a, [row_id], "A", 60.0) == 1
    assert q.claim(b, "t", q.ROTATE, 4, 40.0, node="B", lease=30)[0] == []
    assert q.renew(b, [row_id], "B", 90.0) == 0  # only the holder renews


def test_fifo_head_is_never_overtaken_by_another_node(nodes):
    a, b = nodes
    for sop in ("1", "2", "3"):
        q.enqueue(a, sop, ["t"], 0.0)
    result = {}
    with a.raw.transaction():
        rows_a, _ = q.claim(a, "t", q.FIFO, 1, 1.0, node="A", lease=30)
        # B's fifo claim waits for A's per-target lock (SKIP LOCKED would
        # have skipped the locked head and handed out "2").
        thread = threading.Thread(target=lambda: result.setdefault(
            "b", _in_tx(b, lambda: q.claim(b, "t", q.FIFO, 1, 1.0, node="B", lease=30))))
        thread.start()
        thread.join(0.3)
        assert thread.is_alive(), "B's claim should wait for A's transaction"
    thread.join(10)
    assert [r[1] for r in rows_a] == ["1"]
    assert result["b"] == ([], 31.0)  # the head is in flight at A: nothing for B
    q.delivered(a, rows_a[0][0], 2.0, "A")
    assert [r[1] for r in q.claim(b, "t", q.FIFO, 1, 3.0, node="B", lease=30)[0]] == ["2"]


def test_fifo_head_of_a_dead_node_is_taken_over_in_order(nodes):
    a, b = nodes
    for sop in ("1", "2"):
        q.enqueue(a, sop, ["t"], 0.0)
    q.claim(a, "t", q.FIFO, 1, 1.0, node="A", lease=30)
    assert q.claim(b, "t", q.FIFO, 1, 10.0, node="B", lease=30) == ([], 31.0)
    assert [r[1] for r in q.claim(b, "t", q.FIFO, 1, 31.0, node="B", lease=30)[0]] == ["1"]


def test_unreachable_pause_is_shared(nodes):
    a, b = nodes
    q.enqueue(a, "1", ["t"], 0.0)
    q.pause(a, "t", 50.0, "A", "connection refused", 1.0)
    assert q.claim(b, "t", q.ROTATE, 4, 2.0, node="B") == ([], 50.0)
    stats = q.stats(b, 2.0)["t"]
    assert (stats["paused_until"], stats["paused_by"]) == (50.0, "A")
    assert q.unpause(b, "t") == 1
    assert len(q.claim(b, "t", q.ROTATE, 4, 2.0, node="B")[0]) == 1


def test_pruners_on_two_nodes_do_not_deadlock(nodes):
    a, b = nodes
    for i in range(50):
        q.enqueue(a, str(i), ["t"], 0.0)
    a.execute("UPDATE queue SET state='delivered', finished_at=1.0")
    with a.raw.transaction():
        assert q.expire(a, 10.0, None) == 50
        with b.raw.transaction():
            assert q.expire(b, 10.0, None) == 0  # A prunes: B skips this round at once
    assert q.table_health(a).keys() == {"dead_tuples", "live_tuples"}


def _in_tx(conn, fn):
    with conn.raw.transaction():
        return fn()


# ---------------------------------------------------------------------------- services


class Node:
    """One Harmony node's store_forward: its own store object and node name,
    the shared database, the shared folder."""

    def __init__(self, name, dsn, root, url, clock, lease=30.0, order=q.ROTATE):
        self.store = InstanceStore(root, min_free_bytes=0, database=PostgresDatabase(dsn), node=name)
        self.http = HttpBackend(f"http-{name}", [url], reactor, timeout=5)
        self.backend = StoreForwardBackend("sf", self.store, [TargetSettings("pacs", order=order)], clock=clock,
                                           rnd=lambda: 1.0, lease=lease, poll_interval=1.0)
        self.backend.bind_backends({"pacs": self.http})
        self.forward = self.backend.forward

    async def stop(self):
        await self.forward.stopService()
        await self.http.close()
        self.store.close()


class HangingTarget(Resource):
    """A real HTTP target that stores every Part-10 body it gets, but while
    ``hang`` is set never answers (a delivery stays in flight)."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.hang = True
        self.held: list = []
        self.stored: dict[str, int] = {}

    def render_POST(self, request):
        sop = str(dcmread(io.BytesIO(request.content.read())).SOPInstanceUID)
        if self.hang:
            self.held.append(request)
            return NOT_DONE_YET
        self.stored[sop] = self.stored.get(sop, 0) + 1
        return b"{}"


@pytest_twisted.ensureDeferred
async def test_two_nodes_share_delivery_and_recover_a_dead_nodes_leases(dsn, tmp_path):
    files = make_instances(tmp_path / "in", 6, 71, patient_id="SHARED")
    target = HangingTarget()
    port = listen(target)
    url = f"http://127.0.0.1:{port.getHost().port}/"
    # Node A's clock never moves after it "dies": a dead node renews nothing.
    clock_a, clock_b = task.Clock(), task.Clock()
    a = Node("node-a", dsn, tmp_path / "shared", url, clock_a)
    b = None
    a.forward.startService()
    try:
        await a.forward.ready()
        for f in files:
            await a.store.put_file(f, enqueue=["pacs"], now=0.0)
        a.forward.wake()
        await _until(lambda: len(target.held) == 4)  # A's concurrency: 4 leased, in flight
        stats = await a.forward.stats()
        assert stats["pacs"]["leases"] == {"node-a": 4}
        assert stats["pacs"]["pending"] == 2
        # A dies here, its deliveries in flight and its leases in the database.
        target.hang = False
        b = Node("node-b", dsn, tmp_path / "shared", url, clock_b)
        b.forward.startService()
        await b.forward.ready()
        await b.forward.idle()
        # B delivers what nobody holds at once; A's four wait out their leases.
        assert sum(target.stored.values()) == 2
        assert (await b.forward.stats())["pacs"]["leases"] == {"node-a": 4}
        clock_b.advance(31)  # past A's 30 s leases: B's poll finds them
        await _until(lambda: sum(target.stored.values()) == 6)
        await b.forward.idle()
        rows = await b.store.read(lambda c: c.execute("SELECT state, lease_owner, attempts FROM queue").fetchall())
        assert sorted(rows) == [(q.DELIVERED, None, 1)] * 2 + [(q.DELIVERED, None, 2)] * 4
        assert target.stored == {_sop(f): 1 for f in files}
    finally:
        for request in target.held:
            request.loseConnection() if hasattr(request, "loseConnection") else request.transport.loseConnection()
        if b is not None:
            await b.stop()
        await a.stop()
        await port.stopListening()


async def _until(predicate, timeout=10.0):
    """Wait for real I/O (HTTP on loopback) by polling the reactor, bounded."""
    from twisted.internet.task import deferLater
    deadline = reactor.seconds() + timeout
    while not predicate():
        assert reactor.seconds() < deadline, "condition not reached in time"
        await deferLater(reactor, 0.01, lambda: None)


def _sop(path):
    import pydicom
    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
