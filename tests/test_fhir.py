"""fhir endpoint + fhir backend against a FHIR upstream on a real loopback port.

The upstream is tests/fhir_server.py, a small FHIR server of our own (no real
FHIR server can be installed on this machine kind; that module says why and
what it does).  Every resource the proxy itself produces is validated with
fhir.resources' R4B models.
"""

import json

import pytest
import pytest_twisted
import treq
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.operationoutcome import OperationOutcome
from twisted.internet import reactor
from twisted.internet.protocol import Factory

from tests.fhir_server import start_fhir_server
from tests.harness import MINIMAL_MAIN, start_harmony, write_config

#: http://hl7.org/fhir/valueset-issue-type.html (fhir.resources does not check codes)
ISSUE_TYPES = {"invalid", "structure", "required", "value", "invariant", "security", "login", "unknown", "expired",
               "forbidden", "suppressed", "processing", "not-supported", "duplicate", "multiple-matches",
               "not-found", "deleted", "too-long", "code-invalid", "extension", "too-costly", "business-rule",
               "conflict", "transient", "lock-error", "no-store", "exception", "timeout", "incomplete",
               "throttled", "informational"}

PIPES = """
[pipelines.fhir]
networks = ["default"]
endpoints = ["fhir"]
backends = ["fhir_up"]

[endpoints.fhir]
service = "fhir"
[endpoints.fhir.options]
path_prefix = "/fhir"
max_resource_bytes = 4096

[backends.fhir_up]
service = "fhir"
[backends.fhir_up.options]
base_url = "{upstream}"
timeout_secs = {timeout}
{extra}

[pipelines.public]
networks = ["default"]
endpoints = ["public"]
backends = ["public_up"]

[endpoints.public]
service = "fhir"
[endpoints.public.options]
path_prefix = "/r4b"
fhir_version = "R4B"

[backends.public_up]
service = "fhir"
[backends.public_up.options]
base_url = "{upstream}"
public_base_url = "https://fhir.example.org/r4b"
upstream_base_urls = ["https://fhir-upstream.example.net/fhir"]
auth_header_value = "Bearer upstream-secret"
"""


def config(tmp_path, upstream, timeout=5, extra=""):
    return write_config(tmp_path, MINIMAL_MAIN, {"p": PIPES.format(upstream=upstream, timeout=timeout,
                                                                   extra=extra)})


@pytest.fixture
def fhir_server():
    server = start_fhir_server()
    server.seed("Patient", "p1", name=[{"family": "Doe", "given": ["Jane"]}], gender="female")
    server.seed("Patient", "p2", name=[{"family": "Doe", "given": ["John"]}], gender="male")
    server.seed("Patient", "p3", name=[{"family": "Dorian", "given": ["Gray"]}])
    yield server
    pytest_twisted.blockon(server.port.stopListening())


@pytest.fixture
def harmony(tmp_path, fhir_server):
    running = pytest_twisted.blockon(start_harmony(config(tmp_path, fhir_server.base, timeout=30)))
    yield running
    pytest_twisted.blockon(running.stop())


async def fhir_json(resp):
    assert resp.headers.getRawHeaders("content-type")[0].startswith("application/fhir+json"), \
        resp.headers.getRawHeaders("content-type")
    return json.loads(await resp.content())


async def outcome(resp, status, issue=None):
    """Assert *resp* is a proxy-made OperationOutcome; returns its first issue."""
    assert resp.code == status
    doc = await fhir_json(resp)
    OperationOutcome.model_validate(doc)
    first = doc["issue"][0]
    assert first["code"] in ISSUE_TYPES and first["diagnostics"]
    if issue:
        assert first["code"] == issue, first
    assert resp.headers.getRawHeaders("x-request-id")
    return first


def base_of(harmony):
    return harmony.url("/fhir")


# ------------------------------------------------------------------ reads, searches, paging


