"""The envelope store: one folder per envelope, indexed by StudyInstanceUID in sqlite3.

Layout under the store folder::

    index.sqlite3              id, study_uid, created_at (manifest timestamp, UTC), stored_at, size, source
    <id>/<id>.zip              the envelope, entries at the root (what is served)
    <id>/manifest.json         a copy, so /manifest never opens the zip
    <id>/<id>.tar.gz           made on first request for tar.gz, then kept
    .staging/                  build and upload work folders; emptied at start

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
import shutil
import sqlite3
import threading
import uuid
import zipfile
from pathlib import Path

from harmony.config.errors import OptionError
from harmony.jmix.archive import pack_zip, zip_to_targz
from harmony.jmix.crypto import parse_time

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
    def open(cls, folder: Path) -> "EnvelopeStore":
        """The one store object per folder, shared by the endpoint and the builder."""
        key = os.path.realpath(folder)
        with cls._open_lock:
            store = cls._open.get(key)
            if store is None:
                store = cls._open[key] = cls(Path(key))
            return store

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.staging = self.folder / ".staging"
        self.folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.folder / "index.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.executescript(_SCHEMA)

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

    # -- queries (small, indexed: fine on the reactor thread)
    def _query(self, sql: str, args=()) -> list:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def get(self, env_id: str) -> dict | None:
        cid = canonical_id(env_id)
        if cid is None:
            return None
        rows = self._query("SELECT id, study_uid, created_at, size, source FROM envelopes WHERE id = ?", (cid,))
        if not rows or not self.zip_path(cid).is_file():
            return None
        return dict(zip(("id", "study_uid", "created_at", "size", "source"), rows[0], strict=True))

    def exists(self, env_id: str) -> bool:
        cid = canonical_id(env_id)
        return cid is not None and (self.folder / cid).exists()

    def for_study(self, study_uid: str) -> list[dict]:
        """Envelopes of a study, newest (by manifest timestamp) first."""
        rows = self._query("SELECT id, study_uid, created_at, size, source FROM envelopes WHERE study_uid = ? "
                           "ORDER BY created_at DESC, stored_at DESC", (study_uid,))
        return [dict(zip(("id", "study_uid", "created_at", "size", "source"), r, strict=True)) for r in rows
                if self.zip_path(r[0]).is_file()]

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
        if final.exists():
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
        row = (cid, study_uid, _utc(manifest.get("timestamp", "")),
               datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), size, source)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO envelopes VALUES (?, ?, ?, ?, ?, ?)", row)
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
        with self._lock:
            self._db.close()
        with self._open_lock:
            self._open.pop(os.path.realpath(self.folder), None)


def store_option(options, ctx):
    """``store_dir``, default ``<storage>/jmix`` - the same default for endpoint and builder."""
    path = options.path("store_dir", None) or (ctx.storage_path / "jmix")
    try:
        return EnvelopeStore.open(path)
    except OSError as e:
        raise OptionError("store_dir", f"cannot use {path}: {e.strerror}") from None
