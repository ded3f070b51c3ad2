"""An HTTP/1.1 client for upstreams: a Twisted protocol parsing answers with httptools (llhttp, in C).

Why it exists: the HTTP passthrough is Harmony's hot path, and twisted.web's ``Agent``
was the largest single cost in it.  bench/http_passthrough ``--lean`` measured a
bare twisted.web server + ``Agent`` at ~200 CPU µs per proxied request and the same
server with a client on httptools at ~80 µs; Harmony with ``Agent`` took ~360 µs.
``Agent`` builds a ``URI`` per request (urllib), parses the answer line by line in
Python (``LineReceiver``), fans out through several Deferreds, copies headers through
``Headers``' per-name encoding, and asks its pool for a key-matched connection.

:class:`UpstreamClient` keeps ``Agent``'s contract so every caller stays as it is:
``request(method, url, headers, bodyProducer)`` returns a Deferred firing with an
``IResponse`` (``code``, ``phrase``, ``headers``, ``length``, ``deliverBody``), and
fails with the same types (``ResponseNeverReceived``, ``ResponseFailed``,
``RequestGenerationFailed`` from twisted.web.client; connect errors as they come).
What it does per request is small: one head written with ``b"".join``, llhttp
parsing the answer, one ``Headers`` built straight from the parsed pairs, a pool
of idle connections per target (``scheme://host:port``) taken last-in-first-out.

Kept from ``Agent`` (each has a test in tests/web/test_upstream_client.py):
request bodies stream as producers with flow control (registered on the
connection's transport), Content-Length or chunked; response bodies stream to
``deliverBody`` protocols with ``pauseProducing``/``resumeProducing`` reaching
the upstream socket and ``stopProducing`` dropping the connection; answers
delimited by Content-Length, chunked coding or the close of the connection;
1xx interim answers skipped; HEAD, 204 and 304 answers without a body; a
cancelled request drops its connection; a pooled keep-alive connection the
upstream had already closed is retried once on a fresh one when the request is
idempotent and its body can be sent again.  The ``Connection`` header of an
answer stays among its headers (``Agent`` files it away), so
:func:`harmony.web.headers.end_to_end` can drop the names it lists.

Refused (the connection is dropped, never reused): unparsable answers, a head
over :data:`MAX_HEAD_BYTES` or :data:`MAX_HEADERS`, ``101 Switching Protocols``
(Harmony never asks for an upgrade), bytes the upstream sends that no request
asked for (pipelined leftovers, data on an idle connection).
"""

from __future__ import annotations

import time
from typing import Any

import httptools
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    RequestGenerationFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from harmony.compat.twisted import header_name_encoder, header_name_lookup, send_now
from harmony.envelope import BytesProducer
from harmony.web.headers import HOP_BY_HOP