@pytest_twisted.ensureDeferred
async def test_capability_statement_points_at_the_proxy(harmony, fhir_server):
    resp = await treq.get(harmony.url("/fhir/metadata"))
    doc = await fhir_json(resp)
    CapabilityStatement.model_validate(doc)
    assert doc["implementation"]["url"] == base_of(harmony)
    # FHIR defaults went up: the client sent no Accept
    assert fhir_server.requests[-1]["headers"][b"accept"] == [b"application/fhir+json"]


@pytest_twisted.ensureDeferred
async def test_search_paging_works_through_the_proxy(harmony, fhir_server):
    resp = await treq.get(harmony.url("/fhir/Patient?name=Do&_count=2"))
    page1 = await fhir_json(resp)
    Bundle.model_validate(page1)
    assert page1["total"] == 3
    assert [e["fullUrl"] for e in page1["entry"]] == [base_of(harmony) + "/Patient/p1",
                                                      base_of(harmony) + "/Patient/p2"]
    links = {link["relation"]: link["url"] for link in page1["link"]}
    assert links["self"] == base_of(harmony) + "/Patient?name=Do&_count=2"
    # The next link is HAPI-style, on the bare base: following it must work.
    assert links["next"].startswith(base_of(harmony) + "?_getpages=")
    page2 = await fhir_json(await treq.get(links["next"]))
    assert [e["resource"]["id"] for e in page2["entry"]] == ["p3"]
    assert fhir_server.requests[-1]["uri"].startswith(b"/fhir?_getpages=")


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("server_gzip", ["always", "asked"])
async def test_compressed_searchsets_are_rewritten_and_compressed_again(harmony, fhir_server, server_gzip):
    """python requests sends Accept-Encoding: gzip.  The backend asks the server
    for identity; one that compresses anyway is decoded while the URLs are
    rewritten, and the rewritten Bundle goes to the client gzipped again."""
    import requests
    from twisted.internet.threads import deferToThread
    for i in range(4, 30):
        fhir_server.seed("Patient", f"p{i}", name=[{"family": "Doe", "given": [f"G{i}"]}])
    fhir_server.gzip = server_gzip
    resp = await deferToThread(requests.get, harmony.url("/fhir/Patient?name=Do&_count=20"), timeout=30,
                               headers={"X-Forwarded-For": "198.51.100.7"})  # a remote client via a local proxy
    assert resp.status_code == 200
    assert fhir_server.requests[-1]["headers"][b"accept-encoding"] == [b"identity"]
    assert resp.headers["content-encoding"] == "gzip" and "Accept-Encoding" in resp.headers["vary"]
    page = resp.json()
    Bundle.model_validate(page)
    assert len(page["entry"]) == 20
    assert all(e["fullUrl"].startswith(base_of(harmony) + "/Patient/") for e in page["entry"])
    assert {link["relation"]: link["url"] for link in page["link"]}["next"].startswith(base_of(harmony) + "?")
    # A client that asks for nothing gets it plain.
    resp = await deferToThread(requests.get, harmony.url("/fhir/Patient?name=Do&_count=20"), timeout=30,
                               headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in resp.headers and resp.json()["entry"][0]["fullUrl"].startswith(base_of(harmony))


@pytest_twisted.ensureDeferred
async def test_corrupt_gzip_from_the_server_is_a_cut_body_not_a_rewritten_one(harmony, fhir_server):
    fhir_server.respond[b"/fhir/Patient/bad"] = (200, {b"content-type": b"application/fhir+json",
                                                     b"content-encoding": b"gzip"}, b"this is not gzip" * 100)
    from twisted.web._newclient import ResponseFailed, ResponseNeverReceived
    # The body streams (it is rewritten as it arrives), so the answer was
    # committed before the bad bytes were seen: the connection is cut, and the
    # client never takes a truncated or garbled Bundle for a whole one.
    with pytest.raises((ResponseNeverReceived, ResponseFailed)):
        resp = await treq.get(harmony.url("/fhir/Patient/bad"), headers={"Accept-Encoding": ["identity"]})
        await resp.content()


@pytest_twisted.ensureDeferred
async def test_search_parameters_kept_exactly(harmony, fhir_server):
    raw = ("/fhir/Observation?subject:Patient.name:exact=Doe&code=http%3A%2F%2Floinc.org%7C8867-4"
           "&_include=Observation:subject&date=ge2020&date=lt2021&_revinclude:iterate=Provenance:target"
           "&_summary=true&_elements=id,code&_pretty=true")
    await (await treq.get(harmony.url(raw))).content()
    assert fhir_server.requests[-1]["uri"] == raw.encode()


@pytest_twisted.ensureDeferred
async def test_post_search_form_body_passes(harmony, fhir_server):
    resp = await treq.post(harmony.url("/fhir/Patient/_search"), b"name:exact=Jane&_count=5",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    doc = await fhir_json(resp)
    assert [e["resource"]["id"] for e in doc["entry"]] == ["p1"]
    sent = fhir_server.requests[-1]
    assert sent["body"] == b"name:exact=Jane&_count=5"
    assert sent["headers"][b"content-type"] == [b"application/x-www-form-urlencoded"]


@pytest_twisted.ensureDeferred
async def test_bare_prefix_routes(harmony, fhir_server):
    resp = await treq.get(harmony.url("/fhir"))
    await resp.content()
    assert fhir_server.requests[-1]["uri"] == b"/fhir"


@pytest_twisted.ensureDeferred
async def test_read_vread_and_conditional_headers_both_ways(harmony, fhir_server):
    resp = await treq.get(harmony.url("/fhir/Patient/p1"))
    doc = await fhir_json(resp)
    etag = resp.headers.getRawHeaders("etag")[0]
    assert etag == 'W/"1"' and resp.headers.getRawHeaders("last-modified")
    assert resp.headers.getRawHeaders("content-location") == [base_of(harmony) + "/Patient/p1/_history/1"]
    assert doc["id"] == "p1"
    since = resp.headers.getRawHeaders("last-modified")[0]
    resp = await treq.get(harmony.url("/fhir/Patient/p1"), headers={"If-None-Match": etag, "If-Modified-Since": since})
    assert resp.code == 304 and await resp.content() == b""
    assert fhir_server.requests[-1]["headers"][b"if-none-match"] == [etag.encode()]
    assert fhir_server.requests[-1]["headers"][b"if-modified-since"] == [since.encode()]
    # update with a stale version: the upstream's 412 OperationOutcome comes back as it is
    doc["gender"] = "other"
    body = json.dumps(doc).encode()
    resp = await treq.put(harmony.url("/fhir/Patient/p1"), body,
                          headers={"Content-Type": "application/fhir+json", "If-Match": 'W/"7"'})
    assert resp.code == 412 and (await fhir_json(resp))["issue"][0]["diagnostics"] == "version conflict"
    resp = await treq.put(harmony.url("/fhir/Patient/p1"), body,
                          headers={"Content-Type": "application/fhir+json", "If-Match": etag})
    assert resp.code == 200 and resp.headers.getRawHeaders("etag") == ['W/"2"']
    assert fhir_server.requests[-1]["headers"][b"if-match"] == [etag.encode()]
    old = await fhir_json(await treq.get(harmony.url("/fhir/Patient/p1/_history/1")))
    assert old["meta"]["versionId"] == "1" and old["gender"] == "female"


@pytest_twisted.ensureDeferred
async def test_create_conditional_create_prefer_and_location(harmony, fhir_server):
    patient = {"resourceType": "Patient", "name": [{"family": "Roe"}]}
    resp = await treq.post(harmony.url("/fhir/Patient"), json.dumps(patient).encode(),
                           headers={"Prefer": "return=minimal"})
    assert resp.code == 201 and await resp.content() == b""
    assert resp.headers.getRawHeaders("location") == [base_of(harmony) + "/Patient/n1/_history/1"]
    sent = fhir_server.requests[-1]["headers"]
    assert sent[b"prefer"] == [b"return=minimal"]
    assert sent[b"content-type"] == [b"application/fhir+json"]  # the FHIR default for a body sent without one
    resp = await treq.post(harmony.url("/fhir/Patient"), json.dumps(patient).encode(),
                           headers={"If-None-Exist": "name:exact=Roe", "Content-Type": "application/fhir+json"})
    assert resp.code == 200 and (await fhir_json(resp))["id"] == "n1"
    assert fhir_server.requests[-1]["headers"][b"if-none-exist"] == [b"name:exact=Roe"]


@pytest_twisted.ensureDeferred
async def test_create_with_a_gzip_body_and_refused_codings(harmony, fhir_server):
    import gzip
    patient = {"resourceType": "Patient", "name": [{"family": "Gzipped"}]}
    resp = await treq.post(harmony.url("/fhir/Patient"), gzip.compress(json.dumps(patient).encode()),
                           headers={"Content-Type": "application/fhir+json", "Content-Encoding": "gzip"})
    assert resp.code == 201, await resp.content()
    sent = fhir_server.requests[-1]
    assert json.loads(sent["body"]) == patient and b"content-encoding" not in sent["headers"]
    for coding, body, status in (("br", b"\x0b", 415), ("gzip", b"not gzip", 400),
                                 ("gzip", gzip.compress(b" " * 20_000_000), 413)):
        resp = await treq.post(harmony.url("/fhir/Patient"), body,
                               headers={"Content-Type": "application/fhir+json", "Content-Encoding": coding})
        await outcome(resp, status)


@pytest_twisted.ensureDeferred
async def test_transaction_response_locations_rewritten(harmony, fhir_server):
    tx = {"resourceType": "Bundle", "type": "transaction",
          "entry": [{"fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
                     "resource": {"resourceType": "Patient", "name": [{"family": "Tx"}]},
                     "request": {"method": "POST", "url": "Patient"}}]}
    resp = await treq.post(harmony.url("/fhir"), json.dumps(tx).encode(),
                           headers={"Content-Type": "application/fhir+json"})
    doc = await fhir_json(resp)
    Bundle.model_validate(doc)
    assert doc["entry"][0]["response"]["location"] == base_of(harmony) + "/Patient/n1/_history/1"
    assert doc["entry"][0]["fullUrl"] == base_of(harmony) + "/Patient/n1"


@pytest_twisted.ensureDeferred
async def test_forwarded_headers_and_public_base_url(harmony, fhir_server):
    resp = await treq.get(harmony.url("/fhir/Patient?_count=1"), headers={
        "X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.example.net", "X-Forwarded-Port": "8443"})
    doc = await fhir_json(resp)
    assert doc["entry"][0]["fullUrl"] == "https://gw.example.net:8443/fhir/Patient/p1"
    resp = await treq.get(harmony.url("/fhir/Patient?_count=1"), headers={
        "Forwarded": 'for=10.0.0.1;proto=https;host="gw2.example.net", for=10.0.0.2'})
    assert (await fhir_json(resp))["entry"][0]["fullUrl"] == "https://gw2.example.net/fhir/Patient/p1"
    # a Host header without the port (as dicomweb-client sends) is why public_base_url exists
    resp = await treq.get(harmony.url("/r4b/Patient?_count=1"), headers={"Host": "127.0.0.1"})
    doc = await fhir_json(resp)
    assert doc["entry"][0]["fullUrl"] == "https://fhir.example.org/r4b/Patient/p1"
    assert {link["relation"]: link["url"] for link in doc["link"]}["next"].startswith(
        "https://fhir.example.org/r4b?_getpages=")
    # the backend's own credential replaced the client's
    assert fhir_server.requests[-1]["headers"][b"authorization"] == [b"Bearer upstream-secret"]
    # a forged X-Forwarded-Host that is no host name is ignored
    resp = await treq.get(harmony.url("/fhir/Patient?_count=1"), headers={"X-Forwarded-Host": "evil/<x>"})
    assert (await fhir_json(resp))["entry"][0]["fullUrl"] == base_of(harmony) + "/Patient/p1"


@pytest_twisted.ensureDeferred
async def test_large_bundle_streams_with_every_full_url_rewritten(harmony, fhir_server):
    for i in range(400):
        fhir_server.seed("Observation", f"o{i}", status="final", code={"text": "x" * 2000})
    resp = await treq.get(harmony.url("/fhir/Observation?_count=400"))
    assert resp.headers.getRawHeaders("content-length") is None  # rewritten on the fly: chunked
    doc = await fhir_json(resp)
    assert len(doc["entry"]) == 400
    assert all(e["fullUrl"] == f"{base_of(harmony)}/Observation/{e['resource']['id']}" for e in doc["entry"])


# ------------------------------------------------------------------ content negotiation


@pytest_twisted.ensureDeferred
async def test_xml_and_legacy_formats_pass_through(harmony, fhir_server):
    resp = await treq.get(harmony.url("/fhir/Patient/p1"), headers={"Accept": "application/fhir+xml"})
    assert resp.code == 200 and resp.headers.getRawHeaders("content-type") == ["application/fhir+xml"]
    assert b"<Patient" in await resp.content()
    assert fhir_server.requests[-1]["headers"][b"accept"] == [b"application/fhir+xml"]
    resp = await treq.get(harmony.url("/fhir/Patient/p1?_format=json"), headers={"Accept": "application/json+fhir"})
    await resp.content()
    sent = fhir_server.requests[-1]
    assert sent["headers"][b"accept"] == [b"application/json+fhir"] and sent["uri"].endswith(b"?_format=json")
    for fmt in ("application/fhir+json", "application/fhir%2Bjson", "application/fhir+json;fhirVersion=4.0"):
        resp = await treq.get(harmony.url("/fhir/Patient/p1?_format=" + fmt))
        assert resp.code == 200, fmt
        await resp.content()
        assert fhir_server.requests[-1]["uri"].endswith(fmt.encode())


@pytest.mark.parametrize("query,accept", [
    ("?_format=text/turtle", None), ("?_format=html", None), (None, "text/html"), (None, "application/pdf, image/*"),
    (None, "application/fhir+json; fhirVersion=5.0"), (None, "application/fhir+json;q=0"),
])
@pytest_twisted.ensureDeferred
async def test_unsupported_formats_are_406(harmony, fhir_server, query, accept):
    headers = {"Accept": accept} if accept else {}
    resp = await treq.get(harmony.url("/fhir/Patient/p1" + (query or "")), headers=headers)
    await outcome(resp, 406, "not-supported")
    assert fhir_server.requests == []


@pytest_twisted.ensureDeferred
async def test_fhir_version_parameter_matching_the_endpoint_is_fine(harmony, fhir_server):
    resp = await treq.get(harmony.url("/r4b/Patient/p1"), headers={"Accept": "application/fhir+json; fhirVersion=4.3"})
    assert resp.code == 200
    await resp.content()


# ------------------------------------------------------------------ request validation


@pytest.mark.parametrize("method,path,body,ctype,issue,words", [
    ("POST", "/fhir/Patient", b'{"resourceType": "Patient", ', None, "structure", "not valid JSON"),
    ("POST", "/fhir/Patient", b'{"resourceType": "Observation"}', None, "invalid", "Observation"),
    ("POST", "/fhir/Patient", b'["Patient"]', "application/fhir+json", "structure", "JSON object"),
    ("POST", "/fhir/Patient", b'{"name": []}', "application/fhir+json", "required", "resourceType"),
    ("POST", "/fhir/Patient", b"", "application/fhir+json", "required", "needs a resource"),
    ("PUT", "/fhir/Patient/p1", b'{"resourceType": "Patient", "id": "p2"}', None, "invalid", "does not match"),
    ("PUT", "/fhir/Patient/p1", b'{"resourceType": "Patient"}', None, "invalid", "does not match"),
    ("POST", "/fhir", b'{"resourceType": "Bundle", "type": "searchset"}', None, "invalid", "batch or transaction"),
    ("POST", "/fhir/Patient", b'<Observation xmlns="http://hl7.org/fhir"/>', "application/fhir+xml", "invalid",
     "Observation"),
    ("POST", "/fhir/Patient", b'<Patient xmlns="http://hl7.org/fhir">', "application/fhir+xml", "structure",
     "well-formed"),
    ("POST", "/fhir/Patient", b'<!DOCTYPE x [<!ENTITY a "b">]><Patient xmlns="http://hl7.org/fhir"/>',
     "application/fhir+xml", "security", "DOCTYPE"),
    ("POST", "/fhir/Patient", b'<Patient/>', "application/xml", "structure", "namespace"),
])
@pytest_twisted.ensureDeferred
async def test_bad_bodies_are_400_and_never_sent(harmony, fhir_server, method, path, body, ctype, issue, words):
    headers = {"Content-Type": ctype} if ctype else {}
    resp = await treq.request(method, harmony.url(path), data=body, headers=headers)
    first = await outcome(resp, 400, issue)
    assert words in first["diagnostics"]
    assert fhir_server.requests == []


@pytest_twisted.ensureDeferred
async def test_valid_xml_update_passes(harmony, fhir_server):
    body = b'<Patient xmlns="http://hl7.org/fhir"><id value="p1"/><gender value="male"/></Patient>'
    resp = await treq.put(harmony.url("/fhir/Patient/p1"), body, headers={"Content-Type": "application/fhir+xml"})
    await resp.content()
    assert fhir_server.requests[-1]["body"] == body


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_413_and_never_sent(harmony, fhir_server):
    big = json.dumps({"resourceType": "Patient", "text": {"div": "x" * 300_000}}).encode()  # above the inline limit
    resp = await treq.post(harmony.url("/fhir/Patient"), big, headers={"Content-Type": "application/fhir+json"})
    first = await outcome(resp, 413, "too-long")
    assert "4096" in first["diagnostics"]
    assert fhir_server.requests == []


@pytest_twisted.ensureDeferred
async def test_unsupported_body_type_is_415(harmony, fhir_server):
    resp = await treq.post(harmony.url("/fhir/Patient"), b"name=x", headers={"Content-Type": "text/plain"})
    await outcome(resp, 415, "not-supported")
    assert fhir_server.requests == []


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/fhir/patient", 404), ("GET", "/fhir/Patient/a%2F..%2Fb", 400), ("GET", "/fhir/Patient/..", 400),
    ("GET", "/fhir/Patient/p1/_history/1/extra", 404), ("POST", "/fhir/Patient/p1", 405),
    ("DELETE", "/fhir/metadata", 405), ("GET", "/fhir/.well-known/..", 400), ("GET", "/fhir/.well-known", 404),
])
@pytest_twisted.ensureDeferred
async def test_unknown_routes_are_operation_outcomes(harmony, fhir_server, method, path, status):
    resp = await treq.request(method, harmony.url(path))
    await outcome(resp, status)
    if status == 405:
        assert resp.headers.getRawHeaders("allow")
    assert fhir_server.requests == []


