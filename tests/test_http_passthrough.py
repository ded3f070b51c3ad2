"""HTTP endpoint + http/echo backends against real loopback servers."""

import json
import os

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.http_headers import Headers

from tests.harness import MINIMAL_MAIN, start_harmony, write_config

PIPES = """
[pipelines.proxy]
networks = ["default"]
endpoints = ["api"]
backends = ["up"]

[endpoints.api]
service = "http"
[endpoints.api.options]
path_prefix = "/api"

[backends.up]
service = "http"
[backends.up.options]
base_url = "{upstream}/base"
timeout_secs = {timeout}

[pipelines.echo]
networks = ["default"]
endpoints = ["echo", "deep"]
backends = ["echo"]

[endpoints.echo]
service = "http"
[endpoints.echo.options]
path_prefix = "/echo"

[endpoints.deep]
service = "http"
[endpoints.deep.options]
path_prefix = "/api/deeper"

[backends.echo]
service = "echo"
"""


@pytest.fixture
def harmony(tmp_path, upstream):
    path = write_config(tmp_path, MINIMAL_MAIN, {"p": PIPES.format(upstream=upstream.url, timeout=0.5)})
    running = pytest_twisted.blockon(start_harmony(path))
    yield running
    pytest_twisted.blockon(running.stop())


@pytest_twisted.ensureDeferred
async def test_echo_describes_request(harmony):
    resp = await treq.post(harmony.url("/echo/a/b?x=1&x=2&empty="), b"hello",
                           headers={"X-Custom": ["v1", "v2"]})
    assert resp.code == 200
    assert resp.headers.getRawHeaders("content-type") == ["application/json"]
    doc = json.loads(await resp.content())
    assert doc["method"] == "POST"
    assert doc["path"] == "/echo/a/b" and doc["subpath"] == "/a/b"
    assert doc["query"] == {"x": ["1", "2"], "empty": [""]}
    assert doc["headers"]["x-custom"] == ["v1", "v2"]
    assert doc["body"] == "hello" and doc["body_encoding"] == "utf-8"
    assert doc["metadata"]["protocol"] == "http"
    assert doc["metadata"]["pipeline"] == "echo" and doc["metadata"]["endpoint"] == "echo"
    assert len(doc["metadata"]["request_id"]) == 32
    assert resp.headers.getRawHeaders("x-request-id") == [doc["metadata"]["request_id"]]


@pytest_twisted.ensureDeferred
async def test_echo_binary_body_is_base64(harmony):
    payload = bytes(range(256))
    resp = await treq.put(harmony.url("/echo"), payload)
    doc = json.loads(await resp.content())
    import base64
    assert doc["body_encoding"] == "base64" and base64.b64decode(doc["body"]) == payload


@pytest_twisted.ensureDeferred
async def test_query_string_forwarded_byte_for_byte(harmony, upstream):
    raw = "/api/studies?PatientID=A%20B&x=1&x=2&flag&x=3&enc=%2F%3F"
    resp = await treq.get(harmony.url(raw))
    assert resp.code == 200
    await resp.content()
    assert upstream.requests[-1]["uri"] == b"/base/studies?PatientID=A%20B&x=1&x=2&flag&x=3&enc=%2F%3F"


@pytest_twisted.ensureDeferred
async def test_binary_bodies_byte_exact_both_ways(harmony, upstream):
    big = os.urandom(3 * 1024 * 1024 + 17)  # above the in-memory limit: streamed
    upstream.respond[b"/base/blob"] = (201, {b"content-type": b"application/octet-stream"}, big[::-1])
    resp = await treq.post(harmony.url("/api/blob"), big,
                           headers={"Content-Type": "application/octet-stream"})
    got = await resp.content()
    assert resp.code == 201
    assert upstream.requests[-1]["body"] == big
    assert got == big[::-1]


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_dropped_end_to_end_kept(harmony, upstream):
    upstream.respond[b"/base/h"] = (200, {b"x-upstream": b"yes", b"keep-alive": b"timeout=5",
                                          b"proxy-authenticate": b"Basic"}, b"ok")
    headers = Headers({
        "Connection": ["keep-alive, X-Private"], "X-Private": ["drop me"], "Keep-Alive": ["300"],
        "TE": ["trailers"], "Proxy-Authorization": ["Basic eA=="], "Upgrade": ["h2c"],
        "X-End-To-End": ["keep me"], "Authorization": ["Bearer abc"], "X-Forwarded-For": ["10.1.1.1"],
    })
    resp = await treq.get(harmony.url("/api/h"), headers=headers)
    assert await resp.content() == b"ok"
    sent = upstream.requests[-1]["headers"]
    for gone in (b"x-private", b"keep-alive", b"te", b"proxy-authorization", b"upgrade"):
        assert gone not in sent, gone
    assert sent[b"x-end-to-end"] == [b"keep me"]
    assert sent[b"authorization"] == [b"Bearer abc"]
    assert sent[b"host"] == [upstream.url.removeprefix("http://").encode()]
    assert sent[b"x-forwarded-for"] == [b"10.1.1.1, 127.0.0.1"]
    assert sent[b"x-forwarded-proto"] == [b"http"]
    assert sent[b"x-forwarded-host"] == [f"127.0.0.1:{harmony.port()}".encode()]
    assert len(sent[b"x-request-id"][0]) == 32
    assert resp.headers.getRawHeaders("x-upstream") == ["yes"]
    assert not resp.headers.hasHeader("keep-alive")
    assert not resp.headers.hasHeader("proxy-authenticate")


