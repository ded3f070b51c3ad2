"""harmony.web.fast_channel in memory (StringTransport, task.Clock): what it serves itself, what it
hands to twisted.web's channel, and hostile input at the head - pipelining, floods, aborts, slow and
malformed heads, oversized heads and bodies, idle connections; and the small request bodies it reads
itself for endpoints that name their method in ``fast_body_methods`` (STOW-RS): bodies in pieces,
dripped, late, cut off, oversized, chunked or expecting 100 Continue."""

from __future__ import annotations

import json

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from harmony.backends.base import Backend
from harmony.backends.echo import EchoBackend
from harmony.endpoints.fhir import FhirEndpoint
from harmony.endpoints.http import HttpEndpoint
from harmony.envelope import ResponseEnvelope
from harmony.errors import client_gone
from harmony.pipeline import Pipeline
from harmony.runtime import Route
from harmony.web import fast_channel
from harmony.web.fast_channel import PIPELINE_BUFFER, FastChannel
from harmony.web.router import HarmonySite, PrefixRouter
from harmony.web.streaming import HarmonyChannel


class HeldBackend(Backend):
    """Answers when the test says so: each request waits on its own Deferred."""

    def __init__(self):
        super().__init__("held")
        self.waiting: list[tuple] = []

    def send(self, request):
        d = defer.Deferred()
        self.waiting.append((request, d))
        return d


class Body:
    """A response body producer the test drives (IBodyProducer)."""

    length = UNKNOWN_LENGTH

    def __init__(self):
        self.consumer = None
        self.done = defer.Deferred()
        self.paused = self.stopped = False

    def startProducing(self, consumer):
        self.consumer = consumer
        return self.done

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        self.stopped = True


def connect(backend=None, *, max_body=None, body_methods=frozenset()):
    clock = task.Clock()
    api = HttpEndpoint("api", "/api")
    api.max_body_bytes = max_body
    api.fast_body_methods = body_methods
    fhir = FhirEndpoint("fhir", "/fhir")
    pipeline = Pipeline("p", [], [backend or EchoBackend("echo")])
    router = PrefixRouter("n", [Route("n", "/fhir", fhir, Pipeline("f", [], [EchoBackend("e")])),
                                Route("n", "/api", api, pipeline)])
    site = HarmonySite(router, reactor=clock)
    proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    proto.makeConnection(transport)
    return clock, proto, transport


def answered_with(backend, proto, data: bytes, body) -> None:
    """Send *data*, and answer its (last) request with *body*."""
    proto.dataReceived(data)
    backend.waiting[-1][1].callback(ResponseEnvelope(status=200, headers=Headers(), body=body))


