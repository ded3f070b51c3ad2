"""On-disk cache of WADO-RS metadata answers, with ETags and request collapsing.

Building series metadata means retrieving every instance from the PACS, so the
answer is kept under storage and served again (or answered 304) until it
expires.  Bodies are stored with a placeholder for the proxy's base URL, so
one entry serves clients that reach the proxy under different names.  While
one fetch for a key is running, identical requests wait for it instead of
starting their own retrieve.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from twisted.internet import defer, threads

BASE_PLACEHOLDER = "urn:harmony:dicomweb-base"


def etag_for(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


class MetadataCache:
    def __init__(self, folder: Path, clock, ttl: float = 300.0):
        self.folder = Path(folder)
        self.clock = clock
        self.ttl = ttl
        #: key -> expiry (clock seconds); the index lives in memory, so a
        #: restart simply refetches (and overwrites) entries.
        self._expires: dict[str, float] = {}
        self._inflight: dict[str, list] = {}

    def _path(self, key: str) -> Path:
        # Keys contain validated UIDs only, but hashing keeps names fixed-size and safe regardless.
        return self.folder / (hashlib.sha256(key.encode()).hexdigest() + ".json")

    def _fresh(self, key: str) -> bool:
        expires = self._expires.get(key)
        if expires is None or expires <= self.clock.seconds():
            self._expires.pop(key, None)
            return False
        return True

    def _read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def _write(self, key: str, body: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, path)

    def get(self, key: str) -> bytes | None:
        """The cached body, read in the calling thread (tests, tools)."""
        if not self._fresh(key):
            return None
        body = self._read(key)
        if body is None:
            self._expires.pop(key, None)
        return body

    def put(self, key: str, body: bytes) -> None:
        """Store *body*, written in the calling thread (tests, tools)."""
        if self.ttl <= 0:
            return
        self._write(key, body)
        self._expires[key] = self.clock.seconds() + self.ttl

    # Series metadata can run to megabytes: on the reactor, file I/O goes to a
    # thread and only the in-memory expiry index is touched on the reactor.
    def get_async(self, key: str) -> defer.Deferred:
        if not self._fresh(key):
            return defer.succeed(None)

        def read(body):
            if body is None:
                self._expires.pop(key, None)
            return body

        return threads.deferToThread(self._read, key).addCallback(read)

    def put_async(self, key: str, body: bytes) -> defer.Deferred:
        if self.ttl <= 0:
            return defer.succeed(None)

        def written(_):
            self._expires[key] = self.clock.seconds() + self.ttl

        return threads.deferToThread(self._write, key, body).addCallback(written)

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


def with_base(body: bytes, base_url: str) -> bytes:
    return body.replace(BASE_PLACEHOLDER.encode(), base_url.encode("utf-8"))