#: The most bytes a response head (status line and header lines) may take.
#: Twisted's client allows 16 KiB a line; nginx's proxy_buffer_size is 4-8 KiB.
MAX_HEAD_BYTES = 64 * 1024
#: The most header lines a response head may have.
MAX_HEADERS = 256
#: Idle pooled connections older than this are closed rather than reused
#: (Twisted's pool default; upstreams usually time out idle keep-alive sooner).
IDLE_SECS = 240.0
#: Methods whose request may be sent again after a stale keep-alive connection
#: (RFC 9110 section 9.2.2: idempotent).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
#: Methods that announce an empty body with ``Content-Length: 0`` when they have none.
BODY_EXPECTED = frozenset({b"POST", b"PUT", b"PATCH"})
#: Request headers this client writes itself (from the URL and the body producer).
_OWN = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})
#: Response headers about this connection's framing: not the message's (``Agent``
#: drops them too).  ``Connection`` stays: see the module docstring.
_FRAMING = frozenset({b"transfer-encoding", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"})

#: A response header name as ``Headers`` stores it (Header-Case, ``ETag``...), cached by Twisted.
_header_name = header_name_encoder().encode
_known_name, _ = header_name_lookup()  # _known_name.get(name) or _header_name(name): no Python call when cached
#: The same names as ``Headers`` spells them (its keys): compared without lower-casing.
_FRAMING_NAMES = frozenset(_header_name(n) for n in _FRAMING)
_OWN_NAMES = frozenset(_header_name(n) for n in _OWN)
_TRANSFER_ENCODING = _header_name(b"transfer-encoding")
_CONTENT_LENGTH = _header_name(b"content-length")
_CONNECTION = _header_name(b"connection")
_HOP_BY_HOP_NAMES = frozenset(_header_name(n) for n in HOP_BY_HOP)


class UpstreamProtocolError(Exception):
    """The upstream broke HTTP/1.1 (unparsable, oversized or unsolicited bytes)."""


class _Unsolicited(Exception):
    """Raised inside the parser when a second answer starts: nobody asked for it."""


@implementer(IResponse)
class UpstreamResponse:
    """An answer whose head has arrived; its body goes to :meth:`deliverBody`.

    Its header lines are kept as llhttp reported them and made a ``Headers``
    only when someone reads :attr:`headers`: the passthrough takes
    :meth:`end_to_end_headers` instead, built in one pass over the lines."""

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(self, exchange, code: int, phrase: bytes, pairs: list, length):
        self._exchange = exchange
        self.code = code
        self.phrase = phrase
        self._pairs = pairs
        self._headers: Headers | None = None
        self.length = length

    @property
    def headers(self) -> Headers:
        """Every header of the answer but the connection's framing (``Connection`` stays)."""
        if self._headers is None:
            self._headers = _headers_from(self._pairs, _FRAMING_NAMES)
        return self._headers

    def end_to_end_headers(self) -> Headers:
        """A new ``Headers`` of the answer's end-to-end headers: without the hop-by-hop
        ones and those its ``Connection`` header names (RFC 9110 section 7.6.1), which
        is what :func:`harmony.web.headers.end_to_end` makes of :attr:`headers`."""
        skip = _HOP_BY_HOP_NAMES
        for name, value in self._pairs:
            if len(name) == 10 and (_known_name.get(name) or _header_name(name)) == _CONNECTION:
                listed = set()
                for token in value.split(b","):
                    token = token.strip()
                    if token:
                        try:
                            listed.add(_known_name.get(token) or _header_name(token))
                        except ValueError:  # (InvalidHeaderName)
                            pass  # not a header name: it names nothing to drop
                skip = skip | listed  # compared as Headers keys names: no lower() a header
        return _headers_from(self._pairs, skip)

    def setPreviousResponse(self, response):
        self.previousResponse = response

    def deliverBody(self, protocol):
        self._exchange.deliver(protocol)

    def whole_body(self) -> bytes | None:
        """The body as bytes if all of it arrived with the head (most small answers
        do), taken instead of :meth:`deliverBody`; None when it is still coming."""
        return self._exchange.take_whole()


def _headers_from(pairs: list, skip: frozenset) -> Headers:
    """A ``Headers`` of *pairs* without the names in *skip* (as ``Headers`` spells
    them); names encoded once each, through Twisted's cache."""
    headers = Headers()
    raw = headers._rawHeaders
    for name, value in pairs:
        canon = _known_name.get(name) or _header_name(name)
        if canon in skip:
            continue
        values = raw.get(canon)
        if values is None:
            raw[canon] = [value]
        else:
            values.append(value)
    return headers


#: The outcome of a body that ended well, made a ``Failure(ResponseDone)`` only for a
#: protocol that reads it (an answer taken whole never needs one: a Failure a request saved).
COMPLETE = object()


def _as_failure(outcome) -> Failure:
    return Failure(ResponseDone("the answer is complete")) if outcome is COMPLETE else outcome


class _BodyTransport:
    """What a ``deliverBody`` protocol sees as its transport: flow control on the
    upstream connection while the answer is being read, nothing after (the
    connection may by then be serving another request)."""

    def __init__(self, exchange):
        self._exchange = exchange

    def _connection(self):
        ex = self._exchange
        return ex.connection if ex.connection is not None and not ex.complete else None

    def pauseProducing(self):
        conn = self._connection()
        if conn is not None:
            conn.pause_reading()

    def resumeProducing(self):
        conn = self._connection()
        if conn is not None:
            conn.resume_reading()

    def stopProducing(self):
        conn = self._connection()
        if conn is not None:
            conn.abort()

    def loseConnection(self):
        self.stopProducing()


class _Exchange:
    """One request and its answer, possibly across a retry on a fresh connection."""

    def __init__(self, client, key, method, head, body, retryable):
        self.client = client
        self.key = key
        self.method = method
        self.head = head
        self.body = body
        self.retryable = retryable
        self.deferred = defer.Deferred(self._cancel)
        self.connection: _Connection | None = None
        self.connecting: defer.Deferred | None = None
        #: Whether the head was handed on.  A flag, not the response: the response holds
        #: its exchange (for its body), and the two holding each other made every proxied
        #: request a reference cycle that only the cyclic collector could free (bench
        #: /http_passthrough: its collections were ~7 % of a passthrough process's CPU).
        self.answered_head = False
        self.protocol = None
        self.buffered: list[bytes] = []
        #: How the body ended, until a protocol takes it (COMPLETE: it ended well).
        self.outcome: Failure | object | None = None
        self.complete = False
        self.cancelled = False

    # ------------------------------------------------------------ head

    def answered(self, response: UpstreamResponse):
        self.answered_head = True
        self.deferred.callback(response)

    def fail(self, failure: Failure):
        if not self.deferred.called:
            self.deferred.errback(failure)

    def _cancel(self, _d):
        self.cancelled = True
        if self.connecting is not None:
            self.connecting.cancel()  # fails with CancelledError through connect_failed
            return
        conn = self.connection
        if conn is not None:
            conn.abort()
        if not self.deferred.called:
            self.deferred.errback(defer.CancelledError("the request was cancelled before the upstream answered"))

    # ------------------------------------------------------------ body

    def body_data(self, data: bytes):
        if self.protocol is not None:
            self.protocol.dataReceived(data)
        else:
            self.buffered.append(data)

    def body_end(self, outcome: Failure | object):
        self.complete = True
        protocol = self.protocol
        if protocol is not None:
            self.protocol = _TAKEN  # let go of it: its transport holds this exchange (a cycle)
            protocol.connectionLost(_as_failure(outcome))
        else:
            self.outcome = outcome

    def take_whole(self) -> bytes | None:
        outcome = self.outcome
        if self.protocol is not None or outcome is None or (outcome is not COMPLETE and not (
                isinstance(outcome, Failure) and outcome.check(ResponseDone, PotentialDataLoss))):
            return None
        self.protocol = _TAKEN
        self.outcome = None
        buffered, self.buffered = self.buffered, []
        return b"".join(buffered)

    def deliver(self, protocol):
        if self.protocol is not None:
            raise RuntimeError("the body of this response was already delivered")
        self.protocol = protocol
        protocol.makeConnection(_BodyTransport(self))
        buffered, self.buffered = self.buffered, []
        for chunk in buffered:
            protocol.dataReceived(chunk)
        if self.outcome is not None:
            self.protocol = _TAKEN  # as in body_end
            protocol.connectionLost(_as_failure(self.outcome))
            self.outcome = None
        elif self.connection is not None and self.connection.transport is not None:
            self.connection.resume_reading()  # paused until someone wanted the body


#: An exchange's ``protocol`` once its whole body was taken as bytes.
_TAKEN = Protocol()


class _BodyWriter:
    """The consumer a request body producer writes into: holds it to its declared
    length, or frames its chunks, and writes to the connection."""

    def __init__(self, transport, length, on_error):
        self.transport = transport
        self.chunked = length is UNKNOWN_LENGTH
        self.remaining = 0 if self.chunked else length
        self.on_error = on_error
        self.failed = False

    def write(self, data: bytes):
        if not data or self.failed:
            return
        if self.chunked:
            self.transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
            return
        self.remaining -= len(data)
        if self.remaining < 0:
            self.failed = True
            self.on_error(ValueError("the request body is longer than its declared length"))
            return
        self.transport.write(data)

    def registerProducer(self, producer, streaming):
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self):
        self.transport.unregisterProducer()

    def finish(self):
        if self.chunked:
            self.transport.write(b"0\r\n\r\n")
        elif self.remaining:
            raise ValueError(f"the request body ended {self.remaining} bytes short of its declared length")


class _Connection(Protocol):
    """One keep-alive connection to an upstream, one exchange at a time."""

    transport: Any  # an ITCPTransport (or TLS over one): pause/resume/abort, producers

    def __init__(self, client, key):
        self.client = client
        self.key = key
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: _Exchange | None = None
        self.uses = 0
        self.idle_since = 0.0
        self.lost = False
        self.reading_paused = False
        # Per answer:
        self._reset_answer()

    def _reset_answer(self):
        self.pairs: list = []
        self.phrase = b""
        self.head_fed = 0
        self.head_seen = False
        self.interim = False
        self.message_done = False
        self.keep_alive = False
        self.bytes_in = False
        self.delimited = False  # by Content-Length or chunked coding (else by the close)
        self.body_sending = False
        self.reusable = True

    # ------------------------------------------------------------ sending

    def send(self, exchange: _Exchange):
        self.exchange = exchange
        exchange.connection = self
        self.uses += 1
        self._reset_answer()
        body = exchange.body
        transport = self.transport
        if body is None:
            send_now(transport, exchange.head + (b"Content-Length: 0\r\n\r\n" if exchange.method in BODY_EXPECTED
                                                  else b"\r\n"))
            return
        length: Any = getattr(body, "length", UNKNOWN_LENGTH)
        if length is UNKNOWN_LENGTH:
            transport.write(exchange.head + b"Transfer-Encoding: chunked\r\n\r\n")
        else:
            transport.write(exchange.head + b"Content-Length: %d\r\n\r\n" % length)
        self.body_sending = True

        def too_long(error):
            try:
                body.stopProducing()
            except Exception:  # noqa: BLE001 - stopping is best effort
                pass
            self._body_failed(exchange, Failure(error))

        writer = _BodyWriter(transport, length, too_long)
        transport.registerProducer(body, True)
        try:
            d = body.startProducing(writer)
        except Exception:  # noqa: BLE001 - a producer failing to start is this request's failure
            d = defer.fail()
        d.addCallbacks(lambda _: self._body_sent(exchange, writer), lambda f: self._body_failed(exchange, f))

    def _body_sent(self, exchange, writer):
        if exchange is not self.exchange or self.lost:
            return
        self.body_sending = False
        self.transport.unregisterProducer()
        try:
            writer.finish()
        except ValueError:
            self._body_failed(exchange, Failure())
            return
        if self.message_done:
            self._after_answer()

    def _body_failed(self, exchange, failure):
        if exchange is not self.exchange or not self.body_sending:
            return None
        self.body_sending = False
        if not self.lost:
            self.transport.unregisterProducer()
        # Agent's wrapper, so harmony.backends.http.client_side_cause can tell a
        # client's cut upload (not the upstream's doing) from an upstream failure.
        error = RequestGenerationFailed([failure])
        exchange.fail(Failure(error))
        if exchange.answered_head and not exchange.complete:
            exchange.body_end(Failure(ResponseFailed([failure])))
        self.abort()
        return None

    # ------------------------------------------------------------ receiving

    def dataReceived(self, data):
        exchange = self.exchange
        if exchange is None:
            self.client.log_refusal(self.key, "bytes on an idle connection")
            self.abort()
            return
        self.bytes_in = True
        try:
            if not self.head_seen:
                # httptools gathers a header line in Python before it calls on_header:
                # bound the head here, or one endless line would grow without limit.
                room = MAX_HEAD_BYTES - self.head_fed
                if len(data) > room:
                    self.parser.feed_data(data[:room])
                    if not self.head_seen:
                        raise UpstreamProtocolError(f"the answer's head is over {MAX_HEAD_BYTES} bytes")
                    data = data[room:]
                else:
                    self.head_fed += len(data)
            self.parser.feed_data(data)
        except UpstreamProtocolError as e:
            self._broken(e)
            return
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _Unsolicited) or isinstance(e.__cause__, _Unsolicited):
                self.reusable = False
            else:
                self._broken(e.__context__ or e)
                return
        except httptools.HttpParserError as e:
            self._broken(e)
            return
        if self.exchange is not exchange:
            return  # finished (and possibly reused) inside the parser's callbacks
        answer = None
        if self.head_seen and not exchange.answered_head:
            answer = self._answer()
        if self.message_done:
            if exchange.method == b"HEAD" and not data.endswith(b"\r\n\r\n"):
                self.reusable = False  # a HEAD answer's body (if any) would poison the next answer
            # Before the head is handed on: whoever gets it finds the body whole
            # (UpstreamResponse.whole_body) and this connection back in the pool.
            self._finish_body()
        elif answer is not None and not self.lost:
            self.pause_reading()  # hold the rest until someone reads the body
        if answer is not None:
            exchange.answered(answer)  # (deliverBody resumes the connection)

    def _broken(self, error):
        exchange = self.exchange
        reason = Failure(UpstreamProtocolError(f"unusable answer from the upstream: {error}"))
        self.client.log_refusal(self.key, str(error))
        if exchange is not None:
            if not exchange.answered_head:
                exchange.fail(Failure(ResponseFailed([reason])))
            elif not exchange.complete:
                exchange.body_end(Failure(ResponseFailed([reason])))
        self.abort()

    # httptools callbacks -------------------------------------------------

    def on_message_begin(self):
        if self.message_done or self.exchange is None:
            raise _Unsolicited()
        if self.interim:  # the final answer after a 1xx
            self.pairs = []
            self.phrase = b""
            self.interim = False

    # The head's size is bounded before llhttp sees it (dataReceived feeds at most
    # MAX_HEAD_BYTES until the head is complete), so these two only gather.
    def on_status(self, status):
        self.phrase += status

    def on_header(self, name, value):
        self.pairs.append((name, value))

    def on_headers_complete(self):
        if len(self.pairs) > MAX_HEADERS:
            raise UpstreamProtocolError(f"the answer has over {MAX_HEADERS} header lines")
        code = self.parser.get_status_code()
        if code < 200:
            if code == 101:
                raise UpstreamProtocolError("101 Switching Protocols, and no upgrade was asked for")
            self.interim = True  # 100 Continue, 103 Early Hints: the real answer follows
            return
        self.head_seen = True
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body):
        self.exchange.body_data(body)

    def on_chunk_header(self):
        self.delimited = True

    def on_message_complete(self):
        if self.interim:
            return
        self.message_done = True
        # Only now: llhttp forgets the answer's keep-alive once it is past it.
        self.keep_alive = self.parser.should_keep_alive()

    # ------------------------------------------------------------ answer

    def _answer(self):
        exchange = self.exchange
        code = self.parser.get_status_code()
        length = UNKNOWN_LENGTH
        chunked = False
        pairs = self.pairs
        for name, value in pairs:
            size = len(name)
            if size == 14 or size == 17:  # len("content-length"), len("transfer-encoding")
                canon = _known_name.get(name) or _header_name(name)
                if canon == _CONTENT_LENGTH:
                    self.delimited = True
                    length = int(value)  # llhttp has checked it is a number, and one number
                elif canon == _TRANSFER_ENCODING:
                    chunked = True
        if chunked:
            self.delimited = True
            length = UNKNOWN_LENGTH  # the chunked coding wins over a Content-Length
        if exchange.method == b"HEAD" or code in (204, 304):
            length = 0
            self.delimited = True
            self.message_done = True  # llhttp would wait for a HEAD answer's body
        self.pairs = []
        return UpstreamResponse(exchange, code, self.phrase, pairs, length)

    def _finish_body(self):
        exchange = self.exchange
        if not self.body_sending:
            # Back to the pool first: whoever reads the end of this body may send
            # the next request at once, and should find this connection idle.
            self._after_answer()
        if not exchange.complete:
            exchange.body_end(COMPLETE)

    def _after_answer(self):
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.connection = None
        if self.lost:
            return
        keep = self.keep_alive
        if exchange is not None and exchange.method == b"HEAD":
            # llhttp cannot be told an answer has no body: it would wait for the
            # Content-Length a HEAD answer announces.  The next answer starts afresh.
            self.parser = httptools.HttpResponseParser(self)
        if self.reusable and not self.body_sending and keep:
            self.resume_reading()
            self.client.release(self)
        else:
            self.close()

    def _answer_or_fail(self, reason: Failure):
        """The connection closed mid-exchange: finish what can be finished."""
        exchange = self.exchange
        if not exchange.answered_head:
            if self.head_seen:
                exchange.answered(self._answer())
            else:
                if not self.bytes_in and self.uses > 1 and exchange.retryable and not exchange.cancelled:
                    # A keep-alive connection the upstream had closed: it never saw this request.
                    self.exchange = None
                    exchange.connection = None
                    self.client.retry(exchange)
                    return
                exchange.fail(Failure(ResponseNeverReceived([reason])))
                return
        if exchange.complete:
            return
        if self.message_done:
            exchange.body_end(COMPLETE)
        elif not self.delimited:
            exchange.body_end(Failure(PotentialDataLoss()))  # close-delimited: this is its end
        else:
            exchange.body_end(Failure(ResponseFailed([reason])))

    def connectionLost(self, reason=None):
        self.lost = True
        self.client.forget(self)
        exchange = self.exchange
        if exchange is None:
            return
        if self.body_sending:
            self.body_sending = False
            try:
                exchange.body.stopProducing()
            except Exception:  # noqa: BLE001 - a producer that already finished may complain
                pass
        self._answer_or_fail(reason if reason is not None else Failure(ConnectionError("connection lost")))
        self.exchange = None
        exchange.connection = None

    def pause_reading(self):
        """Stop reading the upstream (its answer's reader is slow, or not there yet)."""
        if self.transport is not None and not self.lost:
            self.reading_paused = True
            self.transport.pauseProducing()

    def resume_reading(self):
        """Read again, if paused: most answers never were, and a resume is several
        reactor calls (``addReader``) a request for nothing."""
        if self.reading_paused and self.transport is not None and not self.lost:
            self.reading_paused = False
            self.transport.resumeProducing()

    def abort(self):
        if self.transport is not None and not self.lost:
            self.transport.abortConnection()

    def close(self):
        if self.transport is not None and not self.lost:
            self.transport.loseConnection()


