"""Faults of the shared PostgreSQL: restarted mid-ingest, down for a while.

A PostgreSQL of its own (restarting the session's would disturb other
tests).  Nothing is acknowledged that is not in the database: an ingest
while it is down fails with 503 + Retry-After / DIMSE 0xA700, one across a
quick restart is retried on a new connection and succeeds, and delivery and
the management view pick up again by themselves when it returns.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor

from harmony.backends.store_forward import StoreForwardBackend
from harmony.backends.http import HttpBackend
from harmony.storage.database import PostgresDatabase
from harmony.storage.errors import DatabaseUnavailable
from harmony.storage.forward import TargetSettings
from harmony.storage.store import InstanceStore
from harmony.web.problem import problem_response
from tests.harness import listen
from tests.sf_helpers import ScriptedTarget, make_instances


@pytest_twisted.ensureDeferred
async def test_restart_and_outage_of_postgresql_during_ingest(own_postgres, tmp_path):
    files = make_instances(tmp_path / "in", 12, 81, patient_id="FAULTS")
    target = ScriptedTarget()
    port = listen(target)
    db = PostgresDatabase(own_postgres.new_database())
    store = InstanceStore(tmp_path / "store", min_free_bytes=0, database=db, node="n1")
    http = HttpBackend("pacs", [f"http://127.0.0.1:{port.getHost().port}/"], reactor, timeout=5)
    backend = StoreForwardBackend("sf", store, [TargetSettings("pacs", backoff_initial=0.05, backoff_max=0.2)],
                                  rnd=lambda: 1.0, poll_interval=0.2, lease=1.5)
    backend.bind_backends({"pacs": http})
    forward = backend.forward
    forward.startService()
    acknowledged = []
    try:
        await forward.ready()
        for f in files[:4]:
            acknowledged.append((await backend_ingest(store, forward, f)).sop_instance_uid)
        # A quick restart (a failover's cut connections): the next ingests wait
        # it out on new connections and are acknowledged.
        own_postgres.restart()
        # A query right after it (C-FIND/QIDO) answers on a new connection.
        from pydicom.dataset import Dataset
        ident = Dataset()
        ident.StudyInstanceUID = ""
        assert len(await store.run(lambda: list(store.query_sync(ident, "STUDY")))) == 1
        for f in files[4:8]:
            acknowledged.append((await backend_ingest(store, forward, f)).sop_instance_uid)
        # Down for longer than the retries: refused, never acknowledged.
        own_postgres.stop_server()
        with pytest.raises(DatabaseUnavailable) as refused:
            await backend_ingest(store, forward, files[8])
        error = refused.value
        assert (error.status, error.dimse_status) == (503, 0xA700)
        assert (b"Retry-After", b"5") in error.headers
        assert problem_response(error).status == 503
        assert db.last_error  # metrics and management say the database is down
        from harmony.storage.admin import queues_overview
        overview = queues_overview([forward], [forward.snapshot])
        assert [d["up"] for d in overview["databases"].values()] == [False]
        # Back: no Harmony restart; the refused instance is sent again by its sender.
        own_postgres.restart()
        for f in files[8:]:
            acknowledged.append((await backend_ingest(store, forward, f)).sop_instance_uid)
        # (a retry that gave up just before the restart may report "down" once
        # more; the next success - a poll, a claim - says "up" again)
        await until(lambda: db.last_error is None, "the database reported up again")
        # (a delivery whose bookkeeping the restart cut is sent again: count instances, not deliveries)
        await until(lambda: set(acknowledged) <= set(target.stored), "every acknowledged instance delivered")
        assert set(target.stored) == set(acknowledged)
        indexed = await store.read(lambda c: [r[0] for r in c.execute("SELECT sop_uid FROM instances")])
        assert set(indexed) == set(acknowledged)
    finally:
        await forward.stopService()
        await http.close()
        await port.stopListening()
        store.close()


async def backend_ingest(store, forward, path):
    stored = await store.put_file(path, enqueue=["pacs"], now=forward.now())
    forward.wake()
    return stored


async def until(predicate, what, timeout=20.0):
    from twisted.internet.task import deferLater
    deadline = reactor.seconds() + timeout
    while not predicate():
        assert reactor.seconds() < deadline, what
        await deferLater(reactor, 0.05, lambda: None)