def test_interactions_are_classified():
    from harmony.fhir.rest import classify
    cases = {
        ("GET", "", True): ("search-system", "", ""), ("POST", "/", False): ("batch-transaction", "", ""),
        ("GET", "/metadata", False): ("capabilities", "", ""), ("GET", "/_history", False): ("history-system", "", ""),
        ("POST", "/$export", False): ("operation", "", ""), ("GET", "/Patient", True): ("search-type", "Patient", ""),
        ("POST", "/Patient", False): ("create", "Patient", ""), ("PUT", "/Patient", True): ("conditional-update", "Patient", ""),
        ("POST", "/Patient/_search", False): ("search-type", "Patient", ""),
        ("GET", "/Patient/_history", False): ("history-type", "Patient", ""),
        ("GET", "/Patient/1", False): ("read", "Patient", "1"), ("PATCH", "/Patient/1", False): ("patch", "Patient", "1"),
        ("DELETE", "/Patient/1", False): ("delete", "Patient", "1"),
        ("GET", "/Patient/1/_history", False): ("history-instance", "Patient", "1"),
        ("GET", "/Patient/1/_history/2", False): ("vread", "Patient", "1"),
        ("POST", "/Patient/1/$everything", False): ("operation", "Patient", "1"),
        ("GET", "/Patient/1/Observation", False): ("search-compartment", "Patient", "1"),
        ("GET", "/.well-known/smart-configuration", False): ("well-known", "", ""),
    }
    for (method, path, q), (name, rt, rid) in cases.items():
        i = classify(method, path, q)
        assert (i.name, i.resource_type, i.id) == (name, rt, rid), (method, path)


