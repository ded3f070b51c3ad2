"""S3-compatible object storage for instance files (``[storage] backend = "s3"``).

Why a local cache in front: receiving straight into S3 costs a round trip
(or several, for multipart) per instance before the sender may be answered -
dcm4chee measured it ~30x slower than receiving to disk.  So an instance is
received into the store's folder exactly as with ``filesystem``, and uploaded
afterwards.

What *durable* means then (the acknowledgement rule is unchanged: nothing is
acknowledged that is not durable): the file is fsynced and renamed into the
local folder, AND its index row, its queue rows and an *upload pending* row
(``blob_uploads``: path, node) are committed in one transaction.  That
survives a kill -9 of the process (the node's uploader finishes the pending
rows when it starts again) and an S3 outage (uploads wait, ingest goes on, the
backlog is a metric).  It does not survive the loss of the receiving node's
disk before the upload - a window of seconds in normal running; a site that
cannot accept it keeps ``filesystem`` on replicated storage.

Reads (WADO, C-GET, C-MOVE, delivery) use the local copy and fetch a missing
one from S3 into the folder first, so a node can serve what another node
received.  Query metadata never comes from S3: it is in the index.  Every S3
call runs on the store's threads (boto3 is blocking), never on the reactor.

    [storage]
    backend = "s3"
    [storage.options]
    s3_endpoint = "https://s3.eu-west-1.amazonaws.com"   # any S3-compatible endpoint
    s3_bucket = "harmony-archive"
    s3_region = "eu-west-1"
    s3_credentials_file = "/run/secrets/harmony-s3"     # "ACCESS_KEY:SECRET_KEY"; else the AWS_* environment
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from harmony.log import get_logger
from harmony.storage.errors import StorageFailure

log = get_logger("harmony.storage.blobs")

SCHEMA = """
CREATE TABLE IF NOT EXISTS blob_uploads (
  relpath TEXT PRIMARY KEY, node TEXT NOT NULL, queued_at REAL NOT NULL);
"""
PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS blob_uploads (
  relpath TEXT PRIMARY KEY, node TEXT NOT NULL, queued_at DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS blob_uploads_node ON blob_uploads(node, queued_at);
"""


class BlobUnavailable(StorageFailure):
    """The file is neither in the local folder nor (yet) in S3: its upload is
    pending on another node, or S3 cannot be reached.  Try again later."""

    status, title, code = 503, "Service Unavailable", "blob-unavailable"


def mark_pending(conn, relpath: str, node: str, now: float) -> None:
    """Record that *relpath* is durable locally and still to be uploaded (in the ingest's transaction)."""
    conn.execute("INSERT INTO blob_uploads(relpath, node, queued_at) VALUES(?,?,?) ON CONFLICT(relpath) "
                 "DO UPDATE SET node=excluded.node, queued_at=excluded.queued_at", (relpath, node, now))


def pending(conn, node: str, limit: int) -> list[str]:
    return [r[0] for r in conn.execute("SELECT relpath FROM blob_uploads WHERE node=? ORDER BY queued_at LIMIT ?",
                                       (node, limit))]


def uploaded(conn, relpath: str, node: str) -> None:
    conn.execute("DELETE FROM blob_uploads WHERE relpath=? AND node=?", (relpath, node))


def pending_set(conn, node: str) -> set[str]:
    """Every file of *node* still to upload (never to be evicted)."""
    return {r[0] for r in conn.execute("SELECT relpath FROM blob_uploads WHERE node=?", (node,))}


def backlog(conn) -> int:
    return conn.execute("SELECT count(*) FROM blob_uploads").fetchone()[0]


def read_credentials(path) -> tuple[str, str]:
    text = Path(path).read_text(encoding="utf-8").strip()
    access, sep, secret = text.partition(":")
    if not sep or not access or not secret:
        raise ValueError("must hold ACCESS_KEY:SECRET_KEY")
    return access, secret


