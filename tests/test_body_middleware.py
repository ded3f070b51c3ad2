"""path_filter, json_extractor, transform and metadata_transform through a real
Harmony, with real HTTP upstreams on loopback: the statuses, bodies and
Content-Length the client and the upstream actually see."""

import gzip
import json
import shutil
from pathlib import Path

import pytest
import pytest_twisted
import treq

from harmony.config import ConfigErrors
from tests.harness import start_harmony, write_config
from tests.middleware_harness import (assert_option_error, build_pipeline, http_backend, pipeline_config,
                                      start_pipeline)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "etc" / "transforms"
GOLDEN = ROOT / "tests" / "golden"
PATIENT_IN = json.loads((GOLDEN / "patient_to_fhir.input.json").read_text())
PATIENT_OUT = json.loads((GOLDEN / "patient_to_fhir.expected.json").read_text())
JSON = {"Content-Type": ["application/json"]}


def transforms_dir(tmp_path) -> Path:
    """A transforms_path with the shipped examples plus test specs."""
    folder = tmp_path / "transforms"
    shutil.copytree(EXAMPLES, folder)
    # Valid specs that fail at run time on any document with "a" / "protocol".
    (folder / "fails.json").write_text(json.dumps([{"operation": "shift", "spec": {"a": "b[&(5,0)]"}}]))
    (folder / "fails_meta.json").write_text(json.dumps([{"operation": "shift",
                                                         "spec": {"protocol": "b[&(5,0)]"}}]))
    (folder / "context.json").write_text(json.dumps([
        {"operation": "shift", "spec": {"*": "data.&",
                                        "_context": {"method": "request.method", "subpath": "request.subpath",
                                                     "query": "request.query", "headers": "request.headers",
                                                     "metadata": {"request_id": "request.id"}}}},
        {"operation": "modify-overwrite-beta", "spec": {"request": {"via": "^metadata.endpoint"}}}]))
    return folder


async def start(tmp_path, middleware, order=None, **kw):
    return await start_pipeline(tmp_path, middleware, order, transforms_path=str(transforms_dir(tmp_path)), **kw)


def content_length(resp) -> int:
    # Twisted's client keeps Content-Length out of response.headers; .length is it.
    return resp.length


async def problem(resp):
    assert resp.headers.getRawHeaders("content-type") == ["application/problem+json"]
    return json.loads(await resp.content())


# --------------------------------------------------------------------------- path_filter

FILTER = {"filter": 'type = "path_filter"\nrules = ["/Patient", "/Patient/{id}", '
                    '"/studies/{study}/series/{*rest}", "/metadata/"]'}


@pytest.fixture(scope="module")
def filtered(tmp_path_factory):
    """path_filter in front of an http backend (a real upstream)."""
    from tests.harness import RecordingUpstream, listen
    up = RecordingUpstream()
    port = listen(up)
    up.url = f"http://127.0.0.1:{port.getHost().port}"
    running = pytest_twisted.blockon(start_pipeline(tmp_path_factory.mktemp("filter"), FILTER,
                                                    backend=http_backend(up.url)))
    yield running, up
    pytest_twisted.blockon(running.stop())
    pytest_twisted.blockon(port.stopListening())


@pytest.mark.parametrize("path, upstream_path", [
    ("/api/Patient", b"/Patient"),
    ("/api/Patient/", b"/Patient/"),
    ("/api/Patient/p-1", b"/Patient/p-1"),
    ("/api/metadata", b"/metadata"),
    ("/api/studies/1.2.3/series", b"/studies/1.2.3/series"),
    ("/api/studies/1.2.3/series/4.5/instances/6.7", b"/studies/1.2.3/series/4.5/instances/6.7"),
])
@pytest_twisted.ensureDeferred
async def test_path_filter_allows_matching_paths(filtered, path, upstream_path):
    running, up = filtered
    resp = await treq.get(running.url(path))
    assert resp.code == 200
    await resp.content()
    assert up.requests[-1]["path"] == upstream_path


