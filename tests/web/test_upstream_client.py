"""harmony.web.upstream_client against scripted upstreams on 127.0.0.1.

The upstream here is a plain Twisted protocol writing exactly the bytes a test
gives it (a real socket, no mock of the client's side): that is the only way to
be an upstream that breaks HTTP/1.1 on purpose.  Well-behaved real upstreams
(twisted.web, nginx, Orthanc) are the rest of the suite's passthrough tests.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from harmony.envelope import BytesProducer
from harmony.web.client import DirectEndpointFactory
from harmony.web.upstream_client import MAX_HEAD_BYTES, UpstreamClient

SAFETY = 10.0  # guards against hanging for ever; no synchronisation


class Scripted(Protocol):
    """Answers each complete request head (and its Content-Length body) with the
    next scripted answer; ``None`` in the script closes the connection instead."""

    def connectionMade(self):
        self.factory.connections.append(self)
        self.buffer = b""

    def dataReceived(self, data):
        self.buffer += data
        while True:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            chunked = b"transfer-encoding: chunked" in head.lower()
            if chunked:
                end = rest.find(b"0\r\n\r\n")
                if end < 0:
                    return
                body, self.buffer = rest[:end + 5], rest[end + 5:]
            else:
                if len(rest) < length:
                    return
                body, self.buffer = rest[:length], rest[length:]
            self.factory.requests.append((head, body))
            answer = self.factory.script.pop(0) if self.factory.script else None
            if answer is None:
                self.transport.loseConnection()
                return
            if callable(answer):
                answer(self)
            else:
                self.transport.write(answer)

    def connectionLost(self, reason):
        self.factory.closed.append(self)
        waiting, self.factory.waiting_close = self.factory.waiting_close, []
        for d in waiting:
            d.callback(None)


class ScriptedFactory(Factory):
    protocol = Scripted
    noisy = False

    def __init__(self, script):
        self.script = list(script)
        self.connections, self.closed, self.requests, self.waiting_close = [], [], [], []

    def next_close(self):
        d = defer.Deferred()
        self.waiting_close.append(d)
        return d


class Collect(Protocol):
    def __init__(self):
        self.data = b""
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.reason = reason
        self.done.callback(None)  # (a Failure given to callback() would errback)


@pytest.fixture
def upstream():
    """(factory, base URL, client); everything stops at the end."""
    made = []

    def make(*script, **client_options):
        factory = ScriptedFactory(script)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        client = UpstreamClient(reactor, DirectEndpointFactory(reactor, 5, None), **client_options)
        made.append((port, client, factory))
        return factory, f"http://127.0.0.1:{port.getHost().port}".encode(), client

    yield make
    for port, client, factory in made:
        pytest_twisted.blockon(client.closeCachedConnections())
        for conn in factory.connections:
            conn.transport.abortConnection()
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


async def fetch(client, url, method=b"GET", body=None, headers=None):
    response = await client.request(method, url, headers, body).addTimeout(SAFETY, reactor)
    sink = Collect()
    response.deliverBody(sink)
    await sink.done.addTimeout(SAFETY, reactor)
    return response, sink.data, sink.reason


def ok(body=b"ok", extra=b""):
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@pytest_twisted.ensureDeferred
async def test_keep_alive_connection_serves_the_next_request(upstream):
    factory, base, client = upstream(ok(b"one"), ok(b"two"))
    first = await fetch(client, base + b"/a?x=1")
    second = await fetch(client, base + b"/b")
    assert (first[1], second[1]) == (b"one", b"two")
    assert first[2].check(ResponseDone) and second[2].check(ResponseDone)
    assert len(factory.connections) == 1
    assert factory.requests[0][0].startswith(b"GET /a?x=1 HTTP/1.1\r\nHost: 127.0.0.1:")


@pytest_twisted.ensureDeferred
async def test_chunked_and_close_delimited_bodies(upstream):
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    def close_delimited(proto):
        proto.transport.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        proto.transport.loseConnection()

    factory, base, client = upstream(chunked, close_delimited)
    response, data, reason = await fetch(client, base + b"/c")
    assert data == b"abcde" and reason.check(ResponseDone) and response.length is UNKNOWN_LENGTH
    assert not response.headers.hasHeader(b"transfer-encoding")  # framing, not the message's
    response, data, reason = await fetch(client, base + b"/d")
    assert data == b"until the end" and reason.check(PotentialDataLoss)
    assert len(factory.connections) == 1 and client.idle_connections() == 0


@pytest_twisted.ensureDeferred
async def test_interim_1xx_answers_are_skipped(upstream):
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n" + ok(b"final")
    factory, base, client = upstream(interim, ok(b"next"))
    response, data, _ = await fetch(client, base + b"/")
    assert response.code == 200 and data == b"final" and not response.headers.hasHeader(b"link")
    assert (await fetch(client, base + b"/"))[1] == b"next"
    assert len(factory.connections) == 1


@pytest_twisted.ensureDeferred
async def test_head_204_and_304_have_no_body_and_keep_the_connection(upstream):
    factory, base, client = upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\nETag: \"x\"\r\n\r\n",
        ok(b"after"))
    head, data, reason = await fetch(client, base + b"/", method=b"HEAD")
    assert (head.code, head.length, data) == (200, 0, b"") and reason.check(ResponseDone)
    assert head.headers.getRawHeaders(b"content-length") == [b"10"]  # the GET's length, for the client
    assert (await fetch(client, base + b"/"))[1] == b""
    not_modified, data, _ = await fetch(client, base + b"/")
    assert (not_modified.code, data, not_modified.headers.getRawHeaders(b"etag")) == (304, b"", [b'"x"'])
    assert (await fetch(client, base + b"/"))[1] == b"after"
    assert len(factory.connections) == 1


@pytest_twisted.ensureDeferred
async def test_connection_header_stays_so_the_names_it_lists_can_be_dropped(upstream):
    factory, base, client = upstream(ok(extra=b"Connection: X-Internal\r\nX-Internal: secret\r\nKeep-Alive: 5\r\n"))
    response, _, _ = await fetch(client, base + b"/")
    assert response.headers.getRawHeaders(b"connection") == [b"X-Internal"]
    assert not response.headers.hasHeader(b"keep-alive")


@pytest_twisted.ensureDeferred
async def test_request_bodies_with_length_and_chunked(upstream):
    factory, base, client = upstream(ok(), ok(), ok())

    chunked = BytesProducer(b"abc")
    chunked.length = UNKNOWN_LENGTH
    await fetch(client, base + b"/", b"POST", BytesProducer(b"12345"),
                Headers({b"content-type": [b"text/plain"], b"host": [b"evil"]}))
    await fetch(client, base + b"/", b"PUT", chunked)
    await fetch(client, base + b"/", b"POST")
    (head1, body1), (head2, body2), (head3, _) = factory.requests
    assert b"Content-Length: 5" in head1 and b"Content-Type: text/plain" in head1 and body1 == b"12345"
    assert b"evil" not in head1  # Host is the client's to write, from the URL
    assert b"Transfer-Encoding: chunked" in head2 and body2 == b"3\r\nabc\r\n0\r\n\r\n"
    assert b"Content-Length: 0" in head3


@pytest_twisted.ensureDeferred
async def test_a_body_longer_than_declared_fails_the_request(upstream):
    from twisted.web.client import RequestGenerationFailed
    factory, base, client = upstream(ok())

    liar = BytesProducer(b"too long")
    liar.length = 2
    with pytest.raises(RequestGenerationFailed):
        await fetch(client, base + b"/", b"POST", liar)


# ----------------------------------------------------------------- hostile


@pytest_twisted.ensureDeferred
async def test_garbage_instead_of_an_answer(upstream):
    factory, base, client = upstream(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    closing = factory.next_close()
    with pytest.raises(ResponseFailed):
        await fetch(client, base + b"/")
    await closing.addTimeout(SAFETY, reactor)  # dropped, never pooled
    assert client.idle_connections() == 0


@pytest_twisted.ensureDeferred
async def test_an_endless_header_line_is_refused_at_the_limit(upstream):
    sent = []

    def endless(proto):
        proto.transport.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        sent.append(0)

        def more():
            if proto.transport.disconnected or sent[0] > 64 * MAX_HEAD_BYTES:
                return
            proto.transport.write(b"a" * 65536)
            sent[0] += 65536
            reactor.callLater(0, more)
        more()

    factory, base, client = upstream(endless)
    with pytest.raises(ResponseFailed) as failed:
        await fetch(client, base + b"/")
    assert "over" in str(failed.value.reasons[0].value)
    assert sent[0] < 16 * MAX_HEAD_BYTES  # cut near the limit, not after megabytes


def dripped(pieces):
    """An answer script writing *pieces* one reactor turn apart, until the client hangs up."""
    def script(proto):
        queue = list(pieces)

        def more():
            if proto.transport.disconnected or not queue:
                return
            proto.transport.write(queue.pop(0))
            reactor.callLater(0, more)
        more()
    return script


@pytest_twisted.ensureDeferred
async def test_a_head_of_many_ordinary_lines_in_small_packets_is_refused_at_the_limit(upstream):
    # 1 KB lines: each is fine, and fewer than MAX_HEADERS of them, but together over MAX_HEAD_BYTES.
    lines = [b"HTTP/1.1 200 OK\r\n"] + [b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(2 * MAX_HEAD_BYTES // 1000)]
    factory, base, client = upstream(dripped(lines + [b"Content-Length: 2\r\n\r\nok"]))
    closing = factory.next_close()
    with pytest.raises(ResponseFailed) as failed:
        await fetch(client, base + b"/")
    assert "over" in str(failed.value.reasons[0].value)
    await closing.addTimeout(SAFETY, reactor)
    assert client.idle_connections() == 0


@pytest_twisted.ensureDeferred
async def test_an_endless_run_of_interim_answers_is_refused_at_the_head_limit(upstream):
    factory, base, client = upstream(dripped([b"HTTP/1.1 100 Continue\r\n\r\n" * 100] * 100))
    with pytest.raises(ResponseFailed) as failed:
        await fetch(client, base + b"/")
    assert "over" in str(failed.value.reasons[0].value)


@pytest_twisted.ensureDeferred
async def test_too_many_header_lines_are_refused(upstream):
    factory, base, client = upstream(ok(extra=b"".join(b"X-%d: 1\r\n" % i for i in range(300))))
    with pytest.raises(ResponseFailed):
        await fetch(client, base + b"/")


@pytest_twisted.ensureDeferred
async def test_a_reset_mid_body_is_a_failed_body_not_a_short_one(upstream):
    factory, base, client = upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    response = await client.request(b"GET", base + b"/").addTimeout(SAFETY, reactor)
    factory.connections[0].transport.abortConnection()  # after the head (and "partial") arrived
    sink = Collect()
    response.deliverBody(sink)
    await sink.done.addTimeout(SAFETY, reactor)
    assert sink.data == b"partial" and sink.reason.check(ResponseFailed)


@pytest_twisted.ensureDeferred
async def test_leftover_bytes_after_an_answer_retire_the_connection(upstream):
    factory, base, client = upstream(ok(b"one") + ok(b"unasked"), ok(b"two"))
    assert (await fetch(client, base + b"/"))[1] == b"one"
    assert (await fetch(client, base + b"/"))[1] == b"two"
    assert len(factory.connections) == 2  # the first was not trusted again


@pytest_twisted.ensureDeferred
async def test_bytes_on_an_idle_connection_retire_it(upstream):
    factory, base, client = upstream(ok(b"one"), ok(b"two"))
    assert (await fetch(client, base + b"/"))[1] == b"one"
    closing = factory.next_close()
    factory.connections[0].transport.write(ok(b"nobody asked"))
    await closing.addTimeout(SAFETY, reactor)
    assert client.idle_connections() == 0
    assert (await fetch(client, base + b"/"))[1] == b"two"


@pytest_twisted.ensureDeferred
async def test_a_101_upgrade_nobody_asked_for_is_refused(upstream):
    factory, base, client = upstream(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")
    with pytest.raises(ResponseFailed):
        await fetch(client, base + b"/")


# --------------------------------------------- stale connections, cancelling


@pytest_twisted.ensureDeferred
async def test_a_stale_keep_alive_connection_is_retried_for_an_idempotent_request(upstream):
    # The upstream closes (without answering) when the second request arrives on
    # the kept connection, as one whose keep-alive timer just ran out does.
    factory, base, client = upstream(ok(b"one"), None, ok(b"fresh"))
    assert (await fetch(client, base + b"/"))[1] == b"one"
    assert (await fetch(client, base + b"/"))[1] == b"fresh"
    assert len(factory.connections) == 2


@pytest_twisted.ensureDeferred
async def test_a_streamed_body_is_not_sent_twice(upstream):
    class Streamed:
        """Not replayable: a client's upload arriving as it goes."""

        def __init__(self, data):
            self.data, self.length = data, len(data)

        def startProducing(self, consumer):
            consumer.write(self.data)
            return defer.succeed(None)

        def pauseProducing(self):
            pass

        resumeProducing = stopProducing = pauseProducing

    factory, base, client = upstream(ok(b"one"), None, ok(b"never"))
    assert (await fetch(client, base + b"/"))[1] == b"one"
    with pytest.raises(ResponseNeverReceived):
        await fetch(client, base + b"/", b"PUT", Streamed(b"data"))
    assert len(factory.requests) == 2  # sent once