class S3Blobs:
    """One bucket (optionally under a key prefix), through boto3 on the caller's thread."""

    def __init__(self, endpoint: str, bucket: str, region: str = "us-east-1", *, access_key: str | None = None,
                 secret_key: str | None = None, prefix: str = "", timeout: float = 10.0):
        self.endpoint, self.bucket, self.region, self.prefix = endpoint, bucket, region, prefix
        self._credentials = (access_key, secret_key)
        self.timeout = timeout
        self._client = None
        self._lock = threading.Lock()
        #: Last S3 error text, None while S3 answers (metrics and management).
        self.last_error: str | None = None

    def describe(self) -> str:
        return f"s3 {self.endpoint}/{self.bucket}"

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config
                access, secret = self._credentials
                self._client = boto3.client(
                    "s3", endpoint_url=self.endpoint, region_name=self.region,
                    aws_access_key_id=access or os.environ.get("AWS_ACCESS_KEY_ID"),
                    aws_secret_access_key=secret or os.environ.get("AWS_SECRET_ACCESS_KEY"),
                    config=Config(connect_timeout=self.timeout, read_timeout=self.timeout,
                                  retries={"max_attempts": 2, "mode": "standard"}))
            return self._client

    def key(self, relpath: str) -> str:
        return f"{self.prefix}{relpath}"

    def _call(self, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError
        try:
            result = fn(*args, **kwargs)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                self._up()
                raise FileNotFoundError(args[0] if args else "") from None
            self._down(e)
            raise BlobUnavailable(f"S3 refused the request: {e}") from None
        except BotoCoreError as e:
            self._down(e)
            raise BlobUnavailable(f"S3 unreachable: {e}") from None
        self._up()
        return result

    def _down(self, error) -> None:
        if self.last_error is None:
            log.warn("storage: S3 unreachable ({s3}): {error}", s3=self.describe(), error=str(error)[:300])
        self.last_error = str(error)[:300] or type(error).__name__

    def _up(self) -> None:
        if self.last_error is not None:
            log.info("storage: S3 answers again ({s3})", s3=self.describe())
        self.last_error = None

    def upload_sync(self, path: Path, relpath: str) -> None:
        with open(path, "rb") as body:
            self._call(self.client.put_object, Bucket=self.bucket, Key=self.key(relpath), Body=body,
                       ContentType="application/dicom")

    def download_sync(self, relpath: str, dest) -> None:
        """Write the object into the open binary file *dest*; FileNotFoundError if there is none."""
        def get():
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key(relpath))
            for chunk in answer["Body"].iter_chunks(1024 * 1024):
                dest.write(chunk)
        self._call(get)

    def delete_sync(self, relpath: str) -> None:
        self._call(self.client.delete_object, Bucket=self.bucket, Key=self.key(relpath))


class LocalCache:
    """A size bound on the local folder in front of S3 (``s3_cache_max_mb``).

    Evicts least recently used files first (a read through the store touches
    the file's mtime), down to :data:`LOW_WATER` of the bound.  Never evicted:
    a file whose upload is pending (its only copy), nor one younger than
    *grace_seconds* (it may be between its rename into place and the commit of
    its upload-pending row).  The folder is walked only when the running
    estimate (bytes uploaded or fetched since the last walk) passes the bound,
    and at most every *walk_interval* seconds while nothing can go.
    """

    #: Eviction stops at this fraction of the bound, so it does not run on every new file.
    LOW_WATER = 0.9

    def __init__(self, folder: Path, max_bytes: int, *, grace_seconds: float = 300.0,
                 walk_interval: float = 10.0, clock=time.time):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.grace_seconds = grace_seconds
        self.walk_interval = walk_interval
        self.clock = clock
        #: Bytes in the folder at the last walk plus what came since (None before the first walk).
        self.bytes: int | None = None
        self.evicted_files = 0
        self.evicted_bytes = 0
        self._next_walk = 0.0
        self._lock = threading.Lock()
        self._walk_lock = threading.Lock()

    def added(self, size: int) -> None:
        with self._lock:
            if self.bytes is not None:
                self.bytes += size

    def due(self) -> bool:
        return (self.bytes is None or self.bytes > self.max_bytes) and self.clock() >= self._next_walk

    def evict_sync(self, pending: set[str]) -> int:
        """Walk the folder and evict down to the low-water mark; files evicted (storage thread)."""
        with self._walk_lock:  # one walk at a time
            return self._evict(pending)

    def _evict(self, pending: set[str]) -> int:
        now = self.clock()
        files, total = [], 0
        for dirpath, _dirs, names in os.walk(self.folder):
            for name in names:
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                total += st.st_size
                rel = os.path.relpath(path, self.folder).replace(os.sep, "/")
                # ctime too: a rename into place (a moved file keeps its old mtime) sets it.
                if rel not in pending and max(st.st_mtime, st.st_ctime) < now - self.grace_seconds:
                    files.append((st.st_mtime, st.st_size, path))
        evicted = 0
        if total > self.max_bytes:
            target = int(self.max_bytes * self.LOW_WATER)
            for _mtime, size, path in sorted(files):
                if total <= target:
                    break
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                total -= size
                evicted += 1
                self.evicted_bytes += size
        self.evicted_files += evicted
        with self._lock:
            self.bytes = total
        # Still over: what is left is pending or young; look again later, not at every file.
        self._next_walk = now + self.walk_interval if total > self.max_bytes else 0.0
        return evicted

    @staticmethod
    def touch(path: Path) -> None:
        """Mark a cached file as just used (least recently used goes first)."""
        try:
            os.utime(path)
        except OSError:
            pass
