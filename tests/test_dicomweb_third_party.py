"""DICOMweb driven by clients nobody here wrote (issue 12, defects 2, 3 and 8).

- python requests and dicomweb-client send ``Accept-Encoding: gzip``; a real
  Orthanc with HTTP compression on answers gzip whenever asked.  Through the
  ``dicomweb`` backend that gave 502 "malformed DICOM JSON" (defect 2).
- Orthanc's own DICOMweb client (``"DicomWeb": {"Servers": ...}``) is the STOW
  client: its 73-character boundary was refused with 400 (defect 3), and the
  QIDO client: it read an empty search's 204 as "Bad file format" (defect 8).

Harmony sits between two real Orthancs: ``client`` (the DICOMweb client) and
``pacs`` (the compressing upstream), plus its own archive (bridge +
local_archive).
"""

from __future__ import annotations

import gzip
import json

import pytest
import pytest_twisted
import requests

from tests.dicom_data import make_instance
from tests.dicomweb_helpers import ARCHIVE_BACKEND, bridge_pipeline, client, dicomweb_proxy_pipeline, in_thread
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.peers import Orthanc

STUDY = "1.2.826.0.1.3680043.10.1207.1"
REMOTE = "198.51.100.7"
SERIES = STUDY + ".1"
PIPES = ARCHIVE_BACKEND + bridge_pipeline("web", "archive", prefix="/archive")


def series(n=40):
    """One series of *n* CT instances: its metadata is what viewers fetch first."""
    return [make_instance(patient_id="TP-CODING", patient_name="CODING^THIRD^PARTY", study_uid=STUDY,
                          series_uid=SERIES, sop_uid=f"{SERIES}.{i}", instance_number=i, seed=i)
            for i in range(1, n + 1)]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("gz-pacs"), aet="GZPACS",
                     extra_config={"HttpCompressionEnabled": True}).start()
    folder = tmp_path_factory.mktemp("gz-series")
    paths = []
    for i, ds in enumerate(series()):
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    server.upload(paths)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def harmony(tmp_path_factory, pacs):
    path = write_config(tmp_path_factory.mktemp("third-party"),
                        MINIMAL_MAIN + PIPES + dicomweb_proxy_pipeline("proxied", "/proxied", pacs.dicomweb_url))
    running = pytest_twisted.blockon(start_harmony(path))
    yield running
    pytest_twisted.blockon(running.stop())


@pytest.fixture(scope="module")
def orthanc_client(tmp_path_factory, harmony):
    """An Orthanc whose DICOMweb client knows Harmony as two servers."""
    servers = {"proxied": [harmony.url("/proxied")], "archive": [harmony.url("/archive")]}
    server = Orthanc(tmp_path_factory.mktemp("orthanc-client"), aet="OCLIENT",
                     extra_config={"DicomWeb": {"Servers": servers}}).start()
    yield server
    server.stop()


def orthanc_post(orthanc, path, doc):
    """Orthanc's REST API from a thread (it calls Harmony, which runs on the reactor)."""
    return in_thread(orthanc.rest, "POST", path, json.dumps(doc).encode())


def wire(url, **headers):
    """GET with python requests, keeping the bytes as they came over the wire."""
    resp = requests.get(url, headers=headers, stream=True, timeout=30)
    raw = resp.raw.read(decode_content=False)
    return resp, raw


# ------------------------------------------------------------------ defect 2


@pytest_twisted.ensureDeferred
async def test_the_upstream_really_compresses(pacs):
    # Without this the tests below could pass against a plain upstream.
    resp, raw = await in_thread(wire, pacs.dicomweb_url + "/studies", **{"Accept-Encoding": "gzip"})
    assert resp.headers["content-encoding"] == "gzip" and json.loads(gzip.decompress(raw))


@pytest_twisted.ensureDeferred
async def test_qido_and_metadata_with_gzip_through_a_compressing_orthanc(harmony, pacs):
    # python requests' defaults: Accept-Encoding: gzip, deflate
    resp = await in_thread(requests.get, harmony.url("/proxied/studies?PatientID=TP-CODING"), timeout=30)
    assert resp.status_code == 200, resp.text
    (study,) = resp.json()
    assert study["00081190"]["Value"][0] == harmony.url(f"/proxied/studies/{STUDY}")

    url = harmony.url(f"/proxied/studies/{STUDY}/series/{SERIES}/metadata")
    # As relayed by a local reverse proxy for a remote client (a client on
    # loopback itself is answered plain: there gzip only costs).
    resp, raw = await in_thread(wire, url, **{"Accept-Encoding": "gzip, deflate", "X-Forwarded-For": REMOTE})
    assert resp.status_code == 200
    # Harmony rewrote the upstream's URLs and compressed the result itself.
    assert resp.headers["content-encoding"] == "gzip" and "Accept-Encoding" in resp.headers["vary"]
    assert "content-length" not in resp.headers or int(resp.headers["content-length"]) == len(raw)
    plain = gzip.decompress(raw)
    docs = json.loads(plain)
    assert sorted(d["00080018"]["Value"][0] for d in docs) == sorted(f"{SERIES}.{i}" for i in range(1, 41))
    assert pacs.dicomweb_url.encode() not in plain
    ratio = len(plain) / len(raw)
    assert ratio > 5, ratio  # series metadata compresses well
    # The same client on loopback, no proxy between: plain, and no less correct.
    resp, raw = await in_thread(wire, url, **{"Accept-Encoding": "gzip, deflate"})
    assert "content-encoding" not in resp.headers and json.loads(raw) == docs
    assert "Accept-Encoding" in resp.headers["vary"]

    # dicomweb-client (requests underneath, gzip accepted) sees the same documents.
    proxy = client(harmony.url("/proxied"))
    meta = await in_thread(proxy.retrieve_series_metadata, STUDY, SERIES)
    assert sorted(m["00080018"]["Value"][0] for m in meta) == sorted(d["00080018"]["Value"][0] for d in docs)
    found = await in_thread(proxy.search_for_instances, STUDY, SERIES)
    assert len(found) == 40