@pytest_twisted.ensureDeferred
async def test_a_post_is_not_sent_twice_even_with_an_in_memory_body(upstream):
    factory, base, client = upstream(ok(b"one"), None, ok(b"never"))
    assert (await fetch(client, base + b"/"))[1] == b"one"
    with pytest.raises(ResponseNeverReceived):
        await fetch(client, base + b"/", b"POST", BytesProducer(b"x"))
    assert len(factory.requests) == 2


@pytest_twisted.ensureDeferred
async def test_cancelling_before_the_answer_drops_the_connection(upstream):
    factory, base, client = upstream(lambda proto: None)  # never answers
    d = client.request(b"GET", base + b"/")
    while not factory.requests:
        await deferLater0()
    closing = factory.next_close()
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    await closing.addTimeout(SAFETY, reactor)
    assert client.idle_connections() == 0


@pytest_twisted.ensureDeferred
async def test_stop_producing_a_body_drops_the_connection_not_a_pooled_one(upstream):
    factory, base, client = upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\nsome", ok(b"next"))
    response = await client.request(b"GET", base + b"/").addTimeout(SAFETY, reactor)
    sink = Collect()
    response.deliverBody(sink)
    closing = factory.next_close()
    sink.transport.stopProducing()  # our client went away
    await sink.done.addTimeout(SAFETY, reactor)
    assert sink.reason.check(ResponseFailed)
    await closing.addTimeout(SAFETY, reactor)
    assert (await fetch(client, base + b"/"))[1] == b"next"
    sink.transport.stopProducing()  # late: the next exchange's connection is not touched
    assert client.idle_connections() == 1


