"""HTTP content codings (RFC 9110 section 8.4): reading gzip/deflate bodies, writing gzip ones.

Why one module: every component that reads or rewrites a body (the dicomweb
and fhir backends, the JSON middleware, STOW-RS parsing) must undo a
``Content-Encoding`` before it looks at the bytes, and must do it the same
bounded way - a few KB of gzip can inflate to gigabytes, so size caps count
*decoded* bytes and decoding happens a piece at a time.  Python requests,
dicomweb-client and every browser send ``Accept-Encoding: gzip``, and real
upstreams (Orthanc, nginx) then compress, whatever a proxy asks for.

The other direction is the same knowledge: bodies Harmony produces or
rewrites (QIDO results, metadata, FHIR Bundles after the URL rewrite, problem
bodies) are gzipped for clients that accept it, as a stream flushed as data
arrives.  A body that passes through untouched keeps the upstream's coding:
that choice was the upstream's to make.

Public API:

- :func:`content_coding` - the coding a message's headers declare ("" for none).
- :class:`Decoder`, :func:`decode_bytes`, :class:`DecodedBody`,
  :func:`decoded_body`, :func:`decode_request`, :func:`decoded_head` - undo
  gzip/deflate, capped on decoded bytes.
- :func:`wants_gzip` - does an ``Accept-Encoding`` value let us send gzip.
- :func:`compress_for` - the one call the response writer makes
  (:func:`compress_response` underneath, for envelopes).
- :func:`etag_matches` - ``If-None-Match`` by weak comparison (our gzipped
  answers carry weak ETags).
"""

from __future__ import annotations

import zlib
from typing import Protocol

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from harmony.envelope import ForwardingProducer, body_length, media_type
from harmony.errors import BadRequest, HarmonyError, PayloadTooLarge, UnsupportedMediaType

GZIP = "gzip"
DEFLATE = "deflate"
_ALIASES = {"gzip": GZIP, "x-gzip": GZIP, "deflate": DEFLATE, "identity": "", "": ""}

#: Decoded output is handed on in pieces of at most this size, so a bomb never
#: materialises more than one piece beyond what the consumer already took.
PIECE = 64 * 1024

#: gzip level for large and streamed responses: on series metadata level 1
#: keeps 70% of level 6's ratio (16.7x vs 23.6x) at 5x its speed, and pays
#: for itself on links up to ~340 MB/s against ~90 MB/s for level 6
#: (bench/compression).
LEVEL = 1
#: Bodies up to this size get :data:`SMALL_LEVEL`: their CPU cost is
#: microseconds whatever the level, so the better ratio is free.
SMALL_BYTES = 64 * 1024
SMALL_LEVEL = 6
#: Smaller bodies are not worth a gzip header, trailer and the CPU.
MIN_BYTES = 1024

_TEXTUAL = ("application/json", "application/xml", "application/javascript", "application/ndjson",
            "application/x-ndjson", "application/fhir+ndjson", "application/x-www-form-urlencoded",
            "image/svg+xml")
_PART_TYPES_TEXTUAL = ("application/dicom+json", "application/json", "application/dicom+xml", "application/xml")


class UnsupportedCoding(ValueError):
    """A Content-Encoding this module cannot undo (``br``, ``zstd``, stacked codings)."""

    def __init__(self, coding: str):
        super().__init__(f"Content-Encoding {coding!r} is not supported (gzip, deflate or identity)")
        self.coding = coding


class CodingError(ValueError):
    """The bytes are not valid for their declared coding (or end too early)."""


