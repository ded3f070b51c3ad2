"""Helpers for the fast in-memory tier: a component built from its options, Deferreds read at once.

Why: a test of one middleware, backend or endpoint should not start a whole Harmony.  Types are
built the way the runtime builds them (``from_config(name, Options(...), ctx)``) and driven with
envelopes; what would be the network is a ``StringTransport``, a ``MemoryReactorClock`` or treq's
``StubTreq``.  Every Deferred here fires synchronously, so a test reads its result at once, with
no reactor turn and no sleep.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from harmony.config.options import Options
from harmony.envelope import RequestEnvelope, ResponseEnvelope


def result_of(value):
    """The result of *value* (a Deferred that must already have fired successfully, or a plain value)."""
    if not isinstance(value, defer.Deferred):
        return value
    results: list = []
    value.addBoth(results.append)
    assert results, f"{value!r} has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def fired(d) -> bool:
    """Whether *d* has its final result (``d.called`` is also true for a Deferred that was
    fired but is paused waiting on another one)."""
    results: list = []
    d.addBoth(lambda result: results.append(True) or result)
    return bool(results)


def failure_of(value, *kinds):
    """The exception a fired Deferred (or a call that raised) failed with, checked against *kinds*."""
    results: list = []
    value.addBoth(results.append)
    assert results, f"{value!r} has not fired"
    assert isinstance(results[0], Failure), f"succeeded with {results[0]!r}"
    error = results[0].value
    if kinds:
        assert isinstance(error, kinds), repr(error)
    return error


def build(cls, options: dict | None = None, *, name: str = "under_test", ctx=None, base_dir: Path | None = None):
    """``cls.from_config`` with *options* as a config file would give them."""
    return cls.from_config(name, Options(options or {}, base_dir), ctx)


def request(method="GET", subpath="/", *, headers: dict | None = None, body=b"", path=None, **kwargs):
    """A RequestEnvelope with text headers."""
    raw = Headers()
    for key, value in (headers or {}).items():
        raw.setRawHeaders(key, [value] if isinstance(value, (str, bytes)) else list(value))
    return RequestEnvelope(method=method, path=path or subpath, subpath=subpath, headers=raw, body=body, **kwargs)


def response(status=200, *, headers: dict | None = None, body=b"", **kwargs):
    raw = Headers()
    for key, value in (headers or {}).items():
        raw.setRawHeaders(key, [value] if isinstance(value, (str, bytes)) else list(value))
    return ResponseEnvelope(status=status, headers=raw, body=body, **kwargs)


class HttpStub:
    """An HTTP endpoint mounted on a real twisted.web Site in memory (treq's StubTreq):
    requests go through twisted.web's parser and the endpoint's ``render_http``, the
    pipeline runs for real, and nothing listens on a port."""

    def __init__(self, endpoint, backends, middleware=(), prefix: str | None = None):
        from treq.testing import StubTreq

        from harmony.pipeline import Pipeline
        from harmony.runtime import Route
        from harmony.web.router import PrefixRouter

        self.pipeline = Pipeline("memory", list(middleware), list(backends))
        route = Route("default", prefix if prefix is not None else endpoint.path_prefix, endpoint, self.pipeline)
        self.treq = StubTreq(PrefixRouter("default", [route]))

    def request(self, method: str, path: str, **kwargs):
        """(response, body bytes) once the exchange is over."""
        d = self.treq.request(method, "http://harmony.test" + path, **kwargs)
        self.treq.flush()
        answer = result_of(d)
        body = self.treq.content(answer)
        self.treq.flush()
        return answer, result_of(body)


class Answering:
    """A backend that answers each request with *respond(request)* (a ResponseEnvelope, a
    Deferred, or an exception to raise), and keeps what it was sent."""

    def __init__(self, respond, name: str = "answering"):
        from zope.interface import directlyProvides

        from harmony.interfaces import IBackend
        self.name = name
        self.respond = respond
        self.requests: list = []
        directlyProvides(self, IBackend)

    def send(self, request):
        self.requests.append(request)
        answer = self.respond(request)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _echo_pipeline() -> str:
    from tests.harness import echo_pipeline
    return echo_pipeline("main", "/api", "api", "be")


#: One pipeline: the ``http`` endpoint ``api`` at /api to the echo backend ``be``.
ECHO_PIPELINE = _echo_pipeline()


def built_runtime(folder: Path, main: str = "", pipelines: str = ECHO_PIPELINE):
    """A runtime built (not started) from a config written into *folder*: every component made
    the way ``harmony`` makes it, nothing listening.  *main* is added to a minimal ``[proxy]``."""
    from harmony.config import load_config
    from harmony.runtime import build_runtime
    from tests.harness import MINIMAL_MAIN, write_config
    path = write_config(folder, MINIMAL_MAIN + main, {"main": pipelines})
    return build_runtime(load_config(path))


class Wires:
    """TCP connections on a MemoryReactorClock, completed in memory (twisted.test.iosim).

    A server listens with ``reactor.listenTCP(port, factory)``; the code under test connects with
    ``connectTCP`` (or an endpoint on that reactor) as it would to a real peer; :meth:`run` joins
    each pending connection to the listener on its port and moves bytes both ways until a Deferred
    fires.  Nothing touches a socket."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.pumps: list = []

    def run(self, d, rounds: int = 50):
        for _ in range(rounds):
            if fired(d):
                break
            self.connect_pending()
            for pump in self.pumps:
                pump.flush()
        return d

    def connect_pending(self):
        from twisted.internet.address import IPv4Address
        from twisted.test import iosim
        while self.reactor.tcpClients:
            host, port, client_factory, _timeout, _bind = self.reactor.tcpClients.pop(0)
            listeners = [f for p, f, *_rest in self.reactor.tcpServers if p == port]
            assert listeners, f"nothing listens on port {port} in this test"
            peer = IPv4Address("TCP", "127.0.0.1", 40000 + len(self.pumps))
            server = listeners[0].buildProtocol(peer)
            client = client_factory.buildProtocol(IPv4Address("TCP", host, port))
            self.pumps.append(iosim.connect(server, iosim.makeFakeServer(server),
                                            client, iosim.makeFakeClient(client), greet=False))


def tls_handshake(server_options, client_options, greeting: bytes = b"hello"):
    """A TLS connection in memory (TLSMemoryBIOFactory over twisted.test.iosim): the client sends
    *greeting*, the server echoes it.  Returns (bytes the client got back, its connectionLost reason
    or None): the greeting when the handshake succeeded, b"" and a reason when either side refused."""
    from twisted.internet import task
    from twisted.internet.protocol import Factory, Protocol
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from twisted.test import iosim

    class Echo(Protocol):
        def dataReceived(self, data):
            self.transport.write(data)

    class Client(Protocol):
        received, lost = b"", None

        def connectionMade(self):
            self.transport.write(greeting)

        def dataReceived(self, data):
            self.received += data

        def connectionLost(self, reason):
            self.lost = reason

    client_protocol = Client()
    clock = task.Clock()  # TLS aggregates small writes until a clock turns: the pump turns this one
    server = TLSMemoryBIOFactory(server_options, False, Factory.forProtocol(Echo), clock=clock).buildProtocol(None)
    client = TLSMemoryBIOFactory(client_options, True, Factory.forProtocol(lambda: client_protocol),
                                 clock=clock).buildProtocol(None)
    iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), clock=clock).flush()
    return client_protocol.received, client_protocol.lost


def plugin_context(reactor, **more):
    """The BuildContext a plug-in's ``from_config`` reads, for types built outside a runtime."""
    import types
    return types.SimpleNamespace(reactor=reactor, component=None, targets=lambda: [],
                                 config=types.SimpleNamespace(targets={}, backends={}), **more)


def upstream_site(reactor, resource, port: int):
    """*resource* served by a twisted.web Site listening on *port* of a MemoryReactorClock,
    reached through :class:`Wires` by any Agent built on that reactor."""
    from twisted.web.server import Site
    reactor.listenTCP(port, Site(resource, reactor=reactor), interface="127.0.0.1")