@pytest_twisted.ensureDeferred
async def test_response_headers_named_in_the_upstreams_connection_header_are_dropped(harmony, upstream):
    """RFC 9110 7.6.1, upstream to client (issue 12, defect 11): Twisted's client parser
    keeps the answer's Connection header apart, so the names it lists used to leak."""
    upstream.respond[b"/base/c"] = (200, {b"Connection": b"X-Secret-Hop, Keep-Alive", b"X-Secret-Hop": b"internal",
                                          b"X-Kept": b"yes"}, b"ok")
    resp = await treq.get(harmony.url("/api/c"))
    assert await resp.content() == b"ok"
    assert not resp.headers.hasHeader("x-secret-hop")
    assert resp.headers.getRawHeaders("x-kept") == ["yes"]
    assert b"x-secret-hop" not in (resp.headers.getRawHeaders("connection", [""])[0].lower().encode())


def test_connection_listed_headers_are_hop_by_hop():
    from harmony.web.headers import end_to_end
    h = Headers({"Connection": ["close, X-Private"], "X-Private": ["a"], "X-Public": ["b"],
                 "Transfer-Encoding": ["chunked"], "Trailer": ["x"]})
    out = end_to_end(h)
    assert dict(out.getAllRawHeaders()) == {b"X-Public": [b"b"]}


@pytest_twisted.ensureDeferred
async def test_incoming_request_id_is_kept(harmony, upstream):
    resp = await treq.get(harmony.url("/api/x"), headers={"X-Request-ID": "abc-123"})
    await resp.content()
    assert upstream.requests[-1]["headers"][b"x-request-id"] == [b"abc-123"]
    assert resp.headers.getRawHeaders("x-request-id") == ["abc-123"]


@pytest.mark.parametrize("status", [404, 500, 503])
@pytest_twisted.ensureDeferred
async def test_upstream_errors_pass_through_unchanged(harmony, upstream, status):
    upstream.respond[b"/base/err"] = (status, {b"content-type": b"text/html"}, b"<h1>upstream says no</h1>")
    resp = await treq.get(harmony.url("/api/err"))
    assert resp.code == status
    assert resp.headers.getRawHeaders("content-type") == ["text/html"]
    assert await resp.content() == b"<h1>upstream says no</h1>"


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_502_problem(tmp_path):
    from twisted.internet.protocol import Factory
    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    dead = f"http://127.0.0.1:{port.getHost().port}"
    await port.stopListening()
    path = write_config(tmp_path, MINIMAL_MAIN, {"p": PIPES.format(upstream=dead, timeout=5)})
    running = await start_harmony(path)
    try:
        resp = await treq.get(running.url("/api/x"))
        assert resp.code == 502
        assert resp.headers.getRawHeaders("content-type") == ["application/problem+json"]
        doc = json.loads(await resp.content())
        assert doc["status"] == 502 and doc["request_id"] == resp.headers.getRawHeaders("x-request-id")[0]
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_slow_upstream_is_504_problem(harmony, upstream):
    upstream.hang.add(b"/base/slow")
    resp = await treq.get(harmony.url("/api/slow"))
    assert resp.code == 504
    doc = json.loads(await resp.content())
    assert doc["title"] == "Gateway Timeout" and "0.5s" in doc["detail"]


@pytest_twisted.ensureDeferred
async def test_unknown_path_is_404_problem_and_prefix_needs_segment_boundary(harmony, upstream):
    for path in ("/nothing", "/apix", "/echox/y"):
        resp = await treq.get(harmony.url(path))
        assert resp.code == 404, path
        doc = json.loads(await resp.content())
        assert doc["status"] == 404 and doc["instance"] == path
    assert upstream.requests == []


@pytest_twisted.ensureDeferred
async def test_longest_prefix_wins(harmony, upstream):
    resp = await treq.get(harmony.url("/api/deeper/x"))
    doc = json.loads(await resp.content())
    assert doc["metadata"]["endpoint"] == "deep" and doc["subpath"] == "/x"
    resp = await treq.get(harmony.url("/api"))
    await resp.content()
    assert upstream.requests[-1]["uri"] == b"/base"
