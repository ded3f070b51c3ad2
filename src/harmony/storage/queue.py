"""The persistent store-and-forward queue: one row per (target, item).

An item is a DICOM instance (``kind = 'dicom'``, the key its SOP Instance
UID, the file in the store) or a message (``kind = 'hl7v2'``, the key
``msg:<id>`` naming a row of ``messages``, which holds the bytes and their
``hl7.*`` metadata).  Rows live in the store's sqlite database next to the
index, so an item and its queue rows are committed together: nothing is
acknowledged that is not both on disk and queued.  States::

    pending --claim--> delivering --ok--> delivered (kept for the retention period)
       ^                   |--transient failure--> pending (later, with backoff)
       |                   |--permanent failure or max_attempts--> dead
       +----- retry -------+------------------------------------------ dead

At start-up every ``delivering`` row goes back to ``pending``: a crash may
have interrupted a delivery, and re-sending the same SOP Instance is
idempotent at a DICOM target (an HL7 receiver sees the same control ID
again, which is what its duplicate detection is for).  All functions take a connection and *now*
(seconds since the epoch, from the caller's clock) and run on a storage thread.
"""

from __future__ import annotations

import sqlite3

PENDING, DELIVERING, DELIVERED, DEAD = "pending", "delivering", "delivered", "dead"
DICOM, HL7V2 = "dicom", "hl7v2"
MESSAGE_PREFIX = "msg:"
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
  dirty INTEGER NOT NULL DEFAULT 0,
  kind TEXT NOT NULL DEFAULT 'dicom');
CREATE TABLE IF NOT EXISTS messages (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  kind TEXT NOT NULL,
  body BLOB NOT NULL,
  metadata TEXT NOT NULL DEFAULT '{}',
  received_at REAL NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS queue_active ON queue(target, sop_uid) WHERE state != 'delivered';
CREATE INDEX IF NOT EXISTS queue_ready ON queue(target, state, next_attempt_at, id);
"""


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a queue made by an older Harmony (DICOM only) up to date."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(queue)")}
    if "kind" not in columns:
        conn.execute("ALTER TABLE queue ADD COLUMN kind TEXT NOT NULL DEFAULT 'dicom'")


def message_key(message_id: int) -> str:
    return f"{MESSAGE_PREFIX}{message_id}"


def enqueue_message(conn: sqlite3.Connection, kind: str, body: bytes, metadata: str, targets: list[str],
                    now: float) -> int:
    """Keep a message and queue it for each target (one transaction); its id."""
    message_id = conn.execute("INSERT INTO messages(kind, body, metadata, received_at) VALUES(?,?,?,?)",
                              (kind, body, metadata, now)).lastrowid
    key = message_key(message_id)
    for target in targets:
        conn.execute("INSERT INTO queue(target, sop_uid, state, enqueued_at, next_attempt_at, kind) "
                     "VALUES(?,?,'pending',?,?,?)", (target, key, now, now, kind))
    return message_id


def load_message(conn: sqlite3.Connection, key: str):
    """(kind, body, metadata JSON) of a queued message, or None when it is gone."""
    if not key.startswith(MESSAGE_PREFIX):
        return None
    return conn.execute("SELECT kind, body, metadata FROM messages WHERE id=?",
                        (int(key[len(MESSAGE_PREFIX):]),)).fetchone()


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

    Returns ``(rows, next_due)``: rows as ``(id, item key, attempts)`` (a key
    starting ``msg:`` is a message), and when
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
    n = conn.execute(f"DELETE FROM queue WHERE target=? AND state IN ({marks})", (target, *states)).rowcount
    forget_messages(conn)
    return n


def expire(conn: sqlite3.Connection, delivered_before: float | None, dead_before: float | None) -> int:
    """Apply retention: forget delivered (and, if configured, dead) rows older than the cut-offs."""
    n = 0
    if delivered_before is not None:
        n += conn.execute("DELETE FROM queue WHERE state='delivered' AND finished_at < ?",
                          (delivered_before,)).rowcount
    if dead_before is not None:
        n += conn.execute("DELETE FROM queue WHERE state='dead' AND finished_at < ?", (dead_before,)).rowcount
    forget_messages(conn)
    return n


def forget_messages(conn: sqlite3.Connection) -> int:
    """Drop messages no queue row refers to any more (delivered and expired, or purged)."""
    return conn.execute("DELETE FROM messages WHERE NOT EXISTS (SELECT 1 FROM queue WHERE queue.kind != 'dicom' "
                        "AND queue.sop_uid = 'msg:' || messages.id)").rowcount


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
    """Dead letters, oldest first.  DICOM ones name the instance; messages
    their kind and the ``hl7.*`` header fields kept with them (no patient data)."""
    import json

    rows = conn.execute(
        "SELECT q.id, q.sop_uid, q.attempts, q.enqueued_at, q.finished_at, q.last_error, i.sop_class_uid, q.kind, "
        "m.metadata FROM queue q LEFT JOIN instances i ON q.kind='dicom' AND i.sop_uid=q.sop_uid "
        "LEFT JOIN messages m ON q.kind!='dicom' AND q.sop_uid = 'msg:' || m.id "
        "WHERE q.target=? AND q.state='dead' AND q.id > ? ORDER BY q.id LIMIT ?", (target, after_id, limit))
    out = []
    for r in rows:
        entry = {"id": r[0], "kind": r[7], "attempts": r[2], "enqueued_at": r[3], "failed_at": r[4],
                 "last_error": r[5]}
        if r[7] == DICOM:
            entry.update(sop_instance_uid=r[1], sop_class_uid=r[6])
        else:
            entry["item"] = r[1]
            entry.update({k: v for k, v in json.loads(r[8] or "{}").items() if k in MESSAGE_SUMMARY})
        out.append(entry)
    return out


#: Message metadata shown with a dead letter: enough to find it at the sender, no patient data.
MESSAGE_SUMMARY = ("hl7.message_type", "hl7.trigger_event", "hl7.control_id", "hl7.sending_application",
                   "hl7.sending_facility")
