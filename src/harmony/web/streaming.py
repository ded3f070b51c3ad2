"""Request bodies that stream to the backend as they arrive.

twisted.web reads a whole request body (into memory, or a temporary file past
100 KB) before it renders the request, so a proxy built on it would only start
sending a 2 GB upload upstream once the client had finished sending it - twice
the time, and the disk to hold it.  Here the channel dispatches a request as
soon as its headers are in, when the endpoint it routes to asks for it
(``stream_request_body = True``) and the body is large (over the inline limit)
or of unknown length (chunked).  The body then reaches the pipeline as a
:class:`StreamingBody`, an ``IBodyProducer`` fed by the connection, with flow
control both ways: when the backend's connection cannot take more, we stop
reading from the client; when it can, we read again.

Everything else keeps twisted.web's behaviour: small bodies, bodies for
endpoints that do not opt in, and the request/response cycle of keep-alive
connections.  If the response is finished before the body has fully arrived
(an auth failure, an upstream error), the connection is closed after the
response rather than reading the rest of the upload: the answer is followed by a
half-close, and what the client still sends is read and dropped for at most
:data:`LINGER_SECS` (and :data:`LINGER_MAX_BYTES`) before the socket closes.  A
plain close with unread bytes makes the kernel answer with a reset, which can
destroy the answer before the client reads it: nginx in front of Harmony saw
"writev() failed (32: Broken pipe)" and answered 502 instead of the upstream's 405
(nginx's own ``lingering_close`` exists for the same reason).

Request bodies are also bounded here, where the bytes arrive, not after
twisted.web has spooled them: an endpoint names its limit per request
(``request_body_limit``); a declared ``Content-Length`` over it is refused
with 413 as soon as the head is in (no ``100 Continue``, nothing read or
spooled), and a chunked body is cut the moment it passes it.  A body that
arrives slower than the network's minimum data rate is cut with 408
(``body_timeout_secs``/``body_min_rate`` of the network, see
:class:`HarmonyChannel`): the idle timeout restarts on every byte, so a
client dripping one byte every few seconds would otherwise hold the
connection for ever.
"""

from __future__ import annotations

from io import BytesIO
from urllib.parse import parse_qs

from twisted.internet import defer, tcp
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.server import Request, Site
from zope.interface import implementer

from harmony.errors import ClientClosedRequest, HarmonyError, PayloadTooLarge, RequestTimeout

#: Bodies up to this size are read whole (cheap, and lets JSON-aware middleware
#: see them); larger or unknown-length ones stream to endpoints that opt in.
INLINE_BODY_LIMIT = 256 * 1024
#: Body bytes held while the backend is not (yet) taking them; past this we
#: stop reading from the client.
BUFFER_LIMIT = 1024 * 1024


@implementer(IBodyProducer)
class StreamingBody:
    """A request body as it arrives on the client connection.  Read once."""

    def __init__(self, client, length):
        #: The client connection as an IPushProducer (its reading side).
        self._client = client
        self.length = UNKNOWN_LENGTH if length is None else length
        self.received = 0
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._consumer = None
        self._finished: defer.Deferred | None = None
        self._complete = False
        self._error = None
        self._stopped = False
        self._consumer_paused = False
        self._client_paused = False
        #: How often we stopped reading from the client (flow control): time
        #: spent so is ours, not the client's, when judging its data rate.
        self.client_pauses = 0

    @property
    def complete(self) -> bool:
        return self._complete

    # ------------------------------------------------------------ channel side

    def feed(self, data: bytes):
        self.received += len(data)
        if self._stopped:
            return
        if self._consumer is not None and not self._consumer_paused and not self._buffer:
            self._consumer.write(data)
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= BUFFER_LIMIT:
            self._pause_client()

    def finish(self):
        self._complete = True
        self._settle()

    def fail(self, reason):
        if self._complete:
            return
        self._complete = True
        self._error = reason
        self._buffer = []
        self._settle()

    # ------------------------------------------------------- IBodyProducer side

    def startProducing(self, consumer):
        if self._consumer is not None:
            raise RuntimeError("a streamed request body can only be read once")
        self._consumer = consumer
        self._finished = defer.Deferred()
        self._flush()
        return self._finished

    def pauseProducing(self):
        self._consumer_paused = True
        self._pause_client()

    def resumeProducing(self):
        self._consumer_paused = False
        self._flush()

    def stopProducing(self):
        # The backend gave up on the body; per IBodyProducer the Deferred must
        # not fire.  Keep reading (and dropping) so the response can be sent.
        self._stopped = True
        self._buffer = []
        self._buffered = 0
        self._resume_client()

    # ----------------------------------------------------------------- helpers

    def _flush(self):
        while self._buffer and not self._consumer_paused and not self._stopped:
            data = self._buffer.pop(0)
            self._buffered -= len(data)
            self._consumer.write(data)
        if not self._buffer and not self._consumer_paused:
            self._resume_client()
        self._settle()

    def _settle(self):
        d = self._finished
        if d is None or d.called or self._stopped or not self._complete or self._buffer:
            return
        if self._error is not None:
            d.errback(self._error)
        else:
            d.callback(None)

    def _pause_client(self):
        if not self._client_paused and not self._complete and self._client is not None:
            self._client_paused = True
            self.client_pauses += 1
            self._client.pauseProducing()

    def _resume_client(self):
        if self._client_paused:
            self._client_paused = False
            self._client.resumeProducing()


