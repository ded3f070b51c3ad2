"""The persistent store-and-forward queue: one row per (target, instance).

Rows live in the store's sqlite database next to the index, so an instance
and its queue rows are committed together: nothing is acknowledged that is
not both on disk and queued.  States::

    pending --claim--> delivering --ok--> delivered (kept for the retention period)
       ^                   |--transient failure--> pending (later, with backoff)
       |                   |--permanent failure or max_attempts--> dead
       +----- retry -------+------------------------------------------ dead

At start-up every ``delivering`` row goes back to ``pending``: a crash may
have interrupted a delivery, and re-sending the same SOP Instance is
idempotent at a DICOM target.  All functions take a connection and *now*
(seconds since the epoch, from the caller's clock) and run on a storage thread.
"""

from __future__ import annotations

import sqlite3

PENDING, DELIVERING, DELIVERED, DEAD = "pending", "delivering", "delivered", "dead"
STATES = (PENDING, DELIVERING, DELIVERED, DEAD)
FIFO, ROTATE = "fifo", "rotate"

SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  target TEXT NOT NULL,
  sop_uid TEXT NOT NULL,
  state TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  enqueued_at REAL NOT NULL,
  next_attempt_at REAL NOT NULL,
  last_attempt_at REAL,
  finished_at REAL,
  last_error TEXT,
  -- set when a new copy arrives while the old one is being delivered
  dirty INTEGER NOT NULL DEFAULT 0);
CREATE UNIQUE INDEX IF NOT EXISTS queue_active ON queue(target, sop_uid) WHERE state != 'delivered';
CREATE INDEX IF NOT EXISTS queue_ready ON queue(target, state, next_attempt_at, id);
"""


def enqueue(conn: sqlite3.Connection, sop_uid: str, targets: list[str], now: float) -> None:
    """Queue *sop_uid* for each target; a second copy of a queued instance does
    not queue it twice, and revives it if it was dead."""
    for target in targets:
        conn.execute(
            "INSERT INTO queue(target, sop_uid, state, enqueued_at, next_attempt_at) VALUES(?,?,'pending',?,?) "
            "ON CONFLICT(target, sop_uid) WHERE state != 'delivered' DO UPDATE SET "
            "dirty = CASE WHEN state='delivering' THEN 1 ELSE dirty END, "
            "attempts = CASE WHEN state='dead' THEN 0 ELSE attempts END, "
            "next_attempt_at = CASE WHEN state='dead' THEN excluded.next_attempt_at ELSE next_attempt_at END, "
            "state = CASE WHEN state='dead' THEN 'pending' ELSE state END",
            (target, sop_uid, now, now))


def recover(conn: sqlite3.Connection, now: float, targets: list[str]) -> int:
    """Return *targets*' interrupted deliveries to the queue (start-up only)."""
    marks = ",".join("?" * len(targets))
    return conn.execute(f"UPDATE queue SET state='pending', next_attempt_at=? WHERE state='delivering' "
                        f"AND target IN ({marks})", (now, *targets)).rowcount


def claim(conn: sqlite3.Connection, target: str, order: str, limit: int, now: float) -> tuple[list, float | None]:
    """Mark up to *limit* ready rows as delivering.

    Returns ``(rows, next_due)``: rows as ``(id, sop_uid, attempts)``, and when
    nothing is ready, the time the next row becomes due (or None if empty).
    ``fifo`` only ever hands out the oldest row, and only when nothing is in
    flight; ``rotate`` hands out any due rows, oldest due first, so a failing
    instance (pushed back by its backoff) never holds the others up.
    """
    if order == FIFO:
        head = conn.execute("SELECT id, state, next_attempt_at FROM queue WHERE target=? AND state IN "
                            "('pending','delivering') ORDER BY id LIMIT 1", (target,)).fetchone()
        if head is None:
            return [], None
        if head[1] == DELIVERING:
            return [], None
        if head[2] > now:
            return [], head[2]
        ids = [head[0]]
    else:
        ids = [r[0] for r in conn.execute(
            "SELECT id FROM queue WHERE target=? AND state='pending' AND next_attempt_at<=? "
            "ORDER BY next_attempt_at, id LIMIT ?", (target, now, limit))]
        if not ids:
            row = conn.execute("SELECT min(next_attempt_at) FROM queue WHERE target=? AND state='pending'",
                               (target,)).fetchone()
            return [], row[0]
    rows = []
    for i in ids:
        rows.append(conn.execute("UPDATE queue SET state='delivering', attempts=attempts+1, last_attempt_at=? "
                                 "WHERE id=? RETURNING id, sop_uid, attempts", (now, i)).fetchone())
    return rows, None


