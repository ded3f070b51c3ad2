"""Issue 12, defect 2: content codings both ways.

- The ``dicomweb`` backend in front of an upstream that compresses (Orthanc
  itself, nginx ``gzip on`` in front of Orthanc), driven by dicomweb-client,
  which sends ``Accept-Encoding: gzip``: today 502 "upstream answered
  malformed DICOM JSON".
- Bodies Harmony produces or rewrites (QIDO results, metadata, FHIR Bundles)
  are compressed for a client that accepts gzip, and a gzip STOW-RS request
  body is read.

Fails until defect 2's fix is merged.  The peers: gzip_peers.py.
"""

from __future__ import annotations

import gzip

import numpy as np
import pydicom
import pytest
import requests

from tests.dicomweb_helpers import client, multipart
from tests.dicom_data import make_instance, uid

PREFIXES = ["/dw-orthanc", "/dw-nginx"]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_dicomweb_client_through_compressing_upstream_d2(gzip_proxy, gzip_upstreams, prefix):
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


def test_harmony_compresses_what_it_produces_d2(gzip_proxy, archive):
    """QIDO results from the archive and a rewritten FHIR Bundle leave gzip-encoded for requests."""
    r = requests.get(archive.web_url + "/instances", headers={"Accept": "application/dicom+json"})
    assert r.status_code == 200 and r.headers.get("Content-Encoding") == "gzip", r.headers
    assert len(r.json()) >= 22
    r = requests.get(gzip_proxy.url("/fhir/Patient"))
    assert r.status_code == 200 and r.headers.get("Content-Encoding") == "gzip", r.headers
    assert r.json()["resourceType"] == "Bundle"


def test_gzip_stow_request_body_d2(archive, tmp_path):
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