def content_coding(headers) -> str:
    """The coding a ``Content-Encoding`` header in *headers* declares: "gzip",
    "deflate", or "" (none or identity).  Raises :class:`UnsupportedCoding` for
    anything else, stacked codings included."""
    values = headers.getRawHeaders(b"content-encoding") or []
    codings = [c.strip().lower() for v in values
               for c in (v.decode("latin-1") if isinstance(v, bytes) else v).split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return ""
    if len(codings) > 1:
        raise UnsupportedCoding(", ".join(codings))
    coding = _ALIASES.get(codings[0])
    if coding is None:
        raise UnsupportedCoding(codings[0])
    return coding


class _Consumer(Protocol):
    """The part of IConsumer a body writes to (zope's declaration is invisible to mypy)."""

    def write(self, data: bytes) -> object: ...


class Decoder:
    """Incremental gzip/deflate decoder that refuses to produce more than *max_bytes*.

    ``decode(data)`` returns the decoded pieces for *data* (each at most
    :data:`PIECE` bytes), ``finish()`` checks the stream really ended.
    Raises :class:`PayloadTooLarge` past the cap and :class:`CodingError` for
    corrupt or truncated input.  gzip bodies of several members (legal, made
    by concatenating gzip files) decode whole; ``deflate`` is accepted both
    zlib-wrapped (RFC 9110) and raw (what some servers send).
    """

    def __init__(self, coding: str, max_bytes: int | None = None):
        if coding not in (GZIP, DEFLATE):
            raise UnsupportedCoding(coding)
        self.coding = coding
        self.max_bytes = max_bytes
        self.decoded = 0
        self._inflater: zlib._Decompress | None = None  # typeshed's name for decompressobj()'s type
        self._sniff = b""  # deflate: the first bytes, until zlib-wrapped or raw is known
        self._raw = False

    def _new_inflater(self, first: bytes):
        if self.coding == GZIP:
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        # RFC 1950 header: CMF byte says deflate (8) and (CMF*256+FLG) % 31 == 0.
        wrapped = len(first) >= 2 and first[0] & 0x0F == 8 and (first[0] << 8 | first[1]) % 31 == 0
        self._raw = not wrapped
        return zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)

    def decode(self, data: bytes) -> list[bytes]:
        if self._inflater is None:
            if self.coding == DEFLATE and len(self._sniff) + len(data) < 2:
                self._sniff += data
                return []
            data, self._sniff = self._sniff + data, b""
            self._inflater = self._new_inflater(data)
        out: list[bytes] = []
        try:
            while True:
                if self._inflater.eof:
                    if not data:
                        break
                    # A gzip body may hold several members; anything else after
                    # the end of the stream is not part of the body.
                    if self.coding != GZIP:
                        raise CodingError(f"body is not valid {self.coding}: data after the end of the stream")
                    self._inflater = self._new_inflater(data)
                piece = self._inflater.decompress(data, PIECE)
                self._count(piece, out)
                if self._inflater.eof:
                    data = self._inflater.unused_data
                    continue
                data = self._inflater.unconsumed_tail
                if not data and len(piece) < PIECE:
                    break  # all input taken and no output held back
        except zlib.error as e:
            raise CodingError(f"body is not valid {self.coding}: {e}") from None
        return out

    def _count(self, piece: bytes, out: list):
        if not piece:
            return
        self.decoded += len(piece)
        if self.max_bytes is not None and self.decoded > self.max_bytes:
            raise PayloadTooLarge(f"decoded body exceeds {self.max_bytes} bytes")
        out.append(piece)

    def finish(self) -> list[bytes]:
        """Check the stream ended (raw deflate is often sent without its final
        block marker, so it is taken as it comes)."""
        if self._inflater is None:
            if self._sniff:
                raise CodingError(f"body is not valid {self.coding}: truncated")
            return []  # an empty body is an empty body in any coding
        if not self._inflater.eof and not self._raw:
            raise CodingError(f"body is not valid {self.coding}: it ends before the compressed stream does")
        return []


def decode_bytes(data: bytes, coding: str, max_bytes: int | None = None) -> bytes:
    """A whole in-memory body decoded (bounded as :class:`Decoder`)."""
    if not coding:
        if max_bytes is not None and len(data) > max_bytes:
            raise PayloadTooLarge(f"body exceeds {max_bytes} bytes")
        return data
    decoder = Decoder(coding, max_bytes)
    return b"".join(decoder.decode(data) + decoder.finish())


def decoded_head(data: bytes, coding: str, size: int) -> bytes:
    """At most the first *size* decoded bytes of *data* (the start of an
    encoded body): enough to sniff a body's start without inflating it."""
    if not coding:
        return data[:size]
    try:
        return Decoder(coding)._new_inflater(data).decompress(data, size)
    except zlib.error as e:
        raise CodingError(f"body is not valid {coding}: {e}") from None


