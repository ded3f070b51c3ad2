"""harmony.middleware.transform in memory: a JOLT spec over request and response bodies, the
normalized view, content types and codings, and who is blamed when it fails."""

from __future__ import annotations

import gzip
import json
import types

import pytest

from harmony.config.errors import OptionError
from harmony.errors import BadRequest, MiddlewareFailed
from harmony.middleware.transform import Transform, request_context
from tests.memory import build, failure_of, request, response, result_of

RENAME = [{"operation": "shift", "spec": {"name": "patient.name", "_context": {"method": "patient.via"}}}]


def _transform(tmp_path, spec=RENAME, **options):
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    ctx = types.SimpleNamespace(transforms_path=tmp_path, reactor=None)
    return build(Transform, {"spec_path": "spec.json", **options}, ctx=ctx, name="t")


def _json_request(doc, **headers):
    body = json.dumps(doc).encode()
    return request("POST", headers={"Content-Type": "application/json", "Content-Length": str(len(body)),
                                    **headers}, body=body)


def test_a_request_body_is_rewritten_with_its_length(tmp_path):
    mw = _transform(tmp_path, apply="left")
    out = result_of(mw.on_request(_json_request({"name": "Synthetic"})))
    assert json.loads(out.body) == {"patient": {"name": "Synthetic"}}
    assert out.header("content-length") == str(len(out.body))
    assert out.normalized == {"patient": {"name": "Synthetic"}}


def test_the_response_side_asks_for_identity_and_rewrites_only_2xx(tmp_path):
    mw = _transform(tmp_path, content_type="application/fhir+json")
    req = request(headers={"Accept-Encoding": "gzip"})
    assert mw.on_request(req).header("accept-encoding") == "identity"
    ok = response(200, headers={"Content-Type": "application/json"}, body=b'{"name": "x"}')
    out = result_of(mw.on_response(req, ok))
    assert json.loads(out.body) == {"patient": {"name": "x"}}
    assert out.header("content-type") == "application/fhir+json"
    error = response(404, headers={"Content-Type": "application/json"}, body=b'{"name": "x"}')
    assert mw.on_response(req, error) is error and error.body == b'{"name": "x"}'


def test_a_gzipped_body_is_inflated_and_written_back_plain(tmp_path):
    mw = _transform(tmp_path, apply="left")
    body = gzip.compress(b'{"name": "z"}')
    req = request("POST", headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}, body=body)
    out = result_of(mw.on_request(req))
    assert json.loads(out.body) == {"patient": {"name": "z"}} and not out.headers.hasHeader(b"content-encoding")


def test_context_is_injected_without_credentials(tmp_path):
    mw = _transform(tmp_path, apply="left", inject_context=True)
    req = _json_request({"name": "n"}, Authorization="Bearer secret", Cookie="c=1")
    out = result_of(mw.on_request(req))
    assert json.loads(out.body) == {"patient": {"name": "n", "via": "POST"}}
    context = request_context(req)
    assert "authorization" not in context["headers"] and "cookie" not in context["headers"]


def test_a_normalized_view_without_a_json_body_is_transformed(tmp_path):
    mw = _transform(tmp_path, apply="left")
    req = request("POST", headers={"Content-Type": "x-application/hl7-v2+er7"}, body=b"MSH|...",
                  normalized={"name": "v2"})
    out = result_of(mw.on_request(req))
    assert out.normalized == {"patient": {"name": "v2"}} and out.body == b"MSH|..."


def test_bad_json_is_the_clients_fault_and_a_bad_upstream_body_ours(tmp_path):
    mw = _transform(tmp_path, apply="both")
    broken = request("POST", headers={"Content-Type": "application/json"}, body=b"{not json")
    failure_of(mw.on_request(broken), BadRequest)
    upstream = response(200, headers={"Content-Type": "application/json"}, body=b"{not json")
    failure_of(mw.on_response(request(), upstream), MiddlewareFailed)
    lenient = _transform(tmp_path, apply="left", fail_on_error=False)
    kept = result_of(lenient.on_request(request("POST", headers={"Content-Type": "application/json"},
                                                body=b"{not json")))
    assert kept.body == b"{not json"


def test_a_spec_that_cannot_load_names_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("[{\"operation\": \"teleport\"}]")
    ctx = types.SimpleNamespace(transforms_path=tmp_path, reactor=None)
    with pytest.raises(OptionError) as e:
        build(Transform, {"spec_path": "bad.json"}, ctx=ctx)
    assert e.value.key == "spec_path" and "bad.json" in e.value.message
