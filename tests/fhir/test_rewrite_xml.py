"""The streaming XML URL rewriter (synchronous, in memory): for any chunking
its output parses to the same tree as a rewrite done with ElementTree."""

import xml.etree.ElementTree as ET

from hypothesis import given, settings
from hypothesis import strategies as st

from harmony.fhir.rewrite import HOLD_LIMIT, UrlMap
from harmony.fhir.rewrite_xml import XmlUrlRewriter

NS = "http://hl7.org/fhir"
UP = "http://up.example:8080/fhir"
PROXY = "https://proxy.example/r4"
url_map = UrlMap([UP], PROXY)


def run(doc: bytes, sizes) -> bytes:
    r = XmlUrlRewriter(url_map)
    out, pos, i = [], 0, 0
    while pos < len(doc):
        n = sizes[i % len(sizes)]
        out.append(r.feed(doc[pos:pos + n]))
        pos += n
        i += 1
    out.append(r.close())
    return b"".join(out)


TARGETS = {("Bundle", "link", "url"), ("Bundle", "entry", "fullUrl"), ("Bundle", "entry", "response", "location"),
           ("CapabilityStatement", "implementation", "url")}


def shape(el):
    return (el.tag, sorted(el.attrib.items()), (el.text or "").strip(), [shape(c) for c in el])


def reference(doc: bytes):
    root = ET.fromstring(doc)

    def walk(el, path):
        local = el.tag.split("}")[-1]
        path = path + (local,)
        p = path
        while len(p) > 3 and p[:3] == ("Bundle", "entry", "resource"):
            p = p[3:]
        if p in TARGETS and "value" in el.attrib:
            el.set("value", url_map(el.get("value")) or el.get("value"))
        for child in el:
            walk(child, path)
    walk(root, ())
    return shape(root)


def canon(doc: bytes):
    return shape(ET.fromstring(doc))


BUNDLE = f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- a comment with <link><url value="{UP}/c"/></link> in it -->
<Bundle xmlns="{NS}">
  <type value="batch-response"/>
  <link><relation value="next"/><url value="{UP}?_getpages=a&amp;_count=2"/></link>
  <entry>
    <fullUrl value='{UP}/Patient/1'/>
    <resource><Patient><id value="1"/>
      <text><div xmlns="http://www.w3.org/1999/xhtml"><p>see {UP}/x</p><![CDATA[ <url value="{UP}"/> ]]></div></text>
      <managingOrganization><reference value="{UP}/Organization/1"/></managingOrganization>
    </Patient></resource>
    <response><status value="200"/><location value="{UP}/Patient/1/_history/2"></location></response>
  </entry>
  <entry><resource><Bundle><link><url value="{UP}/Observation"/></link></Bundle></resource></entry>
</Bundle>""".encode()


def test_fhir_paths_rewritten_and_nothing_else():
    for sizes in ([len(BUNDLE)], [1], [7, 13], [64]):
        out = run(BUNDLE, sizes)
        assert canon(out) == reference(BUNDLE), sizes
    text = run(BUNDLE, [5]).decode()
    assert f'<url value="{PROXY}?_getpages=a&amp;_count=2"/>' in text
    assert f"<fullUrl value='{PROXY}/Patient/1'/>" in text
    assert f'<location value="{PROXY}/Patient/1/_history/2">' in text
    assert f'<url value="{PROXY}/Observation"/>' in text
    # comments, CDATA, narrative and references are data
    assert f'<url value="{UP}/c"/>' in text and f"<p>see {UP}/x</p>" in text
    assert f'<reference value="{UP}/Organization/1"/>' in text and f'<![CDATA[ <url value="{UP}"/> ]]>' in text


def test_huge_attribute_streams():
    data = "QUJD" * (HOLD_LIMIT // 2)
    doc = (f'<Bundle xmlns="{NS}"><entry><resource><Binary><data value="{data}"/></Binary></resource>'
           f'<fullUrl value="{UP}/Binary/1"/></entry></Bundle>').encode()
    r = XmlUrlRewriter(url_map)
    out, held = [], 0
    for i in range(0, len(doc), 1000):
        out.append(r.feed(doc[i:i + 1000]))
        held = max(held, len(r.pending))
    out.append(r.close())
    assert held <= HOLD_LIMIT + 1000
    assert canon(b"".join(out)) == reference(doc)


names = st.sampled_from(["Bundle", "link", "url", "entry", "fullUrl", "resource", "response", "location", "x"])
urls = st.sampled_from([UP + "/Patient/1", UP, UP + "?a=1&b=2", "urn:uuid:1", "http://other/fhir", UP + "x"])


@st.composite
def element(draw, depth=0):
    name = draw(names) if depth else draw(st.sampled_from(["Bundle", "CapabilityStatement"]))
    el = ET.Element(f"{{{NS}}}{name}")
    if draw(st.booleans()):
        el.set("value", draw(urls))
    if depth < 4:
        for _ in range(draw(st.integers(0, 3))):
            el.append(draw(element(depth + 1)))
    return el


@settings(max_examples=300, deadline=None)
@given(element(), st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=4))
def test_any_chunking_matches_elementtree(root, sizes):
    doc = ET.tostring(root)
    assert canon(run(doc, sizes)) == reference(doc)
