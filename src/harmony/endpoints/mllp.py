"""``mllp`` endpoint: Harmony as an HL7 v2 receiver (MLLP over TCP or TLS).

Hospitals still move most of their messages as HL7 v2 over MLLP; this
endpoint takes them into the same pipeline as every other protocol.  Each
framed message becomes a :class:`RequestEnvelope` (``protocol = hl7v2``,
the raw bytes as body, the JSON view of :mod:`harmony.hl7.jsonview` in
``normalized``, ``hl7.*`` metadata) and the acknowledgement is sent only
once the pipeline answered: the backend has the message, or the durable
relay (``store_forward``) has it on disk.  A failure is an AE (the sender may
send again), a refusal an AR, both with an ERR segment saying why.

One connection handles one message at a time, in order (MLLP is a
request/acknowledge protocol): while a message is in the pipeline the
connection is not read, so a sender that floods gets TCP back-pressure,
and the framing decoder never holds more than ``max_message_bytes``.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter, OrderedDict, deque
from pathlib import Path

from twisted.application.service import Service
from twisted.internet import defer, ssl
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer, provider

from harmony.config.errors import OptionError
from harmony.envelope import RequestEnvelope, ResponseEnvelope, new_request_id
from harmony.errors import BackendTimeout, HarmonyError
from harmony.hl7 import ack as hack
from harmony.hl7.framing import FramingError, MessageTooLarge, MllpDecoder, frame
from harmony.hl7.jsonview import to_view
from harmony.hl7.message import APPLICATION_INTERNAL_ERROR, CHARSETS, DUPLICATE_KEY, HL7Error, V2Message, parse_message
from harmony.interfaces import IComponentFactory, IEndpoint
from harmony.log import get_logger
from harmony.state import RequestState

log = get_logger("harmony.endpoints.mllp")

CONTENT_TYPE = b"x-application/hl7-v2+er7"
DUPLICATE_POLICIES = ("ack", "reject")


def hl7_error_for(error: HarmonyError) -> HL7Error:
    """A proxy error as HL7: a failure that may pass (5xx: backend down, timeout)
    is AE, so the sender tries again; a refusal (4xx) is AR."""
    code = hack.ERROR if error.status >= 500 else hack.REJECT
    return HL7Error(APPLICATION_INTERNAL_ERROR, error.detail or error.title, ack_code=code, segment="")


class DuplicateWindow:
    """Control IDs seen lately, per sender: (MSH-3, MSH-4, MSH-10) -> the first
    message's positive ACK, or the Deferred of the first one still in flight."""

    def __init__(self, seconds: float, clock, max_entries: int = 100_000):
        self.seconds = seconds
        self.clock = clock
        self.max_entries = max_entries
        self.done: OrderedDict = OrderedDict()  # key -> (time, ack bytes)
        self.in_flight: dict = {}

    @staticmethod
    def key(message: V2Message) -> tuple:
        return (message.field(3), message.field(4), message.control_id)

    def _expire(self):
        cut = self.clock.seconds() - self.seconds
        while self.done:
            key, (at, _) = next(iter(self.done.items()))
            if at >= cut and len(self.done) <= self.max_entries:
                break
            self.done.popitem(last=False)

    def seen(self, key):
        self._expire()
        entry = self.done.get(key)
        return entry[1] if entry else None

    def remember(self, key, acks: list[bytes]):
        self.done[key] = (self.clock.seconds(), acks)
        self.done.move_to_end(key)
        self._expire()


