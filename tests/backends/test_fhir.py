"""harmony.backends.fhir in memory: FHIR defaults on the way up, the upstream's URLs rewritten to
the proxy's on the way down (headers and streamed JSON/XML bodies), and a non-FHIR answer turned
into a 502 OperationOutcome.  The FHIR server is a twisted.web resource on the same
MemoryReactorClock (tests.memory.Wires)."""

from __future__ import annotations

import json

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.web.resource import Resource

from harmony.backends.fhir import FhirBackend
from harmony.config.errors import OptionError
from harmony.envelope import read_body
from harmony.errors import BackendUnavailable
from harmony.fhir.outcome import issue_code
from tests.memory import Wires, build, failure_of, plugin_context, request, result_of, upstream_site

PORT = 8080
UPSTREAM = f"http://127.0.0.1:{PORT}/fhir"


class FhirServer(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = []
        self.answer = ("application/fhir+json", json.dumps({
            "resourceType": "Bundle", "type": "searchset",
            "link": [{"relation": "next", "url": f"{UPSTREAM}/Patient?_page=2"}],
            "entry": [{"fullUrl": f"{UPSTREAM}/Patient/p1", "resource": {"resourceType": "Patient", "id": "p1"}}],
        }).encode())

    def render(self, req):
        self.seen.append(req)
        ctype, body = self.answer
        req.setHeader(b"content-type", ctype.encode())
        req.setHeader(b"location", f"{UPSTREAM}/Patient/p1/_history/1".encode())
        return body


def _rig(**options):
    reactor = MemoryReactorClock()
    server = FhirServer()
    upstream_site(reactor, server, PORT)
    backend = build(FhirBackend, {"base_url": UPSTREAM, **options}, name="fhir", ctx=plugin_context(reactor))
    return backend, server, Wires(reactor)


def _search(**headers):
    return request("GET", "/Patient", path="/proxy/fhir/Patient", raw_query=b"name:exact=Syn&name=Pat",
                   headers={"Host": "harmony.test:8443", **headers}, host="harmony.test:8443",
                   metadata={"fhir.base_path": "/proxy/fhir", "fhir.interaction": "search-type"})


def test_urls_in_headers_and_the_bundle_point_at_the_proxy():
    backend, server, wires = _rig()
    response = result_of(wires.run(backend.send(_search())))
    body = json.loads(result_of(wires.run(read_body(response.body))))
    assert body["link"][0]["url"] == "http://harmony.test:8443/proxy/fhir/Patient?_page=2"
    assert body["entry"][0]["fullUrl"] == "http://harmony.test:8443/proxy/fhir/Patient/p1"
    assert response.headers.getRawHeaders(b"location") == [b"http://harmony.test:8443/proxy/fhir/Patient/p1/_history/1"]
    sent = server.seen[0]
    assert sent.uri == b"/fhir/Patient?name:exact=Syn&name=Pat"  # the query string byte for byte
    assert sent.requestHeaders.getRawHeaders(b"accept") == [b"application/fhir+json"]
    assert sent.requestHeaders.getRawHeaders(b"accept-encoding") == [b"identity"]


def test_a_configured_public_base_and_credential():
    backend, server, wires = _rig(public_base_url="https://fhir.example.test/r4", auth_header_value="Bearer upstream")
    response = result_of(wires.run(backend.send(_search(Authorization="Bearer client"))))
    body = json.loads(result_of(wires.run(read_body(response.body))))
    assert body["entry"][0]["fullUrl"] == "https://fhir.example.test/r4/Patient/p1"
    assert server.seen[0].requestHeaders.getRawHeaders(b"authorization") == [b"Bearer upstream"]


def test_a_non_fhir_answer_is_a_502_outcome():
    backend, server, wires = _rig()
    server.answer = ("text/html", b"<html>502 from the load balancer</html>")
    error = failure_of(wires.run(backend.send(_search())), BackendUnavailable)
    assert "text/html" in error.detail and issue_code(error) == "transient"


@pytest.mark.parametrize("options, key", [
    ({"auth_header_name": "Bad Header"}, "auth_header_name"),
    ({"auth_header_value": "two\nlines"}, "auth_header_value"),
    ({"public_base_url": "ftp://x"}, "public_base_url"),
])
def test_option_errors_name_their_key(options, key):
    with pytest.raises(OptionError) as e:
        _rig(**options)
    assert e.value.key == key
