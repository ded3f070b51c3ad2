"""Middleware types for the fhir endpoint tests (loaded via ``[middleware_types.*]``),
standing in for auth and path filters: one raises, one answers problem JSON itself."""

from harmony.errors import AuthenticationFailed, Forbidden
from harmony.middleware.base import Middleware
from harmony.web.problem import problem_response


class Deny(Middleware):
    def on_request(self, request):
        raise AuthenticationFailed("a bearer token is required", headers=[("WWW-Authenticate", 'Bearer realm="fhir"')])


class ProblemAnswer(Middleware):
    def on_request(self, request):
        return problem_response(Forbidden(f"{request.metadata['fhir.interaction']} is not allowed here"),
                                request.request_id)
