"""An upstream twisted.web client response as a body producer.

Handing the client's ``IResponse`` on as an ``IBodyProducer`` lets the endpoint
stream it to its own client with flow control: when our client reads slowly,
the transport pauses this producer, which pauses the upstream socket.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from harmony.envelope import ForwardingProducer
from harmony.errors import BackendTimeout


class UpstreamBytes(bytes):
    """An upstream body that had all arrived with its head, as bytes: written in one
    go instead of streamed, and, like :class:`ResponseBodyProducer`, the upstream's
    representation untouched (the response writer does not compress it again)."""

    passthrough = True


def _nothing() -> None:
    pass


class _Relay(Protocol):
    def __init__(self, consumer, finished: defer.Deferred):
        self.consumer = consumer
        self.finished = finished
        #: Called for every chunk that arrives (the producer's idle timer re-arms it).
        self.progress: Callable[[], object] = _nothing

    def dataReceived(self, data):
        self.progress()
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
    """With *idle_timeout* (and a *clock*), an upstream that sends nothing for
    that long while we are ready for more fails the body with BackendTimeout and
    its connection is dropped; otherwise an upstream that stalls mid-body would
    hold our client's connection open for as long as its own stays open.  Time
    spent paused because *our* client reads slowly does not count."""

    #: The upstream's representation, untouched: its content coding was the
    #: upstream's choice, so the response writer does not compress it again.
    passthrough = True

    def __init__(self, response, idle_timeout: float | None = None, clock=None):
        self.response = response
        self.length = response.length if response.length is not UNKNOWN_LENGTH else UNKNOWN_LENGTH
        self._relay = None
        self._idle_timeout = idle_timeout if clock is not None else None
        self._clock = clock
        self._timer = None
        self._finished: defer.Deferred | None = None

    def startProducing(self, consumer):
        finished = defer.Deferred()
        self._relay = self._watched(_Relay(consumer, finished))
        self.response.deliverBody(self._relay)
        return finished

    def _delegate(self):
        return getattr(self._relay, "transport", None) if self._relay else None

    def _watched(self, relay: _Relay) -> _Relay:
        """*relay*, re-arming the idle timer on every chunk that reaches it."""
        if self._idle_timeout:
            self._finished = relay.finished
            self._arm()
            relay.finished.addBoth(self._ended)
            relay.progress = self._rearm
        return relay

    def _ended(self, result):
        """The body is over: the timer and the relay's hook go, as each refers back to
        this producer (reference cycles only the cyclic collector would free)."""
        self._disarm()
        self._timer = None
        if self._relay is not None:
            self._relay.progress = _nothing
        return result

    def _arm(self):
        self._timer = self._clock.callLater(self._idle_timeout, self._stalled)

    def _rearm(self):
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle_timeout)

    def _disarm(self, result=None):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        return result

    def _stalled(self):
        if self._finished is not None and not self._finished.called:
            self._finished.errback(BackendTimeout(f"upstream sent no body data for {self._idle_timeout:g}s"))
        transport = self._delegate()
        if transport is not None:
            transport.stopProducing()  # drops the upstream connection; it never goes back to the pool

    def pauseProducing(self):
        self._disarm()
        super().pauseProducing()

    def resumeProducing(self):
        if self._idle_timeout and self._finished is not None and not self._finished.called \
                and not (self._timer is not None and self._timer.active()):
            self._arm()
        super().resumeProducing()


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
