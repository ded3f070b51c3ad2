"""An upstream that stalls in the middle of its response body must not hold the
client's connection open for ever: after timeout_secs without a byte (while we
were ready for more) the upstream connection is dropped and the client's is
cut, so it sees a truncated body rather than waiting."""

import pytest_twisted
from twisted.internet import defer, task
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from harmony.backends.streams import ResponseBodyProducer
from harmony.errors import BackendTimeout
from tests.harness import MINIMAL_MAIN, listen, proxy_pipeline, raw_exchange, start_harmony, write_config


class _Transport:
    stopped = paused = 0

    def stopProducing(self):
        self.stopped += 1

    def pauseProducing(self):
        self.paused += 1

    def resumeProducing(self):
        pass


class _Response:
    length = UNKNOWN_LENGTH

    def deliverBody(self, protocol):
        self.protocol = protocol
        self.transport = _Transport()
        protocol.makeConnection(self.transport)


class _Sink:
    def __init__(self):
        self.data = b""

    def write(self, data):
        self.data += data


def test_idle_timer_rearms_on_data_and_fails_the_body_when_it_stalls():
    clock, response, sink = task.Clock(), _Response(), _Sink()
    body = ResponseBodyProducer(response, idle_timeout=10, clock=clock)
    finished = body.startProducing(sink)
    failures = []
    finished.addErrback(failures.append)
    clock.advance(9)
    response.protocol.dataReceived(b"abc")  # progress: the 10 s start again
    clock.advance(9)
    assert not failures and response.transport.stopped == 0
    clock.advance(1)
    assert failures and failures[0].check(BackendTimeout)
    assert response.transport.stopped == 1 and sink.data == b"abc"


def test_time_paused_by_a_slow_client_does_not_count():
    clock, response = task.Clock(), _Response()
    body = ResponseBodyProducer(response, idle_timeout=10, clock=clock)
    finished = body.startProducing(_Sink())
    body.pauseProducing()
    clock.advance(60)
    assert not finished.called and response.transport.stopped == 0
    body.resumeProducing()
    clock.advance(10)
    assert finished.called and response.transport.stopped == 1
    finished.addErrback(lambda f: f.trap(BackendTimeout))


def test_without_idle_timeout_nothing_is_scheduled():
    clock, response = task.Clock(), _Response()
    finished = ResponseBodyProducer(response).startProducing(_Sink())
    assert clock.getDelayedCalls() == [] and not finished.called


class StallingUpstream(Resource):
    """Answers 200 with Content-Length 1000, sends 7 bytes, then nothing."""

    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-length", b"1000")
        request.write(b"partial")
        return NOT_DONE_YET


@pytest_twisted.ensureDeferred
async def test_client_connection_is_cut_when_the_upstream_stalls_mid_body(tmp_path):
    port = listen(StallingUpstream())
    upstream = f"http://127.0.0.1:{port.getHost().port}"
    running = await start_harmony(write_config(tmp_path, MINIMAL_MAIN,
                                               {"p": proxy_pipeline(upstream, timeout_secs=0.3)}))
    try:
        # raw_exchange() waits for the server to close (SAFETY-bounded): before the
        # fix it timed out because the connection stayed open as long as the upstream's.
        answer = await raw_exchange(running.port(), b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n")
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 1000" in head
        assert rest == b"partial"
    finally:
        await running.stop()
        await defer.maybeDeferred(port.stopListening)