# ------------------------------------------------------------------ upstream failures


@pytest_twisted.ensureDeferred
async def test_html_from_upstream_is_502_outcome(harmony, fhir_server):
    fhir_server.respond[b"/fhir/Patient/p1"] = (503, {b"content-type": b"text/html"}, b"<html>maintenance</html>")
    first = await outcome(await treq.get(harmony.url("/fhir/Patient/p1")), 502, "transient")
    assert "503" in first["diagnostics"] and "text/html" in first["diagnostics"]
    # a Binary read may answer in the binary's own type
    fhir_server.respond[b"/fhir/Binary/b1"] = (200, {b"content-type": b"application/pdf"}, b"%PDF-1.4")
    resp = await treq.get(harmony.url("/fhir/Binary/b1"), headers={"Accept": "application/pdf"})
    assert resp.code == 200 and await resp.content() == b"%PDF-1.4"
    assert fhir_server.requests[-1]["headers"][b"accept"] == [b"application/pdf"]


@pytest_twisted.ensureDeferred
async def test_upstream_down_is_502_outcome(tmp_path):
    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    dead = f"http://127.0.0.1:{port.getHost().port}/fhir"
    await port.stopListening()
    running = await start_harmony(config(tmp_path, dead))
    try:
        first = await outcome(await treq.get(running.url("/fhir/Patient/p1")), 502)
        assert "unreachable" in first["diagnostics"]
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_upstream_timeout_is_504_outcome(tmp_path, fhir_server):
    fhir_server.respond[b"/fhir/Patient/slow"] = (200, {}, lambda request: None)  # never answers
    running = await start_harmony(config(tmp_path, fhir_server.base, timeout=0.2))
    try:
        first = await outcome(await treq.get(running.url("/fhir/Patient/slow")), 504, "timeout")
        assert "0.2s" in first["diagnostics"]
    finally:
        await running.stop()


