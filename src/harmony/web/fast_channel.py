"""A lean HTTP/1.1 server channel for the passthrough's hot path: llhttp (httptools) in a Twisted protocol.

Why it exists: twisted.web's ``HTTPChannel``/``Request`` parse a request line by
line in Python, build a ``Request`` with its own ``Headers``, cookies, session
hooks, a ``getsockname`` and a date string each time, and write a response as a
37-piece ``writeSequence``; bench/http_passthrough measured that server side at
~40-60 CPU µs of a proxied request that nginx serves whole in ~20.  This channel
serves the requests that matter for speed - well-formed, complete heads without a
body, routed to an endpoint that opts in (``fast_path = True``: the ``http``
endpoint), and requests with a small ``Content-Length`` body for the methods an
endpoint names in ``fast_body_methods`` (STOW-RS's POST on ``dicomweb``) - in
far fewer steps: one ``find`` for the end of the head, llhttp to
parse and validate it, a :class:`FastRequest` that quacks like the parts of a
twisted.web ``Request`` the router, endpoint, CORS, coding and access log read,
the same :class:`~harmony.web.router.PrefixRouter`, endpoint ``render_http`` and
pipeline as every other request, and one ``transport.write`` for the head and a
whole body (written straight to the socket when its buffer is empty, sparing the
reactor's write-readiness round trip).

A body served here is read whole into memory before the request is dispatched,
exactly as twisted.web reads a body of up to ``INLINE_BODY_LIMIT`` bytes (the
endpoint then sees it in ``request.content``), so only such bodies are: one
``Content-Length``, no ``Transfer-Encoding``, no ``Expect``, within both that limit
and the endpoint's ``request_body_limit``.  bench/ingest measured twisted.web's
line-by-line receive, its ``Request`` and its ``finish`` at ~10 % of the Python
CPU of a STOW-RS request of ten instances.  A body still arriving after the
network's ``body_timeout_secs`` (or the idle timeout when that is off) is handed
off with every byte received so far, and twisted.web judges its data rate from there.

Everything else is *handed off*: the connection's remaining bytes go to the
``HarmonyChannel`` the Site built for it, which serves the rest of the
connection exactly as before.  That covers every other request with a body (streaming,
413 at the head, chunked, ``100 Continue``), a head that did not arrive in one piece (the
slow-head 408), over-long lines (414/431), heads llhttp refuses (twisted.web's
400), upgrades, ``CONNECT``, absolute-form targets, and routes whose endpoint
did not opt in (DICOMweb, FHIR, JMIX...).  A hand-off happens only between
requests, after every answer the fast side owes has been written, so pipelined
requests keep their order.

Kept on the fast side itself: keep-alive and ``Connection: close`` (HTTP/1.0
and 1.1 rules), pipelined requests answered in order (reading pauses while
more than :data:`PIPELINE_BUFFER` bytes wait), the idle timeout of the Site
(one timer per connection, re-armed lazily rather than per request, off while
a request is being answered), HEAD/204/304 answers without a body, response
bodies that are producers streamed with flow control (chunked on HTTP/1.1,
close-delimited on 1.0), a client that hangs up mid-answer reported through
``notifyFinish`` (the endpoint counts a 499 and cancels the backend).
"""

from __future__ import annotations

import time
from email.utils import formatdate
from io import BytesIO
from typing import Any

import httptools
from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import version as twisted_web_version

from harmony.compat.twisted import header_name_encoder, header_name_lookup, send_now
from harmony.envelope import body_length
from harmony.log import get_logger
from harmony.web import coding
from harmony.web.bridge import stop_producing
from harmony.web.headers import HOP_BY_HOP, connection_listed
from harmony.web.streaming import BODY_TIMEOUT, INLINE_BODY_LIMIT

log = get_logger("harmony.web")

