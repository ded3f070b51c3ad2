"""RFC 9457 problem details: the body of every proxy-made HTTP error."""

from __future__ import annotations

from twisted.web.http_headers import Headers

from harmony.envelope import ResponseEnvelope
from harmony.errors import HarmonyError

PROBLEM_TYPE_BASE = "https://harmony.invalid/problems/"


def problem_response(error: HarmonyError, request_id: str = "", instance: str = "") -> ResponseEnvelope:
    doc = {
        "type": PROBLEM_TYPE_BASE + error.code,
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
    }
    if instance:
        doc["instance"] = instance
    if request_id:
        doc["request_id"] = request_id
    headers = Headers()
    for name, value in error.headers:
        headers.addRawHeader(name, value)
    if request_id:
        headers.setRawHeaders("X-Request-ID", [request_id])
    return ResponseEnvelope.json(error.status, doc, "application/problem+json", headers)
