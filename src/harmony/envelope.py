"""The protocol-neutral request and response that flow through a pipeline.

Every endpoint turns its protocol's request into a :class:`RequestEnvelope`;
every backend answers with a :class:`ResponseEnvelope`.  Middleware only ever
sees envelopes, which is what lets the same auth or transform run behind HTTP,
FHIR, DICOMweb, JMIX and DIMSE alike.

Bodies are either ``bytes`` (small, already in memory) or a Twisted
``IBodyProducer`` (a stream).  Streams stay streams: only code that really needs
the whole body (a JSON transform, say) calls :func:`read_body`, and that takes a
size cap so a multi-GB upload can never be pulled into memory by accident.
"""

from __future__ import annotations

import json
import random
from typing import Any
from urllib.parse import parse_qsl

import attr
from twisted.internet import defer, task
from twisted.internet.protocol import Protocol
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from harmony.errors import PayloadTooLarge
from harmony.state import RequestState, ResponseState

JSON_TYPES = ("application/json", "application/fhir+json", "application/dicom+json",
              "application/json+fhir", "application/problem+json")


#: ``json.dumps`` with these options builds an encoder per call (an answer per received C-STORE).
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def new_request_id() -> str:
    """A random version-4 UUID as 32 hex digits, like ``uuid.uuid4().hex`` but without
    its ``getrandom`` system call and ``UUID`` object on every request (strace counted one
    per proxied request; ~5 % of a received C-STORE's reactor time).  The ids label
    requests, they guard nothing; the module-level generator is seeded from the OS and
    reseeded in each forked worker by CPython."""
    bits = random.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET
    return "%032x" % bits


#: The version (4, bits 76-79) and variant (0b10, bits 62-63; RFC 9562) of a random UUID.
_UUID4_CLEAR = ~((0xF << 76) | (0b11 << 62))
_UUID4_SET = (4 << 76) | (0b10 << 62)


def parse_query(raw: bytes | str) -> list[tuple[str, str]]:
    """Decode a query string into ordered pairs, keeping repeats and blanks."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    return parse_qsl(raw, keep_blank_values=True)


def media_type(value: str | bytes | None) -> str:
    """``'Application/JSON; charset=utf-8'`` -> ``'application/json'``."""
    if not value:
        return ""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value.split(";", 1)[0].strip().lower()


def is_json_type(value: str | bytes | None) -> bool:
    mt = media_type(value)
    return mt in JSON_TYPES or mt.endswith("+json")


def header(headers: Headers, name: str, default: str | None = None) -> str | None:
    """First value of a header as text, or *default*."""
    values = headers.getRawHeaders(name)
    if not values:
        return default
    v = values[0]
    return v.decode("latin-1") if isinstance(v, bytes) else v


class MadeOnRead:
    """A :attr:`RequestEnvelope.normalized` made by ``make()`` when first read.

    A DIMSE client's C-FIND identifier as DICOM JSON is read by middleware and routing
    rules; with neither, ``dicom_scu`` relays the identifier's bytes and nothing reads
    it, and making it was ~10 us of each proxied C-FIND's way to the PACS (bench/dimse)."""

    __slots__ = ("make",)

    def __init__(self, make):
        self.make = make