def deferLater0():
    from twisted.internet import task
    return task.deferLater(reactor, 0, lambda: None)


# ------------------------------------------------------------- flow control

LIMIT = 16 * 1024 * 1024  # kernel socket buffers plus Twisted's are a few MiB on loopback
CHUNK = b"z" * 65536


class Source:
    """A push producer writing CHUNKs to a transport until told to pause; counts bytes."""

    def __init__(self, transport, total):
        self.transport, self.total, self.sent = transport, total, 0
        self.paused = defer.Deferred()
        self.running = True

    def start(self):
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self):
        self.running = True
        while self.running and self.sent < self.total:
            self.transport.write(CHUNK)
            self.sent += len(CHUNK)
        if self.sent >= self.total:
            self.transport.unregisterProducer()

    def pauseProducing(self):
        self.running = False
        if not self.paused.called:
            self.paused.callback(self.sent)

    def stopProducing(self):
        self.running = False


@pytest_twisted.ensureDeferred
async def test_a_slow_reader_pauses_the_upstream_with_bounded_buffering(upstream):
    total = 64 * 1024 * 1024
    sources = []

    def big(proto):
        proto.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        sources.append(Source(proto.transport, total))
        sources[0].start()

    factory, base, client = upstream(big)
    response = await client.request(b"GET", base + b"/").addTimeout(SAFETY, reactor)

    class Slow(Collect):
        def dataReceived(self, data):
            self.data_len = getattr(self, "data_len", 0) + len(data)
            self.transport.pauseProducing()  # after the first chunk, like a client that stopped reading

    sink = Slow()
    response.deliverBody(sink)
    sent_when_paused = await sources[0].paused.addTimeout(SAFETY, reactor)
    assert sent_when_paused < LIMIT and sink.data_len < LIMIT
    sink.dataReceived = lambda data: setattr(sink, "data_len", sink.data_len + len(data))
    sink.transport.resumeProducing()
    await sink.done.addTimeout(60, reactor)
    assert sink.data_len == total and sink.reason.check(ResponseDone)