class MllpServerProtocol(Protocol, TimeoutMixin):
    def __init__(self, endpoint: "MllpEndpoint"):
        self.endpoint = endpoint
        self.decoder = MllpDecoder(endpoint.max_message_bytes)
        self.pending: deque = deque()
        self.busy = False
        self.gone = False
        self.peer = ""

    def connectionMade(self):
        ep = self.endpoint
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", "")
        if not ep.source_allowed(self.peer):
            log.warn("mllp {name}: connection from {peer} refused (not in allowed_sources)",
                     name=ep.name, peer=self.peer)
            ep.refused["source not allowed"] += 1
            self.transport.abortConnection()
            return
        if len(ep.connections) >= ep.max_connections:
            log.warn("mllp {name}: connection from {peer} refused (max_connections {n})",
                     name=ep.name, peer=self.peer, n=ep.max_connections)
            ep.refused["too many connections"] += 1
            self.transport.abortConnection()
            return
        ep.connections.add(self)
        # An ACK is one small write per message: never hold it back for Nagle.
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        self.setTimeout(ep.idle_timeout)

    def timeoutConnection(self):
        log.info("mllp {name}: closing idle connection from {peer}", name=self.endpoint.name, peer=self.peer)
        self.transport.abortConnection()

    def dataReceived(self, data: bytes):
        if self.gone:
            return
        self.resetTimeout()
        try:
            messages = self.decoder.feed(data)
        except FramingError as e:
            what = "oversized message" if isinstance(e, MessageTooLarge) else "bad framing"
            log.warn("mllp {name}: {what} from {peer}: {error}; connection closed", name=self.endpoint.name,
                     what=what, peer=self.peer, error=str(e))
            self.endpoint.refused[what] += 1
            self.gone = True
            self.transport.abortConnection()
            return
        self.pending.extend(messages)
        self._next()

    def _next(self):
        if self.busy or self.gone:
            return
        if not self.pending:
            self.transport.resumeProducing()
            self.setTimeout(self.endpoint.idle_timeout)
            return
        self.busy = True
        # One message at a time: stop reading (back-pressure) and the idle timer
        # (a slow backend is not an idle client) until it is acknowledged.
        self.transport.pauseProducing()
        self.setTimeout(None)
        raw = self.pending.popleft()
        d = defer.ensureDeferred(self.endpoint.handle(raw, self.peer, secure=self.endpoint.tls is not None))
        d.addCallbacks(self._answer, self._crashed)

    def _answer(self, acks):
        self.busy = False
        if not self.gone:
            for ack in acks:
                self.endpoint.acks_sent[_ack_code(ack)] += 1
                self.transport.write(frame(ack))
        self._next()

    def _crashed(self, failure: Failure):
        log.failure("mllp {name}: handling a message failed", failure, name=self.endpoint.name)
        self.busy = False
        self.gone = True
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self.gone = True
        self.setTimeout(None)
        self.endpoint.connections.discard(self)
        self.pending.clear()


class _MllpFactory(Factory):
    noisy = False

    def __init__(self, endpoint):
        self.endpoint = endpoint

    def buildProtocol(self, addr):
        return MllpServerProtocol(self.endpoint)