@attr.s(auto_attribs=True, slots=True)
class RequestEnvelope:
    """One request, whatever protocol it arrived on."""

    method: str = "GET"
    #: Full request path as received (no query string).
    path: str = "/"
    #: The path below the endpoint's prefix, always starting with ``/``.
    subpath: str = "/"
    #: Decoded query pairs in order, repeated keys kept.
    query: list = attr.Factory(list)
    #: The query string exactly as received, for byte-exact forwarding.
    raw_query: bytes = b""
    headers: Headers = attr.Factory(Headers)
    body: Any = b""
    #: String map shared by endpoint, middleware and backend: ``protocol``,
    #: ``request_id``, ``endpoint``, ``pipeline``, ``auth.sub`` ...
    metadata: dict = attr.Factory(dict)
    #: Parsed JSON view of the body (or DICOM JSON for DIMSE), when there is one: the
    #: :attr:`normalized` property (``normalized=`` when made), which makes a
    #: :class:`MadeOnRead` the first time it is read.
    _normalized: Any = None
    #: Client address and the scheme/host it used, for X-Forwarded-* and URL building.
    client_ip: str = ""
    scheme: str = "http"
    host: str = ""
    #: The well-known facts Harmony's components hand each other (the
    #: association, a C-STORE's instance, the pipeline ...): ``harmony.state``.
    state: RequestState = attr.Factory(RequestState)
    #: Free-form, for user middleware only: Harmony's own code never touches it
    #: (``harmony.state`` says why; tests/test_state.py enforces it).
    context: dict = attr.Factory(dict)

    @property
    def request_id(self) -> str:
        return self.metadata.get("request_id", "")

    @property
    def normalized(self) -> Any:
        value = self._normalized
        if type(value) is MadeOnRead:
            value = self._normalized = value.make()
        return value

    @normalized.setter
    def normalized(self, value: Any) -> None:
        self._normalized = value

    def normalized_read(self) -> bool:
        """Whether :attr:`normalized` exists as a value (given, or made because something
        read it): while it does not, nothing can have changed it."""
        return type(self._normalized) is not MadeOnRead

    def query_values(self, key: str) -> list[str]:
        return [v for k, v in self.query if k == key]

    def query_value(self, key: str, default: str | None = None) -> str | None:
        values = self.query_values(key)
        return values[0] if values else default

    def header(self, name: str, default: str | None = None) -> str | None:
        return header(self.headers, name, default)


@attr.s(auto_attribs=True, slots=True)
class ResponseEnvelope:
    """One response, whatever protocol it will leave on."""

    status: int = 200
    headers: Headers = attr.Factory(Headers)
    body: Any = b""
    metadata: dict = attr.Factory(dict)
    normalized: Any = None
    #: HTTP reason phrase from an upstream, passed through when present.
    reason: bytes | None = None
    #: The well-known facts of the answer (result stream, DIMSE status, HL7 ACK): ``harmony.state``.
    state: ResponseState = attr.Factory(ResponseState)
    #: Free-form, for user middleware only (as on the request).
    context: dict = attr.Factory(dict)

    def header(self, name: str, default: str | None = None) -> str | None:
        return header(self.headers, name, default)

    @classmethod
    def json(cls, status: int, document: Any, content_type: str = "application/json",
             headers: Headers | None = None) -> "ResponseEnvelope":
        body = _COMPACT_JSON.encode(document).encode("utf-8")
        h = headers if headers is not None else Headers()
        h.setRawHeaders("Content-Type", [content_type])
        return cls(status=status, headers=h, body=body, normalized=document)


# --------------------------------------------------------------------------- bodies


def body_length(body: Any) -> int | None:
    """Length of a body when it is known without reading it."""
    if body is None:
        return 0
    if isinstance(body, (bytes, bytearray)):
        return len(body)
    # IBodyProducer.length: an int, or the UNKNOWN_LENGTH marker (a str).
    length = getattr(body, "length", UNKNOWN_LENGTH)
    return length if isinstance(length, int) else None


def as_producer(body: Any):
    """A body as an ``IBodyProducer`` (or ``None`` for no body), for twisted.web clients."""
    if body is None or (isinstance(body, (bytes, bytearray)) and not body):
        return None
    if isinstance(body, (bytes, bytearray)):
        return BytesProducer(bytes(body))
    return body


@implementer(IBodyProducer)
class BytesProducer:
    """An in-memory body as a producer (for APIs that only take producers)."""

    def __init__(self, data: bytes):
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