@pytest_twisted.ensureDeferred
async def test_an_upstream_that_stops_reading_pauses_the_request_body(upstream):
    factory, base, client = upstream()
    body_paused = defer.Deferred()

    class Upload:
        length = UNKNOWN_LENGTH

        def startProducing(self, consumer):
            self.consumer, self.sent, self.finished = consumer, 0, defer.Deferred()
            self.resumeProducing()
            return self.finished

        def resumeProducing(self):
            self.running = True
            while self.running and self.sent < 256 * 1024 * 1024:
                self.consumer.write(CHUNK)
                self.sent += len(CHUNK)

        def pauseProducing(self):
            self.running = False
            if not body_paused.called:
                body_paused.callback(self.sent)

        def stopProducing(self):
            self.running = False

    upload = Upload()
    d = client.request(b"POST", base + b"/", None, upload)
    while not factory.connections:
        await deferLater0()
    factory.connections[0].transport.pauseProducing()  # the upstream stops reading
    sent = await body_paused.addTimeout(SAFETY, reactor)
    assert sent < LIMIT
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d


# ------------------------------------------------- through Harmony's http backend


@pytest.fixture
def proxied(tmp_path, upstream):
    """A Harmony (in-process) whose /api proxies to a scripted upstream: (factory, Harmony)."""
    from tests.harness import MINIMAL_MAIN, proxy_pipeline, start_harmony, write_config
    running = []

    async def make(*script):
        factory, base, _client = upstream(*script)
        config = write_config(tmp_path, MINIMAL_MAIN, {"p": proxy_pipeline(base.decode(), timeout_secs=5)})
        running.append(await start_harmony(config))
        return factory, running[0]

    yield make
    for harmony in running:
        pytest_twisted.blockon(harmony.stop())