@pytest.mark.parametrize("path", [
    "/api", "/api/", "/api/Observation", "/api/Patient/p-1/_history", "/api/patient",
    "/api/studies/1.2.3", "/api/studies//series", "/api//Patient",
    "/api/Patient/..", "/api/Patient/%2e%2e", "/api/Patient/a%2Fb", "/api/Patient/.",
    "/api/studies/x/series/../../../admin", "/api/studies/x/series/%2E%2E/%2e%2E/secret",
    "/api/Patient/%ff%fe",
])
@pytest_twisted.ensureDeferred
async def test_path_filter_refuses_with_real_404(filtered, path):
    running, up = filtered
    before = len(up.requests)
    resp = await treq.get(running.url(path))
    # Dot segments are refused (400) by the router before any middleware runs.
    from harmony.web.router import has_dot_segment
    status, title = (400, "Bad Request") if has_dot_segment(path) else (404, "Not Found")
    assert resp.code == status, path
    doc = await problem(resp)
    assert doc["status"] == status and doc["title"] == title
    assert len(up.requests) == before  # the backend was never called


@pytest_twisted.ensureDeferred
async def test_path_filter_captures_segments_into_metadata(tmp_path):
    running = await start(tmp_path, FILTER)
    try:
        resp = await treq.get(running.url("/api/studies/1.2.3/series/4.5/frames/1"))
        meta = json.loads(await resp.content())["metadata"]
        assert meta["path.study"] == "1.2.3" and meta["path.rest"] == "4.5/frames/1"
    finally:
        await running.stop()


@pytest.mark.parametrize("rules, key, message", [
    ("[]", "rules", "at least one pattern"),
    ('["Patient"]', "rules[0]", "must start with '/'"),
    ('["/a", "/{*rest}/b"]', "rules[1]", "must be the last segment"),
    ('["/a{id}"]', "rules[0]", "bad segment"),
    ('"/Patient"', "rules", "must be a list of str"),
])
def test_path_filter_config_errors(tmp_path, rules, key, message):
    assert_option_error(tmp_path, {"f": f'type = "path_filter"\nrules = {rules}'}, "f", key, message)


# --------------------------------------------------------------------------- json_extractor


@pytest_twisted.ensureDeferred
async def test_json_extractor_strict_rejects_invalid_json(tmp_path):
    running = await start(tmp_path, {"json": 'type = "json_extractor"\nstrict = true\nmax_body_bytes = 400000'})
    try:
        resp = await treq.post(running.url("/api/Patient"), b'{"resourceType": "Patient",', headers=JSON)
        assert resp.code == 400
        doc = await problem(resp)
        assert "invalid JSON" in doc["detail"] and "line 1 column" in doc["detail"]

        resp = await treq.post(running.url("/api/Patient"), b'{"resourceType": "Patient"}',
                               headers={"Content-Type": ["application/fhir+json; charset=utf-8"]})
        assert resp.code == 200
        assert json.loads(await resp.content())["normalized"] == {"resourceType": "Patient"}

        # Not JSON by Content-Type: not parsed, passed as it is.
        resp = await treq.post(running.url("/api/x"), b"{not json", headers={"Content-Type": ["text/plain"]})
        doc = json.loads(await resp.content())
        assert resp.code == 200 and doc["body"] == "{not json" and "normalized" not in doc

        # A body past the in-memory limit arrives as a stream and is still parsed (under the cap).
        big = {"entries": ["x" * 100] * 3000}
        raw = json.dumps(big).encode()
        assert 256 * 1024 < len(raw) < 400000
        resp = await treq.post(running.url("/api/big"), raw, headers=JSON)
        doc = json.loads(await resp.content())
        assert resp.code == 200 and doc["normalized"] == big and doc["body"].encode() == raw

        resp = await treq.post(running.url("/api/big"), raw + b" " * 100000, headers=JSON)
        assert resp.code == 413
        assert "max_body_bytes" in (await problem(resp))["detail"]
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_json_extractor_lenient_passes_invalid_json(tmp_path):
    running = await start(tmp_path, {"json": 'type = "json_extractor"'})
    try:
        resp = await treq.post(running.url("/api/x"), b"[1, 2", headers=JSON)
        doc = json.loads(await resp.content())
        assert resp.code == 200 and doc["body"] == "[1, 2" and "normalized" not in doc
    finally:
        await running.stop()


# --------------------------------------------------------------------------- transform


