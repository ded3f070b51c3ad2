"""harmony.storage.database: the embedded sqlite database's connections.

Every write transaction runs on one connection, whatever storage thread commits
(a commit from another connection would make sqlite drop this one's page cache:
each ingest read its pages again); reads keep a connection per thread.

A new sqlite file's first users, meeting, all get a WAL database: switching a new
file to WAL needs an exclusive lock, and sqlite refuses it at once ("database is
locked", without the busy timeout) while another connection holds the write lock
(seen as a 500 on two concurrent first WADO-RS metadata requests).
"""

from __future__ import annotations

import sqlite3
import threading

from harmony.storage import database
from harmony.storage.database import SqliteDatabase


def test_writes_from_every_thread_run_on_one_connection(sqlite_index):
    used, readers = [], []

    def write(n):
        used.append(sqlite_index.transaction(True, lambda conn: conn))
        readers.append(sqlite_index.read(lambda conn: conn, ()))
    threads = [threading.Thread(target=write, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in used}) == 1
    assert len({id(c) for c in readers}) == 3 and used[0] not in readers   # reads keep a connection per thread


def test_a_write_after_close_opens_a_new_writer(sqlite_index):
    first = sqlite_index.transaction(True, lambda conn: conn)
    sqlite_index.close()
    again = sqlite_index.transaction(True, lambda conn: conn.execute("SELECT count(*) FROM instances").fetchone()[0])
    assert again == 0 and sqlite_index._writer is not first


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



def test_processes_sharing_the_file_flush_the_wal_after_the_process_lock_before_returning(tmp_path, monkeypatch):
    """With worker processes, a durable commit's flush waits outside the cross-process lock
    (another process commits meanwhile; concurrent flushes of the WAL merge), and the
    transaction returns (the instance is acknowledged) only after the WAL is flushed."""
    import fcntl
    import os

    db = SqliteDatabase(str(tmp_path / "index.sqlite"), processes_share=True)
    db.create_schema("CREATE TABLE t (v INTEGER);", "")
    flushes = []
    real_fdatasync = os.fdatasync

    def fdatasync(fd):
        other = os.open(tmp_path / "index.sqlite.write-lock", os.O_RDWR)
        try:  # a lock another process could take now: ours is given back
            fcntl.lockf(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except OSError:
            free = False
        finally:
            os.close(other)
        flushes.append((os.fstat(fd).st_ino, free))
        return real_fdatasync(fd)
    monkeypatch.setattr(database.os, "fdatasync", fdatasync)

    def insert(conn):
        assert not flushes, "flushed before the commit"
        conn.execute("INSERT INTO t VALUES (1)")
        return "done"
    assert db.transaction(True, insert) == "done"
    wal = os.stat(tmp_path / "index.sqlite-wal")
    assert flushes == [(wal.st_ino, True)], "one flush of the WAL file, made with the process lock free"
    assert db._writer.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: checkpoints still sync
    db.transaction(False, lambda conn: conn.execute("INSERT INTO t VALUES (2)"))
    assert len(flushes) == 1, "a commit that need not be durable is not flushed"
    db.close()


def test_one_process_keeps_the_flush_inside_sqlites_commit(tmp_path, monkeypatch):
    db = SqliteDatabase(str(tmp_path / "index.sqlite"))
    db.create_schema("CREATE TABLE t (v INTEGER);", "")
    flushed = []
    monkeypatch.setattr(database.os, "fdatasync", flushed.append)
    db.transaction(True, lambda conn: conn.execute("INSERT INTO t VALUES (1)"))
    assert flushed == [] and db._writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    db.close()


def test_a_checkpoint_lets_the_next_commit_start_the_wal_again_though_frames_were_in_use(tmp_path, monkeypatch):
    """The WAL stays one size, written over.  Frames the checkpoint could not copy at
    first (a steady ingest's commits landing while it copied; here a reader's snapshot
    pins them) are copied in a second pass with the writers held, so the commit after
    the checkpoint starts the WAL again from its top instead of appending to it (an
    append's fdatasync also commits ext4's journal: 0.42 against 0.20 ms here)."""
    path = str(tmp_path / "index.sqlite")
    db = SqliteDatabase(path)
    db.create_schema("CREATE TABLE t (b BLOB)", "")
    blob = b"x" * 40_000

    def put(conn):
        conn.execute("INSERT INTO t VALUES (?)", (blob,))
    for _ in range(10):
        db.transaction(True, put)
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM t").fetchone()   # a snapshot: what comes after it cannot be copied yet
    db.transaction(True, put)
    monkeypatch.setattr(database, "_between_passes", lambda: reader.execute("COMMIT"))
    frames, copied = db.checkpoint()
    assert frames == copied > 0
    wal = tmp_path / "index.sqlite-wal"
    size = wal.stat().st_size
    db.transaction(True, put)
    assert wal.stat().st_size == size   # written over its top: the file did not grow
    frames_now = db.read(lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1], ())
    assert 0 < frames_now < frames / 5  # only the last commit's frames: the WAL was started again
    reader.close()
    db.close()