async def get(url):
    import treq
    response = await treq.get(url).addTimeout(SAFETY, reactor)
    return response, await response.content()


@pytest.mark.parametrize("answer", [
    b"SSH-2.0-OpenSSH_9.2\r\n\r\n",  # not HTTP
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (2 * MAX_HEAD_BYTES) + b"\r\n\r\n",  # a head over the limit
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",  # two lengths: smuggling
], ids=["garbage", "oversized-head", "two-lengths"])
@pytest_twisted.ensureDeferred
async def test_a_broken_upstream_answer_is_a_502_problem(proxied, answer):
    import json
    factory, harmony = await proxied(answer)
    response, body = await get(harmony.url("/api/x"))
    assert response.code == 502
    assert response.headers.getRawHeaders("content-type") == ["application/problem+json"]
    assert json.loads(body)["status"] == 502


@pytest_twisted.ensureDeferred
async def test_leftover_bytes_never_become_the_next_clients_answer(proxied):
    factory, harmony = await proxied(ok(b"first") + ok(b"smuggled"), ok(b"second"))
    assert (await get(harmony.url("/api/a")))[1] == b"first"
    assert (await get(harmony.url("/api/b")))[1] == b"second"


@pytest_twisted.ensureDeferred
async def test_an_upstream_that_never_accepts_is_a_504_after_the_connect_timeout(tmp_path):
    """A listening socket whose accept queue is full: the kernel drops further SYNs,
    so connecting hangs as it does to a host that is down."""
    import json
    import socket

    from tests.harness import MINIMAL_MAIN, proxy_pipeline, start_harmony, write_config
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=5)  # takes the one place in the queue
    harmony = await start_harmony(write_config(tmp_path, MINIMAL_MAIN, {"p": proxy_pipeline(
        f"http://127.0.0.1:{port}", timeout_secs=30, connect_timeout_secs=0.3)}))
    try:
        response, body = await get(harmony.url("/api/x"))
        assert response.code == 504 and json.loads(body)["detail"] == "timed out connecting to upstream"
    finally:
        await harmony.stop()
        filler.close()
        full.close()