#: Pipelined bytes held while an answer is being written; past this, reading pauses.
PIPELINE_BUFFER = 64 * 1024
#: The largest head served here (twisted.web's ``totalHeadersSize``); a longer one is
#: handed off, and twisted.web answers it 414 or 431 as it always did.
MAX_HEAD_BYTES = 16384
#: The most header lines served here; more are twisted.web's to judge (it allows 500).
MAX_HEADERS = 100
#: twisted.web's default idle timeout (HTTPFactory), used when the Site has none.
IDLE_TIMEOUT = 60.0
#: Seconds a timed-out connection has to close before it is aborted (twisted.web's abortTimeout).
ABORT_TIMEOUT = 15.0

_encode_name = header_name_encoder().encode
_known_name, _ = header_name_lookup()  # _known_name.get(name) or _encode_name(name): no Python call when cached
#: Response header names never copied from an envelope, as ``Headers`` spells them (canonical case).
_NOT_COPIED = frozenset(_encode_name(n) for n in HOP_BY_HOP | {b"content-length"})
_CONTENT_LENGTH = _encode_name(b"content-length")
_CONNECTION = _encode_name(b"connection")
_REQUEST_ID = _encode_name(b"x-request-id")
_DATE = _encode_name(b"date")
_SERVER = _encode_name(b"server")
#: twisted.web's ``Request`` names itself in every answer that has no ``Server`` of its
#: own (an upstream's passes through): answers from this channel say the same.
_SERVER_LINE = b"Server: " + twisted_web_version + b"\r\n"
_NO_BODY_STATUS = frozenset({204, 304})
#: Head fields that make a body twisted.web's to read (chunked, 100 Continue), as llhttp reports names.
_BODY_HANDED_OFF = frozenset({b"transfer-encoding", b"expect"})
_REASONS: dict[int, bytes] = {}


def _reason(status: int) -> bytes:
    phrase = _REASONS.get(status)
    if phrase is None:
        from twisted.web.http import RESPONSES
        phrase = _REASONS[status] = RESPONSES.get(status, b"Unknown Status")
    return phrase


class _DateCache:
    """The ``Date`` header's value, formatted at most once a second."""

    second = -1
    value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self.second:
            self.second = second
            self.value = formatdate(second, usegmt=True).encode("ascii")
        return self.value


_date = _DateCache()