def test_config_errors_name_the_key(tmp_path):
    from harmony.config import load_config
    from harmony.config.errors import ConfigErrors
    from harmony.runtime import build_runtime
    path = config(tmp_path / "a", "http://127.0.0.1:1/fhir", extra='auth_header_value = "Bearer a\\nb"')
    with pytest.raises(ConfigErrors) as e:
        build_runtime(load_config(path), reactor)
    assert "backends.fhir_up.options.auth_header_value" in str(e.value)
    path = config(tmp_path, "http://127.0.0.1:1/fhir", extra='public_base_url = "ftp://x"')
    with pytest.raises(ConfigErrors) as e:
        build_runtime(load_config(path), reactor)
    assert "backends.fhir_up.options.public_base_url" in str(e.value)
    path = write_config(tmp_path / "b", MINIMAL_MAIN, {"p": PIPES.format(
        upstream="http://127.0.0.1:1/fhir", timeout=1, extra="").replace('fhir_version = "R4B"', 'fhir_version = "R3"')})
    with pytest.raises(ConfigErrors) as e:
        build_runtime(load_config(path), reactor)
    assert "endpoints.public.options.fhir_version" in str(e.value)


GUARDED = """
[middleware_types.deny]
module = "tests.fhir_middleware:Deny"
[middleware_types.problem]
module = "tests.fhir_middleware:ProblemAnswer"

[pipelines.guarded]
networks = ["default"]
endpoints = ["guarded"]
middleware = ["deny"]
backends = ["up"]

[pipelines.blocked]
networks = ["default"]
endpoints = ["blocked"]
middleware = ["problem"]
backends = ["up"]

[endpoints.guarded]
service = "fhir"
[endpoints.guarded.options]
path_prefix = "/guarded"

[endpoints.blocked]
service = "fhir"
[endpoints.blocked.options]
path_prefix = "/blocked"

[backends.up]
service = "fhir"
[backends.up.options]
base_url = "{upstream}"
"""


