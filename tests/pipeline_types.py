"""Small middleware and backend types for the pipeline tests, loaded the way an
operator loads a custom type: ``[middleware_types.X] module = "tests.pipeline_types:Class"``.
"""

from twisted.internet import defer, task
from twisted.web.http_headers import Headers

from harmony.backends.base import Backend
from harmony.envelope import ResponseEnvelope
from harmony.errors import AuthenticationFailed, Forbidden, NotFound
from harmony.middleware.base import Middleware


class Trace(Middleware):
    """Records its name on the way in (metadata) and on the way out (a header)."""

    def on_request(self, request):
        trail = request.metadata.get("trace", "")
        request.metadata["trace"] = f"{trail}>{self.name}" if trail else self.name
        return request

    def on_response(self, request, response):
        response.headers.addRawHeader(b"x-trace-out", self.name.encode())
        return response


class SlowTrace(Trace):
    """The same, answering through a Deferred that fires on a later turn."""

    def on_request(self, request):
        from twisted.internet import reactor
        return task.deferLater(reactor, 0, Trace.on_request, self, request)

    def on_response(self, request, response):
        return defer.succeed(Trace.on_response(self, request, response))


class Answer(Middleware):
    """Short-circuits with a response of its own."""

    def on_request(self, request):
        headers = Headers({b"content-type": [b"application/x-teapot"], b"x-answered-by": [self.name.encode()]})
        return ResponseEnvelope(status=418, headers=headers, body=b"\x00short-circuit\xff")


class Deny(Middleware):
    def on_request(self, request):
        if request.header("authorization") is None:
            raise AuthenticationFailed("credentials required", headers=[(b"WWW-Authenticate", b'Bearer realm="t"')])
        raise Forbidden("not allowed")


class Missing(Middleware):
    def on_request(self, request):
        raise NotFound("no such resource")


class Boom(Middleware):
    def on_request(self, request):
        raise RuntimeError("secret internals PatientName=DOE^JOHN")


class BoomOnResponse(Middleware):
    def on_response(self, request, response):
        return defer.fail(ValueError("broken transform"))


class CrashingBackend(Backend):
    def send(self, request):
        raise KeyError("backend bug")
