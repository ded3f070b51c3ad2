"""Request bodies stream upstream while they are still arriving (harmony.web.streaming)."""

import json
import os

import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.web.iweb import UNKNOWN_LENGTH

from harmony.envelope import BytesProducer

from tests.harness import MINIMAL_MAIN, echo_pipeline, proxy_pipeline, start_harmony, write_config

SAFETY = 30  # seconds: a guard against hanging, never a synchronisation
MiB = 1024 * 1024

TYPES = '\n[middleware_types.deny]\nmodule = "tests.pipeline_types:Deny"\n'


class Waiter:
    """Deferreds that fire when a predicate over the bytes so far holds."""

    def __init__(self):
        self.data = b""
        self.waiting = []
        self.lost = defer.Deferred()

    def until(self, predicate):
        d = defer.Deferred()
        self.waiting.append((predicate, d))
        self._check()
        return d.addTimeout(SAFETY, reactor)

    def _check(self):
        for item in list(self.waiting):
            predicate, d = item
            if predicate(self.data):
                self.waiting.remove(item)
                d.callback(self.data)

    def received(self, data):
        self.data += data
        self._check()


class RawPeer(Protocol):
    def __init__(self, waiter: Waiter, greeting: bytes = b""):
        self.waiter = waiter
        self.greeting = greeting

    def connectionMade(self):
        if self.greeting:
            self.transport.write(self.greeting)

    def dataReceived(self, data):
        self.waiter.received(data)

    def connectionLost(self, reason):
        self.waiter.lost.callback(type(reason.value).__name__)


class RawUpstream(Factory):
    """Records what the proxy sends; answers 200 once *expect* body bytes arrived."""

    def __init__(self, expect: int):
        self.waiter = Waiter()
        self.expect = expect
        self.peer = None

    def body(self):
        return self.waiter.data.partition(b"\r\n\r\n")[2]

    def buildProtocol(self, addr):
        self.peer = RawPeer(self.waiter)

        def answer(_):
            self.peer.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        self.waiter.until(lambda data: len(self.body()) >= self.expect).addCallbacks(answer, lambda f: None)
        return self.peer


async def harmony_for(tmp_path, upstream_url):
    pipes = (proxy_pipeline(upstream_url)
             + proxy_pipeline(upstream_url, "guarded", "/guarded", "guarded", "up2", middleware=["deny"])
             + echo_pipeline(endpoint="echo", backend="echo"))
    path = write_config(tmp_path, MINIMAL_MAIN + TYPES, {"p": pipes})
    return await start_harmony(path)


async def raw_client(running, greeting=b""):
    waiter = Waiter()
    proto = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", running.port()), RawPeer(waiter, greeting))
    return proto, waiter


def head(path, length=None, chunked=False):
    lines = [f"POST {path} HTTP/1.1", "Host: h", "Content-Type: application/octet-stream"]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest_twisted.ensureDeferred
