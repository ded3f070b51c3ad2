"""Malformed and hostile HTTP at the listening socket, sent as raw bytes over a
real loopback connection: each gets a status line (never silence, never a
traceback) and nothing reaches a backend it should not."""

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from tests.harness import MINIMAL_MAIN, echo_pipeline, proxy_pipeline, start_harmony, write_config

SAFETY = 20  # seconds: only a guard against hanging forever, never a synchronisation


class RawClient(Protocol):
    """Sends bytes, collects whatever comes back until the server closes."""

    def __init__(self, data):
        self.data, self.received, self.done = data, b"", defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.data)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.done.callback(self.received)


async def exchange(port, data):
    client = RawClient(data)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    return await client.done.addTimeout(SAFETY, reactor)


@pytest.fixture
def harmony(tmp_path, upstream):
    running = pytest_twisted.blockon(defer.ensureDeferred(start_harmony(write_config(
        tmp_path, MINIMAL_MAIN, {"echo": echo_pipeline(), "proxy": proxy_pipeline(upstream.url + "/base")}))))
    yield running
    pytest_twisted.blockon(running.stop())


@pytest_twisted.ensureDeferred
async def test_oversized_header_line_is_431_not_a_silent_close(harmony):
    data = b"GET /echo/x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    answer = await exchange(harmony.port("default"), data)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


@pytest_twisted.ensureDeferred
async def test_bad_chunked_encoding_is_400(harmony, upstream):
    data = b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n"
    answer = await exchange(harmony.port("default"), data)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert upstream.requests == []


@pytest.mark.parametrize("path", [
    b"/api/../admin", b"/api/x/../../admin", b"/api/%2e%2e/admin", b"/api/%2E%2e/admin", b"/api/.%2e/admin",
    b"/api/..%2fadmin", b"/api/..%5cadmin", b"/api/a\\..\\..\\admin", b"/api/./x", b"/echo/../api/x",
])
@pytest_twisted.ensureDeferred
async def test_dot_segments_never_reach_a_route(harmony, upstream, path):
    """/api/../../admin would leave base_url's /base at an upstream that resolves
    dot segments; /echo/../api/x would reach /echo's route with a path for /api's."""
    data = b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    answer = await exchange(harmony.port("default"), data)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert b"application/problem+json" in answer and b"Traceback" not in answer
    assert upstream.requests == []


@pytest.mark.parametrize("path", [b"/api/file..txt", b"/api/.well-known/x", b"/api/a%2e%2eb"])
@pytest_twisted.ensureDeferred
async def test_dots_inside_a_segment_pass(harmony, upstream, path):
    data = b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    answer = await exchange(harmony.port("default"), data)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert upstream.requests[-1]["path"] == b"/base" + path[len(b"/api"):]
