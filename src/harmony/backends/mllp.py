"""``mllp`` backend: send HL7 v2 messages to MLLP receivers and bring their ACK back.

A message is sent on a pooled connection to a target chosen by the shared
:class:`~harmony.targets.TargetPool` (strategies, health checks, circuit
breaker); the backend then waits up to ``ack_timeout_secs`` for the
acknowledgement of *that* message (MSA-2 must name its control ID).

- AA/CA: 200, the peer's ACK as body and ``state.hl7_ack``, so the
  ``mllp`` endpoint hands the downstream's own ACK back upstream;
- AE/CE and timeouts: sent again after ``retry_delay_secs``, up to
  ``retries`` times (a receiver's AE means "try again"); then 500 (or 504);
- AR/CR: never sent again (the receiver said resending will not help): 422.

Those statuses are what ``store_forward`` reads as delivered, transient and
permanent.  A connection whose ACK never came is closed, never reused: a late
ACK would otherwise be read as the next message's.

The body may be the v2 message itself (from an ``mllp`` endpoint or the
relay) or a JSON message view (``harmony.hl7.jsonview``; from a ``transform``
mapping FHIR to v2): that is written as ER7 first, with MSH-7 and MSH-10
filled in when the view leaves them out.
"""

from __future__ import annotations

import json
import time

from twisted.internet import defer, ssl, task
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.web.http_headers import Headers

from harmony.backends.base import Backend
from harmony.config.errors import OptionError
from harmony.envelope import ResponseEnvelope, is_json_type, read_body
from harmony.errors import BackendTimeout, BackendUnavailable, BadRequest
from harmony.hl7 import ack as hack
from harmony.hl7.escaping import unescape
from harmony.hl7.framing import FramingError, MllpDecoder, frame
from harmony.hl7.jsonview import ViewError, to_er7
from harmony.hl7.message import HL7Error, read_header
from harmony.log import get_logger
from harmony.state import ResponseState
from harmony.targets import TargetPool

log = get_logger("harmony.backends.mllp")

CONTENT_TYPE = b"x-application/hl7-v2+er7"
STATUS_OF = {hack.ACCEPT: 200, hack.COMMIT_ACCEPT: 200, hack.ERROR: 500, hack.COMMIT_ERROR: 500,
             hack.REJECT: 422, hack.COMMIT_REJECT: 422}


class MllpClientProtocol(Protocol):
    """One connection to a receiver: one message out, its ACK back, repeat."""

    def __init__(self, max_ack_bytes: int):
        self.decoder = MllpDecoder(max_ack_bytes)
        self.waiting: defer.Deferred | None = None
        self.connected = False

    def connectionMade(self):
        self.connected = True
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)  # one small frame per message: no Nagle delay

    def exchange(self, payload: bytes) -> defer.Deferred:
        self.waiting = defer.Deferred(self._cancelled)
        # ITransport's methods are declared without self (zope style): mypy has no zope plug-in here.
        self.transport.write(frame(payload))  # type: ignore[call-arg,misc]
        return self.waiting

    def _cancelled(self, d):
        self.waiting = None  # the canceller errbacks d itself
        self.transport.abortConnection()

    def dataReceived(self, data):
        try:
            messages = self.decoder.feed(data)
        except FramingError as e:
            self._fail(BackendUnavailable(f"the receiver's answer is not MLLP: {e}"))
            self.transport.abortConnection()
            return
        for message in messages:
            if self.waiting is None:
                # Nothing was asked: an unsolicited frame desynchronises the connection.
                self.transport.abortConnection()
                return
            d, self.waiting = self.waiting, None
            d.callback(message)

    def _fail(self, error):
        if self.waiting is not None:
            d, self.waiting = self.waiting, None
            d.errback(error)

    def connectionLost(self, reason):
        self.connected = False
        self._fail(BackendUnavailable("the receiver closed the connection before acknowledging"))


