"""The one Deferred-based executor every endpoint shares.

    endpoint.pre_process -> middleware left (in order) -> backend
      -> middleware right (reverse order) -> endpoint.post_process

A middleware that answers a request itself (returns a ResponseEnvelope from
``on_request``) short-circuits: the backend is not called, and only the
middleware to its left see the response on the way out - an onion, as in
Envoy's filter chains.  Exceptions become proxy-made errors rendered by the
endpoint in its own dialect, carrying the request id.
"""

from __future__ import annotations

import time

from twisted.internet import defer
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError, TimeoutError
from twisted.python.failure import Failure

from harmony.envelope import RequestEnvelope, ResponseEnvelope
from harmony.errors import (
    BackendTimeout,
    BackendUnavailable,
    ClientClosedRequest,
    ConfigurationFailure,
    HarmonyError,
    MiddlewareFailed,
    client_gone,
)
from harmony.interfaces import IBatchBackend
from harmony.log import get_logger

log = get_logger("harmony.pipeline")


def as_harmony_error(failure: Failure, stage: str) -> HarmonyError:
    """Map any failure to the proxy error (and so status) a client should see."""
    err = failure.value
    if isinstance(err, HarmonyError):
        return err
    if isinstance(err, (defer.CancelledError, TimeoutError)):
        return BackendTimeout("the backend did not answer in time")
    if isinstance(err, (ConnectionRefusedError, DNSLookupError, ConnectError)):
        return BackendUnavailable("the backend could not be reached")
    if stage == "backend":
        return BackendUnavailable(f"the backend failed: {type(err).__name__}")
    return MiddlewareFailed(f"{stage} failed: {type(err).__name__}")


def _is_deferred(value) -> bool:
    """``isinstance(value, Deferred)``, answered for an envelope without asking
    ``Deferred``'s ABC machinery (its ``__instancecheck__`` is a Python call that
    every request paid twice for its envelopes)."""
    kind = type(value)
    if kind is RequestEnvelope or kind is ResponseEnvelope:
        return False
    return kind is defer.Deferred or isinstance(value, defer.Deferred)