class FastRequest:
    """One request served by :class:`FastChannel`: the parts of a twisted.web
    ``Request`` that Harmony's router, endpoints, CORS, coding and access log use."""

    content = None
    body_stream = None
    body_limit = None
    _harmony_request_id: str | None = None

    def __init__(self, channel: FastChannel, method: bytes, uri: bytes, version: bytes,
                 headers: Headers, persistent: bool, content=None):
        self.channel = channel
        self.content = content  # a body read whole (BytesIO), as twisted.web's request.content
        self.method = method
        self.uri = uri
        self.path = uri.partition(b"?")[0]
        self.clientproto = version
        self.requestHeaders = headers
        self.persistent = persistent
        self.code = 200
        self.sentLength = 0
        self.startedWriting = False
        self.finished = False
        self._disconnected = False
        self._waiters: list[defer.Deferred] | None = None
        self._gone: list | None = None
        self._chunked = False
        self._discard = False

    # ----------------------------------------------------------- what is read

    def getHeader(self, name: bytes):
        values = self.requestHeaders._rawHeaders.get(_known_name.get(name) or _encode_name(name))
        return values[-1] if values else None

    def getClientAddress(self):
        return self.channel.peer

    def getHost(self):
        return self.channel.host()

    def isSecure(self) -> bool:
        return self.channel.secure

    def notifyFinish(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if self.finished:
            d.callback(None)
        elif self._disconnected:
            d.errback(self._lost)
        else:
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(d)
        return d

    def notify_gone(self, callback, *args) -> None:
        """``notifyFinish().addErrback(callback, *args)`` without a Deferred: *callback*
        is called with the reason if the client hangs up before the answer is written,
        never otherwise (the endpoint's 499 and cancel, once a request)."""
        if self._disconnected:
            callback(self._lost, *args)
        elif not self.finished:
            if self._gone is None:
                self._gone = []
            self._gone.append((callback, args))

    # ---------------------------------------------------------- what is written

    def write_response(self, response) -> defer.Deferred:
        """The answer *response* (a ResponseEnvelope), as harmony.web.bridge.write_response
        writes one on twisted.web, framed here: fires when written (or the client left)."""
        streaming = self.send_response(response)
        return defer.succeed(None) if streaming is None else streaming

    def send_response(self, response) -> defer.Deferred | None:
        """:meth:`write_response` without a Deferred for an answer written at once (the
        endpoint's answer on the hot path: nobody waits on it); a streamed body's
        Deferred, firing when it is written, is returned."""
        if self._disconnected or self.finished:
            return None
        if not getattr(response.body, "passthrough", False):  # an upstream's coding is the upstream's
            response = coding.compress_for(self, response)  # gzip for clients that ask
        status = response.status
        headers = response.headers
        skip = _NOT_COPIED
        if _CONNECTION in headers._rawHeaders:
            skip = skip | {_encode_name(n) for n in connection_listed(headers)}
        body = response.body
        length = body_length(body)
        reason = response.reason
        if isinstance(reason, str):
            reason = reason.encode("latin-1", "replace")
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason or _reason(status))]
        append = parts.append
        raw = headers._rawHeaders
        for name, values in raw.items():
            if name not in skip:
                for value in values:
                    append(b"%s: %s\r\n" % (name, value))  # one formatting, where + made three bytes
        if _DATE not in raw:
            append(b"Date: " + _date.now() + b"\r\n")
        if _SERVER not in raw:
            append(_SERVER_LINE)
        rid = self._harmony_request_id
        if rid and _REQUEST_ID not in raw:
            append(b"X-Request-Id: " + rid.encode() + b"\r\n")
        bodyless = self.method == b"HEAD" or status in _NO_BODY_STATUS or 100 <= status < 200
        if self.method == b"HEAD" or status == 304:
            # No body follows: a Content-Length given describes the representation.
            given = raw.get(_CONTENT_LENGTH)
            if given:
                append(b"Content-Length: " + given[0] + b"\r\n")
            elif self.method == b"HEAD" and length:
                append(b"Content-Length: %d\r\n" % length)
        elif length is not None and not bodyless:
            append(b"Content-Length: %d\r\n" % length)
        elif not bodyless:
            if self.clientproto == b"HTTP/1.1":
                self._chunked = True
                append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.persistent = False  # HTTP/1.0: the close delimits the body
        if not self.persistent:
            append(b"Connection: close\r\n")
        elif self.clientproto != b"HTTP/1.1":
            append(b"Connection: keep-alive\r\n")
        append(b"\r\n")
        self.code = status
        self.startedWriting = True
        transport = self.channel.transport
        if body is None or isinstance(body, (bytes, bytearray)):
            if body and not bodyless:
                append(bytes(body))
                self.sentLength = len(body)
            send_now(transport, b"".join(parts))
            self._finish()
            return None
        send_now(transport, b"".join(parts))
        # A producer on a bodyless answer (HEAD) still runs, as on twisted.web, and what it
        # writes is dropped: it then ends (and frees what it holds) the way it always does.
        self._discard = bodyless
        return self._stream(body, rid)

    def _stream(self, body, rid) -> defer.Deferred:
        """A producer body, with the transport pausing it when the client reads slowly."""
        done: defer.Deferred[None] = defer.Deferred()
        transport = self.channel.transport
        transport.registerProducer(body, True)

        self.notifyFinish().addErrback(stop_producing, body)

        def finished(result):
            if not self._disconnected:
                transport.unregisterProducer()
            if self._disconnected:
                done.callback(None)
                return None
            if isinstance(result, Failure):
                # The head is gone already: cutting the connection is the only honest signal left.
                log.warn("response body stream failed (request {request_id}): {error}",
                         request_id=rid, error=result.getErrorMessage())
                self.persistent = False
                transport.abortConnection()
                done.callback(None)
                return None
            if self._chunked:
                transport.write(b"0\r\n\r\n")
            self._finish()
            done.callback(None)
            return None

        body.startProducing(self).addBoth(finished)
        return done

    def write(self, data: bytes) -> None:
        """Body bytes from a producer (IConsumer)."""
        if self._disconnected or self.finished or not data or self._discard:
            return
        self.sentLength += len(data)
        if self._chunked:
            self.channel.transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.channel.transport.write(data)

    def registerProducer(self, producer, streaming):
        self.channel.transport.registerProducer(producer, streaming)

    def unregisterProducer(self):
        self.channel.transport.unregisterProducer()

    def loseConnection(self):
        self.persistent = False
        self.channel.transport.loseConnection()

    def _finish(self):
        self.finished = True
        self._gone = None
        waiters, self._waiters = self._waiters, None
        self.channel.request_done(self)
        for d in waiters or ():
            d.callback(None)

    def connectionLost(self, reason: Failure):
        if self.finished or self._disconnected:
            return
        self._disconnected = True
        self._lost = reason
        gone, self._gone = self._gone, None
        for callback, args in gone or ():
            callback(reason, *args)
        waiters, self._waiters = self._waiters, None
        for d in waiters or ():
            d.errback(reason)


