"""Behaviour shared by every endpoint type."""

from __future__ import annotations

import time

from twisted.application.service import Service
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from zope.interface import alsoProvides, implementer, provider

from harmony.config.errors import OptionError
from harmony.errors import Forbidden, HarmonyError, mark_client_gone
from harmony.interfaces import IComponentFactory, IHttpEndpoint
from harmony.log import get_logger
from harmony.web.bridge import envelope_from_request, log_access, send_response, write_response
from harmony.web.cors import CorsPolicy
from harmony.web.problem import problem_response

log = get_logger("harmony.endpoint")


def check_prefix(prefix: str) -> str:
    if not prefix.startswith("/"):
        raise OptionError("path_prefix", f"must start with '/', got {prefix!r}")
    if any(seg in (".", "..") for seg in prefix.split("/")) or "?" in prefix or "#" in prefix:
        raise OptionError("path_prefix", f"must be a plain path, got {prefix!r}")
    return "/" + "/".join(s for s in prefix.split("/") if s)


@implementer(IHttpEndpoint)
@provider(IComponentFactory)
class HttpEndpointBase(Service):
    """An endpoint mounted on a network's web site at ``path_prefix``.

    Subclasses adjust ``pre_process``/``post_process``/``error_response`` (FHIR
    answers errors as OperationOutcome) or override ``render_http`` entirely
    (an endpoint with fixed routes of its own, such as JMIX).
    """

    transport = "http"
    protocol = "http"
    #: True: a large or chunked request body reaches the pipeline as a stream
    #: while it is still arriving.  False: twisted.web spools it first (and
    #: ``request.content`` holds it), which endpoints that parse the whole
    #: body anyway may prefer.
    stream_request_body = False
    #: Methods (bytes) whose requests, with a ``Content-Length`` body small enough to be read
    #: whole (``INLINE_BODY_LIMIT``), are served on harmony.web.fast_channel rather than twisted.web.
    fast_body_methods: frozenset = frozenset()
    #: The largest request body this endpoint takes (None: no limit); see request_body_limit.
    max_body_bytes: int | None = None
    #: Methods a CORS preflight is told this endpoint takes (``cors.allow_methods`` overrides).
    cors_methods: tuple = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
    #: :class:`harmony.web.cors.CorsPolicy` from ``options.cors``; None: CORS off (the default).
    cors: CorsPolicy | None = None
    #: Every endpoint has one; twisted's Service says ``name = None`` unannotated, so mypy types it None.
    name: str  # type: ignore[assignment]

    def __init_subclass__(cls, **kwargs):
        # zope's @provider declares the class object alone: without this every
        # subclass (each concrete type) would not provide IComponentFactory.
        super().__init_subclass__(**kwargs)
        alsoProvides(cls, IComponentFactory)

    def __init__(self, name: str, path_prefix: str = "/", options=None):
        self.name = name
        self.path_prefix = path_prefix

    @classmethod
    def from_config(cls, name, options, ctx):
        return cls(name, check_prefix(options.str("path_prefix", "/"))).take_shared_options(options)

    def take_shared_options(self, options):
        """Read the options every HTTP-family endpoint type understands (``cors``);
        each type's ``from_config`` ends with it.  Returns self."""
        self.cors = CorsPolicy.from_options(options, self.cors_methods)
        return self

    def finish_response(self, request, response):
        """Last touch on any answer this endpoint gives (pipeline's or proxy-made),
        given the twisted.web *request*: CORS headers when configured."""
        if self.cors is not None:
            response = self.cors.decorate(request, response)
        return response

    def request_body_limit(self, method: str, subpath: str) -> tuple[int, str] | None:
        """The largest request body *method* on *subpath* may carry, and the
        option that sets it (for the 413's message), or None for no limit.

        Asked when a request's head arrives: the channel refuses a declared
        Content-Length over it at once and cuts a chunked body as it passes it
        (harmony.web.streaming), so an oversized upload is never read, spooled
        or sent upstream."""
        return None if self.max_body_bytes is None else (self.max_body_bytes, "max_body_bytes")

    def pre_process(self, request):
        return request

    def post_process(self, request, response):
        return response

    def error_response(self, error: HarmonyError, request):
        return problem_response(error, request.request_id, request.path)

    def envelope(self, request, route):
        return envelope_from_request(request, route.prefix, self.name, self.protocol)

    def render_http(self, request, route):
        started = time.monotonic()
        if self.cors is not None and CorsPolicy.is_preflight(request):
            # Before the pipeline: a browser never sends credentials on a preflight,
            # so authentication middleware would refuse every one.
            log_access(request, self.name, started)
            answer = self.cors.preflight(request)
            if answer is None:  # in the endpoint's dialect (an OperationOutcome on FHIR)
                answer = self.error_response(Forbidden("this origin is not allowed by the endpoint's CORS policy "
                                                       "(cors.allow_origins)"), self.envelope(request, route))
            write_response(request, answer)
            return NOT_DONE_YET
        env = self.envelope(request, route)
        log_access(request, self.name, started)
        try:
            d = route.pipeline.handle(env, self)
        except Exception:
            d = defer.fail()
        if not isinstance(d, defer.Deferred):
            d = defer.succeed(d)
        gone = getattr(request, "notify_gone", None)  # harmony.web.fast_channel: the same, without a Deferred
        if gone is not None:
            gone(self._client_gone, env, d)
        else:
            request.notifyFinish().addErrback(self._client_gone, env, d)
        # One callback pair: _answer reports its own failure to _unexpected, as an
        # errback added after it would (one Deferred step a request fewer).
        d.addCallbacks(self._answer, self._unexpected, callbackArgs=(request, env), errbackArgs=(request, env))
        return NOT_DONE_YET

    def _answer(self, response, request, env) -> None:
        # The write's own Deferred is not chained in (none is made on the fast channel):
        # it never fails (a client that leaves mid-body is the notify_gone/notifyFinish
        # path's), and chaining an already-fired Deferred is work on every request for nothing.
        try:
            send_response(request, self.finish_response(request, response))
        except Exception:
            self._unexpected(Failure(), request, env)

    @staticmethod
    def _client_gone(_reason, env, d):
        """The connection closed before the answer: mark it first, so that what fails
        because of the cancel is not blamed on a backend (harmony.targets), then cancel."""
        mark_client_gone(env)
        d.cancel()

    def _unexpected(self, failure, request, env):
        if failure.check(defer.CancelledError):
            return None  # the client went away; nothing to answer
        log.failure("endpoint {endpoint} failed to answer request {request_id}", failure,
                    endpoint=self.name, request_id=env.request_id)
        if not request.finished and not request.startedWriting:
            return write_response(request, self.finish_response(
                request, self.error_response(HarmonyError("internal error"), env)))
        return None
