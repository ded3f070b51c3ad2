"""Rows naming the instances whose flushes were still running at their index commit.

Why it exists: an acknowledgement needs three things on disk - the file's
data, its folder entry and its index row - and waiting for them one after
the other cost three flushes per instance where one is enough: issued
together, ext4 commits them in one journal commit (bench/ingest: a lone
instance ~1.2-2 ms instead of ~3.5-10 ms).  Issued together, though, the row
can reach the disk before the file it points to.  Nothing is acknowledged
before all three are done, so such a row only ever names an instance nobody
was told about; but after a crash it must not be left pointing at a file that
is missing or incomplete.

So the ingest transaction also writes one row here per instance: the
instance, where it was filed, where a copy filed before it lives (the same
SOP Instance UID under another study or series), and which opening of the
store wrote it.  Rows of instances whose flushes have finished are deleted
in a later transaction (nothing to wait for: a row left over only costs a
check).  The store's start-up recovery (:meth:`InstanceStore.recover_sync`)
reads the rows a previous run of this node left and checks each file: a
complete one is synced and kept (re-indexed from the file), a missing or
incomplete one loses its index row and queue rows, and a copy filed before
it is indexed again.

The journal: with the embedded sqlite index, a small instance's row also
carries the file's bytes (``data``).  The index commit (a WAL append and one
fdatasync of a file that is overwritten in place, no file-system journal
commit) then makes the bytes, the index row and the queue rows durable at
once, and the instance is acknowledged right after it; the file's own data
sync and folder fsync finish behind the acknowledgement, and only then is
the row (and its copy of the bytes) deleted.  Recovery writes such a file
again from the row's bytes, durably, whatever the crash left of it.  The
file is in its place before the acknowledgement either way, so whoever is
told "stored" reads it at once (read-your-writes).

Each node (worker process, cluster node) has its own rows: a live process's
instances in flight are never checked by another one.
"""

from __future__ import annotations

from harmony.storage import index as idx

SCHEMA = """
CREATE TABLE IF NOT EXISTS in_flight (
  node TEXT NOT NULL, sop_uid TEXT NOT NULL, relpath TEXT NOT NULL, prev_relpath TEXT, opening TEXT NOT NULL,
  data BLOB, PRIMARY KEY (node, sop_uid));
"""
PG_SCHEMA = SCHEMA.replace("data BLOB", "data BYTEA")


def add(conn, node: str, sop_uid: str, relpath: str, prev_relpath: str | None, opening: str,
        data: bytes | None = None) -> None:
    """Record an instance whose flushes run alongside (or after) this transaction;
    *data*: the file's bytes, when the row is the instance's journal (see the module
    docstring): the acknowledgement then waits for this commit only."""
    conn.execute("INSERT INTO in_flight(node, sop_uid, relpath, prev_relpath, opening, data) VALUES(?,?,?,?,?,?) "
                 "ON CONFLICT(node, sop_uid) DO UPDATE SET relpath=excluded.relpath, "
                 "prev_relpath=excluded.prev_relpath, opening=excluded.opening, data=excluded.data",
                 (node, sop_uid, relpath, prev_relpath, opening, data))


def settle(conn, node: str, done: list[tuple[str, str]]) -> None:
    """Forget instances (``(sop_uid, relpath)``) whose flushes have all finished."""
    for sop_uid, relpath in done:
        conn.execute("DELETE FROM in_flight WHERE node=? AND sop_uid=? AND relpath=?", (node, sop_uid, relpath))


def left_by_earlier_runs(conn, node: str, opening: str) -> list[tuple[str, str, str | None, bytes | None]]:
    """``(sop_uid, relpath, prev_relpath, data)`` rows of *node* written before this *opening*."""
    return [(r[0], r[1], r[2], None if r[3] is None else bytes(r[3])) for r in conn.execute(
        "SELECT sop_uid, relpath, prev_relpath, data FROM in_flight WHERE node=? AND opening<>? ORDER BY sop_uid",
        (node, opening))]


def forget_earlier_runs(conn, node: str, opening: str) -> None:
    conn.execute("DELETE FROM in_flight WHERE node=? AND opening<>?", (node, opening))


def undo(conn, sop_uid: str, relpath: str, keep_queue: bool) -> None:
    """Remove what an ingest transaction wrote for an instance whose file did not
    survive the crash: its index row (if still at *relpath*), its upload row and,
    unless a copy filed before it comes back (*keep_queue*), its queue rows."""
    row = conn.execute("SELECT relpath FROM instances WHERE sop_uid=?", (sop_uid,)).fetchone()
    if row is not None and row[0] == relpath:
        idx.delete_instance(conn, sop_uid)
    if not keep_queue:
        conn.execute("DELETE FROM queue WHERE sop_uid=?", (sop_uid,))
    conn.execute("DELETE FROM blob_uploads WHERE relpath=?", (relpath,))