@pytest_twisted.ensureDeferred
async def test_transform_request_side_rewrites_what_upstream_gets(tmp_path, upstream):
    mw = {"to_fhir": 'type = "transform"\nspec_path = "patient_to_fhir.json"\napply = "left"'}
    running = await start(tmp_path, mw, backend=http_backend(upstream.url))
    try:
        resp = await treq.post(running.url("/api/Patient"), json.dumps(PATIENT_IN).encode(), headers=JSON)
        assert resp.code == 200
        await resp.content()
        sent = upstream.requests[-1]
        assert json.loads(sent["body"]) == PATIENT_OUT
        assert int(sent["headers"][b"content-length"][0]) == len(sent["body"])
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_transform_response_side_rewrites_what_client_gets(tmp_path, upstream):
    mw = {"to_fhir": 'type = "transform"\nspec_path = "patient_to_fhir.json"'}  # apply = "right" by default
    running = await start(tmp_path, mw, backend=http_backend(upstream.url))
    body = json.dumps(PATIENT_IN, indent=4).encode()
    upstream.respond[b"/p"] = (200, {b"content-type": b"application/json"}, body)
    upstream.respond[b"/text"] = (200, {b"content-type": b"text/plain"}, b"plain {text}")
    upstream.respond[b"/missing"] = (404, {b"content-type": b"application/json"}, b'{"error": "nope"}')
    upstream.respond[b"/broken"] = (200, {b"content-type": b"application/json"}, b'{"patient": ')
    upstream.respond[b"/empty"] = (204, {b"content-type": b"application/json"}, b"")
    try:
        resp = await treq.get(running.url("/api/p"))
        got = await resp.content()
        assert resp.code == 200
        assert json.loads(got) == PATIENT_OUT
        assert content_length(resp) == len(got) != len(body)

        resp = await treq.get(running.url("/api/text"))
        assert await resp.content() == b"plain {text}"
        resp = await treq.get(running.url("/api/missing"))
        assert resp.code == 404 and json.loads(await resp.content()) == {"error": "nope"}
        resp = await treq.get(running.url("/api/empty"))
        assert resp.code == 204 and await resp.content() == b""

        resp = await treq.get(running.url("/api/broken"))
        assert resp.code == 500
        doc = await problem(resp)
        assert "upstream" in doc["detail"] and "invalid JSON" in doc["detail"]
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_transform_failure_is_500_unless_told_otherwise(tmp_path, upstream):
    mw = {"strict": 'type = "transform"\nspec_path = "fails.json"\napply = "both"',
          "lenient": 'type = "transform"\nspec_path = "fails.json"\napply = "left"\nfail_on_error = false'}
    running = await start(tmp_path, {"strict": mw["strict"]}, backend=http_backend(upstream.url))
    try:
        resp = await treq.post(running.url("/api/x"), b'{"a": 1}', headers=JSON)
        assert resp.code == 500
        doc = await problem(resp)
        assert doc["title"] == "Middleware Failure" and "'strict' failed" in doc["detail"]
        assert upstream.requests == []
        resp = await treq.post(running.url("/api/x"), b'{"a": ', headers=JSON)
        assert resp.code == 400 and "invalid JSON" in (await problem(resp))["detail"]
    finally:
        await running.stop()
    running = await start(tmp_path / "b", {"lenient": mw["lenient"]}, backend=http_backend(upstream.url))
    try:
        for body in (b'{"a": 1}', b'{"a": '):
            resp = await treq.post(running.url("/api/x"), body, headers=JSON)
            assert resp.code == 200
            await resp.content()
            assert upstream.requests[-1]["body"] == body  # untouched
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_transform_large_streamed_response_and_cap(tmp_path, upstream):
    mw = {"t": 'type = "transform"\nspec_path = "bundle_to_patient_list.json"\nmax_body_bytes = 2000000'}
    running = await start(tmp_path, mw, backend=http_backend(upstream.url))
    entries = [{"resource": {"id": f"p{i}", "name": [{"family": f"F{i}", "given": ["G"]}],
                             "birthDate": "2000-01-01"}} for i in range(5000)]
    bundle = json.dumps({"resourceType": "Bundle", "total": 5000, "entry": entries}).encode()
    assert 256 * 1024 < len(bundle) < 2000000
    upstream.respond[b"/Patient"] = (200, {b"content-type": b"application/fhir+json"}, bundle)
    upstream.respond[b"/huge"] = (200, {b"content-type": b"application/json"}, bundle * 4)
    try:
        # A client that asks for nothing gets the transformed body plain, its length fixed.
        from twisted.internet import reactor
        from twisted.web.client import Agent
        from twisted.web.http_headers import Headers
        resp = await Agent(reactor).request(b"GET", running.url("/api/Patient").encode())
        got = await treq.content(resp)
        doc = json.loads(got)
        assert doc["count"] == 5000 and doc["patients"][4999] == {"id": "p4999", "family": "F4999",
                                                                   "given": "G", "born": "2000-01-01"}
        assert content_length(resp) == len(got)
        # A remote one (via a local proxy) that accepts gzip gets it compressed.
        resp = await Agent(reactor).request(b"GET", running.url("/api/Patient").encode(),
                                            Headers({"Accept-Encoding": ["gzip"], "X-Forwarded-For": ["198.51.100.7"]}))
        assert resp.headers.getRawHeaders(b"content-encoding") == [b"gzip"]
        assert gzip.decompress(await treq.content(resp)) == got
        # A document this size is transformed on the thread pool, not the reactor thread.
        assert running.service.runtime.middleware["t"].offloaded == 2
        resp = await treq.get(running.url("/api/huge"))
        assert resp.code == 500 and "max_body_bytes" in (await problem(resp))["detail"]
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_transform_gzip_bodies(tmp_path, upstream):
    import gzip
    mw = {"t": 'type = "transform"\nspec_path = "patient_to_fhir.json"\napply = "both"\nmax_body_bytes = 100000'}
    running = await start(tmp_path, mw, backend=http_backend(upstream.url))
    packed = gzip.compress(json.dumps(PATIENT_IN).encode())
    upstream.respond[b"/gz"] = (200, {b"content-type": b"application/json", b"content-encoding": b"gzip"}, packed)
    upstream.respond[b"/bomb"] = (200, {b"content-type": b"application/json", b"content-encoding": b"gzip"},
                                  gzip.compress(b" " * 200000 + b"{}"))
    upstream.respond[b"/br"] = (200, {b"content-type": b"application/json", b"content-encoding": b"br"}, b"xx")
    try:
        resp = await treq.post(running.url("/api/gz"), packed,
                               headers={"Content-Type": ["application/json"], "Content-Encoding": ["gzip"],
                                        "Accept-Encoding": ["gzip"]})
        got = await resp.content()
        assert resp.code == 200 and json.loads(got) == PATIENT_OUT
        sent = upstream.requests[-1]
        assert json.loads(sent["body"]) == PATIENT_OUT  # request side: inflated, transformed, sent plain
        assert b"content-encoding" not in sent["headers"]
        assert sent["headers"][b"accept-encoding"] == [b"identity"]  # upstream asked for a plain body
        resp = await treq.get(running.url("/api/bomb"))
        assert resp.code == 500 and "exceeds 100000 bytes" in (await problem(resp))["detail"]
        resp = await treq.get(running.url("/api/br"))
        assert resp.code == 500 and "Content-Encoding 'br'" in (await problem(resp))["detail"]
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_transform_inject_context(tmp_path):
    mw = {"ctx": 'type = "transform"\nspec_path = "context.json"\napply = "left"\ninject_context = true'}
    running = await start(tmp_path, mw)
    try:
        resp = await treq.post(running.url("/api/Patient/1?x=1&x=2&y=3"), b'{"a": 1}',
                               headers={"Content-Type": ["application/json"], "X-Site": ["north"],
                                        "Authorization": ["Bearer secret-token"], "X-Request-ID": ["rid-1"]})
        doc = json.loads(await resp.content())
        out = doc["normalized"]
        assert out["data"] == {"a": 1}
        req = out["request"]
        assert req["method"] == "POST" and req["subpath"] == "/Patient/1" and req["id"] == "rid-1"
        assert req["query"] == {"x": ["1", "2"], "y": "3"}
        assert req["headers"]["x-site"] == "north"
        assert "authorization" not in req["headers"]
        assert req["via"] == "api"  # JOLT context (^metadata.endpoint) in a modify step
        assert "_context" not in out
        assert "secret-token" not in doc["body"]
    finally:
        await running.stop()