async def test_upstream_receives_body_before_client_finished(tmp_path):
    body = os.urandom(4 * MiB)
    upstream = RawUpstream(len(body))
    port = reactor.listenTCP(0, upstream, interface="127.0.0.1")
    running = await harmony_for(tmp_path, f"http://127.0.0.1:{port.getHost().port}")
    try:
        client, answer = await raw_client(running, head("/api/upload", len(body)) + body[:MiB])
        # Only 1 MiB of 4 has been sent: the upstream already sees most of it.
        await upstream.waiter.until(lambda data: len(upstream.body()) >= MiB // 2)
        request_head = upstream.waiter.data.partition(b"\r\n\r\n")[0].lower()
        assert b"content-length: 4194304" in request_head
        client.transport.write(body[MiB:])
        response = await answer.until(lambda data: data.endswith(b"ok"))
        assert response.startswith(b"HTTP/1.1 200")
        assert upstream.body() == body
        client.transport.loseConnection()
    finally:
        await running.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_client_abort_mid_upload_closes_upstream(tmp_path):
    upstream = RawUpstream(8 * MiB)
    port = reactor.listenTCP(0, upstream, interface="127.0.0.1")
    running = await harmony_for(tmp_path, f"http://127.0.0.1:{port.getHost().port}")
    try:
        client, _ = await raw_client(running, head("/api/upload", 8 * MiB) + b"\0" * MiB)
        await upstream.waiter.until(lambda data: len(upstream.body()) >= MiB // 2)
        client.transport.abortConnection()
        outcome = await upstream.waiter.lost.addTimeout(SAFETY, reactor)
        assert outcome in ("ConnectionDone", "ConnectionLost")
    finally:
        await running.stop()
        await port.stopListening()


def unknown_length(data: bytes):
    """A body producer that does not say its length, so the client sends it chunked."""
    producer = BytesProducer(data)
    producer.length = UNKNOWN_LENGTH
    return producer


@pytest_twisted.ensureDeferred
async def test_chunked_upload_is_byte_exact(tmp_path, upstream):
    running = await harmony_for(tmp_path, upstream.url)
    try:
        body = os.urandom(600 * 1024 + 3)
        resp = await treq.post(running.url("/api/chunked"), unknown_length(body))
        doc = json.loads(await resp.content())
        assert resp.code == 200 and doc["length"] == len(body)
        assert upstream.requests[-1]["body"] == body
        # Small chunked bodies stream too (their size is unknown up front).
        resp = await treq.post(running.url("/api/small"), unknown_length(b"tiny"))
        await resp.content()
        assert upstream.requests[-1]["body"] == b"tiny"
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_answer_before_body_end_closes_the_connection(tmp_path, upstream):
    running = await harmony_for(tmp_path, upstream.url)
    try:
        _, answer = await raw_client(running, head("/guarded/x", 8 * MiB) + b"\0" * (512 * 1024))
        outcome = await answer.lost.addTimeout(SAFETY, reactor)
        assert answer.data.startswith(b"HTTP/1.1 401 ")
        assert b"application/problem+json" in answer.data
        assert outcome in ("ConnectionDone", "ConnectionLost")
        assert upstream.requests == []
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_keep_alive_continues_after_a_streamed_request(tmp_path):
    running = await harmony_for(tmp_path, "http://127.0.0.1:9")
    try:
        body = b"a" * (300 * 1024)
        second = b"GET /echo/second HTTP/1.1\r\nHost: h\r\n\r\n"
        client, answer = await raw_client(running, head("/echo/first", len(body)) + body + second)
        data = await answer.until(lambda d: d.count(b"HTTP/1.1 200 OK") == 2 and d.endswith(b"}"))
        assert b'"subpath":"/first"' in data and b'"subpath":"/second"' in data
        first_doc = json.loads(data.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1")[0])
        assert len(first_doc["body"]) == len(body)
        client.transport.loseConnection()
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_small_bodies_are_still_read_whole_and_parsed(tmp_path):
    running = await harmony_for(tmp_path, "http://127.0.0.1:9")
    try:
        resp = await treq.post(running.url("/echo/json"), json.dumps({"a": [1, 2]}).encode(),
                               headers={"Content-Type": "application/json"})
        doc = json.loads(await resp.content())
        assert doc["normalized"] == {"a": [1, 2]}
    finally:
        await running.stop()


def test_deadline_waits_for_a_slow_upload_then_for_the_answer():
    """timeout_secs measures an upstream that does not answer, not a slow upload:
    each body chunk pushes the deadline back, and it restarts once the body is sent."""
    from twisted.internet import task

    from harmony.backends.streams import DeadlineBody

    clock = task.Clock()
    fired = []
    deadline = clock.callLater(10, fired.append, "expired")

    class Manual:
        length = UNKNOWN_LENGTH

        def startProducing(self, consumer):
            self.consumer = consumer
            self.done = defer.Deferred()
            return self.done

    class Sink(list):
        def write(self, data):
            self.append(data)

    inner, sink = Manual(), Sink()
    body = DeadlineBody(inner, deadline, 10)
    finished = body.startProducing(sink)
    for _ in range(5):  # 40 s of upload in total, never 10 s without progress
        clock.advance(8)
        inner.consumer.write(b"chunk")
    assert fired == [] and sink == [b"chunk"] * 5
    clock.advance(8)
    inner.done.callback(None)  # body sent: now the wait for the response head starts
    assert finished.called
    clock.advance(9.9)
    assert fired == []
    clock.advance(0.2)
    assert fired == ["expired"]


class FakeClient:
    """The reading side of a client connection: records pause/resume."""

    def __init__(self):
        self.paused = False

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False


class PausingSink(list):
    def write(self, data):
        self.append(data)


def test_streaming_body_flow_control():
    """Memory stays bounded: the client is paused while the backend is not taking
    data (not started yet, or its connection full) and resumed when it is."""
    from harmony.web.streaming import BUFFER_LIMIT, StreamingBody

    client, sink = FakeClient(), PausingSink()
    body = StreamingBody(client, length=None)
    chunk = b"x" * 65536
    # Nobody reads yet: buffer up to the limit, then stop reading from the client.
    while not client.paused:
        body.feed(chunk)
    assert body._buffered == BUFFER_LIMIT
    finished = body.startProducing(sink)
    assert b"".join(sink) == chunk * (BUFFER_LIMIT // len(chunk)) and not client.paused
    # The backend's connection is full: the client is paused again, data waits.
    body.pauseProducing()
    assert client.paused
    body.feed(b"late")
    assert sink[-1] == chunk
    body.resumeProducing()
    assert sink[-1] == b"late" and not client.paused
    assert not finished.called
    body.finish()
    assert finished.called and body.received == BUFFER_LIMIT + 4


def test_streaming_body_reports_a_client_that_left():
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    from harmony.web.streaming import StreamingBody

    body = StreamingBody(FakeClient(), length=10)
    finished = body.startProducing(PausingSink())
    body.feed(b"12345")
    body.fail(Failure(ConnectionLost()))
    failures = []
    finished.addErrback(failures.append)
    assert failures and failures[0].check(ConnectionLost)