@pytest_twisted.ensureDeferred
async def test_a_body_that_came_with_its_head_is_whole_a_longer_one_streams(upstream):
    factory, base, client = upstream(ok(b"small"), b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
    small = await client.request(b"GET", base + b"/").addTimeout(SAFETY, reactor)
    assert small.whole_body() == b"small"
    assert client.idle_connections() == 1  # back in the pool before anyone read the body
    partial = await client.request(b"GET", base + b"/").addTimeout(SAFETY, reactor)
    assert partial.whole_body() is None
    sink = Collect()
    partial.deliverBody(sink)
    factory.connections[0].transport.write(b"-rest")
    await sink.done.addTimeout(SAFETY, reactor)
    assert sink.data == b"first-rest" and sink.reason.check(ResponseDone)


@pytest_twisted.ensureDeferred
async def test_a_whole_upstream_body_passes_through_uncompressed_to_a_gzip_client(proxied):
    from tests.harness import raw_exchange
    plain = b'{"a": "' + b"x" * 4000 + b'"}'
    factory, harmony = await proxied(ok(plain, b"Content-Type: application/json\r\n"))
    answer = await raw_exchange(harmony.port(), b"GET /api/x HTTP/1.1\r\nHost: h\r\nAccept-Encoding: gzip\r\n"
                                                b"X-Forwarded-For: 198.51.100.7\r\nConnection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-encoding" not in head.lower(), head  # the upstream's choice stands
    assert body == plain


def test_end_to_end_headers_drop_hop_by_hop_and_connection_listed_names_in_any_case():
    from harmony.web.upstream_client import UpstreamResponse

    pairs = [(b"Connection", b"x-Trace, KEEP-ALIVE, bad name,"), (b"Keep-Alive", b"timeout=5"),
             (b"X-TRACE", b"1"), (b"Transfer-Encoding", b"chunked"), (b"ETag", b'"a"'),
             (b"set-cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"Content-Length", b"2")]
    response = UpstreamResponse(None, 200, b"OK", pairs, 2)
    kept = response.end_to_end_headers()
    assert dict(kept.getAllRawHeaders()) == {b"ETag": [b'"a"'], b"Set-Cookie": [b"a=1", b"b=2"],
                                             b"Content-Length": [b"2"]}
    # headers: everything but the connection's framing, Connection itself included
    assert set(dict(response.headers.getAllRawHeaders())) == {b"Connection", b"X-Trace", b"ETag", b"Set-Cookie",
                                                              b"Content-Length"}


def test_targets_are_told_apart_after_the_last_one_is_remembered():
    """_target skips the parse for the URL prefix it saw last: a port that extends that
    prefix, a query without a path and another host are still parsed as theirs."""
    client = UpstreamClient(reactor, DirectEndpointFactory(reactor, 5, None))
    seen = [client._target(url) for url in (b"http://127.0.0.1:1/a", b"http://127.0.0.1:1/b?c",
                                            b"http://127.0.0.1:10/d", b"http://127.0.0.1:1?e",
                                            b"http://127.0.0.2:1/f", b"http://127.0.0.1:1/")]
    assert [(t.key, path) for t, path in seen] == [
        (b"http://127.0.0.1:1", b"/a"), (b"http://127.0.0.1:1", b"/b?c"), (b"http://127.0.0.1:10", b"/d"),
        (b"http://127.0.0.1:1", b"/?e"), (b"http://127.0.0.2:1", b"/f"), (b"http://127.0.0.1:1", b"/")]
    assert seen[0][0] is seen[1][0] is seen[3][0] is seen[5][0]
