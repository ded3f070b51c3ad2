"""``harmony storage migrate``: a sqlite store's index and queues into PostgreSQL, nothing lost.

A real store filled through the real ingest path on sqlite, with queue rows
in every state; migrated by the CLI into a real PostgreSQL; then the same
folder opened on PostgreSQL answers the same queries, holds the same queue
(a delivery interrupted by the stop is pending again, fifo order kept) and
delivers it.  A second migration into the now non-empty database is refused.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor

from harmony.backends.http import HttpBackend
from harmony.backends.store_forward import StoreForwardBackend
from harmony.cli import main as harmony_main
from harmony.storage import blobs as blob_sql
from harmony.storage import queue as q
from harmony.storage.migrate import NOT_COPIED, TABLES, sqlite_tables
from harmony.storage.database import PostgresDatabase
from harmony.storage.forward import TargetSettings
from harmony.storage.store import InstanceStore
from tests.harness import listen
from tests.sf_helpers import ScriptedTarget


def queue_rows(store):
    return store.read_sync(lambda c: c.execute(
        "SELECT id, target, sop_uid, state, attempts, last_error FROM queue ORDER BY id").fetchall())


def find_all(store):
    from pydicom.dataset import Dataset
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = ""
    ident.PatientName = ""
    ident.NumberOfStudyRelatedInstances = ""
    ident.ModalitiesInStudy = ""
    return sorted(list(store.query_sync(ident, "STUDY")), key=lambda r: str(r))


@pytest_twisted.ensureDeferred
async def test_migrate_moves_index_and_queues_without_losing_an_entry(postgres, corpus, tmp_path, capsys):
    root = tmp_path / "store"
    lite = InstanceStore(root, min_free_bytes=0)
    for n, inst in enumerate(corpus):
        lite.put_file_sync(inst.path, enqueue=["pacs", "cloud"] if n % 2 else ["pacs"], now=float(n))
    # Every queue state: delivered, dead, in flight at the stop, pending.
    rows = queue_rows(lite)
    lite.write_sync(lambda c: c.execute("UPDATE queue SET state='delivered', finished_at=1 WHERE id=?", (rows[0][0],)))
    lite.write_sync(lambda c: c.execute("UPDATE queue SET state='dead', last_error='refused' WHERE id=?",
                                        (rows[1][0],)))
    lite.write_sync(lambda c: c.execute("UPDATE queue SET state='delivering', attempts=1 WHERE id=?",
                                        (rows[2][0],)))
    # A node that used S3: two files still to upload when it stopped.
    pending = sorted(r[0] for r in lite.read_sync(lambda c: c.execute("SELECT relpath FROM instances").fetchall()))[:2]
    for rel in pending:
        lite.write_sync(blob_sql.mark_pending, rel, "old-node", 5.0)
    before_rows, before_find, before_counts = queue_rows(lite), find_all(lite), lite.counts_sync()
    lite.close()

    dsn = postgres.new_database()
    assert harmony_main(["storage", "migrate", "--from", str(root), "--dsn", dsn]) == 0
    out = capsys.readouterr().out
    assert f"instances: {len(corpus)} row(s) copied and checked" in out
    assert f"queue: {len(before_rows)} row(s) copied and checked" in out
    assert "blob_uploads: 2 row(s) copied and checked" in out

    pg = InstanceStore(root, min_free_bytes=0, database=PostgresDatabase(dsn), node="after")
    try:
        assert pg.counts_sync() == before_counts
        assert find_all(pg) == before_find
        expected = [r if r[3] != q.DELIVERING else (*r[:3], q.PENDING, *r[4:]) for r in before_rows]
        assert queue_rows(pg) == expected
        assert pg.read_sync(lambda c: c.execute("SELECT relpath, node, queued_at FROM blob_uploads "
                                                "ORDER BY relpath").fetchall()) == [(r, "old-node", 5.0)
                                                                                    for r in pending]
        # New rows continue after the copied ids (fifo order stays arrival order).
        pg.write_sync(q.enqueue, "9.9.9", ["pacs"], 100.0)
        assert queue_rows(pg)[-1][0] > before_rows[-1][0]
        pg.write_sync(lambda c: c.execute("DELETE FROM queue WHERE sop_uid='9.9.9'"))

        # And the migrated queue delivers from PostgreSQL.
        target = ScriptedTarget()
        port = listen(target)
        http = HttpBackend("pacs", [f"http://127.0.0.1:{port.getHost().port}/"], reactor, timeout=5)
        backend = StoreForwardBackend("sf", pg, [TargetSettings("pacs"), TargetSettings("cloud")],
                                      rnd=lambda: 1.0)
        backend.bind_backends({"pacs": http, "cloud": http})
        backend.forward.startService()
        await backend.forward.ready()
        await backend.forward.idle()
        await backend.forward.stopService()
        await http.close()
        await port.stopListening()
        waiting = [r for r in expected if r[3] == q.PENDING]
        assert sum(target.stored.values()) == len(waiting)
        assert set(target.stored) == {r[2] for r in waiting}
    finally:
        pg.close()

    # The database is no longer empty: a second run refuses and changes nothing.
    assert harmony_main(["storage", "migrate", "--from", str(root), "--dsn", dsn]) == 1
    assert "already holds rows" in capsys.readouterr().err


def test_every_sqlite_table_is_copied_or_explained(tmp_path):
    """A table added to the store's sqlite schema fails here until migrate copies it (TABLES) or
    says why not (NOT_COPIED)."""
    store = InstanceStore(tmp_path / "store", min_free_bytes=0)
    store.open_sync()
    tables = store.read_sync(sqlite_tables)
    store.close()
    assert tables - set(TABLES) - set(NOT_COPIED) == set()
    assert {"instances", "queue", "blob_uploads", "target_state"} <= tables


def test_an_unknown_sqlite_table_stops_the_migration(postgres, tmp_path, capsys):
    store = InstanceStore(tmp_path / "store", min_free_bytes=0)
    store.open_sync()
    store.write_sync(lambda c: c.execute("CREATE TABLE added_later (id INTEGER PRIMARY KEY)"))
    store.close()
    dsn = postgres.new_database()
    assert harmony_main(["storage", "migrate", "--from", str(tmp_path / "store"), "--dsn", dsn]) == 1
    assert "added_later" in capsys.readouterr().err


def test_migrate_to_s3_queues_every_file_for_upload(postgres, corpus, tmp_path, capsys):
    """A node moving to backend = "s3" as well: --upload-as queues each instance file for that node's
    uploader (files already pending keep their node)."""
    root = tmp_path / "store"
    lite = InstanceStore(root, min_free_bytes=0)
    for inst in corpus[:4]:
        lite.put_file_sync(inst.path)
    rels = sorted(r[0] for r in lite.read_sync(lambda c: c.execute("SELECT relpath FROM instances").fetchall()))
    lite.write_sync(blob_sql.mark_pending, rels[0], "old-node", 5.0)
    lite.close()
    dsn = postgres.new_database()
    assert harmony_main(["storage", "migrate", "--from", str(root), "--dsn", dsn, "--upload-as", "n1"]) == 0
    assert "3 instance file(s) queued for upload to S3 by node 'n1'" in capsys.readouterr().out
    pg = InstanceStore(root, min_free_bytes=0, database=PostgresDatabase(dsn), node="n1")
    try:
        assert pg.read_sync(lambda c: c.execute("SELECT relpath, node FROM blob_uploads ORDER BY relpath")
                            .fetchall()) == [(rels[0], "old-node")] + [(r, "n1") for r in rels[1:]]
    finally:
        pg.close()


def _metadata(store):
    return dict(store.read_sync(lambda c: c.execute("SELECT sop_uid, metadata FROM instances").fetchall()))


def test_migrate_keeps_metadata_and_takes_an_index_older_than_its_column(postgres, corpus, tmp_path, capsys):
    """Each instance's WADO-RS metadata (made at ingest) is copied as it is; a
    sqlite index made before that column existed migrates too, and PostgreSQL
    then makes the metadata when first asked for."""
    from pydicom.dataset import Dataset
    stores = {}
    for name, old in (("current", False), ("old", True)):
        root = tmp_path / name
        lite = InstanceStore(root, min_free_bytes=0)
        for inst in corpus[:4]:
            lite.put_file_sync(inst.path)
        kept = _metadata(lite)
        assert all(kept.values())
        if old:
            lite.write_sync(lambda c: c.execute("ALTER TABLE instances DROP COLUMN metadata"))
        lite.close()
        dsn = postgres.new_database()
        assert harmony_main(["storage", "migrate", "--from", str(root), "--dsn", dsn]) == 0
        capsys.readouterr()
        stores[name] = (InstanceStore(root, min_free_bytes=0, database=PostgresDatabase(dsn), node="n"), kept)
    try:
        current, kept = stores["current"]
        assert _metadata(current) == kept
        old, kept = stores["old"]
        assert set(_metadata(old).values()) == {None}
        ident = Dataset()
        ident.QueryRetrieveLevel = "PATIENT"
        ident.PatientID = "*"
        found = list(old.instances_sync(ident, "PATIENT", "patient", metadata=True))
        assert {i.sop_instance_uid: i.metadata_json for i in found} == kept == _metadata(old)
    finally:
        for store, _ in stores.values():
            store.close()
