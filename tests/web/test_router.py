"""harmony.web.router in memory: longest prefix on segment boundaries, dot segments refused in the
dialect of the endpoint the path names, and each endpoint's body policy asked at the request head."""

from __future__ import annotations

import json

import pytest
from treq.testing import StubTreq

from harmony.backends.echo import EchoBackend
from harmony.endpoints.fhir import FhirEndpoint
from harmony.endpoints.http import HttpEndpoint
from harmony.pipeline import Pipeline
from harmony.runtime import Route
from harmony.web.router import PrefixRouter, has_dot_segment
from tests.memory import result_of


def _router():
    pipeline = Pipeline("p", [], [EchoBackend("echo")])
    api = HttpEndpoint("api", "/api")
    api.max_body_bytes = 100
    deep = HttpEndpoint("deep", "/api/deep")
    fhir = FhirEndpoint("fhir", "/fhir")
    routes = [Route("n", "/api/deep", deep, pipeline), Route("n", "/api", api, pipeline),
              Route("n", "/fhir", fhir, pipeline)]
    return PrefixRouter("n", routes)


def _get(router, path):
    stub = StubTreq(router)
    d = stub.get("http://harmony.test" + path)
    stub.flush()
    answer = result_of(d)
    body = stub.content(answer)
    stub.flush()
    return answer.code, json.loads(result_of(body))


def test_the_longest_prefix_wins_on_a_segment_boundary():
    router = _router()
    assert router.match("/api/deep/x").endpoint.name == "deep"
    assert router.match("/api/deeper").endpoint.name == "api"
    assert router.match("/apix") is None
    assert _get(router, "/api/deep/1")[1]["metadata"]["endpoint"] == "deep"


@pytest.mark.parametrize("path", ["/a/../b", "/a/%2e%2E/b", "/a\\..\\b", "/a/..;x/b", "/a/.;/b",
                                  "..", "./a", "/a/.", "/a\\."])
def test_dot_segments_in_every_disguise(path):
    assert has_dot_segment(path)


def test_plain_paths_are_not_dot_segments():
    assert not has_dot_segment("/a/b.c/..d/%2e%2ex")
    assert not has_dot_segment("/hello.txt") and not has_dot_segment("/a.b/c..d") and not has_dot_segment("")


def test_a_dot_segment_is_400_in_the_named_endpoints_dialect():
    router = _router()
    status, problem = _get(router, "/api/%2e%2e/admin")
    assert status == 400 and problem["status"] == 400
    status, outcome = _get(router, "/fhir/../Patient")
    assert status == 400 and outcome["resourceType"] == "OperationOutcome"


def test_no_route_is_a_404_problem():
    status, problem = _get(_router(), "/nowhere")
    assert status == 404 and problem["instance"] == "/nowhere"


def test_body_policy_asks_the_endpoint():
    router = _router()
    assert router.body_policy(b"/api/upload", b"POST") == (True, (100, "max_body_bytes"))
    assert router.body_policy(b"/fhir/Patient", b"GET") == (False, None)
    assert router.body_policy(b"/nowhere", b"POST") == (False, None)


def test_form_bodies_are_never_parsed_by_twisted_web(monkeypatch):
    """twisted.web's Site parses POST form bodies into ``request.args`` before any
    resource runs: a multipart/form-data body read whole into memory, whatever the
    endpoint (a STOW-RS endpoint takes gigabytes), and the email package run on
    every POST's Content-Type.  HarmonySite turns that off; the body reaches the
    endpoint untouched."""
    from twisted.internet import task
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport
    from twisted.web import http

    from harmony.web.router import HarmonySite

    parsed = []
    monkeypatch.setattr(http, "_getMultiPartArgs", lambda *a: parsed.append(a) or {})
    monkeypatch.setattr(http, "_parseContentType", lambda line: parsed.append(line) or b"multipart/form-data")
    site = HarmonySite(_router(), reactor=task.Clock())
    proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 12345))
    transport = StringTransport()
    proto.makeConnection(transport)
    body = b"--xx\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--xx--\r\n"
    proto.dataReceived(b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Type: multipart/form-data; boundary=xx\r\n"
                       b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert transport.value().startswith(b"HTTP/1.1 200 ")  # the echo backend got the body
    assert parsed == []