@pytest_twisted.ensureDeferred
async def test_middleware_errors_are_operation_outcomes(tmp_path, fhir_server):
    path = write_config(tmp_path, MINIMAL_MAIN, {"p": GUARDED.format(upstream=fhir_server.base)})
    running = await start_harmony(path)
    try:
        resp = await treq.get(running.url("/guarded/Patient/p1"))
        first = await outcome(resp, 401, "login")
        assert "bearer token" in first["diagnostics"]
        assert resp.headers.getRawHeaders("www-authenticate") == ['Bearer realm="fhir"']
        first = await outcome(await treq.delete(running.url("/blocked/Patient/p1")), 403, "forbidden")
        assert first["diagnostics"] == "delete is not allowed here"
        assert fhir_server.requests == []
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_format_xml_without_accept_asks_upstream_for_xml(harmony, fhir_server):
    resp = await treq.get(harmony.url("/fhir/Patient/p1?_format=xml"))
    assert resp.code == 200 and b"<Patient" in await resp.content()
    assert fhir_server.requests[-1]["headers"][b"accept"] == [b"application/fhir+xml"]


@pytest_twisted.ensureDeferred
async def test_operation_and_head_pass(harmony, fhir_server):
    fhir_server.respond[b"/fhir/Patient/p1/$everything"] = (
        200, {b"content-type": b"application/fhir+json"},
        json.dumps({"resourceType": "Bundle", "type": "searchset",
                    "entry": [{"fullUrl": fhir_server.base + "/Patient/p1"}]}).encode())
    doc = await fhir_json(await treq.post(harmony.url("/fhir/Patient/p1/$everything"), b"",))
    assert doc["entry"][0]["fullUrl"] == base_of(harmony) + "/Patient/p1"
    resp = await treq.head(harmony.url("/fhir/Patient/p1"))
    assert resp.code == 200 and await resp.content() == b""
    assert fhir_server.requests[-1]["method"] == b"HEAD"


