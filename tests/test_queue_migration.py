"""A store whose queue was made before queue items had a kind (DICOM only)
opens with its rows intact, read as DICOM, and takes HL7 v2 messages too."""

from __future__ import annotations

import sqlite3

from harmony.storage import queue as q
from harmony.storage.store import InstanceStore

OLD_QUEUE = """
CREATE TABLE queue (
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
  dirty INTEGER NOT NULL DEFAULT 0);
CREATE UNIQUE INDEX queue_active ON queue(target, sop_uid) WHERE state != 'delivered';
CREATE INDEX queue_ready ON queue(target, state, next_attempt_at, id);
INSERT INTO queue(target, sop_uid, state, enqueued_at, next_attempt_at) VALUES('pacs', '1.2.3', 'pending', 1, 1);
"""


def test_old_queue_is_migrated_in_place(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    db = sqlite3.connect(root / "index.sqlite")
    db.executescript(OLD_QUEUE)
    db.close()
    store = InstanceStore(root, fsync=False)
    try:
        store.open_sync()
        message_id = store.write_sync(q.enqueue_message, q.HL7V2, b"MSH|^~\\&|A\r", "{}", ["ris"], 2.0)
        rows = store.read_sync(lambda c: c.execute("SELECT target, sop_uid, kind FROM queue ORDER BY id").fetchall())
        claimed, _ = store.write_sync(q.claim, "pacs", q.FIFO, 1, 5.0)
        message = store.read_sync(q.load_message, q.message_key(message_id))
    finally:
        store.close()
    assert rows == [("pacs", "1.2.3", "dicom"), ("ris", f"msg:{message_id}", "hl7v2")]
    assert claimed == [(1, "1.2.3", 1)]
    assert message == ("hl7v2", b"MSH|^~\\&|A\r", "{}")
