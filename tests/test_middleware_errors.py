"""Middleware errors reach every endpoint as the right HarmonyError.

Endpoints render errors in their own dialect (problem+json, OperationOutcome,
DIMSE statuses) from ``error_response(error, request)``; what they all rely on
is that the pipeline hands them the error with its status and headers intact.
This checks that contract with a protocol-neutral recording endpoint (this
branch has only the HTTP endpoint; the HTTP tests check the rendered
responses end to end), with the real middleware objects built from TOML.
"""

import base64
import json

import pytest
import pytest_twisted
from twisted.web.http_headers import Headers

from harmony.envelope import RequestEnvelope, ResponseEnvelope
from harmony.errors import HarmonyError
from tests.middleware_harness import build_pipeline


class RecordingEndpoint:
    """Stands in for any endpoint type: renders errors as a bare status and
    remembers the HarmonyError it was given."""

    name = "neutral"

    def __init__(self):
        self.errors = []

    def pre_process(self, request):
        return request

    def post_process(self, request, response):
        return response

    def error_response(self, error, request):
        self.errors.append(error)
        return ResponseEnvelope(status=error.status, headers=Headers(dict(
            (k, [v]) for k, v in error.headers)))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    folder = tmp / "transforms"
    folder.mkdir()
    (folder / "fails.json").write_text(json.dumps([{"operation": "shift", "spec": {"a": "b[&(5,0)]"}}]))
    mw = {
        "basic": 'type = "basic_auth"\nusername = "u"\npassword = "p"',
        "filter": 'type = "path_filter"\nrules = ["/ok/{*rest}"]',
        "json": 'type = "json_extractor"\nstrict = true',
        "transform": 'type = "transform"\nspec_path = "fails.json"\napply = "left"',
    }
    return build_pipeline(tmp, mw, transforms_path=str(folder)).pipelines["main"]


def envelope(subpath="/ok/x", auth="u:p", body=b"", metadata=None):
    headers = Headers({"Content-Type": ["application/json"]})
    if auth:
        headers.setRawHeaders("Authorization", ["Basic " + base64.b64encode(auth.encode()).decode()])
    return RequestEnvelope(method="POST", path="/any" + subpath, subpath=subpath, headers=headers, body=body,
                           metadata={"protocol": "dimse", "request_id": "r1", **(metadata or {})})


@pytest.mark.parametrize("kwargs, status, title", [
    ({"auth": None}, 401, "Unauthorized"),
    ({"auth": "u:wrong"}, 401, "Unauthorized"),
    ({"subpath": "/elsewhere"}, 404, "Not Found"),
    ({"body": b"{oops"}, 400, "Bad Request"),
    ({"body": b'{"a": 1}'}, 500, "Middleware Failure"),
])
@pytest_twisted.ensureDeferred
async def test_error_reaches_the_endpoint_with_its_status(pipeline, kwargs, status, title):
    endpoint = RecordingEndpoint()
    response = await pipeline.handle(envelope(**kwargs), endpoint)
    assert response.status == status
    [error] = endpoint.errors
    assert isinstance(error, HarmonyError) and error.status == status and error.title == title
    if status == 401:
        assert response.headers.getRawHeaders("WWW-Authenticate")[0].startswith("Basic realm=")
    assert response.metadata["error"] == error.code


@pytest_twisted.ensureDeferred
async def test_passing_request_reaches_the_backend(pipeline):
    endpoint = RecordingEndpoint()
    response = await pipeline.handle(envelope(body=b'{"b": 1}'), endpoint)
    assert endpoint.errors == []
    assert response.status == 200
    echoed = json.loads(response.body)
    assert echoed["metadata"]["auth.sub"] == "u" and echoed["metadata"]["path.rest"] == "x"
    assert echoed["body"] == "null"  # the shift matched nothing in {"b": 1}: JOLT's output is null


@pytest_twisted.ensureDeferred
async def test_transform_rewrites_the_normalized_view_of_a_bodiless_request(tmp_path):
    """A DIMSE endpoint has no body: its C-FIND identifier is DICOM JSON in
    ``normalized``.  The same transform applies to it."""
    folder = tmp_path / "transforms"
    folder.mkdir()
    # Default a missing ModalitiesInStudy (0008,0061) to CT in every study-level query.
    (folder / "ct.json").write_text(json.dumps([{"operation": "default", "spec": {
        "00080061": {"vr": "CS", "Value": ["CT"]}}}]))
    pipeline = build_pipeline(tmp_path, {"t": 'type = "transform"\nspec_path = "ct.json"\napply = "left"'},
                              transforms_path=str(folder)).pipelines["main"]
    identifier = {"00100020": {"vr": "LO", "Value": ["PAT-1"]}, "0020000D": {"vr": "UI"}}
    request = RequestEnvelope(method="C-FIND", path="", subpath="", body=b"", normalized=identifier,
                              metadata={"protocol": "dimse", "dimse_op": "C-FIND", "request_id": "r"})
    response = await pipeline.handle(request, RecordingEndpoint())
    echoed = json.loads(response.body)
    assert echoed["normalized"] == {**identifier, "00080061": {"vr": "CS", "Value": ["CT"]}}
    assert echoed["body"] == ""  # no body was invented


@pytest_twisted.ensureDeferred
async def test_transform_failure_keeps_document_data_out_of_info_logs(tmp_path):
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher
    folder = tmp_path / "transforms"
    folder.mkdir()
    (folder / "index.json").write_text(json.dumps([{"operation": "shift", "spec": {"a": {"*": "x[&0]"}}}]))
    pipeline = build_pipeline(tmp_path, {"t": 'type = "transform"\nspec_path = "index.json"\napply = "left"'},
                              transforms_path=str(folder)).pipelines["main"]
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        # The engine's message names the offending key, which is document data.
        response = await pipeline.handle(envelope(body=b'{"a": {"987654321": "x"}}', auth=None), RecordingEndpoint())
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert response.status == 500
    loud = [formatEvent(e) for e in events if e.get("log_level", LogLevel.info) >= LogLevel.info]
    assert any("failed on a document" in text for text in loud)
    assert not any("987654321" in text for text in loud)