@pytest.mark.parametrize("spec_text, message", [
    (None, "cannot read"),
    ("[{", "invalid JSON"),
    ('[{"operation": "shift"}]', "needs a 'spec'"),
    ('[{"operation": "modify-overwrite-beta", "spec": {"a": "=nope"}}]', "Unknown modify function 'nope'"),
])
def test_bad_spec_file_is_a_config_error_naming_it(tmp_path, spec_text, message):
    folder = transforms_dir(tmp_path)
    if spec_text is not None:
        (folder / "bad.json").write_text(spec_text)
    with pytest.raises(ConfigErrors) as e:
        build_pipeline(tmp_path, {"t": 'type = "transform"\nspec_path = "bad.json"',
                         "m": 'type = "metadata_transform"\nspec_path = "bad.json"'},
              transforms_path=str(folder))
    text = e.value.render()
    assert "2 configuration problem(s)" in text  # both reported in one pass
    for name in ("t", "m"):
        assert f"[middleware.{name}.options.spec_path]: {folder / 'bad.json'}" in text
    assert message in text


def test_transform_options_checked(tmp_path):
    folder = transforms_dir(tmp_path)
    assert_option_error(tmp_path, {"t": 'type = "transform"\nspec_path = "patient_to_fhir.json"\napply = "sideways"'},
                        "t", "apply", "must be one of 'left', 'right', 'both'", transforms_path=str(folder))
    with pytest.raises(ConfigErrors, match=r"options.spec_path\]: is required"):
        build_pipeline(tmp_path / "b", {"t": 'type = "transform"'}, transforms_path=str(folder))


