"""Malformed and hostile HTTP at the listening socket, sent as raw bytes over a
real loopback connection: each gets a status line (never silence, never a
traceback) and nothing reaches a backend it should not."""

import pytest
import pytest_twisted
from twisted.internet import defer

from tests.harness import MINIMAL_MAIN, echo_pipeline, proxy_pipeline, raw_exchange, start_harmony, write_config


@pytest.fixture
def harmony(tmp_path, upstream):
    running = pytest_twisted.blockon(defer.ensureDeferred(start_harmony(write_config(
        tmp_path, MINIMAL_MAIN, {"echo": echo_pipeline(), "proxy": proxy_pipeline(upstream.url + "/base")}))))
    yield running
    pytest_twisted.blockon(running.stop())


@pytest_twisted.ensureDeferred
async def test_oversized_header_line_is_431_not_a_silent_close(harmony):
    data = b"GET /echo/x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    answer = await raw_exchange(harmony.port("default"), data)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


@pytest_twisted.ensureDeferred
async def test_oversized_request_line_is_414(harmony):
    data = b"GET /echo/x?q=" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    answer = await raw_exchange(harmony.port("default"), data)
    assert answer.startswith(b"HTTP/1.1 414 "), answer[:200]


@pytest_twisted.ensureDeferred
async def test_bad_chunked_encoding_is_400(harmony, upstream):
    data = b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n"
    answer = await raw_exchange(harmony.port("default"), data)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert upstream.requests == []


@pytest.mark.parametrize("path", [
    b"/api/../admin", b"/api/x/../../admin", b"/api/%2e%2e/admin", b"/api/%2E%2e/admin", b"/api/.%2e/admin",
    b"/api/..%2fadmin", b"/api/..%5cadmin", b"/api/a\\..\\..\\admin", b"/api/./x", b"/echo/../api/x",
    # path parameters: Tomcat/Jetty strip ';...' per segment, then resolve (issue 12, defect 14)
    b"/api/..;/admin", b"/api/.;x/admin", b"/api/..;foo/admin", b"/api/%2e%2e;/admin", b"/api/..%3b/admin",
    b"/api/%2e;x/y", b"/api/x/..;",
])
@pytest_twisted.ensureDeferred
async def test_dot_segments_never_reach_a_route(harmony, upstream, path):
    """/api/../../admin would leave base_url's /base at an upstream that resolves
    dot segments; /echo/../api/x would reach /echo's route with a path for /api's."""
    data = b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    answer = await raw_exchange(harmony.port("default"), data)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert b"application/problem+json" in answer and b"Traceback" not in answer
    assert upstream.requests == []
    assert b'"request_id"' in answer


@pytest_twisted.ensureDeferred
async def test_the_no_route_404_carries_a_request_id(harmony):
    """Every proxy-made problem body carries request_id (issue 12, defect 12)."""
    import json

    data = b"GET /nowhere HTTP/1.1\r\nHost: a\r\nX-Request-ID: trace-42\r\nConnection: close\r\n\r\n"
    answer = await raw_exchange(harmony.port("default"), data)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 ") and b"X-Request-Id: trace-42" in head
    assert json.loads(body)["request_id"] == "trace-42"
    answer = await raw_exchange(harmony.port("default"), data.replace(b"X-Request-ID: trace-42\r\n", b""))
    doc = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert len(doc["request_id"]) == 32 and doc["status"] == 404


@pytest.mark.parametrize("path", [b"/api/file..txt", b"/api/.well-known/x", b"/api/a%2e%2eb", b"/api/x;v=1/y",
                                  b"/api/...;x"])
@pytest_twisted.ensureDeferred
async def test_dots_inside_a_segment_pass(harmony, upstream, path):
    data = b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    answer = await raw_exchange(harmony.port("default"), data)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert upstream.requests[-1]["path"] == b"/base" + path[len(b"/api"):]


DEEP = b"[" * 50_000 + b"]" * 50_000  # 100 KB: under every body limit, far past the parser's recursion limit

DEEP_PIPELINES = """
[pipelines.fhir]
networks = ["default"]
endpoints = ["fhir"]
backends = ["deep_echo"]
[endpoints.fhir]
service = "fhir"
[endpoints.fhir.options]
path_prefix = "/fhir"

[pipelines.jwt]
networks = ["default"]
endpoints = ["j"]
middleware = ["auth"]
backends = ["deep_echo"]
[endpoints.j]
service = "http"
path_prefix = "/jwt"
[middleware.auth]
type = "jwt_auth"
use_hs256 = true
hs256_secret = "0123456789abcdef0123456789abcdef"
audience = "harmony-tests"

[pipelines.jmix]
networks = ["default"]
endpoints = ["jmix"]
backends = ["deep_echo"]
[endpoints.jmix]
service = "jmix"
path_prefix = "/jmix"

[backends.deep_echo]
service = "echo"
"""