class _TargetConnections:
    """Idle connections to one target and a bound on how many are in use."""

    def __init__(self, limit: int):
        self.idle: list[MllpClientProtocol] = []
        self.slots = defer.DeferredSemaphore(limit)

    def take_idle(self):
        while self.idle:
            conn = self.idle.pop()
            if conn.connected:
                return conn
        return None


class MllpBackend(Backend):
    def __init__(self, name, reactor, target_pool: TargetPool, *, ack_timeout=30.0, connect_timeout=10.0,
                 retries=2, retry_delay=1.0, max_connections=4, tls=None, max_ack_bytes=1024 * 1024,
                 keep_connection_open=True):
        super().__init__(name)
        self.reactor = reactor
        self.target_pool = target_pool
        self.ack_timeout = ack_timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.retry_delay = retry_delay
        self.max_connections = max_connections
        self.tls = tls
        self.max_ack_bytes = max_ack_bytes
        #: False: one connection per message, closed after its ACK (receivers that
        #: mishandle a second message on a connection, e.g. node-hl7-server 2.5).
        self.keep_connection_open = keep_connection_open
        self.connections: dict[str, _TargetConnections] = {}

    @classmethod
    def from_config(cls, name, options, ctx):
        implicit = None
        if "host" in options or "port" in options:
            implicit = {"host": options.str("host"), "port": options.int("port", minimum=1, maximum=65535)}
        elif not (ctx.component and ctx.component.targets):
            raise OptionError("host", "is required (or name targets whose tables have 'host' and 'port')")
        pool = TargetPool.from_options(name, options, ctx, kind="mllp", implicit=implicit)
        tls = None
        if options.bool("tls", False) or "tls_ca" in options:
            tls = client_tls_options(options)
        return cls(name, ctx.reactor, pool,
                   ack_timeout=options.number("ack_timeout_secs", 30.0, minimum=0.001),
                   connect_timeout=options.number("connect_timeout_secs", 10.0, minimum=0.001),
                   retries=options.int("ack_retries", 2, minimum=0, maximum=100),
                   retry_delay=options.number("retry_delay_secs", 1.0, minimum=0),
                   max_connections=options.int("max_connections_per_target", 4, minimum=1, maximum=1000),
                   tls=tls, max_ack_bytes=options.int("max_ack_bytes", 1024 * 1024, minimum=64, maximum=1 << 30),
                   keep_connection_open=options.bool("keep_connection_open", True))

    # ------------------------------------------------------------------ sending

    async def payload_of(self, request) -> bytes:
        body = await read_body(request.body, 64 * 1024 * 1024)
        view = None
        if is_json_type(request.header("content-type")) and body.strip():
            try:
                view = json.loads(body)
            except ValueError:
                raise BadRequest("the JSON body is not a v2 message view") from None
        elif not body and isinstance(request.normalized, dict) and "MSH" in request.normalized:
            view = request.normalized
        if view is None:
            return body
        try:
            return to_er7(complete_header(view))
        except ViewError as e:
            raise BadRequest(f"cannot write the message as HL7 v2: {e}") from None

    def send(self, request):
        return defer.ensureDeferred(self._send(request))

    async def _send(self, request):
        payload = await self.payload_of(request)
        try:
            seps, fields = read_header(payload)
        except HL7Error as e:
            raise BadRequest(f"not an HL7 v2 message: {e.text}") from None
        control_id = unescape(fields[10], seps) if len(fields) > 10 else ""
        if not control_id:
            raise BadRequest("not an HL7 v2 message: MSH-10 (control ID) is missing")
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self.target_pool.call(
                    request, lambda target: defer.ensureDeferred(self.exchange(target, payload, control_id)))
            except (BackendTimeout, BackendUnavailable):
                if attempt > self.retries:
                    raise
            else:
                if response.status != 500 or attempt > self.retries:
                    return response
            # AE or no answer: the receiver may take it next time.
            await task.deferLater(self.reactor, self.retry_delay, lambda: None)

    async def exchange(self, target, payload: bytes, control_id: str) -> ResponseEnvelope:
        pool = self.connections.setdefault(target.name, _TargetConnections(self.max_connections))
        await pool.slots.acquire()
        conn = None
        try:
            conn = pool.take_idle() or await self.connect(target)
            d = conn.exchange(payload)
            d.addTimeout(self.ack_timeout, self.reactor)
            try:
                raw = await d
            except defer.TimeoutError:
                raise BackendTimeout(f"no ACK from {_address(target)} within {self.ack_timeout:g}s") from None
            try:
                info = hack.read_ack(raw)
            except HL7Error as e:
                raise BackendUnavailable(f"the receiver's answer is not an ACK: {e.text}") from None
            if info.control_id != control_id:
                raise BackendUnavailable("the receiver acknowledged another message (MSA-2)")
            if self.keep_connection_open:
                pool.idle.append(conn)
            else:
                conn.transport.loseConnection()  # type: ignore[misc]  # zope-style ITransport method, as in exchange
            conn = None
            status = STATUS_OF[info.code]
            return ResponseEnvelope(
                status=status, headers=Headers({b"content-type": [CONTENT_TYPE]}), body=raw,
                metadata={"hl7.ack_code": info.code, "upstream_status": info.code},
                state=ResponseState(hl7_ack=raw, hl7_ack_code=info.code, hl7_ack_info=info))
        finally:
            if conn is not None and conn.connected:
                conn.transport.abortConnection()  # never reuse a connection in an unknown state
            pool.slots.release()

    async def connect(self, target) -> MllpClientProtocol:
        if self.tls is not None:
            options = ssl.optionsForClientTLS(target.options.get("tls_server_name", target.host), **self.tls)
            endpoint: SSL4ClientEndpoint | TCP4ClientEndpoint = SSL4ClientEndpoint(
                self.reactor, target.host, target.port, options, timeout=self.connect_timeout)
        else:
            endpoint = TCP4ClientEndpoint(self.reactor, target.host, target.port, timeout=self.connect_timeout)
        try:
            return await connectProtocol(endpoint, MllpClientProtocol(self.max_ack_bytes))
        except Exception as e:  # noqa: BLE001 - every way of not connecting is "unreachable"
            raise BackendUnavailable(f"cannot connect to {_address(target)}: {type(e).__name__}") from None

    def close(self):
        self.target_pool.stop()
        for pool in self.connections.values():
            for conn in pool.idle:
                if conn.connected:
                    conn.transport.loseConnection()
            pool.idle.clear()
        return defer.succeed(None)


