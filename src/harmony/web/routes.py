"""Klein route tables and Harmony errors, shared by the management API, the
queue admin and endpoints that route on Klein's (werkzeug's) URL map.

Klein answers unmatched paths and methods with werkzeug's HTML error pages;
Harmony answers every error as problem+json (or its endpoint's dialect), so
the routers turn werkzeug's exceptions into :class:`HarmonyError`\\ s here.
"""

from __future__ import annotations

from twisted.python.failure import Failure
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.exceptions import NotFound as WerkzeugNotFound

from harmony.errors import BadRequest, HarmonyError, MethodNotAllowed, NotFound


def harmony_error(exc: HTTPException, path: str = "") -> HarmonyError:
    """The HarmonyError for a werkzeug routing exception (404, 405 with Allow, ...)."""
    if isinstance(exc, WerkzeugMethodNotAllowed):
        allowed = sorted(set(exc.valid_methods or ()) - {"OPTIONS"})
        return MethodNotAllowed(f"{path or 'this resource'} takes {', '.join(allowed)}",
                                headers=[("Allow", ", ".join(allowed))])
    if isinstance(exc, WerkzeugNotFound):
        return NotFound(f"no resource {path}" if path else "no such resource")
    if exc.code == 400:
        return BadRequest(exc.description or "bad request")
    return HarmonyError(exc.description or "routing failed", status=exc.code or 500)


def routing_failure(request, failure: Failure) -> Failure:
    """For a Klein app's error handler: a werkzeug routing miss as the
    matching HarmonyError, any other failure as it is."""
    if failure.check(HTTPException):
        return Failure(harmony_error(failure.value, request.path.decode("utf-8", "replace")))
    return failure


def match(url_map, path: str, method: str):
    """``(endpoint, arguments)`` for *path* and *method* in a Klein app's URL map,
    or raise the matching HarmonyError (404, 405 with Allow)."""
    adapter = url_map.bind("localhost", "", path_info=path or "/", default_method=method)
    try:
        return adapter.match(return_rule=False)
    except HTTPException as e:
        raise harmony_error(e, path) from None


__all__ = ["harmony_error", "routing_failure", "match", "apply_response", "HTTPException"]


def apply_response(request, response) -> bytes:
    """Put a bytes-bodied ResponseEnvelope's status and headers on *request*
    and return its body for Klein to write: Klein finishes the request itself,
    on routing errors too, so a handler must not finish it first."""
    request.setResponseCode(response.status, response.reason)
    for name, values in response.headers.getAllRawHeaders():
        if name.lower() != b"content-length":
            request.responseHeaders.setRawHeaders(name, values)
    body = bytes(response.body or b"")
    request.setHeader(b"content-length", str(len(body)).encode())
    return body