class HarmonyRequest(Request):
    """A twisted.web request that can be dispatched before its body is in."""

    body_stream: StreamingBody | None = None
    #: (bytes, option name) the endpoint takes at most, set when the head is in.
    body_limit: tuple[int, str] | None = None
    body_received = 0
    _body_cut = False
    #: Always one of ours (HarmonySite builds HarmonyChannels, which make these requests).
    channel: HarmonyChannel

    def _received_head(self, command: bytes, uri: bytes, version: bytes):
        # What Request.requestReceived does, minus the (absent) form body.
        self.method, self.uri, self.clientproto = command, uri, version
        self.path, _, query = uri.partition(b"?")
        # twisted.web.http.Request says ``args = None`` unannotated, so mypy types it None.
        self.args = parse_qs(query, keep_blank_values=True) if query else {}  # type: ignore[assignment]

    def start_streaming(self, command: bytes, uri: bytes, version: bytes, length):
        client = IPushProducer(self.channel.transport, None)
        self.body_stream = StreamingBody(client, length)
        if self.content is not None:
            self.content.close()  # gotLength's spool file (an fd, for large bodies) goes unused
        self.content = BytesIO()  # type: ignore[assignment]  # Request.content: ``= None`` in twisted, as args
        self._received_head(command, uri, version)
        self.process()

    def refuse_body(self, command: bytes, uri: bytes, version: bytes, error: HarmonyError):
        """Answer *error* now, before the body is in (or while it arrives), and
        close after the answer: what the client still sends is dropped unread."""
        self._body_cut = True
        self.body_stream = StreamingBody(None, None)
        self.body_stream.stopProducing()  # nothing will read it
        if self.content is not None:
            self.content.close()  # drop what was spooled so far
        self.content = BytesIO()  # type: ignore[assignment]  # as in start_streaming
        self.channel.persistent = False
        self.channel.linger_wanted = True
        self._received_head(command, uri, version)
        refuse = getattr(getattr(self.channel.site, "resource", None), "refuse", None)
        if refuse is not None:
            refuse(self, error)
        else:
            self.setResponseCode(error.status)
            self.finish()

    def handleContentChunk(self, data):
        if self._body_cut:
            return  # refused: what still arrives before the close is dropped unread
        self.body_received += len(data)
        limit = self.body_limit
        if limit is not None and self.body_received > limit[0]:
            self._over_limit(limit)
            return
        if self.body_stream is not None:
            self.body_stream.feed(data)
        else:
            super().handleContentChunk(data)

    def body_too_slow(self, error: HarmonyError):
        """The body stopped arriving at the network's minimum rate: 408, close."""
        if self.startedWriting:
            # Already answering (a streamed response to a streamed upload):
            # nothing left to say but to close.
            self._body_cut = True
            self.channel.persistent = False
            self.channel.transport.loseConnection()  # type: ignore[misc]  # zope ITransport method has no self
            return
        self._cut_body(error)

    def _over_limit(self, limit):
        """A chunked body just passed the endpoint's limit: cut it here."""
        self._cut_body(PayloadTooLarge(
            f"the request body exceeds this endpoint's limit of {limit[0]} bytes ({limit[1]})"))

    def _cut_body(self, error: HarmonyError):
        """Stop reading this body and answer *error* (413, 408) in the endpoint's dialect."""
        self._body_cut = True
        if self.body_stream is None:
            # Not dispatched yet (twisted.web was spooling it): answer now.
            channel = self.channel
            self.refuse_body(channel._command, channel._path, channel._version, error)
        else:
            # Dispatched: the backend reading the body sees the error (not a target failure).
            self.channel.persistent = False
            self.body_stream.fail(Failure(error))

    def requestReceived(self, command, path, version):
        if self.body_stream is not None:
            self.body_stream.finish()  # already dispatched; the body is now complete
            return
        super().requestReceived(command, path, version)

    def write(self, data):
        if not self.startedWriting and self.channel is not None and (
                self._body_cut or (self.body_stream is not None and not self.body_stream.complete)):
            # Answered before the body was in (refused, or answered early): the
            # connection closes after this answer, and the client must know not
            # to send its next request on it.
            self.channel.persistent = False
            self.responseHeaders.setRawHeaders(b"connection", [b"close"])
        super().write(data)

    def finish(self):
        if self.body_stream is not None and not self.body_stream.complete and self.channel is not None:
            # Answered before the upload ended: close after the response
            # instead of reading the rest of the body into the void, and drop
            # whatever still arrives before the close.
            self.channel.persistent = False
            self.channel.linger_wanted = True
            self.body_stream.stopProducing()
        return super().finish()

    def connectionLost(self, reason):
        # Tell the pipeline first (notifyFinish: the endpoint marks the client
        # gone and cancels), then fail the body: an upload cut mid-body must
        # read as the client's doing, never as the upstream failing.
        super().connectionLost(reason)
        if self.body_stream is not None:
            self.body_stream.fail(Failure(ClientClosedRequest(
                f"the client closed the connection mid-body: {reason.getErrorMessage()}")))


