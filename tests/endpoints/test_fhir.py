"""harmony.endpoints.fhir in memory: interactions classified into metadata, what no FHIR server could
serve refused before the pipeline, and every proxy-made error an OperationOutcome."""

from __future__ import annotations

import json

import pytest

from harmony.config.errors import OptionError
from harmony.endpoints.fhir import FhirEndpoint
from harmony.envelope import ResponseEnvelope
from harmony.errors import Forbidden
from tests.memory import Answering, HttpStub, build


def _stub(respond=None, **options):
    endpoint = build(FhirEndpoint, {"path_prefix": "/fhir", **options}, name="fhir")
    backend = Answering(respond or (lambda request: ResponseEnvelope.json(200, {"resourceType": "Bundle"})))
    return HttpStub(endpoint, [backend]), backend


def _outcome(body):
    doc = json.loads(body)
    assert doc["resourceType"] == "OperationOutcome"
    return doc["issue"][0]


def test_an_interaction_reaches_the_backend_classified():
    stub, backend = _stub()
    answer, _body = stub.request("GET", "/fhir/Patient/p1/_history/2", headers={"Accept": "application/fhir+xml"})
    assert answer.code == 200
    meta = backend.requests[0].metadata
    assert meta["fhir.interaction"] == "vread" and meta["fhir.id"] == "p1" and meta["fhir.version_id"] == "2"
    assert meta["fhir.format"] == "xml" and meta["fhir.version"] == "R4" and meta["fhir.base_path"] == "/fhir"


def test_a_created_resource_is_parsed_into_normalized():
    stub, backend = _stub()
    resource = {"resourceType": "Patient", "name": [{"family": "Synthetic"}]}
    answer, _body = stub.request("POST", "/fhir/Patient", data=json.dumps(resource).encode(),
                                 headers={"Content-Type": "application/fhir+json"})
    assert answer.code == 200
    assert backend.requests[0].normalized == resource


@pytest.mark.parametrize("method, path, headers, data, status, code", [
    ("GET", "/fhir/not-a-type", {}, None, 404, "not-supported"),
    ("GET", "/fhir/Patient", {"Accept": "text/html"}, None, 406, "not-supported"),
    ("POST", "/fhir/Patient", {"Content-Type": "application/fhir+json"}, b'{"resourceType": "Observation"}',
     400, "invalid"),
    ("POST", "/fhir/Patient", {"Content-Type": "application/fhir+json"}, b"{oops", 400, "structure"),
    ("POST", "/fhir/Patient", {"Content-Type": "text/plain"}, b"x", 415, "not-supported"),
    ("DELETE", "/fhir/metadata", {}, None, 405, "not-supported"),
])
def test_what_no_fhir_server_could_serve_is_refused_before_the_pipeline(method, path, headers, data, status, code):
    stub, backend = _stub()
    answer, body = stub.request(method, path, headers=headers, data=data)
    assert answer.code == status
    assert answer.headers.getRawHeaders("content-type")[0].startswith("application/fhir+json")
    assert _outcome(body)["code"] == code
    assert backend.requests == []


def test_a_backend_error_is_an_operation_outcome():
    stub, _backend = _stub(lambda request: Forbidden("no consent"))
    answer, body = stub.request("GET", "/fhir/Patient/p1")
    assert answer.code == 403
    assert _outcome(body) == {"severity": "error", "code": "forbidden", "diagnostics": "no consent"}


def test_problem_json_from_middleware_becomes_an_operation_outcome():
    problem = ResponseEnvelope.json(429, {"title": "Too Many", "detail": "slow down"}, "application/problem+json")
    problem.headers.setRawHeaders("Retry-After", ["5"])
    stub, _backend = _stub(lambda request: problem)
    answer, body = stub.request("GET", "/fhir/Patient")
    assert answer.code == 429 and answer.headers.getRawHeaders("retry-after") == ["5"]
    assert _outcome(body) == {"severity": "error", "code": "throttled", "diagnostics": "slow down"}


def test_options_and_limits():
    endpoint = build(FhirEndpoint, {"fhir_version": "R5", "max_resource_bytes": 4096})
    assert endpoint.version_number == "5.0" and endpoint.path_prefix == "/fhir"
    assert endpoint.request_body_limit("PUT", "/Patient/1") == (4096, "max_resource_bytes")
    assert endpoint.request_body_limit("GET", "/Patient/1") is None
    with pytest.raises(OptionError) as e:
        build(FhirEndpoint, {"fhir_version": "DSTU2"})
    assert e.value.key == "fhir_version"
