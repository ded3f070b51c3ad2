"""HTTP pieces the ``jmix`` endpoint and the ``jmix_builder`` middleware share:
Accept negotiation, archive responses streamed from disk, upload spooling."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers

from harmony.envelope import BytesProducer, ResponseEnvelope
from harmony.errors import NotAcceptable, NotFound, PayloadTooLarge
from harmony.jmix.archive import TAR_GZ, ZIP
from harmony.jmix.store import EnvelopeStore

JSON = "json"
ZIP_TYPES = ("application/zip", "application/x-zip-compressed")
TGZ_TYPES = ("application/gzip", "application/x-gzip", "application/tar+gzip", "application/x-tar+gzip",
             "application/x-gtar")
CONTENT_TYPE = {ZIP: "application/zip", TAR_GZ: "application/gzip", JSON: "application/json"}


def _parse_accept(value: str) -> list[tuple[str, float]]:
    out = []
    for part in value.split(","):
        fields = [f.strip() for f in part.split(";")]
        mtype = fields[0].lower()
        if not mtype:
            continue
        q = 1.0
        for f in fields[1:]:
            if f.lower().startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
        out.append((mtype, q))
    return out


def negotiate(accept: str | None, allow_json: bool = False) -> str:
    """``zip``, ``tar.gz`` or (when *allow_json*) ``json`` for an Accept header.

    No Accept, ``*/*`` or ``application/*`` get the zip (the spec's required
    format); JSON wins only when named explicitly and preferred.  Raises
    :class:`NotAcceptable` (406) when nothing offered is acceptable.
    """
    if not accept or not accept.strip():
        return ZIP
    ranges = _parse_accept(accept)
    offers = [(ZIP, ZIP_TYPES), (TAR_GZ, TGZ_TYPES)] + ([(JSON, ("application/json",))] if allow_json else [])
    best, best_q = None, 0.0
    for fmt, types in offers:
        exact = [q for t, q in ranges if t in types]
        if exact:
            q = max(exact)
        elif fmt == JSON:
            continue  # never by wildcard
        else:
            wild = [q for t, q in ranges if t in ("*/*", "application/*")]
            q = max(wild) if wild else 0.0
        if q > best_q:
            best, best_q = fmt, q
    if best is None:
        raise NotAcceptable("this resource is available as application/zip or application/gzip (tar.gz)")
    return best


class HeadBody(BytesProducer):
    """A body that has a length but sends nothing: HEAD answers with the real Content-Length."""

    def __init__(self, length: int):
        super().__init__(b"")
        self.length = length


def file_response(path: Path, content_type: str, method: str, headers: Headers | None = None) -> ResponseEnvelope:
    """A 200 streaming *path* from disk (never read whole into memory)."""
    h = headers or Headers()
    h.setRawHeaders("Content-Type", [content_type])
    size = path.stat().st_size
    if method == "HEAD":
        body: HeadBody | FileBodyProducer = HeadBody(size)
    else:
        body = FileBodyProducer(open(path, "rb"))
    return ResponseEnvelope(status=200, headers=h, body=body)


@defer.inlineCallbacks
def envelope_response(store: EnvelopeStore, env_id: str, fmt: str, method: str, reactor=None):
    """The stored envelope *env_id* as a zip or tar.gz response (tar.gz made once, off the reactor)."""
    if reactor is None:
        from twisted.internet import reactor
    # The index lookup waits on the store's lock: off the reactor, like the tar.gz.
    found = yield store.in_thread(reactor, store.get, env_id)
    if found is None:
        raise NotFound(f"JMIX envelope {env_id} not found")
    if fmt == TAR_GZ:
        path = yield store.in_thread(reactor, store.targz_path, env_id)
        suffix = ".tar.gz"
    else:
        path, suffix = store.zip_path(env_id), ".zip"
    headers = Headers()
    headers.setRawHeaders("Content-Disposition", [f'attachment; filename="{env_id}{suffix}"'])
    headers.setRawHeaders("X-JMIX-Envelope-Id", [env_id])
    response = file_response(path, CONTENT_TYPE[fmt], method, headers)
    response.metadata["jmix.envelope_id"] = env_id
    return response


def study_index_response(store: EnvelopeStore, study_uid: str) -> ResponseEnvelope:
    """The JSON index of a study's envelopes (an extension; no server paths in it)."""
    found = store.for_study(study_uid)
    if not found:
        raise NotFound(f"no JMIX envelope for study {study_uid}")
    return ResponseEnvelope.json(200, {"jmixEnvelopes": [
        {"id": e["id"], "studyInstanceUid": e["study_uid"], "timestamp": e["created_at"], "size": e["size"],
         "source": e["source"]} for e in found]})


class _FileSink:
    """IConsumer writing a request body to a file, failing past a byte cap."""

    def __init__(self, f, limit: int):
        self.f, self.limit, self.size = f, limit, 0
        self.producer = None

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def write(self, data: bytes):
        self.size += len(data)
        if self.size > self.limit:
            raise PayloadTooLarge(f"upload exceeds {self.limit} bytes")
        self.f.write(data)


@defer.inlineCallbacks
def spool_body(body, path: Path, limit: int):
    """Write a request body (bytes or producer) to *path*; 413 past *limit* bytes."""
    with open(path, "xb") as f:
        if body is None or isinstance(body, (bytes, bytearray)):
            if len(body or b"") > limit:
                raise PayloadTooLarge(f"upload exceeds {limit} bytes")
            f.write(body or b"")
            return len(body or b"")
        sink = _FileSink(f, limit)
        yield body.startProducing(sink)
        return sink.size