@implementer(IBodyProducer)
class CooperativeProducer:
    """A streaming body written by the generator ``_produce(consumer)``, run
    with ``task.cooperate``: it yields a Deferred to wait on (the next item of
    a stream) or ``None`` between chunks, and those are the points where a slow
    client pauses it and a gone one stops it.  A generator that raises fails
    the producer, so the HTTP layer cuts the connection rather than ending a
    truncated body as if it were complete.

    Subclasses write ``_produce`` and, to release what an unfinished body
    still holds (staged files, a PACS operation), ``_stopped``.
    """

    length = UNKNOWN_LENGTH
    _task = None

    def _produce(self, consumer):
        raise NotImplementedError

    def _stopped(self):
        """The consumer gave up on the body before its end."""

    @staticmethod
    def _result(d: defer.Deferred):
        """``value = yield from self._result(d)``: *d*'s result, handing *d* to
        the cooperator only when it has not fired yet (a failure fails the
        producer)."""
        box: list = []
        d.addCallback(box.append)
        if not box:
            yield d
        return box[0]

    @staticmethod
    def _file_chunks(consumer, path, chunk_size: int = 64 * 1024):
        """``yield from self._file_chunks(consumer, path)``: copy a file to
        *consumer* a chunk at a time, letting the reactor (and a pause) in
        between chunks."""
        with open(path, "rb") as f:
            while True:
                chunk = f.read(chunk_size)
                if not chunk:
                    return
                consumer.write(chunk)
                yield None

    _generator = None

    def startProducing(self, consumer):
        self._generator = self._produce(consumer)
        self._task = task.cooperate(self._generator)
        return self._task.whenDone().addCallback(lambda _: None)

    def pauseProducing(self):
        if self._task is not None:
            self._task.pause()

    def resumeProducing(self):
        if self._task is not None:
            self._task.resume()

    def stopProducing(self):
        if self._task is not None:
            try:
                self._task.stop()
            except task.TaskDone:
                pass
        # A stopped task never resumes its generator: closing it runs its ``finally``
        # clauses now (the file or instance being written is released), not whenever
        # the garbage collector gets to it.
        generator, self._generator = self._generator, None
        if generator is not None:
            try:
                generator.close()
            except ValueError:
                pass  # stopped from inside its own step (a write that lost the connection)
        self._stopped()


class ForwardingProducer:
    """Pause, resume and stop handed on to the producer that does the work
    (``_delegate()``; ``None`` until there is one): for bodies that wrap
    another producer or a connection's transport, so flow control reaches
    the source instead of stopping at the wrapper."""

    def _delegate(self):
        raise NotImplementedError

    def pauseProducing(self):
        inner = self._delegate()
        if inner is not None:
            inner.pauseProducing()

    def resumeProducing(self):
        inner = self._delegate()
        if inner is not None:
            inner.resumeProducing()

    def stopProducing(self):
        inner = self._delegate()
        if inner is not None:
            inner.stopProducing()


class _Collector(Protocol):
    def __init__(self, finished: defer.Deferred, limit: int | None):
        self.finished = finished
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.failed = False

    def write(self, data: bytes):  # IConsumer side, for producers
        self.dataReceived(data)

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        pass

    def dataReceived(self, data: bytes):
        if self.failed:
            return
        self.size += len(data)
        if self.limit is not None and self.size > self.limit:
            self.failed = True
            self.parts = []
            if self.transport is not None:
                self.transport.stopProducing()
            if not self.finished.called:
                self.finished.errback(PayloadTooLarge(f"body exceeds {self.limit} bytes"))
            return
        self.parts.append(data)


def read_body(body: Any, max_bytes: int | None = 64 * 1024 * 1024) -> defer.Deferred:
    """Read a whole body into ``bytes`` (fires with bytes).

    Fails with :class:`PayloadTooLarge` past *max_bytes* instead of buffering a
    body nobody should hold in memory.  A producer can only be read once; callers
    that read a body replace it with the bytes they got.
    """
    if body is None:
        return defer.succeed(b"")
    if isinstance(body, (bytes, bytearray)):
        if max_bytes is not None and len(body) > max_bytes:
            return defer.fail(PayloadTooLarge(f"body exceeds {max_bytes} bytes"))
        return defer.succeed(bytes(body))
    length = body_length(body)
    if max_bytes is not None and length is not None and length > max_bytes:
        return defer.fail(PayloadTooLarge(f"body exceeds {max_bytes} bytes"))
    finished: defer.Deferred = defer.Deferred()
    collector = _Collector(finished, max_bytes)
    collector.transport = None

    def done(_):
        if not finished.called:
            finished.callback(b"".join(collector.parts))

    def failed(f):
        if not finished.called:
            finished.errback(f)

    body.startProducing(collector).addCallbacks(done, failed)
    return finished
