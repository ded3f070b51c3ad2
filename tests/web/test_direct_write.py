"""harmony.web.direct_write over a real loopback connection: what the socket does not take at
once still arrives, in order, after what it did."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from harmony.web.direct_write import write_now

BIG = bytes(range(256)) * 40_000  # ~10 MB: far more than one send takes


class Writer(protocol.Protocol):
    def connectionMade(self):
        write_now(self.transport, b"head:")
        write_now(self.transport, BIG)  # queued behind the first if the socket is busy
        write_now(self.transport, b":tail")
        self.transport.loseConnection()


class Reader(protocol.Protocol):
    def __init__(self):
        self.chunks: list[bytes] = []
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason):
        self.done.callback(b"".join(self.chunks))


@pytest_twisted.ensureDeferred
async def test_a_large_write_arrives_whole_and_in_order():
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Writer), interface="127.0.0.1")
    try:
        reader = Reader()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), reader)
        received = await reader.done
    finally:
        await port.stopListening()
    assert received == b"head:" + BIG + b":tail"
