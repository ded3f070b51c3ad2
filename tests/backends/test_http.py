"""harmony.backends.http in memory: the reverse-proxy backend's Agent talking to a twisted.web Site
that listens on the same MemoryReactorClock (connections completed by tests.memory.Wires).  What
goes up (URL, headers a proxy owes its upstream, hop-by-hop ones dropped), what comes back (status,
streamed body, hop-by-hop headers named in Connection dropped), and the timeouts, on the clock."""

from __future__ import annotations

import json

import pytest
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from harmony.backends.http import HttpBackend, upstream_url
from harmony.envelope import read_body
from harmony.errors import BackendTimeout, BackendUnavailable
from tests.memory import Wires, build, failure_of, fired, plugin_context, request, result_of, upstream_site

PORT = 8042


class Upstream(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = []
        self.hold = False

    def render(self, req):
        self.seen.append(req)
        if self.hold:
            return NOT_DONE_YET  # never answers
        req.setResponseCode(207, b"Multi")
        req.setHeader(b"connection", b"x-internal")
        req.setHeader(b"x-internal", b"secret hop")
        req.setHeader(b"x-kept", b"yes")
        return json.dumps({"uri": req.uri.decode(), "body": req.content.read().decode()}).encode()


def _rig(**options):
    reactor = MemoryReactorClock()
    upstream = Upstream()
    upstream_site(reactor, upstream, PORT)
    backend = build(HttpBackend, {"base_url": f"http://127.0.0.1:{PORT}/base", **options}, name="up",
                    ctx=plugin_context(reactor))
    return backend, upstream, reactor, Wires(reactor)


def _body(response, wires):
    return result_of(wires.run(read_body(response.body)))


def test_a_request_goes_up_with_what_a_proxy_owes_and_comes_back_streamed():
    backend, upstream, _reactor, wires = _rig()
    req = request("POST", "/items/7", headers={"X-A": "1", "Connection": "close, X-Secret", "X-Secret": "hop",
                                               "Host": "client-facing.test"},
                  body=b"payload", raw_query=b"b=2&a=1", client_ip="192.0.2.9", host="client-facing.test",
                  metadata={"request_id": "rid-42"})
    response = result_of(wires.run(backend.send(req)))
    assert (response.status, response.reason) == (207, b"Multi")
    doc = json.loads(_body(response, wires))
    assert doc == {"uri": "/base/items/7?b=2&a=1", "body": "payload"}
    seen = upstream.seen[0].requestHeaders
    assert seen.getRawHeaders(b"x-a") == [b"1"] and not seen.hasHeader(b"x-secret")
    assert seen.getRawHeaders(b"x-forwarded-for") == [b"192.0.2.9"]
    assert seen.getRawHeaders(b"x-forwarded-host") == [b"client-facing.test"]
    assert seen.getRawHeaders(b"x-request-id") == [b"rid-42"]
    assert seen.getRawHeaders(b"host") == [b"127.0.0.1:8042"]
    assert response.headers.getRawHeaders(b"x-kept") == [b"yes"]
    assert not response.headers.hasHeader(b"x-internal")  # named in the upstream's Connection header


def test_the_connection_is_kept_for_the_next_request():
    backend, upstream, _reactor, wires = _rig()
    for _ in range(2):
        response = result_of(wires.run(backend.send(request("GET", "/x"))))
        _body(response, wires)
    assert len(upstream.seen) == 2 and len(wires.pumps) == 1


def test_an_upstream_that_does_not_answer_is_a_504_on_the_clock():
    backend, upstream, reactor, wires = _rig(timeout_secs=5)
    upstream.hold = True
    d = wires.run(backend.send(request("GET", "/slow")))
    reactor.advance(4)
    assert not fired(d)
    reactor.advance(1.5)
    failure_of(d, BackendTimeout)


def test_nothing_listening_is_a_502():
    backend, _upstream, reactor, wires = _rig()
    d = backend.send(request("GET", "/x"))
    _host, _port, factory, _timeout, _bind = reactor.tcpClients.pop()
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))  # what the kernel would say
    assert "unreachable" in str(failure_of(d, BackendUnavailable))


@pytest.mark.parametrize("base, subpath, query, expected", [
    ("http://u", "", b"", b"http://u/"),
    ("http://u/base", "", b"q=1", b"http://u/base?q=1"),
    ("http://u/base", "/a%2Fb", b"", b"http://u/base/a%2Fb"),
])
def test_upstream_url(base, subpath, query, expected):
    assert upstream_url(base, subpath, query) == expected


def test_head_deadlines_share_one_timer_and_expire_only_the_unanswered():
    """Bodyless requests' head deadlines share one DelayedCall, re-armed for the
    oldest unanswered request; an answered one is never expired."""
    from twisted.internet.task import Clock

    from harmony.backends.http import HeadDeadlines

    clock = Clock()
    deadlines = HeadDeadlines(clock, 5.0)
    expired = []
    first = deadlines.start(lambda: expired.append("first"))
    clock.advance(2)
    deadlines.start(lambda: expired.append("second"))
    third = deadlines.start(lambda: expired.append("third"))
    assert len(clock.getDelayedCalls()) == 1
    deadlines.stop(first)
    deadlines.stop(third)
    clock.advance(3)  # the first's deadline: answered, nothing expires, re-armed for the second
    assert expired == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(1.999)
    assert expired == []
    clock.advance(0.001)
    assert expired == ["second"]
    assert clock.getDelayedCalls() == []
    deadlines.close()