@pytest_twisted.ensureDeferred
async def test_a_plain_client_gets_plain_answers(harmony):
    resp, raw = await in_thread(wire, harmony.url(f"/proxied/studies/{STUDY}/series/{SERIES}/metadata"),
                                **{"Accept-Encoding": "identity"})
    assert "content-encoding" not in resp.headers and int(resp.headers["content-length"]) == len(raw)
    assert len(json.loads(raw)) == 40


@pytest_twisted.ensureDeferred
async def test_wado_passes_through_with_the_upstreams_coding(harmony, pacs):
    media = "multipart/related; type=\"application/dicom\"; transfer-syntax=*"
    url = f"/studies/{STUDY}/series/{SERIES}/instances/{SERIES}.1"
    direct, direct_raw = await in_thread(wire, pacs.dicomweb_url + url, Accept=media,
                                         **{"Accept-Encoding": "gzip"})
    ours, our_raw = await in_thread(wire, harmony.url("/proxied" + url), Accept=media,
                                    **{"Accept-Encoding": "gzip"})
    assert ours.status_code == 200
    # Whatever Orthanc chose for a DICOM retrieve reaches the client unchanged.
    assert ours.headers.get("content-encoding") == direct.headers.get("content-encoding") == "gzip"
    assert "Accept-Encoding" not in ours.headers.get("vary", "")  # not ours: we did not negotiate it

    def instance(raw):  # the one part's payload (the boundaries differ per answer)
        body = gzip.decompress(raw)
        return body[body.index(b"\r\n\r\n") + 4:body.rindex(b"\r\n--")]
    assert instance(our_raw) == instance(direct_raw)


# ------------------------------------------------------------------ defect 3


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("server", ["proxied", "archive"])
async def test_orthanc_stow_client_is_accepted(tmp_path, harmony, pacs, orthanc_client, server):
    study = f"{STUDY}.{9 if server == 'proxied' else 8}"
    datasets = [make_instance(patient_id="TP-STOW", study_uid=study, series_uid=study + ".1",
                              sop_uid=f"{study}.1.{i}", instance_number=i, seed=i) for i in (1, 2)]
    paths = []
    for i, ds in enumerate(datasets):
        paths.append(tmp_path / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    await in_thread(orthanc_client.upload, paths)
    studies = await in_thread(orthanc_client.rest, "GET", "/studies")
    (oid,) = [s for s in [await in_thread(orthanc_client.rest, "GET", f"/studies/{x}") for x in studies]
              if s["MainDicomTags"]["StudyInstanceUID"] == study]
    # Orthanc's STOW client: multipart/related with a 73-character boundary, chunked.
    await orthanc_post(orthanc_client, f"/dicom-web/servers/{server}/stow", {"Resources": [oid["ID"]]})
    where = client(harmony.url(f"/{server}"))
    found = await in_thread(where.search_for_instances, study)
    assert sorted(f["00080018"]["Value"][0] for f in found) == [f"{study}.1.1", f"{study}.1.2"]
    if server == "proxied":  # and it really reached the PACS behind the proxy
        stored = await in_thread(client(pacs.dicomweb_url).search_for_instances, study)
        assert len(stored) == 2


# ------------------------------------------------------------------ defect 8


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("server", ["proxied", "archive"])
async def test_orthanc_qido_client_reads_an_empty_search(harmony, orthanc_client, server):
    found = await orthanc_post(orthanc_client, f"/dicom-web/servers/{server}/qido",
                               {"Uri": "/studies", "Arguments": {"PatientID": "NOBODY"}})
    assert found == []
    if server == "proxied":
        found = await orthanc_post(orthanc_client, f"/dicom-web/servers/{server}/qido",
                                   {"Uri": "/studies", "Arguments": {"PatientID": "TP-CODING"}})
        # Orthanc simplifies what it read: one "Value" string per attribute.
        assert [f["0020000D"]["Value"] for f in found] == [STUDY]
        assert found[0]["00081190"]["Value"] == harmony.url(f"/proxied/studies/{STUDY}")
