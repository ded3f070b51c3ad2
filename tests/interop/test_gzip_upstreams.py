"""Harmony as a DICOMweb, FHIR and plain HTTP proxy in front of upstreams that
compress (``Content-Encoding: gzip``), chunk and keep connections alive -
nginx with ``gzip on`` (static FHIR answers, and in front of Orthanc) and
Orthanc with its own HTTP compression - driven by clients that send
``Accept-Encoding: gzip`` by default: python requests and dicomweb-client.

Issue 12, defect 2 (content codings both ways): the dicomweb backend reads
what a compressing upstream sends (it answered 502 "malformed DICOM JSON"),
Harmony compresses the bodies it produces for a client that accepts gzip, and
reads a gzip STOW-RS request body.  The peers are built in gzip_peers.py.
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pydicom
import pytest
import requests

from tests.dicom_data import make_instance, uid
from tests.dicomweb_helpers import client, multipart


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


@pytest.mark.parametrize("prefix", ["/dw-orthanc", "/dw-nginx"])
def test_dicomweb_client_through_compressing_upstream(gzip_proxy, gzip_upstreams, prefix):
    web = client(gzip_proxy.url(prefix))
    corpus = gzip_upstreams["corpus"]
    studies = web.search_for_studies(search_filters={"PatientID": "PAT002"})
    assert [s["0020000D"]["Value"][0] for s in studies] == [corpus[0].study_uid]
    inst = corpus[0]  # the RLE-compressed instance
    meta = web.retrieve_instance_metadata(inst.study_uid, inst.series_uid, inst.sop_uid)
    assert meta["00080018"]["Value"] == [inst.sop_uid]
    got = web.retrieve_instance(inst.study_uid, inst.series_uid, inst.sop_uid,
                                media_types=[("application/dicom", "*")])
    assert np.array_equal(got.pixel_array, pydicom.dcmread(inst.path).pixel_array)


#: a client behind a reverse proxy: Harmony sends loopback clients plain bodies
#: (docs/content-coding.md: there compressing costs more than it saves)
PROXIED = {"X-Forwarded-For": "203.0.113.7"}


def test_harmony_compresses_what_it_produces(gzip_proxy, archive):
    """QIDO results from the archive and a rewritten FHIR Bundle leave gzip-encoded for requests."""
    r = requests.get(archive.web_url + "/instances", headers={"Accept": "application/dicom+json", **PROXIED})
    assert r.status_code == 200 and r.headers.get("Content-Encoding") == "gzip", r.headers
    assert len(r.json()) >= 22
    r = requests.get(gzip_proxy.url("/fhir/Patient"), headers=PROXIED)
    assert r.status_code == 200 and r.headers.get("Content-Encoding") == "gzip", r.headers
    assert r.json()["resourceType"] == "Bundle"
    local = requests.get(archive.web_url + "/instances", headers={"Accept": "application/dicom+json"})
    assert "Content-Encoding" not in local.headers and local.json() == requests.get(
        archive.web_url + "/instances", headers={"Accept": "application/dicom+json", **PROXIED}).json()


def test_gzip_stow_request_body(archive, tmp_path):
    ds = make_instance(patient_id="IOPGZ", study_uid=uid(7, 5), series_uid=uid(7, 5, 1), sop_uid=uid(7, 5, 1, 1))
    path = tmp_path / "gz.dcm"
    ds.save_as(path, enforce_file_format=True)
    body, content_type = multipart([path.read_bytes()])
    r = requests.post(archive.web_url + "/studies", data=gzip.compress(body),
                      headers={"Content-Type": content_type, "Content-Encoding": "gzip",
                               "Accept": "application/dicom+json"})
    assert r.status_code == 200, r.text
    found = client(archive.web_url).search_for_instances(study_instance_uid=uid(7, 5))
    assert [f["00080018"]["Value"][0] for f in found] == [uid(7, 5, 1, 1)]