def _address(target) -> str:
    return f"{target.host}:{target.port}"


def complete_header(view: dict) -> dict:
    """Fill MSH-7 (now) and MSH-10 (a new control ID) when a view leaves them out."""
    msh = view.get("MSH")
    if isinstance(msh, dict):
        msh = [msh]
    if not isinstance(msh, list) or not msh or not isinstance(msh[0], dict):
        raise ViewError("MSH: a message view needs an MSH segment")
    header = dict(msh[0])
    header.setdefault("7", time.strftime("%Y%m%d%H%M%S", time.gmtime()))
    header.setdefault("10", hack.new_control_id())
    header.setdefault("11", "P")
    header.setdefault("12", "2.5")
    return {**view, "MSH": [header] + list(msh[1:])}


def client_tls_options(options) -> dict:
    """Keyword arguments for ``optionsForClientTLS``: ``tls_ca`` to trust (else the
    system's roots), ``tls_cert``/``tls_key`` for a client certificate."""
    kwargs = {}
    ca = options.path("tls_ca", None)
    try:
        if ca is not None:
            kwargs["trustRoot"] = ssl.Certificate.loadPEM(ca.read_bytes())
        if "tls_cert" in options or "tls_key" in options:
            pem = options.path("tls_cert").read_bytes() + b"\n" + options.path("tls_key").read_bytes()
            kwargs["clientCertificate"] = ssl.PrivateCertificate.loadPEM(pem)
    except (OSError, ValueError, ssl.SSL.Error) as e:
        raise OptionError("tls_cert" if ca is None else "tls_ca", f"cannot load: {e}") from None
    return kwargs
