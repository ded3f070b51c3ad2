"""OperationOutcome: the body of every proxy-made error on a FHIR endpoint.

FHIR clients look for an OperationOutcome on any failed interaction (HAPI's and
Firely's clients raise typed exceptions from it), so an HTML page or RFC 9457
problem JSON would be an error the client cannot read.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

from harmony.envelope import ResponseEnvelope
from harmony.errors import HarmonyError

FHIR_JSON = "application/fhir+json"

#: HTTP status -> OperationOutcome.issue.code (http://hl7.org/fhir/issue-type).
ISSUE_CODE = {
    400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
    406: "not-supported", 409: "conflict", 410: "deleted", 412: "conflict", 413: "too-long",
    415: "not-supported", 422: "processing", 429: "throttled", 501: "not-supported",
    502: "transient", 503: "transient", 504: "timeout",
}


def issue_code(error: HarmonyError) -> str:
    """An error may name its issue code (``fhir_issue_code``); else the status decides."""
    return getattr(error, "fhir_issue_code", None) or ISSUE_CODE.get(error.status, "exception")


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> dict:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}


def outcome_response(error: HarmonyError, request_id: str = "") -> ResponseEnvelope:
    severity = "fatal" if error.status >= 500 else "error"
    doc = operation_outcome(issue_code(error), error.detail, severity)
    headers = Headers()
    for name, value in error.headers:
        headers.addRawHeader(name, value)
    if request_id:
        headers.setRawHeaders("X-Request-ID", [request_id])
    return ResponseEnvelope.json(error.status, doc, FHIR_JSON + "; charset=utf-8", headers)


def with_issue(error: HarmonyError, issue: str) -> HarmonyError:
    """Name the issue code for *error* when its status alone would say too little
    (``structure`` for an unparseable body, where 400 alone says ``invalid``)."""
    # An optional attribute of any HarmonyError, read back with getattr by issue_code().
    error.fhir_issue_code = issue  # type: ignore[attr-defined]
    return error
