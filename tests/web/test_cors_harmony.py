"""CORS on the dicomweb, fhir, jmix and http endpoints (issue 12, defect 20).

A browser viewer from another origin (OHIF pointed at Harmony's DICOMweb)
first sends a preflight, then reads answers only if they carry
Access-Control-Allow-Origin.  Checked here on the wire (raw HTTP headers):
preflights answered before the pipeline (so before authentication, which a
browser never satisfies on a preflight), the origin echoed with Vary: Origin,
exposed headers, credentials rules, the upstream's own CORS headers replaced,
and nothing at all unless configured.
"""

from __future__ import annotations

import base64
import json

import pytest
import pytest_twisted
import treq
from twisted.internet import defer

from harmony.config import ConfigErrors, load_config
from harmony.runtime import build_runtime
from tests.harness import ECHO, MINIMAL_MAIN, http_pipeline, raw_exchange, start_harmony, write_config

VIEWER = "https://viewer.example"
AUTH = "Basic " + base64.b64encode(b"alice:secret").decode()

BASIC = '[middleware.basic]\ntype = "basic_auth"\nusername = "alice"\npassword_file = "pw"\n'


def pipelines(upstream: str, store) -> str:
    """dicomweb (credentials, behind basic_auth), fhir ("*"), jmix and http with CORS; one http without."""
    up = f'service = "http"\n[backends.up.options]\nbase_url = "{upstream}"'
    return (http_pipeline("dw", "/dw", "dw", "echo", ECHO, ["basic"], service="dicomweb", options="""
                max_upload_bytes = 1000
                [endpoints.dw.options.cors]
                allow_origins = ["https://viewer.example", "http://localhost:3000"]
                allow_credentials = true""")
            + http_pipeline("fhir", "/fhir", "fhir", "echo", "", service="fhir", options="""
                [endpoints.fhir.options.cors]
                allow_origins = ["*"]
                max_age_secs = 7200""")
            + http_pipeline("jmix", "/jmix", "jmix", "echo", "", service="jmix", options=f"""
                store_dir = "{store}"
                [endpoints.jmix.options.cors]
                allow_origins = ["https://viewer.example"]""")
            + http_pipeline("api", "/api", "api", "up", up, options="""
                [endpoints.api.options.cors]
                allow_origins = ["https://viewer.example"]
                expose_headers = ["X-Upstream"]""")
            + http_pipeline("plain", "/plain", "plain", "echo", "")
            + BASIC)


@pytest.fixture
def harmony(tmp_path, upstream):
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "pw").write_text("secret\n")
    text = pipelines(upstream.url + "/base", tmp_path / "jmix")
    running = pytest_twisted.blockon(defer.ensureDeferred(start_harmony(
        write_config(tmp_path, MINIMAL_MAIN, {"p": text}))))
    yield running
    pytest_twisted.blockon(running.stop())


def h(resp, name):
    return resp.headers.getRawHeaders(name)


def preflight(harmony, path, origin=VIEWER, method="GET", asked="authorization, accept"):
    headers = {"Origin": origin, "Access-Control-Request-Method": method}
    if asked:
        headers["Access-Control-Request-Headers"] = asked
    return treq.request("OPTIONS", harmony.url(path), headers=headers)


