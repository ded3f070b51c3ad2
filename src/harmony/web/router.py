"""One twisted.web Site per network; its root dispatches by longest path prefix.

A bare Resource rather than Klein at the root: the passthrough hot path should
pay for nothing it does not use (see the field notes' throughput table).
Routes match on segment boundaries: ``/api`` takes ``/api`` and ``/api/x``,
never ``/apix``.  Swapping ``routes`` is atomic, which hot reload relies on.
A path with a ``.`` or ``..`` segment (raw, percent-encoded, between
backslashes, or with path parameters such as ``..;x``) is refused with 400 before any route sees it: ``/echo/../api``
would otherwise reach the ``/echo`` route, and ``/api/../../admin`` would be
forwarded as ``base_url + "/../../admin"`` for the upstream to resolve outside
the base path it was meant to confine requests to.
"""

from __future__ import annotations

import re
import time
from urllib.parse import unquote

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from harmony.errors import BadRequest, HarmonyError, NotFound
from harmony.log import get_logger
from harmony.web.bridge import log_access, request_id_for, write_response
from harmony.web.fast_channel import FastChannel
from harmony.web.problem import problem_response
from harmony.web.streaming import BODY_MIN_RATE, BODY_TIMEOUT, HEAD_TIMEOUT, HarmonyChannel, HarmonyRequest

log = get_logger("harmony.web")

_SEPARATORS = re.compile(r"[/\\]")


def has_dot_segment(path: str) -> bool:
    """Whether *path* has a ``.``/``..`` segment once percent-decoded, counting
    ``\\`` as a separator too (some servers do, and decode ``%2f`` before resolving),
    and ignoring path parameters: Tomcat and Jetty strip ``;...`` from each
    segment before resolving, so ``..;/admin`` and ``.;x`` are dot segments too."""
    if "%" not in path:
        if "." not in path or (path[0] != "." and "/." not in path and "\\." not in path):
            return False  # the common case (no segment starts with a dot), without splitting the path
        decoded = path
    else:
        decoded = unquote(path, errors="replace")
    return any(seg.partition(";")[0] in (".", "..") for seg in _SEPARATORS.split(decoded))


class PrefixRouter(Resource):
    isLeaf = True

    def __init__(self, network: str, routes=()):
        super().__init__()
        self.network = network
        self.routes = list(routes)

    def match(self, path: str):
        for route in self.routes:
            p = route.prefix
            if p == "/" or path == p or path.startswith(p + "/"):
                return route
        return None

    def body_policy(self, path: bytes, method: bytes) -> tuple[bool, tuple[int, str] | None]:
        """For a request head: does the endpoint take the body as it arrives, and
        what is the largest body it takes (bytes, option name; None: no limit)."""
        text = path.decode("utf-8", "surrogateescape")
        route = self.match(text)
        if route is None:
            return False, None
        endpoint = route.endpoint
        limit_for = getattr(endpoint, "request_body_limit", None)
        limit = None
        if limit_for is not None:
            subpath = text if route.prefix == "/" else text[len(route.prefix):]
            limit = limit_for(method.decode("latin-1"), subpath or "/")
        return bool(getattr(endpoint, "stream_request_body", False)), limit

    def refuse(self, request, error: HarmonyError) -> None:
        """Answer *error* to a request refused on its head (body too large, too
        slow), in the dialect of the endpoint its path names, and log it."""
        path = request.path.decode("utf-8", "surrogateescape")
        route = self.match(path)
        log_access(request, route.endpoint.name if route is not None else "", time.monotonic())
        write_response(request, self._in_dialect(request, route, path, error))

    def render(self, request):
        path = request.path.decode("utf-8", "surrogateescape")
        return self.render_route(request, path, self.match(path))

    def render_route(self, request, path: str, route):
        """:meth:`render` for a request whose *path* (decoded) and *route* (``match``) are
        known already (harmony.web.fast_channel matched them to choose its way)."""
        if has_dot_segment(path):
            # Logged like any request: a refused traversal attempt is what an operator wants to see.
            log_access(request, route.endpoint.name if route is not None else "", time.monotonic())
            write_response(request, self._refuse_dot_segments(request, route, path))
            return NOT_DONE_YET
        if route is None:
            log_access(request, "", time.monotonic())
            write_response(request, problem_response(NotFound(f"no route for {path}"), request_id_for(request),
                                                     instance=path))
            return NOT_DONE_YET
        try:
            return route.endpoint.render_http(request, route)
        except Exception:  # noqa: BLE001 - the last line of defence for one request
            # Otherwise twisted.web answers its own HTML "Processing Failed" page.
            log.failure("endpoint {endpoint} failed on a request", endpoint=route.endpoint.name)
            if not request.startedWriting:
                write_response(request, problem_response(HarmonyError("internal error"), request_id_for(request),
                                                         instance=path))
            elif not request.finished:
                request.loseConnection()
            return NOT_DONE_YET

    @classmethod
    def _refuse_dot_segments(cls, request, route, path):
        """400, in the dialect of the endpoint the path names (OperationOutcome on FHIR)."""
        error = BadRequest("the path has a '.' or '..' segment (also percent-encoded, between "
                           "backslashes or with ';' parameters); send the resolved path")
        return cls._in_dialect(request, route, path, error)

    @staticmethod
    def _in_dialect(request, route, path, error):
        """*error* as the endpoint *route* names would answer it (its dialect, its CORS headers)."""
        endpoint = route.endpoint if route is not None else None
        if hasattr(endpoint, "envelope") and hasattr(endpoint, "error_response"):
            response = endpoint.error_response(error, endpoint.envelope(request, route))
            finish = getattr(endpoint, "finish_response", None)
            return response if finish is None else finish(request, response)
        return problem_response(error, request_id_for(request), instance=path)


