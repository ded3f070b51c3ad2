"""Errors the proxy itself raises, each carrying the HTTP status it maps to.

Endpoints render them in their own dialect (problem+json by default, an
OperationOutcome on FHIR endpoints, a DIMSE failure status on DIMSE), so the
pipeline only has to know the status and a human-readable detail.
"""

from __future__ import annotations


class HarmonyError(Exception):
    """Base class for every proxy-made error that reaches a client."""

    status = 500
    title = "Internal Server Error"
    #: A stable machine-readable slug used in problem ``type`` URIs and logs.
    code = "internal-error"

    def __init__(self, detail: str = "", *, status: int | None = None, headers=None):
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        if status is not None:
            self.status = status
        #: Extra response headers (e.g. ``WWW-Authenticate``), as (name, value) pairs.
        self.headers = list(headers or [])


class BadRequest(HarmonyError):
    status, title, code = 400, "Bad Request", "bad-request"


class AuthenticationFailed(HarmonyError):
    status, title, code = 401, "Unauthorized", "unauthorized"


class Forbidden(HarmonyError):
    status, title, code = 403, "Forbidden", "forbidden"


class NotFound(HarmonyError):
    status, title, code = 404, "Not Found", "not-found"


class MethodNotAllowed(HarmonyError):
    status, title, code = 405, "Method Not Allowed", "method-not-allowed"


class NotAcceptable(HarmonyError):
    status, title, code = 406, "Not Acceptable", "not-acceptable"


class RequestTimeout(HarmonyError):
    """The client was too slow sending its request (its body, past the network's minimum rate)."""

    status, title, code = 408, "Request Timeout", "request-timeout"


class Conflict(HarmonyError):
    status, title, code = 409, "Conflict", "conflict"


class PayloadTooLarge(HarmonyError):
    status, title, code = 413, "Payload Too Large", "payload-too-large"


class UnsupportedMediaType(HarmonyError):
    status, title, code = 415, "Unsupported Media Type", "unsupported-media-type"


class ClientClosedRequest(HarmonyError):
    """The client went away before its answer was ready (nginx logs this 499).

    Nobody is left to read it; it is what the pipeline's observers (metrics,
    audit) see, and it is never evidence against an upstream."""

    status, title, code = 499, "Client Closed Request", "client-closed-request"


def mark_client_gone(request) -> None:
    """Say that *request*'s client went away: whatever fails from now on is not the upstream's doing."""
    request.state.client_gone = True


def client_gone(request) -> bool:
    return request.state.client_gone


class MiddlewareFailed(HarmonyError):
    status, title, code = 500, "Middleware Failure", "middleware-failure"


class ConfigurationFailure(HarmonyError):
    """A request hit a part of the configuration that cannot serve it."""

    status, title, code = 500, "Configuration Error", "configuration-error"


class NotImplementedYet(HarmonyError):
    status, title, code = 501, "Not Implemented", "not-implemented"


class BackendUnavailable(HarmonyError):
    status, title, code = 502, "Bad Gateway", "backend-unavailable"


class ServiceUnavailable(HarmonyError):
    status, title, code = 503, "Service Unavailable", "service-unavailable"


class BackendTimeout(HarmonyError):
    status, title, code = 504, "Gateway Timeout", "backend-timeout"


class InsufficientStorage(HarmonyError):
    status, title, code = 507, "Insufficient Storage", "insufficient-storage"