@pytest.fixture
def deep_harmony(tmp_path):
    running = pytest_twisted.blockon(defer.ensureDeferred(start_harmony(write_config(
        tmp_path, MINIMAL_MAIN, {"echo": echo_pipeline(), "deep": DEEP_PIPELINES}))))
    yield running
    pytest_twisted.blockon(running.stop())


async def post(port, path, body, headers=b""):
    head = (b"POST " + path + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Type: application/json\r\n"
            + headers + b"Content-Length: %d\r\n\r\n" % len(body))
    return await raw_exchange(port, head + body)


@pytest_twisted.ensureDeferred
async def test_deeply_nested_json_body_is_not_a_crash(deep_harmony):
    """The http endpoint parses JSON bodies for middleware; RecursionError there
    gave twisted.web's HTML 'Processing Failed' page."""
    answer = await post(deep_harmony.port(), b"/echo/x", DEEP)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert b"Content-Type: application/json" in answer and b'"normalized"' not in answer  # not parsed


@pytest_twisted.ensureDeferred
async def test_deeply_nested_fhir_resource_is_400_outcome(deep_harmony):
    answer = await post(deep_harmony.port(), b"/fhir/Patient", DEEP, b"Accept: application/fhir+json\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert b"OperationOutcome" in answer and b"nested too deeply" in answer


@pytest_twisted.ensureDeferred
async def test_deeply_nested_jwt_header_is_401(deep_harmony):
    import base64
    header = base64.urlsafe_b64encode(b"[" * 5000 + b"]" * 5000).rstrip(b"=")
    answer = await post(deep_harmony.port(), b"/jwt/x", b"{}", b"Authorization: Bearer " + header + b".e30.c2ln\r\n")
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:300]


@pytest_twisted.ensureDeferred
async def test_an_endpoint_that_raises_gets_problem_json_not_html(harmony, monkeypatch):
    endpoint = harmony.service.runtime.endpoints["e"]

    def broken(request, route):
        raise RuntimeError("a bug")

    monkeypatch.setattr(endpoint, "render_http", broken)
    answer = await raw_exchange(harmony.port(), b"GET /echo/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 500 "), answer[:300]
    assert b"application/problem+json" in answer and b"a bug" not in answer and b"<html" not in answer


@pytest_twisted.ensureDeferred
async def test_deeply_nested_jmix_manifest_is_400(deep_harmony):
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("manifest.json", DEEP)
    body = buf.getvalue()
    head = (b"POST /jmix/api/jmix HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Type: application/zip\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    answer = await raw_exchange(deep_harmony.port(), head + body)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert b"nested too deeply" in answer


@pytest_twisted.ensureDeferred
async def test_refused_and_unrouted_requests_are_in_the_access_log(harmony):
    from twisted.logger import globalLogPublisher
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        for path in (b"/api/%2e%2e/admin", b"/nowhere"):
            await raw_exchange(harmony.port(), b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    finally:
        globalLogPublisher.removeObserver(events.append)
    access = [(e["path"], e["status"]) for e in events if e.get("log_namespace") == "harmony.access"]
    assert access == [("/api/%2e%2e/admin", 400), ("/nowhere", 404)]


def test_malformed_multipart_read_from_a_file_body_is_answered(tmp_path):
    """Bodies over 256 KB reach endpoints as twisted's FileBodyProducer, whose
    Deferred never fires once stopped: a parse error (here a 1 MB part header)
    stopped it and then waited on it, so the STOW-RS request hung.  The
    producer's cooperator is driven by hand: no reactor, no time."""
    import io

    from twisted.internet.task import Cooperator
    from twisted.web.client import FileBodyProducer

    from harmony.dicomweb.multipart import StowParser, parse_body
    from harmony.errors import BadRequest

    pending = []
    cooperator = Cooperator(terminationPredicateFactory=lambda: (lambda: False), scheduler=pending.append)
    data = (b"--XX\r\nContent-Type: application/dicom\r\nX-Junk: " + b"a" * 1_000_000
            + b"\r\n\r\nabc\r\n--XX--\r\n")
    from twisted.internet import defer
    d = parse_body(FileBodyProducer(io.BytesIO(data), cooperator=cooperator), StowParser("XX", tmp_path),
                   run=lambda fn, *args: defer.maybeDeferred(fn, *args))  # the parser's thread, inline
    while pending:
        pending.pop(0)()
    failures = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(BadRequest), d
    assert "malformed multipart body" in str(failures[0].value)
    assert list(tmp_path.iterdir()) == []  # nothing kept