@implementer(IEndpoint)
@provider(IComponentFactory)
class MllpEndpoint(Service):
    transport = "mllp"
    protocol = "hl7v2"

    def __init__(self, name, reactor, *, bind_addr="127.0.0.1", port=2575, tls=None, allowed_sources=None,
                 idle_timeout=300.0, max_message_bytes=1024 * 1024, max_connections=100, request_timeout=60.0,
                 ack_mode="auto", duplicate_window=0.0, duplicate_policy="ack", default_charset="utf-8",
                 json_view=True):
        self.name = name
        self.reactor = reactor
        self.bind_addr = bind_addr
        self.port = port
        self.tls = tls
        self.allowed_sources = allowed_sources
        self.idle_timeout = idle_timeout
        self.max_message_bytes = max_message_bytes
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.ack_mode = ack_mode
        self.duplicates = DuplicateWindow(duplicate_window, reactor) if duplicate_window > 0 else None
        self.duplicate_policy = duplicate_policy
        self.default_charset = default_charset
        #: False: no JSON view in ``normalized`` (a pure relay skips parsing the body).
        self.json_view = json_view
        self.pipeline = None
        self.listening_port = None
        self.connections: set = set()
        #: refusals by reason (oversized message, bad framing, parse error, duplicate, source, connections)
        self.refused: Counter = Counter()
        #: ACKs sent, by MSA-1 code (harmony_hl7_acks)
        self.acks_sent: Counter = Counter()

    @classmethod
    def from_config(cls, name, options, ctx):
        tls = None
        if "tls_cert" in options or "tls_key" in options:
            cert, key = options.path("tls_cert"), options.path("tls_key")
            ca = options.path("tls_ca", None)
            try:
                tls = server_tls(cert, key, ca)
            except (OSError, ValueError, ssl.SSL.Error) as e:
                raise OptionError("tls_cert", f"cannot load the certificate/key: {e}") from None
        elif "tls_ca" in options:
            raise OptionError("tls_ca", "needs tls_cert and tls_key")
        sources = None
        raw_sources = options.list("allowed_sources", None, of=str)
        if raw_sources is not None:
            try:
                sources = [ipaddress.ip_network(s, strict=False) for s in raw_sources]
            except ValueError as e:
                raise OptionError("allowed_sources", f"{e}") from None
        charset = options.str("default_charset", "UNICODE UTF-8")
        if charset.upper() not in CHARSETS:
            raise OptionError("default_charset", f"unknown HL7 character set {charset!r} "
                                                 f"(one of {', '.join(sorted(CHARSETS))})")
        return cls(
            name, ctx.reactor, bind_addr=options.str("bind_addr", "127.0.0.1"), port=options.port("port", 2575),
            tls=tls, allowed_sources=sources,
            idle_timeout=options.number("idle_timeout_secs", 300.0, minimum=0.01),
            max_message_bytes=options.int("max_message_bytes", 1024 * 1024, minimum=64, maximum=1 << 30),
            max_connections=options.int("max_connections", 100, minimum=1, maximum=100_000),
            request_timeout=options.number("request_timeout_secs", 60.0, minimum=0.01),
            ack_mode=options.str("ack_mode", "auto", choices=("auto", "original")),
            duplicate_window=options.number("duplicate_window_secs", 0.0, minimum=0),
            duplicate_policy=options.str("duplicate_policy", "ack", choices=DUPLICATE_POLICIES),
            default_charset=CHARSETS[charset.upper()],
            json_view=options.bool("json_view", True),
        )

    # ------------------------------------------------------------------ service

    @property
    def listen_description(self) -> str:
        return f"mllp{'+tls' if self.tls is not None else ''}:{self.bind_addr}:{self.port}"

    @property
    def bound_port(self) -> int | None:
        return self.listening_port.getHost().port if self.listening_port is not None else None

    def source_allowed(self, host: str) -> bool:
        if self.allowed_sources is None:
            return True
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in net for net in self.allowed_sources)

    def startService(self):
        super().startService()
        factory = _MllpFactory(self)
        if self.tls is not None:
            endpoint = SSL4ServerEndpoint(self.reactor, self.port, self.tls, interface=self.bind_addr)
        else:
            endpoint = TCP4ServerEndpoint(self.reactor, self.port, interface=self.bind_addr)
        d = endpoint.listen(factory)

        def up(port):
            self.listening_port = port
            log.info("mllp {name} listening on {host}:{port}", name=self.name, host=self.bind_addr,
                     port=port.getHost().port)
            return port

        def down(f):
            log.critical("mllp {name} cannot listen on {host}:{port}: {error}", name=self.name,
                         host=self.bind_addr, port=self.port, error=f.getErrorMessage())
            return f

        self.listening = d.addCallbacks(up, down)
        return self.listening

    def stopService(self):
        super().stopService()
        for conn in list(self.connections):
            conn.transport.abortConnection()
        if self.listening_port is not None:
            port, self.listening_port = self.listening_port, None
            return defer.maybeDeferred(port.stopListening)
        return None

    # ------------------------------------------------------------------ pipeline glue

    def pre_process(self, request):
        return request

    def post_process(self, request, response):
        return response

    def error_response(self, error: HarmonyError, request):
        hl7_error = hl7_error_for(error)
        resp = ResponseEnvelope.json(error.status, {"detail": error.detail})
        resp.state.hl7_error = hl7_error
        resp.metadata["hl7.ack_code"] = hl7_error.ack_code
        return resp

    def envelope(self, message: V2Message, peer: str, secure: bool) -> RequestEnvelope:
        md = {"protocol": "hl7v2", "request_id": new_request_id(), "endpoint": self.name}
        md.update(message.metadata())
        # path names the message for routing rules; subpath "/" posts to an
        # HTTP/FHIR backend's base URL (a FHIR transaction Bundle, say).
        path = f"/{message.message_type}/{message.trigger_event}".rstrip("/")
        headers = Headers({b"content-type": [CONTENT_TYPE]})
        return RequestEnvelope(method="POST", path=path, subpath="/", headers=headers, body=message.raw,
                               metadata=md, normalized=to_view(message) if self.json_view else None,
                               client_ip=peer,
                               scheme="mllps" if secure else "mllp", host=self.name,
                               state=RequestState(hl7_message=message))

    async def handle(self, raw: bytes, peer: str, secure: bool = False) -> list[bytes]:
        """One message in, the ACK(s) to send back (possibly none in enhanced mode)."""
        try:
            message = parse_message(raw, self.default_charset)
        except HL7Error as e:
            self.refused["parse error"] += 1
            log.info("mllp {name}: refused a message from {peer}: {error} (HL7 {code})", name=self.name,
                     peer=peer, error=e.text, code=e.code)
            return [hack.build_ack(e.ack_code, error=e, text=e.text)]
        key = None
        if self.duplicates is not None:
            key = self.duplicates.key(message)
            earlier = self.duplicates.in_flight.get(key)
            if earlier is not None:
                await _wait(earlier)  # the first copy decides what this one gets
            previous = self.duplicates.seen(key)
            if previous is not None:
                self.refused["duplicate"] += 1
                log.info("mllp {name}: duplicate control ID from {peer} ({policy})", name=self.name, peer=peer,
                         policy=self.duplicate_policy)
                if self.duplicate_policy == "ack":
                    return previous  # answered as the first time, not sent on again
                refusal = HL7Error(DUPLICATE_KEY, "duplicate message control ID (MSH-10) within the duplicate window",
                                   field=10)
                return [self._ack(message, hack.REJECT, error=refusal, text=refusal.text)]
            waiter: defer.Deferred[None] = defer.Deferred()
            self.duplicates.in_flight[key] = waiter
        try:
            acks, positive = await self._through_pipeline(message, peer, secure)
        finally:
            if key is not None:
                self.duplicates.in_flight.pop(key).callback(None)
        if key is not None and positive:
            self.duplicates.remember(key, acks)
        return acks

    async def _through_pipeline(self, message: V2Message, peer: str, secure: bool) -> tuple[list[bytes], bool]:
        try:
            request = self.envelope(message, peer, secure)
        except HL7Error as e:
            self.refused["parse error"] += 1
            return [self._ack(message, e.ack_code, error=e, text=e.text)], False
        if self.pipeline is None:
            response = self.error_response(HarmonyError("no pipeline serves this endpoint"), request)
        else:
            d = self.pipeline.handle(request, self)
            d.addTimeout(self.request_timeout, self.reactor)
            try:
                response = await d
            except defer.TimeoutError:
                response = self.error_response(BackendTimeout("the pipeline did not answer in time"), request)
        downstream = response.state.hl7_ack  # an MLLP backend's peer's own ACK
        error = response.state.hl7_error
        if error is not None:
            code, text = error.ack_code, error.text
        elif downstream is not None:
            code, text = response.state.hl7_ack_code or hack.ACCEPT, ""
        elif 200 <= response.status < 300:
            code, text = hack.ACCEPT, ""
        else:
            code = hack.ERROR if response.status >= 500 else hack.REJECT
            error = HL7Error(APPLICATION_INTERNAL_ERROR, f"the backend answered {response.status}", ack_code=code,
                             segment="")
            text = error.text
        positive = code in hack.POSITIVE
        if error is not None:
            log.info("mllp {name}: {code} for control ID {control_id} from {peer}: {error}", name=self.name,
                     code=code, control_id=message.control_id, peer=peer, error=error.text)
        original = code if code in (hack.ACCEPT, hack.ERROR, hack.REJECT) else {
            "CA": hack.ACCEPT, "CE": hack.ERROR, "CR": hack.REJECT}.get(code, hack.ERROR)
        if self.ack_mode == "auto" and hack.is_enhanced(message):
            acks = []
            commit = hack.COMMIT_OF[original]
            if hack.wanted(message.accept_ack_type or hack.ALWAYS, commit):
                acks.append(self._ack(message, commit, error=error, text=text))
            if message.application_ack_type and hack.wanted(message.application_ack_type, original):
                acks.append(downstream if downstream is not None else
                            self._ack(message, original, error=error, text=text))
            return acks, positive
        if downstream is not None:
            return [downstream], positive
        return [self._ack(message, original, error=error, text=text)], positive

    def _ack(self, message, code, *, error=None, text=""):
        return hack.build_ack(code, message, error=error, text=text, now=time.time())


def _ack_code(ack: bytes) -> str:
    """MSA-1 of an ACK we are about to send (for metrics), without parsing it."""
    start = ack.find(b"\rMSA")
    if start < 0 or len(ack) < start + 7:
        return "other"
    code = ack[start + 5:start + 7].decode("latin-1")
    return code if code in ("AA", "AE", "AR", "CA", "CE", "CR") else "other"


async def _wait(d: defer.Deferred):
    mine: defer.Deferred[None] = defer.Deferred()

    def release(result):
        mine.callback(None)
        return result

    d.addBoth(release)
    await mine


def server_tls(cert_path, key_path, ca_path=None):
    """Twisted TLS options for the listener; with *ca_path*, clients must present
    a certificate signed by it (mutual TLS)."""
    pem = Path(cert_path).read_bytes() + b"\n" + Path(key_path).read_bytes()
    private = ssl.PrivateCertificate.loadPEM(pem)
    if ca_path is None:
        return private.options()
    ca = ssl.Certificate.loadPEM(Path(ca_path).read_bytes())
    return private.options(ca)
