"""The envelope store: one folder per envelope, indexed by StudyInstanceUID.

Layout under the store folder::

    index.sqlite3              id, study_uid, created_at (manifest timestamp, UTC), stored_at, size, source
    <id>/<id>.zip              the envelope, entries at the root (what is served)
    <id>/manifest.json         a copy, so /manifest never opens the zip
    <id>/<id>.tar.gz           made on first request for tar.gz, then kept
    .staging/                  build and upload work folders; emptied at start

The index is SQL on :mod:`harmony.storage.database`: the folder's own sqlite
file on one node, or - with ``[storage] index = "postgresql"`` - the table
``envelopes`` in the cluster's database, so every node finds every node's
envelopes.  With ``[storage] backend = "s3"`` the zip and manifest also go to
the bucket (``jmix/<id>/...``) before the row is committed, and a node that
lacks them locally fetches them on first use: the folder is then each node's
cache.  Without S3 the nodes share the folder (NFS), each with its own staging.

An envelope becomes visible by one ``rename`` of its finished folder into
place, then one index row: a crash leaves either nothing or an unindexed
folder, never a half-written envelope that is served.  Built and uploaded
envelopes go through the same :meth:`EnvelopeStore.add`, so every route works
for both.  Ids reaching the filesystem are always canonical UUIDs.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import threading
import uuid
import zipfile
from pathlib import Path

from twisted.internet import defer, threads

from harmony.config.errors import OptionError
from harmony.jmix.archive import pack_zip, zip_to_targz
from harmony.jmix.crypto import parse_time
from harmony.storage.database import SqliteDatabase

_SCHEMA = """
CREATE TABLE IF NOT EXISTS envelopes (
    id TEXT PRIMARY KEY,
    study_uid TEXT,
    created_at TEXT NOT NULL,
    stored_at TEXT NOT NULL,
    size INTEGER NOT NULL,
    source TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS envelopes_by_study ON envelopes (study_uid, created_at);
"""
_PG_SCHEMA = _SCHEMA.replace("size INTEGER", "size BIGINT")
_COLUMNS = ("id", "study_uid", "created_at", "size", "source")
#: Files of an envelope that go to object storage (the tar.gz is remade locally from the zip).
_SHARED_FILES = ("{id}.zip", "manifest.json")


class DuplicateEnvelope(Exception):
    pass


def canonical_id(value: str) -> str | None:
    """The lower-case hyphenated form of a UUID, or None if *value* is not one."""
    if not isinstance(value, str) or len(value) != 36:
        return None
    try:
        u = uuid.UUID(value)
    except ValueError:
        return None
    return str(u) if str(u) == value.lower() else None


def _utc(text: str) -> str:
    try:
        when = parse_time(text)
    except (ValueError, AttributeError):
        when = datetime.datetime.now(datetime.timezone.utc)
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class EnvelopeStore:
    _open: dict = {}
    _open_lock = threading.Lock()

    @classmethod
    def open(cls, folder: Path, shared=None) -> "EnvelopeStore":
        """The one store object per folder, shared by the endpoint and the builder;
        *shared* makes the cluster's parts (database, blobs, node) for a new one."""
        key = os.path.realpath(folder)
        with cls._open_lock:
            store = cls._open.get(key)
            if store is None:
                parts = shared() if shared is not None else None
                extra = {"database": parts.database, "blobs": parts.blobs, "node": parts.node} if parts else {}
                store = cls._open[key] = cls(Path(key), **extra)
            return store

    def __init__(self, folder: Path, *, database=None, blobs=None, node: str = ""):
        """*database*: the cluster's (an :class:`~harmony.storage.database.IDatabase`), else the
        folder's own sqlite file; *blobs*: the cluster's S3 bucket, or None."""
        self.folder = Path(folder)
        self.shared = database is not None
        self.blobs = blobs
        self.folder.mkdir(parents=True, exist_ok=True)
        # Nodes sharing the folder each clear only their own staging.
        self.staging = self.folder / ".staging"
        if self.shared:
            self.staging = self.staging / (re.sub(r"[^A-Za-z0-9_.-]", "_", node) or "node")
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        self._fetch_lock = threading.Lock()
        self.db = database if database is not None else SqliteDatabase(self.folder / "index.sqlite3")
        self._schema_ready = False

    def _database(self):
        # The schema on first use: building a configuration (harmony check)
        # must not need the cluster's database to be reachable.
        if not self._schema_ready:
            self.db.create_schema(_SCHEMA, _PG_SCHEMA)
            self._schema_ready = True
        return self.db

    # -- paths
    def envelope_dir(self, env_id: str) -> Path:
        cid = canonical_id(env_id)
        if cid is None:
            raise ValueError(f"envelope id {env_id!r} is not a UUID")
        return self.folder / cid

    def zip_path(self, env_id: str) -> Path:
        return self.envelope_dir(env_id) / f"{env_id}.zip"

    def manifest_path(self, env_id: str) -> Path:
        return self.envelope_dir(env_id) / "manifest.json"

    def new_workdir(self) -> Path:
        """A fresh work folder on the store's filesystem (so the final rename is atomic)."""
        path = self.staging / uuid.uuid4().hex
        path.mkdir()
        return path

    # -- the thread boundary
    @staticmethod
    def in_thread(reactor, fn, *args) -> defer.Deferred:
        """Run a blocking call of the store - an index query (on a cluster, a round trip to
        PostgreSQL that its retries may stretch to seconds), an S3 fetch, a build or an
        upload - on *reactor*'s thread pool.  The one way the endpoint, the builder and the
        response writers reach the store: nothing of it runs on the reactor thread
        (tests/endpoints/test_jmix.py checks every route)."""
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)

    # -- queries (small and indexed; blocking: reach them through in_thread)
    def _query(self, sql: str, args=()) -> list:
        return self._database().read(lambda conn: conn.execute(sql, args).fetchall())

    def get(self, env_id: str) -> dict | None:
        """The envelope's row, its files present locally (fetched from S3 if need be; blocking)."""
        cid = canonical_id(env_id)
        if cid is None:
            return None
        rows = self._query("SELECT id, study_uid, created_at, size, source FROM envelopes WHERE id = ?", (cid,))
        if not rows or not self._local_files(cid):
            return None
        return dict(zip(_COLUMNS, rows[0], strict=True))

    def exists(self, env_id: str) -> bool:
        cid = canonical_id(env_id)
        if cid is None:
            return False
        if (self.folder / cid).exists():
            return True
        return self.shared and bool(self._query("SELECT 1 FROM envelopes WHERE id = ?", (cid,)))

    def for_study(self, study_uid: str) -> list[dict]:
        """Envelopes of a study, newest (by manifest timestamp) first."""
        rows = self._query("SELECT id, study_uid, created_at, size, source FROM envelopes WHERE study_uid = ? "
                           "ORDER BY created_at DESC, stored_at DESC", (study_uid,))
        # With S3 every indexed envelope is in the bucket (put before its row);
        # otherwise only those whose files this node can see.
        return [dict(zip(_COLUMNS, r, strict=True)) for r in rows
                if self.blobs is not None or self.zip_path(r[0]).is_file()]

    def _local_files(self, cid: str) -> bool:
        """True once the envelope's files are in the local folder (fetched from S3 when missing)."""
        if self.zip_path(cid).is_file():
            return True
        if self.blobs is None:
            return False
        with self._fetch_lock:  # one fetch per envelope at a time in this process
            if self.zip_path(cid).is_file():
                return True
            work = self.new_workdir()
            try:
                for name in _SHARED_FILES:
                    name = name.format(id=cid)
                    with open(work / name, "wb") as dest:
                        try:
                            self.blobs.download_sync(f"jmix/{cid}/{name}", dest)
                        except FileNotFoundError:
                            return False
                try:
                    os.rename(work, self.folder / cid)
                except OSError:
                    pass  # there already (another thread of this node won)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return self.zip_path(cid).is_file()

    def newest_for_study(self, study_uid: str) -> str | None:
        found = self.for_study(study_uid)
        return found[0]["id"] if found else None

    # -- writes (may run in a worker thread)
    def add(self, root: Path, study_uid: str | None, source: str) -> dict:
        """Store the unpacked, validated envelope at *root*; raises :class:`DuplicateEnvelope`."""
        manifest = json.loads((Path(root) / "manifest.json").read_text("utf-8"))
        cid = canonical_id(manifest.get("id"))
        if cid is None:
            raise ValueError("manifest id is not a UUID")
        final = self.folder / cid
        if final.exists() or (self.shared and self.exists(cid)):
            raise DuplicateEnvelope(cid)
        work = self.new_workdir()
        try:
            pack_zip(root, work / f"{cid}.zip")
            shutil.copyfile(Path(root) / "manifest.json", work / "manifest.json")
            try:
                os.rename(work, final)  # atomic; fails if another request won the race
            except OSError:
                raise DuplicateEnvelope(cid) from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        size = (final / f"{cid}.zip").stat().st_size
        if self.blobs is not None:
            # In the bucket before the row: an indexed envelope is always fetchable.
            # S3 down: the error (503) goes to the caller and the envelope is not indexed.
            try:
                for name in _SHARED_FILES:
                    name = name.format(id=cid)
                    self.blobs.upload_sync(final / name, f"jmix/{cid}/{name}")
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise
        row = (cid, study_uid, _utc(manifest.get("timestamp", "")),
               datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), size, source)

        # Alone, a row whose folder vanished is replaced; shared, the first node's row wins.
        conflict = ("DO NOTHING" if self.shared else "DO UPDATE SET study_uid=excluded.study_uid, "
                    "created_at=excluded.created_at, stored_at=excluded.stored_at, size=excluded.size, "
                    "source=excluded.source")

        def insert(conn):
            return conn.execute("INSERT INTO envelopes(id, study_uid, created_at, stored_at, size, source) "
                                f"VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(id) {conflict}", row).rowcount
        if not self._database().transaction(True, insert):
            shutil.rmtree(final, ignore_errors=True)  # the first node's copy is the one served
            raise DuplicateEnvelope(cid)  # another node indexed the same id meanwhile
        return {"id": cid, "study_uid": study_uid, "size": size, "source": source}

    def targz_path(self, env_id: str) -> Path:
        """The tar.gz form, made from the zip on first use (blocking: call from a thread)."""
        out = self.envelope_dir(env_id) / f"{env_id}.tar.gz"
        if not out.is_file():
            zip_to_targz(self.zip_path(env_id), out)
        return out

    def read_manifest(self, env_id: str) -> bytes | None:
        path = self.manifest_path(env_id)
        if path.is_file():
            return path.read_bytes()
        zp = self.zip_path(env_id)
        if zp.is_file():
            with zipfile.ZipFile(zp) as zf:
                return zf.read("manifest.json")
        return None

    def close(self):
        self.db.close()
        with self._open_lock:
            self._open.pop(os.path.realpath(self.folder), None)


def store_option(options, ctx):
    """``store_dir``, default ``<storage>/jmix`` - the same default for endpoint and builder;
    on a cluster (``[storage] index = "postgresql"``) indexed in its database, its blobs in S3 when
    ``[storage] backend = "s3"``."""
    from harmony.storage.config import shared_parts
    path = options.path("store_dir", None) or (ctx.storage_path / "jmix")
    try:
        return EnvelopeStore.open(path, lambda: shared_parts(ctx, "jmix", path))
    except OSError as e:
        raise OptionError("store_dir", f"cannot use {path}: {e.strerror}") from None