class _DecodingSink:
    """The consumer a wrapped producer writes its encoded bytes to."""

    def __init__(self, owner: "DecodedBody", consumer):
        self.owner = owner
        self.consumer = consumer

    def write(self, data):
        if self.owner.outcome.called:
            return
        try:
            pieces = self.owner.decoder.decode(data)
        except ValueError as e:
            self.owner.fail(e)
            return
        except HarmonyError as e:
            self.owner.fail(e)
            return
        for piece in pieces:
            self.consumer.write(piece)

    def registerProducer(self, producer, streaming):
        pass

    def unregisterProducer(self):
        pass


@implementer(IBodyProducer)
class DecodedBody(ForwardingProducer):
    """A body producer that yields *body* (a producer) decoded, a piece at a time.

    A decoded size over *max_bytes* fails it with :class:`PayloadTooLarge`;
    corrupt input fails it with *invalid* (a HarmonyError class: 400 for a
    client's body, 502 for an upstream's).  The wrapped producer is stopped
    then, and this producer's own Deferred answers (a stopped producer's may
    never fire).
    """

    length = UNKNOWN_LENGTH

    def __init__(self, body, coding: str, max_bytes: int | None = None, invalid=BadRequest,
                 what: str = "body"):
        self.body = body
        self.decoder = Decoder(coding, max_bytes)
        self.invalid = invalid
        self.what = what
        self.outcome: defer.Deferred = defer.Deferred()

    def _delegate(self):
        return self.body

    def fail(self, error: Exception):
        if self.outcome.called:
            return
        if isinstance(error, ValueError):
            error = self.invalid(f"{self.what}: {error}")
        try:
            self.body.stopProducing()
        except Exception:  # noqa: BLE001 - a producer that already finished may complain
            pass
        self.outcome.errback(Failure(error))

    def startProducing(self, consumer):
        sink = _DecodingSink(self, consumer)

        def finished(result):
            if self.outcome.called:
                return None
            if isinstance(result, Failure):
                self.outcome.errback(result)
                return None
            try:
                tail = self.decoder.finish()
            except (ValueError, HarmonyError) as e:
                self.fail(e)
                return None
            for piece in tail:
                consumer.write(piece)
            self.outcome.callback(None)
            return None

        self.body.startProducing(sink).addBoth(finished)
        return self.outcome


def decoded_body(body, coding: str, max_bytes: int | None = None, invalid=BadRequest, what: str = "body"):
    """*body* (bytes or a producer) with *coding* undone: bytes stay bytes
    (decoded now, raising *invalid*/PayloadTooLarge), a producer becomes a
    :class:`DecodedBody`."""
    if not coding or body is None:
        return body
    if isinstance(body, (bytes, bytearray)):
        try:
            return decode_bytes(bytes(body), coding, max_bytes)
        except ValueError as e:
            raise invalid(f"{what}: {e}") from None
    return DecodedBody(body, coding, max_bytes, invalid, what)


def decode_request(request, max_bytes: int | None = None):
    """Undo a request envelope's Content-Encoding in place (its body streams
    on decoded; Content-Encoding and Content-Length go).  An unknown coding is
    415, corrupt data 400, a decoded size over *max_bytes* 413."""
    try:
        coding = content_coding(request.headers)
    except UnsupportedCoding as e:
        raise UnsupportedMediaType(str(e)) from None
    if coding:
        request.body = decoded_body(request.body, coding, max_bytes, BadRequest, "request body")
        request.headers.removeHeader(b"content-encoding")
        request.headers.removeHeader(b"content-length")
    return request


# --------------------------------------------------------------------------- sending


