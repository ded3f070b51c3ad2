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

from harmony.envelope import ForwardingProducer


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
class ResponseBodyProducer(ForwardingProducer):
    def __init__(self, response):
        self.response = response
        self.length = response.length if response.length is not UNKNOWN_LENGTH else UNKNOWN_LENGTH
        self._relay = None

    def startProducing(self, consumer):
        finished = defer.Deferred()
        self._relay = _Relay(consumer, finished)
        self.response.deliverBody(self._relay)
        return finished

    def _delegate(self):
        return getattr(self._relay, "transport", None) if self._relay else None


class _ProgressConsumer:
    def __init__(self, consumer, on_progress):
        self._consumer = consumer
        self._on_progress = on_progress

    def write(self, data):
        self._on_progress()
        self._consumer.write(data)

    def registerProducer(self, producer, streaming):
        self._consumer.registerProducer(producer, streaming)

    def unregisterProducer(self):
        self._consumer.unregisterProducer()


@implementer(IBodyProducer)
class DeadlineBody(ForwardingProducer):
    """A request body that keeps a response deadline from firing mid-upload.

    A backend's ``timeout_secs`` is meant for an upstream that does not
    answer, not for a client uploading a large body slowly (request bodies
    stream as they arrive).  While the body is being sent, every chunk pushes
    *deadline* (a ``DelayedCall``) *seconds* into the future, so it only fires
    if the upload stalls that long; once the body is sent it restarts, and
    then measures the wait for the response head.
    """

    def __init__(self, body, deadline, seconds: float):
        self._body = body
        self._deadline = deadline
        self._seconds = seconds
        self.length = getattr(body, "length", UNKNOWN_LENGTH)

    def _push(self, result=None):
        if self._deadline.active():
            self._deadline.reset(self._seconds)
        return result

    def startProducing(self, consumer):
        return self._body.startProducing(_ProgressConsumer(consumer, self._push)).addCallback(self._push)

    def _delegate(self):
        return self._body
