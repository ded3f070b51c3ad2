"""A cache of WADO-RS metadata answers, with ETags and request collapsing.

Building series metadata means retrieving every instance from the PACS, so the
answer is kept and served again (or answered 304) until it expires.  Bodies are
stored with a placeholder for the proxy's base URL, so one entry serves clients
that reach the proxy under different names.  While one fetch for a key is
running, identical requests wait for it instead of starting their own retrieve.

Entries are rows (key, body, expiry) on :mod:`harmony.storage.database`: a
sqlite file in the bridge's folder on one node, or the cluster's PostgreSQL
(``[storage] index = "postgresql"``), so a series one node fetched is served
by every node.  Expiry is wall-clock time (the reactor's clock), the same on
every node; expired rows are swept as new ones are written.  Collapsing of
identical fetches stays per process.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from twisted.internet import defer, threads

from harmony.storage.database import SqliteDatabase

BASE_PLACEHOLDER = "urn:harmony:dicomweb-base"
SCHEMA = """
CREATE TABLE IF NOT EXISTS dicomweb_metadata (
  key TEXT PRIMARY KEY, body BLOB NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS dicomweb_metadata_expiry ON dicomweb_metadata(expires_at);
"""
PG_SCHEMA = SCHEMA.replace("BLOB", "BYTEA").replace("REAL", "DOUBLE PRECISION")
#: Expired rows are deleted every this many writes.
SWEEP_EVERY = 50


def etag_for(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


class MetadataCache:
    def __init__(self, folder: Path, clock, ttl: float = 300.0, *, database=None, namespace: str = ""):
        """*database*: the cluster's (an IDatabase), else a sqlite file in *folder*;
        *namespace* keeps the entries of bridges to different PACS apart."""
        self.folder = Path(folder)
        self.clock = clock
        self.ttl = ttl
        self.namespace = namespace
        self._db = database
        self._writes = 0
        self._schema = False
        #: The first uses may come on several threads at once (concurrent first
        #: metadata requests): the database is opened and its schema made once.
        self._setup = threading.Lock()
        self._inflight: dict[str, list] = {}

    @property
    def db(self):
        # Made on first use: building a configuration (harmony check) creates no file.
        if not self._schema:
            with self._setup:
                if self._db is None:
                    self.folder.mkdir(parents=True, exist_ok=True)
                    self._db = SqliteDatabase(self.folder / "cache.sqlite3", fsync=False)
                if not self._schema:
                    self._db.create_schema(SCHEMA, PG_SCHEMA)
                    self._schema = True
        return self._db

    def _key(self, key: str) -> str:
        # Keys hold validated UIDs only; hashing keeps them fixed-size regardless.
        return hashlib.sha256(f"{self.namespace}\0{key}".encode()).hexdigest()

    def get(self, key: str) -> bytes | None:
        """The cached body if fresh, read in the calling thread (never the reactor's on a shared database)."""
        row = self.db.read(lambda conn: conn.execute(
            "SELECT body FROM dicomweb_metadata WHERE key=? AND expires_at>?",
            (self._key(key), self.clock.seconds())).fetchone())
        return bytes(row[0]) if row is not None else None

    def put(self, key: str, body: bytes) -> None:
        """Store *body*, written in the calling thread."""
        if self.ttl <= 0:
            return
        now = self.clock.seconds()
        self._writes += 1
        sweep = self._writes % SWEEP_EVERY == 0

        def write(conn):
            conn.execute("INSERT INTO dicomweb_metadata(key, body, expires_at) VALUES(?,?,?) ON CONFLICT(key) "
                         "DO UPDATE SET body=excluded.body, expires_at=excluded.expires_at",
                         (self._key(key), bytes(body), now + self.ttl))
            if sweep:
                conn.execute("DELETE FROM dicomweb_metadata WHERE expires_at<=?", (now,))
        # A cache: losing the last writes to a power cut only means a refetch.
        self.db.transaction(False, write)

    # Series metadata can run to megabytes, and a shared database is a round
    # trip away: on the reactor, the work goes to a thread.
    def get_async(self, key: str) -> defer.Deferred:
        return threads.deferToThread(self.get, key)

    def put_async(self, key: str, body: bytes) -> defer.Deferred:
        if self.ttl <= 0:
            return defer.succeed(None)
        return threads.deferToThread(self.put, key, body)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    # -- collapsing identical fetches
    def join(self, key: str) -> defer.Deferred | None:
        """A Deferred for the running fetch of *key*, or None (the caller fetches
        and must call :meth:`settle` when done)."""
        waiters = self._inflight.get(key)
        if waiters is None:
            self._inflight[key] = []
            return None
        d: defer.Deferred = defer.Deferred()
        waiters.append(d)
        return d

    def settle(self, key: str, result) -> None:
        """Hand the fetch's result (bytes or a Failure) to every waiter."""
        for d in self._inflight.pop(key, []):
            if isinstance(result, bytes):
                d.callback(result)
            else:
                d.errback(result)

    def running(self, key: str) -> bool:
        return key in self._inflight

    def waiting(self, key: str) -> int:
        """How many joined the running fetch of *key* and still wait for it (not cancelled)."""
        return sum(1 for d in self._inflight.get(key, ()) if not d.called)


def with_base(body: bytes, base_url: str) -> bytes:
    return body.replace(BASE_PLACEHOLDER.encode(), base_url.encode("utf-8"))