class _ConnectionFactory(Factory):
    noisy = False  # one "Starting factory" line per upstream connection is noise

    def __init__(self, client, key):
        self.client = client
        self.key = key

    def buildProtocol(self, addr):
        return _Connection(self.client, self.key)


class _Target:
    """Where one ``scheme://host:port`` is reached, and its idle connections."""

    def __init__(self, key, host_header: bytes, endpoint, factory):
        self.key = key
        self.host_header = host_header
        self.endpoint = endpoint
        self.factory = factory
        self.idle: list[_Connection] = []


class UpstreamClient:
    """``Agent.request`` on httptools connections, with a keep-alive pool per target.

    *endpoints* is an ``IAgentEndpointFactory`` (harmony.web.client.DirectEndpointFactory:
    plain TCP to IPv4 literals, TLS per the target's policy for ``https``).
    """

    def __init__(self, reactor, endpoints, *, max_idle_per_target: int = 64, idle_secs: float = IDLE_SECS,
                 log=None):
        self.reactor = reactor
        self.endpoints = endpoints
        self.max_idle_per_target = max_idle_per_target
        self.idle_secs = idle_secs
        self._targets: dict[bytes, _Target] = {}
        #: (``scheme://authority/``, its target) of the last URL parsed.
        self._last: tuple[bytes, _Target] | None = None
        self._log = log
        self._closing: list[defer.Deferred] = []

    # ------------------------------------------------------------ requests

    def request(self, method: bytes, url: bytes, headers: Headers | None = None, bodyProducer=None):
        target, path = self._target(url)
        if b"\r" in path or b"\n" in path or b" " in path:
            return defer.fail(ValueError(f"not a request target: {path!r}"))
        parts = [method, b" ", path, b" HTTP/1.1\r\nHost: ", target.host_header, b"\r\n"]
        if headers is not None:
            raw = getattr(headers, "_rawHeaders", None)  # its dict: no generator a request
            for name, values in (raw.items() if raw is not None else headers.getAllRawHeaders()):
                if name in _OWN_NAMES:  # Headers' keys are canonical names
                    continue
                for value in values:
                    parts.append(b"%s: %s\r\n" % (name, value))
        retryable = method in IDEMPOTENT and (bodyProducer is None or isinstance(bodyProducer, BytesProducer))
        exchange = _Exchange(self, target.key, method, b"".join(parts), bodyProducer, retryable)
        self._start(exchange, target)
        return exchange.deferred

    def _target(self, url: bytes):
        last = self._last
        if last is not None and url.startswith(last[0]):
            # The target of the request before (a backend sends to one or few): the
            # URL is its ``scheme://authority/`` and a path, so no parse is needed.
            return last[1], url[len(last[1].key):]
        scheme, sep, rest = url.partition(b"://")
        if not sep:
            raise ValueError(f"not an absolute URL: {url!r}")
        cut = len(rest)
        for stop in (b"/", b"?"):
            at = rest.find(stop)
            if 0 <= at < cut:
                cut = at
        authority, path = rest[:cut], rest[cut:]
        if not path.startswith(b"/"):
            path = b"/" + path
        key = scheme + b"://" + authority
        target = self._targets.get(key)
        if target is None:
            uri = URI.fromBytes(key + b"/")
            target = self._targets[key] = _Target(
                key, authority.rpartition(b"@")[2], self.endpoints.endpointForURI(uri), _ConnectionFactory(self, key))
        self._last = (key + b"/", target)
        return target, path

    def _start(self, exchange: _Exchange, target: _Target, fresh: bool = False):
        idle = target.idle
        now = time.monotonic()
        while idle and not fresh:
            conn = idle.pop()
            if now - conn.idle_since > self.idle_secs:
                conn.abort()
                continue
            conn.send(exchange)
            return
        d = exchange.connecting = target.endpoint.connect(target.factory)

        def connected(conn):
            exchange.connecting = None
            if exchange.cancelled:
                conn.close()
                return
            conn.send(exchange)

        def connect_failed(failure):
            exchange.connecting = None
            exchange.fail(failure)

        d.addCallbacks(connected, connect_failed)

    def retry(self, exchange: _Exchange):
        exchange.retryable = False  # once; an in-memory body (BytesProducer) writes itself again
        self._start(exchange, self._targets[exchange.key], fresh=True)

    # ------------------------------------------------------------ pool

    def release(self, conn: _Connection):
        target = self._targets.get(conn.key)
        if target is None or len(target.idle) >= self.max_idle_per_target or self._closing:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        target.idle.append(conn)

    def forget(self, conn: _Connection):
        target = self._targets.get(conn.key)
        if target is not None and conn in target.idle:
            target.idle.remove(conn)
        if self._closing and not any(t.idle for t in self._targets.values()):
            closing, self._closing = self._closing, []
            for d in closing:
                d.callback(None)

    def idle_connections(self, url_base: bytes | None = None) -> int:
        """How many idle connections the pool holds (for one ``scheme://host:port``, or all)."""
        if url_base is not None:
            target = self._targets.get(url_base)
            return len(target.idle) if target is not None else 0
        return sum(len(t.idle) for t in self._targets.values())

    def closeCachedConnections(self) -> defer.Deferred:
        """Close every idle connection; fires once they are closed (``HTTPConnectionPool``'s name)."""
        conns = [c for t in self._targets.values() for c in t.idle]
        if not conns:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._closing.append(d)
        for conn in conns:
            conn.close()
        return d

    def log_refusal(self, key: bytes, why: str):
        if self._log is not None:
            self._log.warn("upstream {upstream} broke HTTP/1.1: {why}; its connection is dropped",
                           upstream=key.decode("ascii", "replace"), why=why)