def test_a_stuck_request_does_not_hold_the_deadlines_answered_after_it():
    """One request the upstream never answers keeps only its own entry: the
    requests answered after it leave at once, and the ones still waiting
    expire at their own deadlines, not at the stuck one's."""
    from twisted.internet.task import Clock

    from harmony.backends.http import HeadDeadlines

    clock = Clock()
    deadlines = HeadDeadlines(clock, 30.0)
    expired = []
    deadlines.start(lambda: expired.append("stuck"))
    for _ in range(1000):  # steady traffic behind it, each answered at once (7.8 s in all)
        clock.advance(0.0078125)  # (a power of two: the clock adds up exactly)
        deadlines.stop(deadlines.start(lambda: expired.append("answered")))
    assert len(deadlines) == 1  # was 1001 until the stuck one's deadline
    clock.advance(7.1875)  # 15 s
    deadlines.start(lambda: expired.append("late"))  # due at 45 s
    clock.advance(15)  # 30 s: the stuck one's deadline
    assert expired == ["stuck"] and len(deadlines) == 1
    assert len(clock.getDelayedCalls()) == 1  # re-armed for the late one, nothing else
    clock.advance(14.999)
    assert expired == ["stuck"]
    clock.advance(0.001)
    assert expired == ["stuck", "late"] and len(deadlines) == 0
    assert clock.getDelayedCalls() == []
    deadlines.close()


def test_a_deadline_set_while_one_expires_keeps_a_single_timer():
    """An expiry that starts another attempt (a retry on another target) sets a
    deadline from inside the timer: still one timer, armed for the earliest."""
    from twisted.internet.task import Clock

    from harmony.backends.http import HeadDeadlines

    clock = Clock()
    deadlines = HeadDeadlines(clock, 10.0)
    expired = []
    deadlines.start(lambda: (expired.append("first"), deadlines.start(lambda: expired.append("retry"))))
    clock.advance(4)
    deadlines.start(lambda: expired.append("second"))  # due at 14
    clock.advance(6)
    assert expired == ["first"] and len(clock.getDelayedCalls()) == 1
    clock.advance(4)
    assert expired == ["first", "second"]
    clock.advance(6)  # the retry's own deadline: 10 s after it started
    assert expired == ["first", "second", "retry"] and clock.getDelayedCalls() == []


@pytest.mark.parametrize("pieces", [1, 2], ids=["whole", "streamed"])
def test_a_proxied_request_leaves_no_reference_cycle(pieces):
    """The plain passthrough (fast channel, endpoint, pipeline, this backend, a pooled upstream
    connection, in memory) leaves nothing for the cyclic collector, whether the answer came whole
    or its body streamed after the head: an answer and its exchange held each other (and a streamed
    body's producer, its relay and its timer), so every proxied request was freed only by a
    collection (bench/http_passthrough: ~7 % of a passthrough process's CPU)."""
    import gc

    from twisted.internet import task
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from harmony.endpoints.http import HttpEndpoint
    from harmony.pipeline import Pipeline
    from harmony.runtime import Route
    from harmony.web import upstream_client
    from harmony.web.router import HarmonySite, PrefixRouter

    clock = task.Clock()
    backend = HttpBackend("up", ["http://127.0.0.1:8081"], clock)
    router = PrefixRouter("default", [Route("default", "/", HttpEndpoint("all", "/"), Pipeline("p", [], [backend]))])
    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    channel = HarmonySite(router, reactor=clock).buildProtocol(peer)
    client_side = StringTransport(peerAddress=peer)
    channel.makeConnection(client_side)
    target, _ = backend.client._target(b"http://127.0.0.1:8081/")
    conn = upstream_client._Connection(backend.client, target.key)
    upstream_side = StringTransport()
    conn.makeConnection(upstream_side)
    backend.client.release(conn)
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\n"
              b"ETag: \"x\"\r\n\r\nhello")

    def proxied():
        channel.dataReceived(b"GET /a?b=c HTTP/1.1\r\nHost: h\r\nX-Request-ID: r-1\r\n\r\n")
        assert upstream_side.value().startswith(b"GET /a?b=c HTTP/1.1\r\n")
        if pieces == 1:
            conn.dataReceived(answer)
        else:
            conn.dataReceived(answer[:-3])
            conn.dataReceived(answer[-3:])
        assert client_side.value().startswith(b"HTTP/1.1 200 OK\r\n") and client_side.value().endswith(b"hello")
        client_side.clear()
        upstream_side.clear()

    proxied()
    gc.collect()
    gc.disable()
    try:
        before = {id(o) for o in gc.get_objects()}  # what earlier tests left is not these requests'
        for _ in range(5):
            proxied()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection would free stays in gc.garbage, to be named
        gc.collect()
        assert [type(o).__qualname__ for o in gc.garbage if id(o) not in before] == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert backend.client.idle_connections() == 1


def test_a_client_that_raises_at_once_leaves_no_head_deadline_behind():
    """``client.request`` raising before any exchange exists: the deadline set for it
    goes too (it used to stay, and fired later at an attempt with nothing to cancel)."""
    from twisted.internet.task import Clock
    from twisted.web.http_headers import Headers

    clock = Clock()
    backend = HttpBackend("up", ["http://127.0.0.1:8081"], clock)

    def refuse(*args, **kwargs):
        raise ValueError("no such scheme")

    backend.client.request = refuse
    with pytest.raises(ValueError):
        backend.request(b"GET", b"http://127.0.0.1:8081/x", Headers(), None)
    assert len(backend.head_deadlines) == 0
    clock.advance(backend.timeout + 1)   # nothing left to fire (it raised here before the fix)