class Pipeline:
    def __init__(self, name: str, middleware: list, backends: list, description: str = ""):
        self.name = name
        self.middleware = list(middleware)
        self.backends = list(backends)
        self.description = description
        #: Callables ``(request, response, seconds)`` told of every finished request
        #: (metrics, audit); they must not raise.
        self.observers: list = []

    def select_backend(self, request: RequestEnvelope):
        """The backend for this request: ``metadata['backend']`` when a routing
        step chose one of this pipeline's backends, otherwise the first."""
        if not self.backends:
            raise ConfigurationFailure(f"pipeline {self.name!r} has no backend for this request")
        wanted = request.metadata.get("backend")
        if wanted:
            for b in self.backends:
                if b.name == wanted:
                    return b
        return self.backends[0]

    def _onion(self, request: RequestEnvelope, middleware: list, where: dict):
        """*middleware* ``on_request`` in order -> backend -> ``on_response`` in
        reverse; a middleware answering itself short-circuits.  *where* tracks
        the current ``stage`` and ``request`` for the caller's error handling."""
        if not middleware:
            # The plain passthrough: no generator of its own between the caller and
            # the backend's Deferred (cancelling the caller still cancels the backend).
            try:
                backend = self.select_backend(request)
                where["stage"] = "backend"
                request.metadata["backend"] = backend.name
                sent = backend.send(request)
            except Exception:
                return defer.fail()
            return sent if isinstance(sent, defer.Deferred) else defer.succeed(sent)
        return self._layers(request, middleware, where)

    @defer.inlineCallbacks
    def _layers(self, request: RequestEnvelope, middleware: list, where: dict):
        entered = []
        response = None
        for mw in middleware:
            where["stage"] = f"middleware {mw.name}"
            result = yield mw.on_request(request)
            if isinstance(result, ResponseEnvelope):
                response = result
                break
            request = where["request"] = result
            entered.append(mw)
        if response is None:
            backend = self.select_backend(request)
            where["stage"] = "backend"
            request.metadata["backend"] = backend.name
            response = yield backend.send(request)
        for mw in reversed(entered):
            where["stage"] = f"middleware {mw.name}"
            response = yield mw.on_response(request, response)
        return response

    def send_after(self, middleware, request: RequestEnvelope):
        """Run *request* through the middleware right of *middleware* and the
        backend, and back; fires with the ResponseEnvelope.

        For middleware that fans one client request out into several backend
        requests (the DICOMweb bridge turns one STOW-RS upload into a C-STORE
        per instance).  Failures propagate to the caller; a middleware further
        right may still answer itself.
        """
        index = self.middleware.index(middleware) + 1
        return self._onion(request, self.middleware[index:], {"request": request})

    def send_batch_after(self, middleware, requests: list[RequestEnvelope], concurrency: int = 4):
        """:meth:`send_after` for several requests at once (a STOW-RS upload's
        C-STOREs); fires with one ResponseEnvelope or Failure per request, in order.

        When no middleware sits right of *middleware* and the backend files
        batches (:class:`~harmony.interfaces.IBatchBackend`), that is one call
        and one durable commit for all of them; otherwise each request runs
        alone through the middleware (which may need to see each instance),
        *concurrency* at a time.
        """
        rest = self.middleware[self.middleware.index(middleware) + 1:]
        if not requests:
            return defer.succeed([])
        if not rest:
            try:
                backend = self.select_backend(requests[0])
            except Exception:
                return defer.fail()
            if IBatchBackend.providedBy(backend) and all(self.select_backend(r) is backend for r in requests):
                for r in requests:
                    r.metadata["backend"] = backend.name
                return defer.maybeDeferred(backend.send_batch, requests)
        limiter = defer.DeferredSemaphore(concurrency)
        alone = [limiter.run(self._onion, r, rest, {"request": r}) for r in requests]
        return defer.DeferredList(alone, consumeErrors=True).addCallback(lambda done: [v for _ok, v in done])

    def handle(self, request: RequestEnvelope, endpoint) -> defer.Deferred:
        """Run *request* through the pipeline; always fires with a ResponseEnvelope.

        Plain callbacks rather than a generator: this runs once per request on
        every endpoint, and ``inlineCallbacks`` was a visible share of the
        passthrough's CPU.  Cancelling the result cancels whatever it waits on
        (the backend's Deferred)."""
        started = time.monotonic()
        request.metadata["pipeline"] = self.name
        if request.state.pipeline is None:
            request.state.pipeline = self
        where = {"stage": "endpoint", "request": request}
        try:
            pre = endpoint.pre_process(request)
            if _is_deferred(pre):
                d = pre.addCallback(self._run_onion, where)
            else:
                d = self._run_onion(pre, where)
        except Exception:
            d = defer.fail()
        # One callback pair for the way out (post-process, error mapping,
        # observers) rather than three Deferred layers: see _finish.
        return d.addCallbacks(self._finish, self._finish_failed,
                              callbackArgs=(endpoint, where, started), errbackArgs=(endpoint, where, started))

    def _run_onion(self, request, where):
        where["request"] = request
        where["stage"] = "middleware"
        return self._onion(request, self.middleware, where)

    def _finish(self, response, endpoint, where, started):
        """The endpoint's post-process and the observers, called directly; a
        Deferred only when the post-process returns one.  A post-process that
        fails is mapped like any other stage's failure."""
        where["stage"] = "endpoint"
        try:
            out = endpoint.post_process(where["request"], response)
        except Exception:
            return self._finish_failed(Failure(), endpoint, where, started)
        if _is_deferred(out):
            return out.addCallbacks(self._observe, self._finish_failed,
                                    callbackArgs=(where, started), errbackArgs=(endpoint, where, started))
        return self._observe(out, where, started)

    def _finish_failed(self, failure: Failure, endpoint, where, started):
        answer = self._answer_failure(failure, endpoint, where)
        if isinstance(answer, Failure):
            return answer  # not ours to answer: observers are not told, as before
        return self._observe(answer, where, started)

    def _answer_failure(self, failure: Failure, endpoint, where):
        """A proxy-made answer, in the endpoint's dialect, for whatever failed."""
        if not failure.check(Exception):
            return failure  # not ours to answer (e.g. KeyboardInterrupt)
        stage, request = where["stage"], where["request"]
        if client_gone(request) and not isinstance(failure.value, ClientClosedRequest):
            # Whatever failed after our client hung up failed because it did: a 499
            # for the observers (metrics count it apart), not a 502/504 to blame on a backend.
            failure = Failure(ClientClosedRequest("the client went away before the answer"))
        error = as_harmony_error(failure, "backend" if stage == "backend" else stage)
        if error.status >= 500 and not isinstance(failure.value, HarmonyError):
            log.failure("pipeline {pipeline} failed in {stage} (request {request_id})",
                        failure, pipeline=self.name, stage=stage, request_id=request.request_id)
        else:
            log.debug("pipeline {pipeline}: {stage} answered {status}: {detail}",
                      pipeline=self.name, stage=stage, status=error.status, detail=error.detail)
        response = endpoint.error_response(error, request)
        response.metadata.setdefault("error", error.code)
        return response

    def _observe(self, response, where, started):
        elapsed = time.monotonic() - started
        request = where["request"]
        for observer in self.observers:
            try:
                observer(request, response, elapsed)
            except Exception:
                log.failure("pipeline observer failed")
        return response