def _qvalues(accept_encoding: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in accept_encoding.split(","):
        name, _, params = item.partition(";")
        name = name.strip().lower()
        if not name:
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = min(max(float(value.strip()), 0.0), 1.0)
                except ValueError:
                    q = 0.0  # an unreadable weight is no consent
        key = "identity" if name == "identity" else _ALIASES.get(name, name)
        out[key] = max(q, out.get(key, 0.0))
    return out


def wants_gzip(accept_encoding: str | bytes | list | None) -> tuple[bool, bool]:
    """(gzip acceptable and preferred, identity refused) for an Accept-Encoding value.

    No header: nothing is asked for, so nothing is compressed (RFC 9110 lets
    us, but a client that says nothing is often a script that cannot cope).
    ``*`` stands for codings not named; ``identity`` is acceptable unless
    given q=0 (directly or by ``*;q=0``).  gzip wins a tie with identity.
    """
    if accept_encoding is None:
        return False, False
    if isinstance(accept_encoding, (list, tuple)):  # a header given more than once
        accept_encoding = b", ".join(v if isinstance(v, bytes) else v.encode("latin-1") for v in accept_encoding)
    if isinstance(accept_encoding, bytes):
        accept_encoding = accept_encoding.decode("latin-1")
    q = _qvalues(accept_encoding)
    star = q.get("*")
    gzip_q = q.get(GZIP, star if star is not None else 0.0)
    identity_q = q.get("identity", star if star is not None and star == 0.0 else 1.0)
    return gzip_q > 0 and gzip_q >= identity_q, identity_q == 0


def compressible(content_type: str | bytes | None) -> bool:
    """Worth gzipping by type: text, JSON, XML; multipart only when its parts are
    DICOM JSON/XML.  Never DICOM files, images, video, zip or gzip."""
    mtype = media_type(content_type)
    if not mtype:
        return False
    if mtype.startswith("text/") or mtype in _TEXTUAL or mtype.endswith("+json") or mtype.endswith("+xml"):
        return True
    if mtype == "multipart/related":
        value = content_type.decode("latin-1") if isinstance(content_type, bytes) else content_type
        for param in value.split(";")[1:]:
            key, _, v = param.partition("=")
            if key.strip().lower() == "type":
                return v.strip().strip('"').lower() in _PART_TYPES_TEXTUAL
    return False


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """``If-None-Match`` against our *etag*, by weak comparison (RFC 9110
    13.1.2): a client holding our gzipped answer sends the ``W/`` form back."""
    if not if_none_match:
        return False
    ours = etag[2:] if etag.startswith("W/") else etag
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or (tag[2:] if tag.startswith("W/") else tag) == ours:
            return True
    return False


def _weak(etag: bytes) -> bytes:
    return etag if etag.startswith(b"W/") else b"W/" + etag


def _add_vary(headers) -> None:
    values = headers.getRawHeaders(b"vary") or []
    names = {v.strip().lower() for value in values for v in value.split(b",")}
    if b"*" in names or b"accept-encoding" in names:
        return
    headers.setRawHeaders(b"vary", [b", ".join([v for v in values if v.strip()] + [b"Accept-Encoding"])])


def _loopback(address) -> bool:
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return False
    if host.startswith("::ffff:"):
        host = host[7:]
    return host == "::1" or host.startswith("127.")


def compress_for(request, response):
    """:func:`compress_response` for a twisted.web *request*: the one call the
    response writer makes.

    Adaptive to the link: a client on loopback with no ``Forwarded`` /
    ``X-Forwarded-For`` header is answered plain, because there compression
    only costs (bench/compression: +1.4 ms on a 0.4 MB cached metadata answer
    that takes 2.7 ms, for a transfer that costs ~0.1 ms).  A local reverse
    proxy relaying a remote client says so in those headers, and that client
    gets gzip.  ``identity;q=0`` is honoured whatever the link.
    """
    headers = request.requestHeaders
    accept = headers.getRawHeaders(b"accept-encoding")
    local = _loopback(request.getClientAddress()) and not (
        headers.hasHeader(b"x-forwarded-for") or headers.hasHeader(b"forwarded"))
    return compress_response(accept, request.method, response, local=local)


def compress_response(accept_encoding, method: bytes | str, response, *, level: int = None,
                      min_bytes: int = None, clock=None, local: bool = False):
    """Gzip *response* (a ResponseEnvelope) in place for a client whose
    request said *accept_encoding*, when it is worth it; returns it.

    Compressed: bodies Harmony made or rewrote, of a compressible type, with
    no coding yet, at least *min_bytes* long (or of unknown length), on an
    answer that has a body (not HEAD, 1xx, 204, 304) and is not a range.
    A body that is an upstream's representation passed through untouched
    (its producer says ``passthrough``) keeps the upstream's choice.
    ``identity;q=0`` makes any non-empty compressible body worth it; *local*
    (a client on the same host, :func:`compress_for`) makes none worth it
    otherwise.  Streams stay streams: a producer is wrapped, not read.
    *level* defaults to :data:`SMALL_LEVEL` for bodies known to be small,
    :data:`LEVEL` otherwise.
    """
    min_bytes = MIN_BYTES if min_bytes is None else min_bytes
    body = response.body
    status = response.status
    if isinstance(method, bytes):
        method = method.decode("latin-1")
    if getattr(body, "passthrough", False):
        return response
    headers = response.headers
    if status == 304 and headers.hasHeader(b"etag"):
        # Not modified: the ETag must be the one the 200 would have carried
        # (assuming that body was worth compressing; its size is unknown here).
        gzip_ok, identity_refused = wants_gzip(accept_encoding)
        if gzip_ok and (identity_refused or not local):
            headers.setRawHeaders(b"etag", [_weak(headers.getRawHeaders(b"etag")[0])])
            _add_vary(headers)
        return response
    if method == "HEAD" or status < 200 or status in (204, 206, 304) or body is None or body == b"":
        return response
    if headers.hasHeader(b"content-encoding") or headers.hasHeader(b"content-range"):
        return response
    if not compressible(response.header("content-type")):
        return response
    size = body_length(body)
    gzip_ok, identity_refused = wants_gzip(accept_encoding)
    small = size is not None and size < min_bytes
    if not small:
        _add_vary(headers)  # the answer depends on Accept-Encoding from here on
    if not gzip_ok or ((small or local) and not identity_refused):
        return response
    if level is None:
        level = SMALL_LEVEL if size is not None and size <= SMALL_BYTES else LEVEL
    headers.setRawHeaders(b"content-encoding", [b"gzip"])
    headers.removeHeader(b"content-length")
    headers.removeHeader(b"accept-ranges")
    etag = headers.getRawHeaders(b"etag")
    if etag:
        headers.setRawHeaders(b"etag", [_weak(etag[0])])
    if isinstance(body, (bytes, bytearray)):
        compressor = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        response.body = compressor.compress(bytes(body)) + compressor.flush()
    else:
        response.body = GzipBody(body, level, clock)
    return response


class _CompressingSink:
    def __init__(self, owner: "GzipBody", consumer):
        self.owner = owner
        self.consumer = consumer

    def write(self, data):
        self.owner.feed(self.consumer, data)

    def registerProducer(self, producer, streaming):
        pass

    def unregisterProducer(self):
        pass


@implementer(IBodyProducer)
class GzipBody(ForwardingProducer):
    """*body* (a producer) gzipped as it is produced.

    Input is compressed as it arrives and flushed (``Z_SYNC_FLUSH``) once per
    reactor turn in which data came: a DICOM JSON array written match by
    match is flushed in batches, not per match (each flush ends a deflate
    block, ~5% on 1 KB writes), yet nothing waits in the compressor while the
    PACS is slow to send the next match.  Flow control reaches *body*.
    """

    length = UNKNOWN_LENGTH

    def __init__(self, body, level: int = LEVEL, clock=None):
        self.body = body
        self.level = level
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        self._flush_call = None
        self._consumer: _Consumer | None = None
        self._done = False
        self.raw_bytes = 0
        self.sent_bytes = 0

    def _delegate(self):
        return self.body

    def _write(self, data: bytes):
        if data:
            self.sent_bytes += len(data)
            self._consumer.write(data)

    def feed(self, consumer, data: bytes):
        if self._done or not data:
            return
        self._consumer = consumer
        self.raw_bytes += len(data)
        self._write(self._compressor.compress(data))
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self):
        self._flush_call = None
        if not self._done:
            self._write(self._compressor.flush(zlib.Z_SYNC_FLUSH))

    def _cancel_flush(self):
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None

    def startProducing(self, consumer):
        self._consumer = consumer

        def finished(result):
            self._cancel_flush()
            if not isinstance(result, Failure) and not self._done:
                self._done = True
                self._write(self._compressor.flush(zlib.Z_FINISH))
            self._done = True
            return result

        return self.body.startProducing(_CompressingSink(self, consumer)).addBoth(finished)

    def stopProducing(self):
        self._cancel_flush()
        self._done = True
        super().stopProducing()
