"""The streaming URL rewriter (synchronous, in memory): for any chunking its
output must equal a rewrite done on the parsed document, byte for byte
elsewhere."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from harmony.fhir.rewrite import HOLD_LIMIT, JsonUrlRewriter, UrlMap

UP = "http://up.example:8080/fhir"
PROXY = "https://proxy.example/r4"
url_map = UrlMap([UP, "http://10.0.0.5/fhir"], PROXY)


def run(doc: bytes, sizes) -> bytes:
    r = JsonUrlRewriter(url_map)
    out, pos, i = [], 0, 0
    while pos < len(doc):
        n = sizes[i % len(sizes)] if sizes else len(doc)
        out.append(r.feed(doc[pos:pos + n]))
        pos += n
        i += 1
    out.append(r.close())
    return b"".join(out)


def reference(doc):
    """The same rewrite done on the parsed document."""
    def fix(node):
        if not isinstance(node, dict):
            return
        for link in node.get("link", []) if isinstance(node.get("link"), list) else []:
            if isinstance(link, dict) and isinstance(link.get("url"), str):
                link["url"] = url_map(link["url"]) or link["url"]
        impl = node.get("implementation")
        if isinstance(impl, dict) and isinstance(impl.get("url"), str):
            impl["url"] = url_map(impl["url"]) or impl["url"]
        for e in node.get("entry", []) if isinstance(node.get("entry"), list) else []:
            if not isinstance(e, dict):
                continue
            if isinstance(e.get("fullUrl"), str):
                e["fullUrl"] = url_map(e["fullUrl"]) or e["fullUrl"]
            resp = e.get("response")
            if isinstance(resp, dict) and isinstance(resp.get("location"), str):
                resp["location"] = url_map(resp["location"]) or resp["location"]
            fix(e.get("resource"))
    fix(doc)
    return doc


def test_url_map_segments_ports_and_case():
    assert url_map("http://up.example:8080/fhir/Patient/1") == PROXY + "/Patient/1"
    assert url_map("HTTP://UP.example:8080/fhir?_getpages=x") == PROXY + "?_getpages=x"
    assert url_map("http://up.example:8080/fhir") == PROXY
    assert url_map("http://10.0.0.5:80/fhir/Patient") == PROXY + "/Patient"
    assert url_map("http://up.example:8080/fhirx/Patient") is None
    assert url_map("http://up.example:8081/fhir/Patient") is None
    assert url_map("urn:uuid:1234") is None
    assert url_map("Patient/1") is None


def test_only_the_fhir_paths_are_rewritten():
    doc = {
        "resourceType": "Bundle", "type": "batch-response",
        "link": [{"relation": "next", "url": UP + "/Patient?_page=2"}],
        "entry": [
            {"fullUrl": UP + "/StructureDefinition/x",
             "resource": {"resourceType": "StructureDefinition", "url": UP + "/StructureDefinition/x",
                          "text": {"div": UP + "/Patient/1"}}},
            {"resource": {"resourceType": "Bundle", "type": "searchset",
                          "link": [{"relation": "self", "url": UP + "/Observation"}]},
             "response": {"status": "201", "location": UP + "/Patient/9/_history/1"}},
            {"resource": {"resourceType": "Observation", "subject": {"reference": UP + "/Patient/1"},
                          "extension": [{"url": UP + "/ext"}]}},
        ],
    }
    out = json.loads(run(json.dumps(doc, indent=2).encode(), [7, 3, 1000]))
    assert out["link"][0]["url"] == PROXY + "/Patient?_page=2"
    assert out["entry"][0]["fullUrl"] == PROXY + "/StructureDefinition/x"
    # canonical URLs, narrative, references and extensions are data: untouched
    assert out["entry"][0]["resource"]["url"] == UP + "/StructureDefinition/x"
    assert out["entry"][0]["resource"]["text"]["div"] == UP + "/Patient/1"
    assert out["entry"][2]["resource"]["subject"]["reference"] == UP + "/Patient/1"
    assert out["entry"][2]["resource"]["extension"][0]["url"] == UP + "/ext"
    assert out["entry"][1]["resource"]["link"][0]["url"] == PROXY + "/Observation"
    assert out["entry"][1]["response"]["location"] == PROXY + "/Patient/9/_history/1"


def test_capability_statement_and_untouched_bytes():
    raw = b'{ "resourceType" : "CapabilityStatement" ,\n "implementation" : { "url" : "http:\\/\\/up.example:8080\\/fhir" },' \
          b' "x": 1.50, "y": "\\u00e9\\"" }'
    out = run(raw, [5])
    assert json.loads(out)["implementation"]["url"] == PROXY
    assert out.endswith(b' "x": 1.50, "y": "\\u00e9\\"" }')  # decimals and escapes kept as written


def test_long_strings_stream_without_being_held():
    big = "A" * (HOLD_LIMIT * 3) + '\\"' + "B" * 10
    raw = ('{"entry":[{"resource":{"resourceType":"Binary","data":"%s"},"fullUrl":"%s/Binary/1"}]}' % (big, UP)).encode()
    r = JsonUrlRewriter(url_map)
    held = 0
    out = []
    for i in range(0, len(raw), 1000):
        out.append(r.feed(raw[i:i + 1000]))
        held = max(held, len(r.pending))
    out.append(r.close())
    assert held <= HOLD_LIMIT + 1000  # bounded, whatever the string's length
    assert json.loads(b"".join(out))["entry"][0]["fullUrl"] == PROXY + "/Binary/1"


def test_invalid_json_passes_through():
    for raw in (b'}}]]{"a":', b'"unterminated', b'\xff\xfe"\\', b'{"link":[{"url":"x"}}}]]]"'):
        assert run(raw, [3]) == raw
    # a truncated body still has its complete target values rewritten
    raw = b'{"link":[{"url":"' + UP.encode() + b'/x"'
    assert run(raw, [3]) == b'{"link":[{"url":"' + PROXY.encode() + b'/x"'


urls = st.sampled_from([UP + "/Patient/1", UP, "http://10.0.0.5/fhir/Obs?x=1", "urn:uuid:abc",
                        "http://elsewhere/fhir/Patient/2", UP + "x"])
scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8), urls)
json_values = st.recursive(
    scalar,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(["url", "fullUrl", "link", "entry", "resource", "response",
                                          "location", "implementation", "x"]), children, max_size=5)),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(json_values, st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=5),
       st.sampled_from([None, 1]))
def test_any_chunking_matches_the_parsed_rewrite(doc, sizes, indent):
    raw = json.dumps(doc, indent=indent).encode()
    assert json.loads(run(raw, sizes)) == reference(json.loads(raw))


def test_a_huge_key_resets_the_path():
    raw = ('{"link":[{"url":"%s/a","%s":"%s/b"}]}' % (UP, "k" * (HOLD_LIMIT + 10), UP)).encode()
    out = json.loads(run(raw, [1000]))
    values = list(out["link"][0].values())
    assert values == [PROXY + "/a", UP + "/b"]


def test_proxy_base_is_json_escaped():
    r = JsonUrlRewriter(UrlMap([UP], 'https://p.example/a"b'))
    out = r.feed(('{"link":[{"url":"%s/x"}]}' % UP).encode()) + r.close()
    assert json.loads(out)["link"][0]["url"] == 'https://p.example/a"b/x'
