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
response rather than reading and discarding the rest of the upload.
"""

from __future__ import annotations

from io import BytesIO
from urllib.parse import parse_qs

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.internet.interfaces import IPushProducer
from twisted.web.http import HTTPChannel
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.server import Request
from zope.interface import implementer

from harmony.errors import ClientClosedRequest

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
            self._client.pauseProducing()

    def _resume_client(self):
        if self._client_paused:
            self._client_paused = False
            self._client.resumeProducing()


class HarmonyRequest(Request):
    """A twisted.web request that can be dispatched before its body is in."""

    body_stream: StreamingBody | None = None

    def start_streaming(self, command: bytes, uri: bytes, version: bytes, length):
        client = IPushProducer(self.channel.transport, None)
        self.body_stream = StreamingBody(client, length)
        if self.content is not None:
            self.content.close()  # gotLength's spool file (an fd, for large bodies) goes unused
        self.content = BytesIO()
        # What Request.requestReceived does, minus the (absent) form body.
        self.method, self.uri, self.clientproto = command, uri, version
        self.path, _, query = uri.partition(b"?")
        self.args = parse_qs(query, 1) if query else {}
        self.process()

    def handleContentChunk(self, data):
        if self.body_stream is not None:
            self.body_stream.feed(data)
        else:
            super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        if self.body_stream is not None:
            self.body_stream.finish()  # already dispatched; the body is now complete
            return
        super().requestReceived(command, path, version)

    def finish(self):
        if self.body_stream is not None and not self.body_stream.complete and self.channel is not None:
            # Answered before the upload ended: close after the response
            # instead of reading the rest of the body into the void, and drop
            # whatever still arrives before the close.
            self.channel.persistent = False
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


class HarmonyChannel(HTTPChannel):
    """Dispatches streaming requests once their headers are in, and gives each
    request's head (request line + headers) ``head_deadline`` seconds from its
    first byte: the Site's idle timeout restarts on every byte, so without this
    a client dripping a header byte a minute would hold a connection for ever."""

    head_deadline = 30.0
    _head_timer = None

    def dataReceived(self, data):
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
        super().connectionLost(reason)

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
        super().allHeadersReceived()
        if self.length == 0 or (self.length is not None and self.length <= INLINE_BODY_LIMIT):
            return
        request = self.requests[-1] if self.requests else None
        if not isinstance(request, HarmonyRequest):
            return
        resource = getattr(self.site, "resource", None)
        wants = getattr(resource, "streams_request_body", None)
        if wants is not None and wants(self._path.partition(b"?")[0]):
            request.start_streaming(self._command, self._path, self._version, self.length)

    def allContentReceived(self):
        if not self.requests:
            # The streamed request was answered and the connection is closing.
            return
        super().allContentReceived()