@pytest_twisted.ensureDeferred
async def test_xml_bundle_urls_rewritten(harmony, fhir_server):
    up = fhir_server.base
    xml = (f'<Bundle xmlns="http://hl7.org/fhir"><type value="searchset"/>'
           f'<link><relation value="next"/><url value="{up}?_getpages=p0&amp;_count=1"/></link>'
           f'<entry><fullUrl value="{up}/Patient/p1"/><resource><Patient><id value="p1"/></Patient></resource></entry>'
           f'</Bundle>').encode()
    fhir_server.respond[b"/fhir/Patient"] = (200, {b"content-type": b"application/fhir+xml;charset=utf-8"}, xml)
    resp = await treq.get(harmony.url("/fhir/Patient?_count=1"), headers={"Accept": "application/fhir+xml"})
    text = (await resp.content()).decode()
    assert resp.code == 200
    assert f'<url value="{base_of(harmony)}?_getpages=p0&amp;_count=1"/>' in text
    assert f'<fullUrl value="{base_of(harmony)}/Patient/p1"/>' in text and up not in text


@pytest_twisted.ensureDeferred
async def test_upstream_aliases_rewritten_and_config_checked(harmony, fhir_server):
    doc = {"resourceType": "Bundle", "type": "searchset",
           "link": [{"relation": "next", "url": "https://fhir-upstream.example.net/fhir/Group?page=2"},
                    {"relation": "previous", "url": "https://elsewhere.example.net/fhir/Group?page=0"}]}
    fhir_server.respond[b"/fhir/Group"] = (200, {b"content-type": b"application/fhir+json"}, json.dumps(doc).encode())
    got = await fhir_json(await treq.get(harmony.url("/r4b/Group")))
    assert [link["url"] for link in got["link"]] == ["https://fhir.example.org/r4b/Group?page=2",
                                                     "https://elsewhere.example.net/fhir/Group?page=0"]
