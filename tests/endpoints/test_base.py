"""harmony.endpoints.base in memory: prefixes, errors in problem+json, the last line of defence,
CORS preflights answered before the pipeline."""

from __future__ import annotations

import json

from twisted.internet import defer

from harmony.endpoints.base import HttpEndpointBase, check_prefix
from harmony.envelope import ResponseEnvelope
from harmony.errors import Forbidden
from tests.memory import Answering, HttpStub, build


def test_check_prefix_normalises_slashes():
    assert check_prefix("/") == "/"
    assert check_prefix("//a//b/") == "/a/b"


def test_a_harmony_error_becomes_problem_json_with_its_status_and_headers():
    endpoint = build(HttpEndpointBase, {"path_prefix": "/p"}, name="p")
    backend = Answering(lambda request: Forbidden("not you", headers=[("X-Why", "policy")]))
    answer, body = HttpStub(endpoint, [backend]).request("GET", "/p/x")
    assert answer.code == 403
    assert answer.headers.getRawHeaders("content-type") == ["application/problem+json"]
    assert answer.headers.getRawHeaders("x-why") == ["policy"]
    problem = json.loads(body)
    assert problem["status"] == 403 and problem["detail"] == "not you"


def test_an_unexpected_failure_is_a_502_from_the_pipeline():
    endpoint = build(HttpEndpointBase, {"path_prefix": "/p"}, name="p")
    answer, body = HttpStub(endpoint, [Answering(lambda request: RuntimeError("boom"))]).request("GET", "/p")
    assert answer.code == 502
    assert "boom" not in body.decode()  # the internal message is not shown to the client


def test_an_answer_that_cannot_be_written_still_answers_500():
    class NotAnEnvelope:
        status = 200  # enough to pass the pipeline, not enough to be written

    endpoint = build(HttpEndpointBase, {"path_prefix": "/b"}, name="b")
    answer, body = HttpStub(endpoint, [Answering(lambda request: defer.succeed(NotAnEnvelope()))]).request("GET", "/b")
    assert answer.code == 500 and json.loads(body)["status"] == 500


def test_a_cors_preflight_is_answered_before_the_pipeline():
    endpoint = build(HttpEndpointBase, {"path_prefix": "/p", "cors": {"allow_origins": ["https://ok.test"]}},
                     name="p")
    backend = Answering(lambda request: ResponseEnvelope.json(200, {}))
    stub = HttpStub(endpoint, [backend])
    preflight = {"Origin": "https://ok.test", "Access-Control-Request-Method": "PUT"}
    answer, _body = stub.request("OPTIONS", "/p/x", headers=preflight)
    assert answer.code in (200, 204)
    assert answer.headers.getRawHeaders("access-control-allow-origin") == ["https://ok.test"]
    refused, body = stub.request("OPTIONS", "/p/x", headers=dict(preflight, Origin="https://evil.test"))
    assert refused.code == 403 and json.loads(body)["status"] == 403
    assert backend.requests == []
