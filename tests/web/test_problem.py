"""harmony.web.problem: every proxy-made HTTP error as an RFC 9457 problem document."""

from __future__ import annotations

import json

from harmony.errors import AuthenticationFailed, PayloadTooLarge
from harmony.web.problem import PROBLEM_TYPE_BASE, problem_response


def test_a_problem_names_type_status_detail_instance_and_request_id():
    response = problem_response(PayloadTooLarge("over 10 bytes"), "rid-7", "/api/upload")
    assert response.status == 413 and response.header("content-type") == "application/problem+json"
    assert response.header("x-request-id") == "rid-7"
    assert json.loads(response.body) == {
        "type": PROBLEM_TYPE_BASE + "payload-too-large", "title": "Payload Too Large", "status": 413,
        "detail": "over 10 bytes", "instance": "/api/upload", "request_id": "rid-7"}


def test_the_errors_headers_are_kept_and_empty_fields_left_out():
    response = problem_response(AuthenticationFailed("no", headers=[("WWW-Authenticate", 'Basic realm="x"')]))
    assert response.header("www-authenticate") == 'Basic realm="x"'
    assert not response.headers.hasHeader(b"x-request-id")
    assert set(json.loads(response.body)) == {"type", "title", "status", "detail"}