def answers(data: bytes) -> list[tuple[bytes, dict, bytes]]:
    """(status line, headers, body) of each Content-Length framed answer in *data*."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b": ")
            headers[name.lower()] = value
        length = int(headers.get(b"content-length", b"0"))
        out.append((lines[0], headers, rest[:length]))
        data = rest[length:]
    return out


def test_a_bodyless_request_is_served_by_the_fast_channel_through_the_pipeline():
    _, proto, transport = connect()
    assert isinstance(proto, FastChannel)
    proto.dataReceived(b"GET /api/x?q=1 HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 10.0.0.9\r\n\r\n")
    [(status, headers, body)] = answers(transport.value())
    assert status == b"HTTP/1.1 200 OK"
    doc = json.loads(body)
    assert doc["subpath"] == "/x" and doc["query"] == {"q": ["1"]} and doc["headers"]["host"] == ["h"]
    assert doc["metadata"]["endpoint"] == "api" and doc["metadata"]["pipeline"] == "p"
    assert headers[b"x-request-id"].decode() == doc["metadata"]["request_id"]
    assert b"date" in headers and b"connection" not in headers
    assert proto._delegate is None and not transport.disconnecting  # kept alive, still ours


def test_a_network_without_fast_routes_keeps_twisted_webs_channel():
    site = HarmonySite(PrefixRouter("n", [Route("n", "/fhir", FhirEndpoint("fhir", "/fhir"), None)]))
    assert isinstance(site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)), HarmonyChannel)


def test_pipelined_requests_are_answered_in_order_one_at_a_time():
    backend = HeldBackend()
    _, proto, transport = connect(backend)
    proto.dataReceived(b"GET /api/1 HTTP/1.1\r\n\r\nGET /api/2 HTTP/1.1\r\n\r\nGET /api/3 HTTP/1.1\r\n\r\n")
    assert [r.subpath for r, _ in backend.waiting] == ["/1"]  # the next waits for this answer
    for n in (1, 2, 3):
        request, d = backend.waiting[-1]
        assert request.subpath == f"/{n}"
        d.callback(ResponseEnvelope(status=200, headers=Headers(), body=b"answer %d" % n))
    assert [body for _, _, body in answers(transport.value())] == [b"answer 1", b"answer 2", b"answer 3"]


def test_a_pipelining_flood_pauses_reading_until_the_answer_is_written():
    backend = HeldBackend()
    _, proto, transport = connect(backend)
    request = b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n"
    proto.dataReceived(request)
    flood = request * (PIPELINE_BUFFER // len(request) + 10)
    proto.dataReceived(flood)
    assert transport.producerState == "paused"  # bounded: no more is read while we answer
    assert len(backend.waiting) == 1
    backend.waiting[0][1].callback(ResponseEnvelope(status=204, headers=Headers(), body=b""))
    assert transport.producerState == "producing"
    assert len(backend.waiting) == 2  # and the next one is being served


def test_connection_close_and_http_1_0_keep_alive_rules():
    _, proto, transport = connect()
    proto.dataReceived(b"GET /api/x HTTP/1.1\r\nConnection: close\r\n\r\n")
    [(_, headers, _)] = answers(transport.value())
    assert headers[b"connection"] == b"close" and transport.disconnecting

    _, proto, transport = connect()
    proto.dataReceived(b"GET /api/x HTTP/1.0\r\n\r\n")
    assert answers(transport.value())[0][1][b"connection"] == b"close" and transport.disconnecting

    _, proto, transport = connect()
    proto.dataReceived(b"GET /api/x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert answers(transport.value())[0][1][b"connection"] == b"keep-alive" and not transport.disconnecting


def test_head_and_304_answers_carry_no_body_but_keep_the_length():
    backend = HeldBackend()
    _, proto, transport = connect(backend)
    proto.dataReceived(b"HEAD /api/x HTTP/1.1\r\n\r\n")
    backend.waiting[-1][1].callback(ResponseEnvelope(status=200, headers=Headers({b"content-length": [b"1234"]}),
                                                     body=b""))
    assert transport.value().endswith(b"Content-Length: 1234\r\n\r\n")
    transport.clear()
    proto.dataReceived(b"GET /api/x HTTP/1.1\r\nIf-None-Match: \"e\"\r\n\r\n")
    backend.waiting[-1][1].callback(ResponseEnvelope(status=304, headers=Headers({b"etag": [b'"e"']}), body=b""))
    assert transport.value().startswith(b"HTTP/1.1 304 ") and transport.value().endswith(b"\r\n\r\n")
    assert b"content-length" not in transport.value().lower() and not transport.disconnecting


def test_a_head_answer_with_a_producer_runs_it_and_sends_none_of_it():
    backend = HeldBackend()
    _, proto, transport = connect(backend)
    body = Body()
    body.length = 3
    answered_with(backend, proto, b"HEAD /api/x HTTP/1.1\r\n\r\n", body)
    body.consumer.write(b"abc")
    body.done.callback(None)
    assert transport.value().endswith(b"Content-Length: 3\r\n\r\n") and not transport.disconnecting


def test_hop_by_hop_and_connection_listed_headers_of_an_answer_are_dropped():
    backend = HeldBackend()
    _, proto, transport = connect(backend)
    proto.dataReceived(b"GET /api/x HTTP/1.1\r\n\r\n")
    backend.waiting[-1][1].callback(ResponseEnvelope(status=200, body=b"x", headers=Headers({
        b"connection": [b"x-private"], b"x-private": [b"secret"], b"keep-alive": [b"timeout=5"],
        b"transfer-encoding": [b"chunked"], b"x-kept": [b"yes"]})))
    [(_, headers, body)] = answers(transport.value())
    assert body == b"x" and headers[b"x-kept"] == b"yes"
    assert not {b"x-private", b"keep-alive", b"transfer-encoding"} & set(headers)


def test_a_streamed_answer_is_chunked_with_the_transport_pausing_its_producer():
    backend = HeldBackend()
    _, proto, transport = connect(backend)
    body = Body()
    answered_with(backend, proto, b"GET /api/x HTTP/1.1\r\n\r\nGET /api/y HTTP/1.1\r\n\r\n", body)
    assert transport.producer is body  # the socket's backpressure reaches the body
    transport.producer.pauseProducing()
    assert body.paused
    body.consumer.write(b"hello")
    body.consumer.write(b" world")
    body.done.callback(None)
    assert transport.producer is None
    head, _, rest = transport.value().partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert rest.startswith(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert [r.subpath for r, _ in backend.waiting] == ["/x", "/y"]  # then the pipelined one


def test_a_failing_streamed_answer_cuts_the_connection():
    backend = HeldBackend()
    _, proto, transport = connect(backend)
    body = Body()
    answered_with(backend, proto, b"GET /api/x HTTP/1.1\r\n\r\n", body)
    body.consumer.write(b"part")
    body.done.errback(Failure(RuntimeError("upstream broke off")))
    assert transport.disconnecting  # (StringTransport's abortConnection) never a clean end
    assert not transport.value().endswith(b"0\r\n\r\n")


def test_a_client_hanging_up_mid_answer_cancels_the_backend_and_stops_the_body():
    backend = HeldBackend()
    _, proto, transport = connect(backend)
    proto.dataReceived(b"GET /api/x HTTP/1.1\r\n\r\n")
    request, d = backend.waiting[0]
    proto.connectionLost(Failure(ConnectionResetError()))
    assert d.called and client_gone(request)  # cancelled, and counted as the client's doing
    assert transport.value() == b""
    # and mid-body: the body producer is told to stop
    backend = HeldBackend()
    _, proto, transport = connect(backend)
    body = Body()
    answered_with(backend, proto, b"GET /api/x HTTP/1.1\r\n\r\n", body)
    proto.connectionLost(Failure(ConnectionResetError()))
    assert body.stopped


def test_requests_with_a_body_go_to_twisted_web_with_their_limits():
    _, proto, transport = connect(max_body=10)
    proto.dataReceived(b"GET /api/a HTTP/1.1\r\n\r\n")  # fast first, on the same connection
    proto.dataReceived(b"POST /api/b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
    first, second = answers(transport.value())
    assert json.loads(first[2])["subpath"] == "/a"
    assert json.loads(second[2])["body"] == "hello"
    assert isinstance(proto._delegate, HarmonyChannel)
    transport.clear()
    proto.dataReceived(b"POST /api/c HTTP/1.1\r\nContent-Length: 11\r\n\r\n")  # refused at the head
    assert transport.value().startswith(b"HTTP/1.1 413 ")


def test_an_oversized_body_is_refused_at_the_head_on_a_fresh_connection():
    _, proto, transport = connect(max_body=10)
    proto.dataReceived(b"PUT /api/c HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ") and b"max_body_bytes" in transport.value()


def test_routes_that_did_not_opt_in_are_handed_off():
    _, proto, transport = connect()
    proto.dataReceived(b"GET /fhir/metadata HTTP/1.1\r\n\r\n")
    assert isinstance(proto._delegate, HarmonyChannel)
    assert b"TwistedWeb" in transport.value()  # served by twisted.web's Request


def test_malformed_and_oversized_heads_get_twisted_webs_answers():
    for data, status in [
        (b"GET /api/x HTTP/1.1\r\nBad Header Line\r\n\r\n", b"400"),
        (b"GET /api/x HTTP/9.9\r\n\r\n", b"400"),
        (b"GET /api/x HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", b"431"),
        (b"GET /api/x?" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n", b"414"),
        (b"POST /api/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n", b"400"),
        (b"GET /api/x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", b"400"),
        (b"GET /api/x HTTP/1.1\r\n" + b"X-A: b\r\n" * 600 + b"\r\n", b"400"),  # over twisted.web's 500 lines
    ]:
        _, proto, transport = connect()
        proto.dataReceived(data)
        assert transport.value().startswith(b"HTTP/1.1 " + status), (data[:60], transport.value()[:80])


def test_dot_segments_are_refused_on_the_fast_path_too():
    _, proto, transport = connect()
    proto.dataReceived(b"GET /api/../admin HTTP/1.1\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400 ") and b"problem+json" in transport.value()


def test_a_head_dripping_in_is_handed_off_and_cut_with_408():
    clock, proto, transport = connect()
    proto.dataReceived(b"GET /api/x HTTP/1.1\r\n")
    for _ in range(5):
        clock.advance(10)
        proto.dataReceived(b"X")
    assert transport.value().startswith(b"HTTP/1.1 408 ") and transport.disconnecting


def test_an_idle_connection_is_closed_once_after_the_sites_timeout_never_mid_answer():
    backend = HeldBackend()
    clock, proto, transport = connect(backend)
    timeout = proto.timeout
    proto.dataReceived(b"GET /api/x HTTP/1.1\r\n\r\n")
    clock.advance(timeout * 3)  # answering: the idle clock is off
    assert not transport.disconnecting
    backend.waiting[0][1].callback(ResponseEnvelope(status=204, headers=Headers(), body=b""))
    clock.advance(timeout - 1)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting
    assert len(clock.getDelayedCalls()) == 1  # only the abort that follows a close nobody completes
    clock.advance(fast_channel.ABORT_TIMEOUT)


def test_one_idle_timer_per_connection_not_per_request():
    clock, proto, transport = connect()
    for _ in range(20):
        proto.dataReceived(b"GET /api/x HTTP/1.1\r\n\r\n")
    assert len(clock.getDelayedCalls()) == 1


def test_the_fast_channel_names_the_server_as_twisted_web_does_unless_the_answer_has_its_own():
    _, proto, transport = connect()
    proto.dataReceived(b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n")
    [(_, fast, _)] = answers(transport.value())
    _, web_proto, web_transport = connect()
    web_proto.dataReceived(b"POST /api/x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")  # twisted.web's
    [(_, web, _)] = answers(web_transport.value())
    assert web_proto._delegate is not None and fast[b"server"] == web[b"server"]
    assert fast[b"server"].startswith(b"TwistedWeb/")
    backend = HeldBackend()
    _, proto, transport = connect(backend)
    proto.dataReceived(b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n")
    backend.waiting[-1][1].callback(ResponseEnvelope(status=200, headers=Headers({b"server": [b"upstream/1"]}),
                                                     body=b"ok"))
    [(_, headers, _)] = answers(transport.value())
    assert headers[b"server"] == b"upstream/1" and transport.value().count(b"erver:") == 1


# ------------------------------------------------- small bodies read by the fast channel itself

POST = frozenset({b"POST"})


def test_a_small_body_is_read_whole_and_served_on_the_fast_channel():
    _, proto, transport = connect(body_methods=POST)
    proto.dataReceived(b"POST /api/a HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello")
    assert transport.value() == b""  # not dispatched before the body is whole
    proto.dataReceived(b" world")
    proto.dataReceived(b"POST /api/b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /api/c HTTP/1.1\r\n\r\n")
    first, second, third = answers(transport.value())
    assert json.loads(first[2])["body"] == "hello world" and json.loads(second[2])["body"] == "abc"
    assert json.loads(third[2])["subpath"] == "/c"  # a body's end is where the next request begins
    assert first[1][b"x-request-id"] and b"connection" not in first[1]
    assert proto._delegate is None and not transport.disconnecting


def test_an_empty_post_and_a_body_dripped_a_byte_at_a_time_are_served_too():
    _, proto, transport = connect(body_methods=POST)
    proto.dataReceived(b"POST /api/e HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    payload = bytes(range(32, 127)) * 20
    proto.dataReceived(b"POST /api/d HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(payload))
    for i in range(len(payload)):
        assert len(answers(transport.value())) == 1
        proto.dataReceived(payload[i:i + 1])
    empty, dripped = answers(transport.value())
    assert json.loads(empty[2]).get("body", "") == "" and json.loads(dripped[2])["body"] == payload.decode()
    assert proto._delegate is None


def test_a_body_late_past_the_body_timeout_is_handed_to_twisted_web_with_every_byte():
    clock, proto, transport = connect(body_methods=POST)
    proto.dataReceived(b"POST /api/late HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345")
    clock.advance(proto.site.body_timeout + 0.1)
    assert isinstance(proto._delegate, HarmonyChannel)
    proto.dataReceived(b"67890")
    [(status, _, body)] = answers(transport.value())
    assert status == b"HTTP/1.1 200 OK" and json.loads(body)["body"] == "1234567890"


def test_a_body_that_stops_arriving_ends_in_twisted_webs_408():
    clock, proto, transport = connect(body_methods=POST)
    proto.dataReceived(b"POST /api/stall HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc")
    clock.advance(proto.site.body_timeout)  # handed off, twisted.web's body clock starts
    clock.advance(proto.site.body_timeout)  # a window with 3 bytes of the 256 B/s asked for
    assert transport.value().startswith(b"HTTP/1.1 408 ") and transport.disconnecting


def test_a_pending_body_holds_off_the_idle_timeout_and_its_own_clock_bounds_it():
    clock, proto, transport = connect(body_methods=POST)
    proto.site.body_timeout = proto.timeout * 2
    proto.dataReceived(b"POST /api/slow HTTP/1.1\r\nContent-Length: 4\r\n\r\nab")
    clock.advance(proto.timeout * 1.5)
    assert not transport.disconnecting and proto._delegate is None  # the body's clock, not the idle one
    clock.advance(proto.timeout)
    assert isinstance(proto._delegate, HarmonyChannel)


def test_a_client_leaving_mid_body_dispatches_nothing_and_leaves_no_timer():
    backend = HeldBackend()
    clock, proto, transport = connect(backend, body_methods=POST)
    proto.dataReceived(b"POST /api/gone HTTP/1.1\r\nContent-Length: 50\r\n\r\npartial")
    proto.connectionLost(Failure(ConnectionResetError()))
    assert backend.waiting == [] and clock.getDelayedCalls() == []


def test_bodies_the_fast_channel_does_not_read_whole_are_twisted_webs():
    big = fast_channel.INLINE_BODY_LIMIT + 1
    for head, expect in [
        (b"Content-Length: 11\r\n", b"HTTP/1.1 413 "),  # the endpoint's limit (10): refused at the head
        (b"Content-Length: %d\r\n" % big, b"HTTP/1.1 413 "),  # over the inline limit too
        (b"Transfer-Encoding: chunked\r\n", b""),  # chunked: twisted.web decodes it
        (b"Content-Length: 5\r\nExpect: 100-continue\r\n", b"HTTP/1.1 100 Continue"),
        (b"Content-Length: 5\r\nContent-Length: 5\r\n", b""),  # repeated: twisted.web's to judge
    ]:
        _, proto, transport = connect(max_body=10, body_methods=POST)
        proto.dataReceived(b"POST /api/x HTTP/1.1\r\n" + head + b"\r\n")
        assert isinstance(proto._delegate, HarmonyChannel), head
        assert transport.value().startswith(expect), (head, transport.value()[:60])
    _, proto, transport = connect(max_body=10, body_methods=POST)
    proto.dataReceived(b"PUT /api/x HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi")  # a method not named
    assert isinstance(proto._delegate, HarmonyChannel) and json.loads(answers(transport.value())[0][2])["body"] == "hi"


def test_a_smuggling_attempt_with_two_framings_is_not_read_here():
    _, proto, transport = connect(body_methods=POST)
    proto.dataReceived(b"POST /api/x HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"0\r\n\r\nGET /api/smuggled HTTP/1.1\r\n\r\n")
    assert proto._delegate is not None or transport.value().startswith(b"HTTP/1.1 400 ")
    assert b"/smuggled" not in transport.value()


def test_a_flood_after_a_body_pauses_reading_and_bodies_are_served_in_order():
    backend = HeldBackend()
    _, proto, transport = connect(backend, body_methods=POST)
    post = b"POST /api/p HTTP/1.1\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000
    proto.dataReceived(post[:1000])  # the first body in pieces...
    flood = post[1000:] + post * (PIPELINE_BUFFER // len(post) + 10)  # ...then more than the buffer holds
    for at in range(0, len(flood), 65536):
        proto.dataReceived(flood[at:at + 65536])
    assert transport.producerState == "paused" and len(backend.waiting) == 1
    for n in range(3):
        assert backend.waiting[n][0].body == b"x" * 2000
        backend.waiting[n][1].callback(ResponseEnvelope(status=204, headers=Headers(), body=b""))
    assert transport.producerState == "producing" and len(backend.waiting) == 4 and proto._delegate is None