def delivered(conn: sqlite3.Connection, row_id: int, now: float) -> None:
    conn.execute("UPDATE queue SET state = CASE WHEN dirty THEN 'pending' ELSE 'delivered' END, "
                 "attempts = CASE WHEN dirty THEN 0 ELSE attempts END, "
                 "finished_at = CASE WHEN dirty THEN NULL ELSE ? END, "
                 "next_attempt_at = ?, dirty = 0, last_error = NULL WHERE id=?", (now, now, row_id))


def failed(conn: sqlite3.Connection, row_id: int, error: str, now: float, *, retry_at: float | None) -> str:
    """Record a failed attempt: back to pending at *retry_at*, or dead if None."""
    if retry_at is None:
        conn.execute("UPDATE queue SET state='dead', finished_at=?, last_error=?, dirty=0 WHERE id=?",
                     (now, error[:2000], row_id))
        return DEAD
    conn.execute("UPDATE queue SET state='pending', next_attempt_at=?, last_error=? WHERE id=?",
                 (retry_at, error[:2000], row_id))
    return PENDING


def retry_dead(conn: sqlite3.Connection, target: str, now: float, row_id: int | None = None) -> int:
    sql = "UPDATE queue SET state='pending', attempts=0, next_attempt_at=?, finished_at=NULL WHERE target=? AND state='dead'"
    args: list = [now, target]
    if row_id is not None:
        sql += " AND id=?"
        args.append(row_id)
    return conn.execute(sql, args).rowcount


def make_due(conn: sqlite3.Connection, target: str, now: float) -> int:
    """Every pending entry of *target* due now; returns how many are pending."""
    return conn.execute("UPDATE queue SET next_attempt_at=min(next_attempt_at, ?) WHERE target=? AND state='pending'",
                        (now, target)).rowcount


def purge(conn: sqlite3.Connection, target: str, states=(DEAD,)) -> int:
    marks = ",".join("?" * len(states))
    return conn.execute(f"DELETE FROM queue WHERE target=? AND state IN ({marks})", (target, *states)).rowcount


def expire(conn: sqlite3.Connection, delivered_before: float | None, dead_before: float | None) -> int:
    """Apply retention: forget delivered (and, if configured, dead) rows older than the cut-offs."""
    n = 0
    if delivered_before is not None:
        n += conn.execute("DELETE FROM queue WHERE state='delivered' AND finished_at < ?",
                          (delivered_before,)).rowcount
    if dead_before is not None:
        n += conn.execute("DELETE FROM queue WHERE state='dead' AND finished_at < ?", (dead_before,)).rowcount
    return n


def fully_delivered(conn: sqlite3.Connection, sop_uid: str) -> bool:
    """No target still needs (or may be asked to replay) this instance."""
    return conn.execute("SELECT 1 FROM queue WHERE sop_uid=? AND state != 'delivered' LIMIT 1",
                        (sop_uid,)).fetchone() is None


def stats(conn: sqlite3.Connection, now: float) -> dict:
    """Per target: count per state and the age of the oldest undelivered row."""
    out: dict = {}
    for target, state, n, oldest in conn.execute(
            "SELECT target, state, count(*), min(enqueued_at) FROM queue GROUP BY target, state"):
        t = out.setdefault(target, {s: 0 for s in STATES} | {"oldest_age_seconds": 0.0})
        t[state] = n
        if state in (PENDING, DELIVERING) and oldest is not None:
            t["oldest_age_seconds"] = max(t["oldest_age_seconds"], now - oldest)
    return out


def dead_entries(conn: sqlite3.Connection, target: str, limit: int = 100, after_id: int = 0) -> list[dict]:
    rows = conn.execute(
        "SELECT q.id, q.sop_uid, q.attempts, q.enqueued_at, q.finished_at, q.last_error, i.sop_class_uid "
        "FROM queue q LEFT JOIN instances i ON i.sop_uid=q.sop_uid "
        "WHERE q.target=? AND q.state='dead' AND q.id > ? ORDER BY q.id LIMIT ?", (target, after_id, limit))
    return [{"id": r[0], "sop_instance_uid": r[1], "attempts": r[2], "enqueued_at": r[3], "failed_at": r[4],
             "last_error": r[5], "sop_class_uid": r[6]} for r in rows]