@pytest.mark.parametrize("path,methods", [
    ("/dw/studies", "GET, HEAD, POST, DELETE, OPTIONS"),
    ("/jmix/api/jmix", "GET, HEAD, POST, OPTIONS"),
    ("/api/x", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
])
@pytest_twisted.ensureDeferred
async def test_a_preflight_is_answered_before_the_pipeline(harmony, upstream, path, methods):
    resp = await preflight(harmony, path)
    assert resp.code == 204 and await resp.content() == b""  # basic_auth never saw it (no 401)
    assert h(resp, "access-control-allow-origin") == [VIEWER]
    assert h(resp, "access-control-allow-methods") == [methods]
    assert "Authorization" in h(resp, "access-control-allow-headers")[0]
    assert h(resp, "access-control-max-age") == ["600"]
    assert "Origin" in h(resp, "vary")[0]
    assert upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_credentials_are_allowed_only_where_configured(harmony):
    resp = await preflight(harmony, "/dw/studies", origin="http://localhost:3000")
    assert h(resp, "access-control-allow-origin") == ["http://localhost:3000"]
    assert h(resp, "access-control-allow-credentials") == ["true"]
    resp = await preflight(harmony, "/jmix/api/jmix")
    assert h(resp, "access-control-allow-credentials") is None


@pytest_twisted.ensureDeferred
async def test_a_preflight_from_an_origin_not_on_the_list_is_refused(harmony):
    resp = await preflight(harmony, "/dw/studies", origin="https://evil.example")
    assert resp.code == 403
    assert h(resp, "access-control-allow-origin") is None
    doc = json.loads(await resp.content())
    assert "cors.allow_origins" in doc["detail"] and doc["request_id"]


@pytest_twisted.ensureDeferred
async def test_answers_to_an_allowed_origin_carry_allow_origin_vary_and_exposed_headers(harmony):
    resp = await treq.get(harmony.url("/dw/studies?PatientID=1"), headers={"Origin": VIEWER, "Authorization": AUTH})
    await resp.content()
    assert resp.code == 200
    assert h(resp, "access-control-allow-origin") == [VIEWER]
    assert h(resp, "access-control-allow-credentials") == ["true"]
    assert "Origin" in h(resp, "vary")[0]
    exposed = h(resp, "access-control-expose-headers")[0]
    for name in ("Content-Location", "Location", "ETag", "Content-Type", "Warning", "X-Request-ID"):
        assert name in exposed
    # A proxy-made error too, or the page cannot even read its 401.
    resp = await treq.get(harmony.url("/dw/studies"), headers={"Origin": VIEWER})
    assert resp.code == 401 and h(resp, "access-control-allow-origin") == [VIEWER]
    await resp.content()


@pytest_twisted.ensureDeferred
async def test_another_origin_gets_no_allow_origin_but_caches_still_see_vary(harmony):
    resp = await treq.get(harmony.url("/dw/studies"), headers={"Origin": "https://evil.example",
                                                                "Authorization": AUTH})
    await resp.content()
    assert h(resp, "access-control-allow-origin") is None
    assert "Origin" in h(resp, "vary")[0]


@pytest_twisted.ensureDeferred
async def test_a_refused_preflight_on_fhir_is_an_operation_outcome(tmp_path):
    text = http_pipeline("f", "/fhir", "fhir", "echo", ECHO, service="fhir",
                         options='[endpoints.fhir.options.cors]\nallow_origins = ["https://viewer.example"]')
    running = await start_harmony(write_config(tmp_path, MINIMAL_MAIN, {"p": text}))
    try:
        resp = await preflight(running, "/fhir/Patient", origin="https://evil.example")
        doc = json.loads(await resp.content())
        assert resp.code == 403 and doc["resourceType"] == "OperationOutcome"
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_wildcard_without_credentials_answers_star(harmony):
    resp = await treq.get(harmony.url("/fhir/Patient/1"), headers={"Origin": "https://anyone.example"})
    await resp.content()
    assert h(resp, "access-control-allow-origin") == ["*"]
    assert h(resp, "access-control-allow-credentials") is None
    resp = await preflight(harmony, "/fhir/Patient", origin="https://anyone.example", method="PUT")
    assert resp.code == 204 and h(resp, "access-control-max-age") == ["7200"]
    assert "PUT" in h(resp, "access-control-allow-methods")[0]


@pytest_twisted.ensureDeferred
async def test_the_upstreams_own_cors_headers_are_replaced_not_doubled(harmony, upstream):
    upstream.respond[b"/base/x"] = (200, {b"Access-Control-Allow-Origin": b"*", b"X-Upstream": b"1",
                                          b"Access-Control-Allow-Credentials": b"true"}, b"ok")
    resp = await treq.get(harmony.url("/api/x"), headers={"Origin": VIEWER})
    assert await resp.content() == b"ok"
    assert h(resp, "access-control-allow-origin") == [VIEWER]
    assert h(resp, "access-control-allow-credentials") is None
    assert h(resp, "access-control-expose-headers") == ["X-Upstream"]


@pytest_twisted.ensureDeferred
async def test_cors_is_off_unless_configured(harmony):
    resp = await preflight(harmony, "/plain/x")
    await resp.content()
    assert resp.code == 200  # an ordinary OPTIONS request, for the pipeline (echo) to answer
    assert not any(name.lower().startswith(b"access-control-") for name, _ in resp.headers.getAllRawHeaders())
    resp = await treq.get(harmony.url("/plain/x"), headers={"Origin": VIEWER})
    await resp.content()
    assert h(resp, "access-control-allow-origin") is None and h(resp, "vary") is None


@pytest_twisted.ensureDeferred
async def test_a_refusal_at_the_head_carries_cors_too(harmony):
    """A 413 on the declared length is answered before the pipeline: the browser must still read it."""
    answer = await raw_exchange(harmony.port(), f"POST /dw/studies HTTP/1.1\r\nHost: a\r\nOrigin: {VIEWER}\r\n"
                                "Content-Type: multipart/related; boundary=B\r\nContent-Length: 999999\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert f"access-control-allow-origin: {VIEWER}".encode() in answer.lower()


@pytest.mark.parametrize("table,key,message", [
    ('allow_origins = ["*"]\nallow_credentials = true', "cors.allow_credentials", "wildcard"),
    ('allow_origins = ["https://viewer.example/"]', "cors.allow_origins", "not an origin"),
    ("allow_origins = []", "cors.allow_origins", "is required"),
    ('allow_origins = ["https://a.example"]\nallow_origin = ["x"]', "cors.allow_origin", "unknown option"),
    ('allow_origins = ["https://a.example"]\nmax_age_secs = -1', "cors.max_age_secs", "between"),
])
def test_cors_config_errors_name_the_key(tmp_path, table, key, message):
    text = http_pipeline("p", "/", "e", "b", ECHO, service="dicomweb", options="[endpoints.e.options.cors]\n" + table)
    with pytest.raises(ConfigErrors) as info:
        build_runtime(load_config(write_config(tmp_path, MINIMAL_MAIN, {"p": text})))
    text = str(info.value)
    assert f"endpoints.e.options.{key}" in text and message in text, text
