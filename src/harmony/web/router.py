"""One twisted.web Site per network; its root dispatches by longest path prefix.

A bare Resource rather than Klein at the root: the passthrough hot path should
pay for nothing it does not use (see the field notes' throughput table).
Routes match on segment boundaries: ``/api`` takes ``/api`` and ``/api/x``,
never ``/apix``.  Swapping ``routes`` is atomic, which hot reload relies on.
"""

from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from harmony.errors import NotFound
from harmony.web.bridge import write_response
from harmony.web.problem import problem_response
from harmony.web.streaming import HarmonyChannel, HarmonyRequest


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

    def streams_request_body(self, path: bytes) -> bool:
        """Whether the endpoint *path* routes to takes its body as it arrives."""
        route = self.match(path.decode("utf-8", "surrogateescape"))
        return route is not None and getattr(route.endpoint, "stream_request_body", False)

    def render(self, request):
        path = request.path.decode("utf-8", "surrogateescape")
        route = self.match(path)
        if route is None:
            write_response(request, problem_response(NotFound(f"no route for {path}"), instance=path))
            return NOT_DONE_YET
        return route.endpoint.render_http(request, route)


class HarmonySite(Site):
    """A Site with twisted.web's own access log off: Harmony logs each request
    itself, with its request id and without query strings (which carry PHI).
    Its channels can stream request bodies (see :mod:`harmony.web.streaming`)."""

    noisy = False
    protocol = HarmonyChannel
    requestFactory = HarmonyRequest

    def log(self, request):
        pass
