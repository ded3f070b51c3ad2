"""harmony.storage.database: a new sqlite file's first users, meeting, all get a WAL database.

Switching a new file to WAL needs an exclusive lock, and sqlite refuses it at once
("database is locked", without the busy timeout) while another connection holds
the write lock: seen as a 500 on two concurrent first WADO-RS metadata requests.
"""

from __future__ import annotations

import sqlite3

from harmony.storage import database
from harmony.storage.database import SqliteDatabase


def test_the_switch_to_wal_waits_for_another_connections_write_lock(tmp_path, monkeypatch):
    path = tmp_path / "new.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None)   # still rollback-journal mode
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("CREATE TABLE other(x)")
    pauses = []

    def pause(seconds):   # the holder commits while create_schema waits for it
        pauses.append(seconds)
        if holder.in_transaction:
            holder.execute("COMMIT")

    monkeypatch.setattr(database, "_pause", pause, raising=False)
    db = SqliteDatabase(path, fsync=False)
    try:
        db.create_schema("CREATE TABLE IF NOT EXISTS t(x);", "")
        assert pauses, "the write lock was held: create_schema must have waited for it"
        assert db.read(lambda conn: conn.execute("PRAGMA journal_mode").fetchone()) == ("wal",)
        assert db.read(lambda conn: conn.execute("SELECT count(*) FROM t").fetchone()) == (0,)
    finally:
        db.close()
        holder.close()