class HarmonySite(Site):
    """A Site with twisted.web's own access log off: Harmony logs each request
    itself, with its request id and without query strings (which carry PHI).
    Its channels can stream request bodies (see :mod:`harmony.web.streaming`)."""

    noisy = False
    # twisted types it as the HTTP/1-or-2 chooser's signature; any HTTPChannel class builds.
    protocol = HarmonyChannel  # type: ignore[assignment]
    requestFactory = HarmonyRequest
    #: Slow-client bounds read by HarmonyChannel; ``[network.X.http]`` sets them (apply_settings).
    head_timeout: float = HEAD_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    body_min_rate: float = BODY_MIN_RATE

    def __init__(self, resource, *args, **kwargs):
        # twisted.web would parse form bodies into request.args on the reactor: a
        # multipart/form-data body read whole into memory (up to the upload cap), and
        # its Content-Type run through the email package on every POST (7 % of a
        # STOW-RS request's CPU, bench/ingest).  Harmony's endpoints read bodies themselves.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, *args, **kwargs)

    def apply_settings(self, http: dict | None) -> None:
        """Take ``head_timeout_secs``, ``body_timeout_secs`` and ``body_min_rate``
        from a network's (already checked) ``[network.X.http]`` table."""
        http = http or {}
        self.head_timeout = float(http.get("head_timeout_secs", HEAD_TIMEOUT))
        self.body_timeout = float(http.get("body_timeout_secs", BODY_TIMEOUT))
        self.body_min_rate = float(http.get("body_min_rate", BODY_MIN_RATE))

    def log(self, request):
        pass

    def buildProtocol(self, addr):
        """A :class:`~harmony.web.fast_channel.FastChannel` in front of the usual
        channel when a route's endpoint takes the fast path (the ``http``
        passthrough, ``dicomweb``'s STOW-RS POST), else the usual ``HarmonyChannel`` alone."""
        channel = super().buildProtocol(addr)
        routes = getattr(self.resource, "routes", ())
        if any(getattr(route.endpoint, "fast_path", False) or getattr(route.endpoint, "fast_body_methods", ())
               for route in routes):
            return FastChannel(self, channel)
        return channel