class _Head:
    """What llhttp reports while parsing one head (its callbacks land here)."""

    __slots__ = ("url", "pairs", "complete", "parser", "keep_alive", "method", "version")

    def __init__(self):
        self.parser = httptools.HttpRequestParser(self)  # one a connection: llhttp restarts after each message
        self.reset()

    def reset(self):
        self.url = b""
        self.pairs: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.keep_alive = False
        self.method = b""
        self.version = ""

    def on_headers_complete(self):
        # Read now: llhttp resets its flags (keep-alive among them) once the message is complete.
        parser = self.parser
        self.keep_alive = parser.should_keep_alive()
        self.method = parser.get_method()
        self.version = parser.get_http_version()

    def on_url(self, url: bytes):
        self.url += url

    def on_header(self, name: bytes, value: bytes):
        self.pairs.append((name, value))

    def on_message_complete(self):
        self.complete = True


class FastChannel(Protocol):
    """Serves complete, bodyless requests for fast-path routes; hands the
    connection to *fallback* (a ``HarmonyChannel``) for anything else."""

    #: A TCP or TLS transport (``Protocol`` types it as the bare ``ITransport``, whose
    #: zope method signatures mypy cannot call).
    transport: Any

    def __init__(self, site, fallback):
        self.site = site
        self.fallback = fallback
        self.router = site.resource
        self.callLater = fallback.callLater
        self.timeout = getattr(site, "timeOut", IDLE_TIMEOUT)
        self.peer = None
        self.secure = False
        self._buffer = b""
        self._current: FastRequest | None = None
        self._delegate = None
        self._reading_paused = False
        self._idle_timer = None
        self._idle_since = 0.0
        self._serving = False
        self._head: _Head | None = None
        #: A head parsed, its body still arriving: (head end, body length, route, path).
        self._pending: tuple | None = None
        self._more: list[bytes] = []  # what arrived after the head of a pending body
        self._more_size = 0
        self._body_timer = None
        self._host = None

    # ------------------------------------------------------------ connection

    def connectionMade(self):
        self.peer = self.transport.getPeer()
        self.secure = ISSLTransport.providedBy(self.transport)
        if self.timeout:
            self._idle_since = self._seconds()
            self._idle_timer = self.callLater(self.timeout, self._idle_check)

    def _seconds(self) -> float:
        return self.site.reactor.seconds()

    def host(self):
        """The connection's local address, asked of the socket once (as HarmonyChannel.getHost)."""
        if self._host is None:
            self._host = self.transport.getHost()
        return self._host

    def _idle_check(self):
        """One timer per connection: re-armed for what is left of the idle time
        rather than cancelled and set again by every request."""
        self._idle_timer = None
        if self._delegate is not None:
            return
        if self._current is not None or self._pending is not None:
            left = self.timeout  # answering, or a body arriving: its own clock (as in twisted.web)
        else:
            left = self._idle_since + self.timeout - self._seconds()
        if left > 0:
            self._idle_timer = self.callLater(left, self._idle_check)
            return
        log.info("Timing out client: {peer}", peer=str(self.peer))
        self.transport.loseConnection()
        self._idle_timer = self.callLater(ABORT_TIMEOUT, self.transport.abortConnection)

    def _stop_idle_timer(self):
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None

    def connectionLost(self, reason=None):
        if self._delegate is not None:
            self._delegate.connectionLost(reason)
            return
        self._stop_idle_timer()
        self._stop_body_timer()
        self._pending = None  # a body that never arrived whole: never dispatched (as on twisted.web)
        current, self._current = self._current, None
        if current is not None:
            current.connectionLost(reason)

    # --------------------------------------------------------------- reading

    def dataReceived(self, data: bytes):
        if self._delegate is not None:
            self._delegate.dataReceived(data)
            return
        if self._pending is not None:
            # A body arriving: its pieces are kept apart and joined once (a client dripping
            # it a byte at a time would otherwise cost a copy of the buffer per byte).
            self._more.append(data)
            self._more_size += len(data)
            self._serve()
            return
        self._buffer = self._buffer + data if self._buffer else data
        if self._current is not None:
            if len(self._buffer) > PIPELINE_BUFFER and not self._reading_paused:
                self._reading_paused = True
                self.transport.pauseProducing()
            return
        self._serve()

    def _serve(self):
        """Answer the complete requests in the buffer, one at a time, in order."""
        if self._serving:
            return  # an answer finished synchronously inside the loop below: it goes on
        self._serving = True
        try:
            while self._buffer and self._current is None and self._delegate is None \
                    and not self.transport.disconnecting and self._serve_one():
                pass
        finally:
            self._serving = False

    def _serve_one(self) -> bool:
        """Serve (or hand off) the request at the buffer's start; False while its body is still arriving."""
        if self._pending is not None:
            return self._body_arrived()
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES)
        if end < 0 or not buffer.startswith((b"GET ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"POST ", b"PUT ",
                                                b"PATCH ")):
            self._hand_off()  # a head in pieces, or not one we serve: twisted.web's rules
            return True
        head = self._head
        if head is None:
            head = self._head = _Head()
        else:
            head.reset()
        try:
            head.parser.feed_data(buffer[:end + 4])
        except httptools.HttpParserError:
            self._hand_off()  # refused in twisted.web's words (400)
            return True
        url = head.url
        if not url.startswith(b"/") or len(head.pairs) > MAX_HEADERS:
            self._hand_off()  # an absolute-form/asterisk target, a crowd of headers
            return True
        path = url.partition(b"?")[0].decode("utf-8", "surrogateescape")
        route = self.router.match(path)
        if route is None:
            self._hand_off()
            return True
        endpoint = route.endpoint
        if head.complete:  # no body (or an empty one)
            if not (getattr(endpoint, "fast_path", False) or head.method in getattr(endpoint, "fast_body_methods", ())):
                self._hand_off()
                return True
            self._buffer = buffer[end + 4:]
            self._dispatch(head, route, path, BytesIO() if head.method in getattr(
                endpoint, "fast_body_methods", ()) else None)  # an empty body, as twisted.web gives it
            return True
        length = self._body_length(head, endpoint, route, path)
        if length is None:
            self._hand_off()  # streamed, refused at the head (413), chunked, 100 Continue: twisted.web's
            return True
        self._pending = (end + 4, length, route, path)
        if len(buffer) >= end + 4 + length:
            return self._body_arrived()
        window = getattr(self.site, "body_timeout", BODY_TIMEOUT) or self.timeout
        if not window:
            self._pending = None
            self._hand_off()  # no clock to bound a slow body by: twisted.web's rules
            return True
        self._body_timer = self.callLater(window, self._body_late)
        return False

    @staticmethod
    def _body_length(head: _Head, endpoint, route, path: str) -> int | None:
        """The length of a body this channel reads whole, or None when it is twisted.web's."""
        if head.method not in getattr(endpoint, "fast_body_methods", ()):
            return None
        length = None
        for name, value in head.pairs:
            lowered = name.lower()
            if lowered == b"content-length":
                if length is not None or not value.isdigit():
                    return None  # llhttp took it; a repeated one is still twisted.web's to judge
                length = int(value)
            elif lowered in _BODY_HANDED_OFF:
                return None
        if length is None or length > INLINE_BODY_LIMIT:
            return None
        subpath = path if route.prefix == "/" else path[len(route.prefix):]
        limit = endpoint.request_body_limit(head.method.decode("latin-1"), subpath or "/")
        if limit is not None and length > limit[0]:
            return None  # twisted.web answers 413 at the head, in the endpoint's dialect
        return length

    def _body_arrived(self) -> bool:
        start, length, route, path = self._pending  # type: ignore[misc]  # called only while pending
        if len(self._buffer) + self._more_size < start + length:
            return False
        self._join_more()
        buffer = self._buffer
        self._pending = None
        self._stop_body_timer()
        body = buffer[start:start + length]
        self._buffer = buffer[start + length:]
        head = self._head
        try:
            head.parser.feed_data(body)  # type: ignore[union-attr]  # llhttp ends the message (and resets)
        except httptools.HttpParserError:
            self.transport.loseConnection()  # cannot happen for a counted body; never serve what llhttp refused
            return False
        self._dispatch(head, route, path, BytesIO(body))
        return True

    def _join_more(self):
        if self._more:
            self._buffer = b"".join([self._buffer, *self._more])
            self._more, self._more_size = [], 0

    def _body_late(self):
        """The body did not arrive within the body timeout: twisted.web's from here (408 rules)."""
        self._body_timer = None
        if self._pending is not None and self._delegate is None:
            self._pending = None
            self._hand_off()

    def _stop_body_timer(self):
        if self._body_timer is not None and self._body_timer.active():
            self._body_timer.cancel()
        self._body_timer = None

    def _dispatch(self, head: _Head, route, path: str, content) -> None:
        headers = Headers()
        raw = headers._rawHeaders
        for name, value in head.pairs:
            name = _known_name.get(name) or _encode_name(name)
            values = raw.get(name)
            if values is None:
                raw[name] = [value]
            else:
                values.append(value)
        version = b"HTTP/" + head.version.encode("ascii")
        request = FastRequest(self, head.method, head.url, version, headers, head.keep_alive, content)
        self._current = request
        self.router.render_route(request, path, route)

    def request_done(self, request: FastRequest):
        """*request*'s answer is written: close, or go on with what is buffered."""
        if request is not self._current:
            return
        self._current = None
        if not request.persistent:
            self.transport.loseConnection()
            return
        if self.timeout:
            self._idle_since = self._seconds()
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        if self._buffer:
            self._serve()

    # -------------------------------------------------------------- hand-off

    def _hand_off(self):
        """From here on the connection is twisted.web's (harmony.web.streaming)."""
        self._stop_idle_timer()
        self._stop_body_timer()
        self._pending = None
        self._join_more()
        channel, self.fallback = self.fallback, None
        self._delegate = channel
        data, self._buffer = self._buffer, b""
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        channel.makeConnection(self.transport)
        channel.dataReceived(data)
