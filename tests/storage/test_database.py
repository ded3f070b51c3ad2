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


def _wal_db(tmp_path):
    path = str(tmp_path / "index.sqlite")
    db = SqliteDatabase(path)
    db.create_schema("CREATE TABLE t (b BLOB)", "")
    for _ in range(10):
        db.transaction(True, _put)
    return path, db


def _put(conn):
    conn.execute("INSERT INTO t VALUES (?)", (b"x" * 40_000,))


def _wal_frames(db) -> int:
    return db.read(lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1], ())


def test_a_checkpoint_lets_the_next_commit_start_the_wal_again_though_commits_landed_meanwhile(tmp_path, monkeypatch):
    """The WAL stays one size, written over.  A commit that began before the checkpoint
    had copied everything lands after what it copied (a steady ingest's commits always
    did); a second pass copies it with the writers held, so the commit after the
    checkpoint starts the WAL again from its top instead of appending to it (an append's
    fdatasync also writes the file's inode here: 0.42 against 0.20 ms)."""
    path, db = _wal_db(tmp_path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")   # begun while the WAL is not all copied: it will append
    _put(other)
    monkeypatch.setattr(database, "_between_passes", lambda: other.execute("COMMIT"))
    frames, copied = db.checkpoint()
    assert frames == copied > 0
    wal = tmp_path / "index.sqlite-wal"
    size = wal.stat().st_size
    db.transaction(True, _put)
    assert wal.stat().st_size == size   # written over its top: the file did not grow
    assert 0 < _wal_frames(db) < frames / 5   # only the last commit's frames: the WAL was started again
    other.close()
    db.close()


def test_a_checkpoint_held_back_by_a_reader_does_not_hold_the_writers(tmp_path, monkeypatch):
    """Frames a reader's snapshot keeps in use cannot be copied: the checkpoint says so and
    leaves the writers alone (copying them all with the writers held could take long)."""
    path, db = _wal_db(tmp_path)
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM t").fetchone()
    db.transaction(True, _put)   # after the reader's snapshot
    held = []
    monkeypatch.setattr(db, "_write_lock", _Recording(held))
    frames, copied = db.checkpoint()
    assert copied < frames and held == []
    reader.close()
    db.close()


class _Recording:
    def __init__(self, log):
        self.log = log

    def __enter__(self):
        self.log.append("held")

    def __exit__(self, *exc):
        return False