# --------------------------------------------------------------------------- metadata_transform


@pytest_twisted.ensureDeferred
async def test_metadata_transform_routes_and_keeps_other_keys(tmp_path):
    # basic_auth sets auth.sub; a metadata_transform turns it into routing metadata.
    mw = {
        "login": 'type = "basic_auth"\nusername = "north"\npassword = "pw"',
        "filter": 'type = "path_filter"\nrules = ["/{level}"]',
        "tenant": 'type = "metadata_transform"\nspec_path = "tenant.json"',
        "route": 'type = "metadata_transform"\nspec_path = "route_by_tenant.json"',
    }
    folder = transforms_dir(tmp_path)
    (folder / "tenant.json").write_text(json.dumps(
        [{"operation": "shift", "spec": {"auth.sub": "auth.tenant", "request_id": "junk.number"}},
         {"operation": "default", "spec": {"junk": {"count": 3, "flag": True, "list": ["x"]}}}]))
    main, pipes = pipeline_config(mw, transforms_path=str(folder))
    running = await start_harmony(write_config(tmp_path, main, {"main": pipes}))
    try:
        import base64
        auth = "Basic " + base64.b64encode(b"north:pw").decode()
        resp = await treq.get(running.url("/api/series"), headers={"Authorization": auth, "X-Request-ID": "r-9"})
        meta = json.loads(await resp.content())["metadata"]
        assert meta["auth.tenant"] == "north"
        assert meta["dimse_op"] == "C-FIND" and meta["query_level"] == "SERIES"
        assert meta["route.user"] == "north"
        assert meta["request_id"] == "r-9" and meta["junk.number"] == "r-9"
        assert "junk.count" not in meta and "junk.flag" not in meta and "junk.list" not in meta
        # The pipeline has one backend, so "backend" names the one that ran, whatever the spec said.
        assert meta["protocol"] == "http" and meta["endpoint"] == "api"
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_metadata_transform_failure_is_500(tmp_path):
    running = await start(tmp_path, {"m": 'type = "metadata_transform"\nspec_path = "fails_meta.json"'})
    try:
        resp = await treq.get(running.url("/api/x"))
        assert resp.code == 500
        assert "metadata transform 'm' failed" in (await problem(resp))["detail"]
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_shipped_example_pipeline(tmp_path):
    """etc/examples/patient-to-fhir's pipeline, as documented, with the shipped specs."""
    import base64
    text = (ROOT / "etc" / "examples" / "patient-to-fhir" / "pipelines" / "patient-to-fhir.toml").read_text()
    from tests.harness import MINIMAL_MAIN
    main = MINIMAL_MAIN.replace("[proxy]", f'[proxy]\ntransforms_path = "{EXAMPLES}"', 1)
    running = await start_harmony(write_config(tmp_path, main, {"example": text}))
    auth = {"Authorization": ["Basic " + base64.b64encode(b"demo:change-me").decode()],
            "Content-Type": ["application/json"]}
    try:
        resp = await treq.post(running.url("/demo/patient-fhir/Patient"), json.dumps(PATIENT_IN).encode(),
                               headers=auth)
        doc = json.loads(await resp.content())
        assert resp.code == 200 and json.loads(doc["body"]) == PATIENT_OUT
        resp = await treq.post(running.url("/demo/patient-fhir/Observation"), b"{}", headers=auth)
        assert resp.code == 404
        await resp.content()
        resp = await treq.post(running.url("/demo/patient-fhir/Patient"), b"{}", headers=JSON)
        assert resp.code == 401
        await resp.content()
    finally:
        await running.stop()
