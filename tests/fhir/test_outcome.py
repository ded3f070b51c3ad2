"""harmony.fhir.outcome: every proxy-made FHIR error is an OperationOutcome a client can read."""

from __future__ import annotations

import json

from harmony.errors import AuthenticationFailed, BackendTimeout, BadRequest, HarmonyError
from harmony.fhir.outcome import FHIR_JSON, issue_code, operation_outcome, outcome_response, with_issue


def test_the_status_chooses_the_issue_code_unless_the_error_names_one():
    assert issue_code(BadRequest("x")) == "invalid"
    assert issue_code(with_issue(BadRequest("x"), "structure")) == "structure"
    assert issue_code(HarmonyError("x", status=418)) == "exception"


def test_outcome_response_carries_status_headers_and_request_id():
    error = AuthenticationFailed("who are you", headers=[("WWW-Authenticate", "Bearer")])
    response = outcome_response(error, "rid-1")
    assert response.status == 401
    assert response.header("content-type") == FHIR_JSON + "; charset=utf-8"
    assert response.header("www-authenticate") == "Bearer"
    assert response.header("x-request-id") == "rid-1"
    doc = json.loads(response.body)
    assert doc == operation_outcome("login", "who are you", "error")


def test_a_5xx_is_fatal():
    doc = json.loads(outcome_response(BackendTimeout("slow")).body)
    assert doc["issue"][0]["severity"] == "fatal" and doc["issue"][0]["code"] == "timeout"