#: Defaults of the per-network settings (``[network.X.http]``), see docs/configuration.md.
HEAD_TIMEOUT = 30.0
#: After answering before an upload ended: how long, and how many bytes, of the rest
#: are read and dropped after the half-close, so the close does not reset the answer.
LINGER_SECS = 2.0
LINGER_MAX_BYTES = 8 * 1024 * 1024
BODY_TIMEOUT = 20.0
BODY_MIN_RATE = 256


class HarmonyChannel(HTTPChannel):
    """Dispatches streaming requests once their headers are in, and bounds how
    slowly a client may send.  The Site's idle timeout restarts on every byte,
    so without these a client dripping a byte a minute would hold a connection
    for ever:

    * a request's head (request line + headers) must be complete
      ``head_timeout_secs`` after its first byte (else 408 and close);
    * its body must arrive at ``body_min_rate`` bytes/s or more, judged over
      each window of ``body_timeout_secs`` (at least one byte per window when
      the rate is 0, nginx's ``client_body_timeout``); a window in which less
      arrived ends the request with 408 and closes the connection.  A window
      in which Harmony itself stopped reading (flow control: the upstream
      was slow to take the body) is not held against the client.

    The values come from the site (``HarmonySite``), i.e. the network's config.
    """

    #: Set by the Site that built the channel (twisted.web does it, undeclared).
    site: Site
    _head_timer = None
    _body_timer = None
    _body_request = None
    _window_start = (0, 0)  # (bytes received, client pauses) when the window began
    #: Set when a request was answered before its body was all in (see the module docstring).
    linger_wanted = False
    _lingering = False
    _lingered = 0
    _linger_timer = None

    _host = None

    @property
    def head_deadline(self) -> float:
        return getattr(self.site, "head_timeout", HEAD_TIMEOUT)

    def getHost(self):
        # twisted.web asks for every request (Request.__init__), and a TCP transport
        # answers with a getsockname system call each time, for an address a
        # connection never changes: the reactor gave up the GIL on it once a request.
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def dataReceived(self, data):
        if self._lingering:
            self._lingered += len(data)  # dropped unread: the answer is out, the request is over
            if self._lingered > LINGER_MAX_BYTES:
                self.transport.abortConnection()
            return
        if self._head_timer is None and data and getattr(self, "_HTTPChannel__first_line", 0):
            self._head_timer = self.callLater(self.head_deadline, self._head_too_slow)
        super().dataReceived(data)

    def _cancel_head_timer(self):
        if self._head_timer is not None and self._head_timer.active():
            self._head_timer.cancel()
        self._head_timer = None

    def _head_too_slow(self):
        self._head_timer = None
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        self.loseConnection()

    def connectionLost(self, reason):
        self._cancel_head_timer()
        self._stop_body_clock()
        if self._linger_timer is not None and self._linger_timer.active():
            self._linger_timer.cancel()
        super().connectionLost(reason)

    def loseConnection(self):
        if self.linger_wanted and not self._lingering and self._linger():
            return None
        return super().loseConnection()

    def _linger(self) -> bool:
        """Half-close after the answer and drop what still arrives, for a bounded time,
        then close.  Only on a plain TCP transport (TLS has no half-close here): else
        the caller closes at once, as before."""
        transport = self.transport
        if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False) \
                or not transport.connected or transport.disconnecting:
            return False
        self._lingering = True
        self._cancel_head_timer()
        self._stop_body_clock()
        self._networkProducer.unregisterProducer()
        transport.loseWriteConnection()  # FIN once the answer is written
        transport.resumeProducing()  # flow control may have paused reading
        self._linger_timer = self.callLater(LINGER_SECS, transport.loseConnection)  # type: ignore[misc]  # zope method
        return True

    # -------------------------------------------------------- body data rate

    def _start_body_clock(self, request):
        window = getattr(self.site, "body_timeout", BODY_TIMEOUT)
        if not window:
            return
        self._body_request = request
        self._window_start = (request.body_received, self._pauses(request))
        self._body_timer = self.callLater(window, self._body_window_over, window)

    def _stop_body_clock(self):
        if self._body_timer is not None and self._body_timer.active():
            self._body_timer.cancel()
        self._body_timer = self._body_request = None

    @staticmethod
    def _pauses(request):
        stream = request.body_stream
        return 0 if stream is None else stream.client_pauses

    @staticmethod
    def _reading_paused(request):
        stream = request.body_stream
        return stream is not None and stream._client_paused

    def _body_window_over(self, window):
        self._body_timer = None
        request = self._body_request
        if request is None or request._body_cut or request.finished or request._disconnected:
            return
        received, pauses = self._window_start
        got = request.body_received - received
        wanted = max(1, int(getattr(self.site, "body_min_rate", BODY_MIN_RATE) * window))
        if got >= wanted or self._pauses(request) != pauses or self._reading_paused(request):
            self._start_body_clock(request)  # fast enough, or we were the slow side: next window
            return
        self._body_request = None
        request.body_too_slow(RequestTimeout(
            f"the request body arrived too slowly: {got} bytes in {window:g}s, at least {wanted} expected "
            f"(body_min_rate, body_timeout_secs)"))

    def lineLengthExceeded(self, line):
        # LineReceiver's default drops the connection without a word, which a
        # client (or the operator reading its log) cannot tell from a crash.
        # Still on the request line (twisted.web's own flag): the URI is too long.
        status = (b"414 URI Too Long" if getattr(self, "_HTTPChannel__first_line", 0)
                  else b"431 Request Header Fields Too Large")
        self.transport.write(b"HTTP/1.1 " + status + b"\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        self.loseConnection()

    def allHeadersReceived(self):
        self._cancel_head_timer()
        request = self.requests[-1] if self.requests else None
        if not isinstance(request, HarmonyRequest):
            super().allHeadersReceived()
            return
        resource = getattr(self.site, "resource", None)
        body_policy = getattr(resource, "body_policy", None)
        streams, limit = (False, None)
        if body_policy is not None and self.length != 0:
            streams, limit = body_policy(self._path.partition(b"?")[0], self._command)
        if limit is not None and self.length is not None and self.length > limit[0]:
            # Refused on the declared length: before 100 Continue, before a byte
            # of the body is read or spooled (twisted.web's gotLength would open
            # a temporary file for it).
            request.refuse_body(self._command, self._path, self._version, PayloadTooLarge(
                f"a request body of {self.length} bytes exceeds this endpoint's limit of {limit[0]} bytes "
                f"({limit[1]})"))
            return
        request.body_limit = limit
        super().allHeadersReceived()
        if self.length != 0:
            self._start_body_clock(request)
        if self.length == 0 or (self.length is not None and self.length <= INLINE_BODY_LIMIT):
            return
        if streams:
            request.start_streaming(self._command, self._path, self._version, self.length)

    def allContentReceived(self):
        self._stop_body_clock()
        if not self.requests:
            # The streamed request was answered and the connection is closing.
            return
        super().allContentReceived()
