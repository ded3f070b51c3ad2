"""An upstream twisted.web client response as a body producer.

Handing the client's ``IResponse`` on as an ``IBodyProducer`` lets the endpoint
stream it to its own client with flow control: when our client reads slowly,
the transport pauses this producer, which pauses the upstream socket.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer


class _Relay(Protocol):
    def __init__(self, consumer, finished: defer.Deferred):
        self.consumer = consumer
        self.finished = finished

    def dataReceived(self, data):
        self.consumer.write(data)

    def connectionLost(self, reason):
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(None)
        else:
            self.finished.errback(reason)


@implementer(IBodyProducer)
class ResponseBodyProducer:
    def __init__(self, response):
        self.response = response
        self.length = response.length if response.length is not UNKNOWN_LENGTH else UNKNOWN_LENGTH
        self._relay = None

    def startProducing(self, consumer):
        finished = defer.Deferred()
        self._relay = _Relay(consumer, finished)
        self.response.deliverBody(self._relay)
        return finished

    def _transport(self):
        return getattr(self._relay, "transport", None) if self._relay else None

    def pauseProducing(self):
        t = self._transport()
        if t is not None:
            t.pauseProducing()

    def resumeProducing(self):
        t = self._transport()
        if t is not None:
            t.resumeProducing()

    def stopProducing(self):
        t = self._transport()
        if t is not None:
            t.stopProducing()
