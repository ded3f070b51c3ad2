"""Harmony as a DICOMweb, FHIR and plain HTTP proxy in front of upstreams that
compress (``Content-Encoding: gzip``), chunk and keep connections alive -
nginx with ``gzip on`` (static FHIR answers, and in front of Orthanc) and
Orthanc with its own HTTP compression - driven by clients that send
``Accept-Encoding: gzip`` by default: python requests and dicomweb-client.

Here: what holds today (the FHIR proxy, which asks the upstream for identity
bodies when it rewrites URLs, and passthrough).  The DICOMweb backend reading
a compressed upstream body, and Harmony compressing what it produces, wait
on defect 2: test_gzip_upstreams_d2.py.  The peers are built in gzip_peers.py.
"""

from __future__ import annotations

import gzip
import json

import requests


def test_upstreams_compress(gzip_upstreams):
    """The premise: each upstream really answers gzip, chunked, to a client that accepts it."""
    for url in (gzip_upstreams["fhir_base"] + "/Patient", gzip_upstreams["nginx"] + "/dicom-web/studies",
                gzip_upstreams["orthanc"].dicomweb_url + "/studies"):
        r = requests.get(url, headers={"Accept": "application/json"})
        assert r.status_code == 200 and r.headers.get("Content-Encoding") == "gzip", (url, r.headers)
    r = requests.get(gzip_upstreams["fhir_base"] + "/Patient")
    assert r.headers.get("Transfer-Encoding") == "chunked"


def test_fhir_search_through_proxy_rewrites_and_decodes(gzip_proxy, gzip_upstreams):
    """requests (Accept-Encoding: gzip) -> fhir endpoint -> fhir backend -> nginx gzip:
    the Bundle arrives whole, every upstream URL rewritten to the proxy's base."""
    with requests.Session() as s:  # one keep-alive connection for both requests
        for _ in range(2):
            r = s.get(gzip_proxy.url("/fhir/Patient"), params={"family": "Interop"})
            assert r.status_code == 200, r.text
            bundle = r.json()
            assert [e["resource"]["name"][0]["given"][0] for e in bundle["entry"]] == ["Πέτρος1", "Πέτρος2"]
            assert gzip_upstreams["fhir_base"] not in r.text
            assert bundle["entry"][0]["fullUrl"] == gzip_proxy.url("/fhir/Patient/1")
            assert bundle["link"][1]["url"].startswith(gzip_proxy.url("/fhir?"))


def test_fhir_without_rewrite_passes_gzip_through(gzip_proxy, gzip_upstreams):
    r = requests.get(gzip_proxy.url("/fhir-raw/Patient"), stream=True)
    assert r.status_code == 200 and r.headers.get("Content-Encoding") == "gzip"
    body = gzip.decompress(r.raw.read())
    assert json.loads(body)["entry"][0]["fullUrl"] == gzip_upstreams["fhir_base"] + "/Patient/1"


def test_passthrough_keeps_content_coding(gzip_proxy):
    """HTTP passthrough in front of nginx gzip, one keep-alive session: decoded bodies are exact."""
    with requests.Session() as s:
        for _ in range(3):
            r = s.get(gzip_proxy.url("/pass/fhir/notes.txt"))
            assert r.status_code == 200 and r.headers.get("Content-Encoding") == "gzip"
            assert r.text == "interop " * 2000
        plain = s.get(gzip_proxy.url("/pass/fhir/notes.txt"), headers={"Accept-Encoding": "identity"})
        assert "Content-Encoding" not in plain.headers and plain.text == "interop " * 2000
