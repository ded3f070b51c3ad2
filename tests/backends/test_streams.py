"""harmony.backends.streams in memory: an upstream body relayed with flow control, its idle clock,
and a request body that keeps a response deadline from firing mid-upload.

The upstream response is a small stand-in for twisted.web's ``IResponse`` (``deliverBody`` onto a
StringTransport): only its body delivery matters here, and that is what it does."""

from __future__ import annotations

import io

from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH

from harmony.backends.streams import DeadlineBody, ResponseBodyProducer
from harmony.errors import BackendTimeout
from tests.memory import failure_of, fired, result_of


class UpstreamResponse:
    def __init__(self, length=UNKNOWN_LENGTH):
        self.length = length
        self.transport = StringTransport()
        self.protocol = None

    def deliverBody(self, protocol):
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data):
        self.protocol.dataReceived(data)

    def end(self, reason=None):
        self.protocol.connectionLost(Failure(reason or ResponseDone()))


class Consumer:
    def __init__(self):
        self.data = []

    def write(self, data):
        self.data.append(data)


def test_the_body_is_relayed_and_ends_with_the_upstream():
    upstream = UpstreamResponse(length=6)
    producer = ResponseBodyProducer(upstream)
    assert producer.length == 6 and producer.passthrough is True
    consumer = Consumer()
    done = producer.startProducing(consumer)
    upstream.send(b"abc")
    upstream.send(b"def")
    assert not done.called
    upstream.end()
    assert result_of(done) is None and b"".join(consumer.data) == b"abcdef"


def test_pausing_the_producer_pauses_the_upstream_connection():
    upstream = UpstreamResponse()
    producer = ResponseBodyProducer(upstream)
    producer.startProducing(Consumer())
    producer.pauseProducing()
    assert upstream.transport.producerState == "paused"
    producer.resumeProducing()
    assert upstream.transport.producerState == "producing"


def test_an_upstream_cut_mid_body_fails_the_body():
    upstream = UpstreamResponse()
    done = ResponseBodyProducer(upstream).startProducing(Consumer())
    upstream.end(ConnectionResetError("reset"))
    failure_of(done, ConnectionResetError)


def test_an_upstream_that_stalls_fails_with_a_timeout_and_is_dropped():
    clock = task.Clock()
    upstream = UpstreamResponse()
    done = ResponseBodyProducer(upstream, idle_timeout=5, clock=clock).startProducing(Consumer())
    clock.advance(4)
    upstream.send(b"x")  # progress re-arms the idle clock
    clock.advance(4)
    assert not done.called
    clock.advance(1.5)
    assert "5s" in str(failure_of(done, BackendTimeout))
    assert upstream.transport.producerState == "stopped"
    assert clock.getDelayedCalls() == []


def test_time_paused_by_a_slow_client_does_not_count():
    clock = task.Clock()
    upstream = UpstreamResponse()
    producer = ResponseBodyProducer(upstream, idle_timeout=5, clock=clock)
    done = producer.startProducing(Consumer())
    producer.pauseProducing()
    clock.advance(60)
    assert not done.called
    producer.resumeProducing()
    clock.advance(5)
    failure_of(done, BackendTimeout)


def test_a_deadline_is_pushed_back_by_every_uploaded_chunk():
    clock = task.Clock()
    expired = []
    deadline = clock.callLater(10, expired.append, "deadline")
    # A slow uploader: one 10-byte chunk every 8 s.
    cooperator = task.Cooperator(scheduler=lambda step: clock.callLater(8, step),
                                 terminationPredicateFactory=lambda: lambda: True)
    body = FileBodyProducer(io.BytesIO(b"x" * 30), cooperator=cooperator, readSize=10)
    consumer = Consumer()
    sent = DeadlineBody(body, deadline, 10).startProducing(consumer)
    for _ in range(4):
        clock.advance(8)
    assert fired(sent) and b"".join(consumer.data) == b"x" * 30
    assert expired == [] and clock.seconds() == 32  # 32 s of upload, never 10 s without progress
    clock.advance(10)
    assert expired == ["deadline"]  # now it measures the wait for the response
