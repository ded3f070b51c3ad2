"""dicomweb endpoint + dicomweb backend in front of a real Orthanc DICOMweb plugin,
driven by dicomweb-client; every answer is compared with Orthanc's own."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq

from tests.dicom_data import make_instance
from tests.dicomweb_helpers import client, in_thread, same_dataset, summaries
from tests.harness import MINIMAL_MAIN, start_harmony, write_config

PIPES = """
[pipelines.dw]
networks = ["default"]
endpoints = ["web"]
backends = ["orthanc"]

[endpoints.web]
service = "dicomweb"
[endpoints.web.options]
path_prefix = "/dicomweb"
max_upload_bytes = 2000000

[backends.orthanc]
service = "dicomweb"
targets = ["pacs"]

[targets.pacs]
url = "{url}"
aet = "ORTHANC"

[pipelines.store]
networks = ["default"]
endpoints = ["store"]
backends = ["scratch"]

[endpoints.store]
service = "dicomweb"
[endpoints.store.options]
path_prefix = "/store"
empty_search_status = 204

[backends.scratch]
service = "dicomweb"
[backends.scratch.options]
base_url = "{store_url}"
"""


@pytest.fixture(scope="module")
def harmony(tmp_path_factory, orthanc, store_orthanc):
    path = write_config(tmp_path_factory.mktemp("dwb"), MINIMAL_MAIN,
                        {"p": PIPES.format(url=orthanc.dicomweb_url, store_url=store_orthanc.dicomweb_url)})
    running = pytest_twisted.blockon(start_harmony(path))
    yield running
    pytest_twisted.blockon(running.stop())


@pytest.fixture
def proxy(harmony):
    return client(harmony.url("/dicomweb"))


@pytest.fixture
def native(orthanc):
    return client(orthanc.dicomweb_url)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("level,kwargs", [
    ("studies", {}),
    ("studies", {"search_filters": {"PatientID": "PAT001"}}),
    ("studies", {"search_filters": {"StudyDate": "20230101-20241231"}}),
    ("series", {"search_filters": {"Modality": "MR"}}),
    ("instances", {"search_filters": {"SeriesDescription": "AXIAL"}, "fields": ["SeriesDescription"]}),
    ("studies", {"fields": ["StudyDescription"], "limit": 2, "offset": 1}),
])
async def test_qido_matches_orthanc(proxy, native, level, kwargs):
    fn = {"studies": "search_for_studies", "series": "search_for_series", "instances": "search_for_instances"}[level]
    ours = await in_thread(getattr(proxy, fn), **kwargs)
    theirs = await in_thread(getattr(native, fn), **kwargs)
    assert ours, "the corpus matches every one of these searches"
    assert summaries(ours) == summaries(theirs)


@pytest_twisted.ensureDeferred
async def test_qido_wildcards_reach_orthanc_decoded(proxy, orthanc):
    """dicomweb-client percent-encodes '*' and '^'; Orthanc 1.10 does not decode
    them, so natively the search finds nothing.  Harmony re-encodes the parsed
    query minimally, so the wildcard works; compare with Orthanc asked plainly."""
    ours = await in_thread(proxy.search_for_studies, search_filters={"PatientName": "TEST^B*"})
    raw = await in_thread(orthanc.rest, "GET", "/dicom-web/studies?PatientName=TEST^B*")
    theirs = json.loads(raw) if isinstance(raw, bytes) else raw
    assert len(ours) == 1 and summaries(ours) == summaries(theirs)


@pytest_twisted.ensureDeferred
async def test_qido_retrieve_urls_point_at_the_proxy(harmony, proxy, corpus):
    study = corpus[0].study_uid
    results = await in_thread(proxy.search_for_series, study_instance_uid=study)
    urls = [r["00081190"]["Value"][0] for r in results]
    assert urls and all(u.startswith(harmony.url("/dicomweb/studies/")) for u in urls)
    # A client following the RetrieveURL stays on the proxy and gets the series.
    series = results[0]["0020000E"]["Value"][0]
    resp = await treq.get(urls[0] + "/metadata", headers={"Accept": "application/dicom+json"})
    assert resp.code == 200
    meta = json.loads(await resp.content())
    assert {m["0020000E"]["Value"][0] for m in meta} == {series}


@pytest_twisted.ensureDeferred
async def test_wado_instance_series_study_are_identical(proxy, native, corpus):
    inst = corpus[0]
    ours = await in_thread(proxy.retrieve_instance, inst.study_uid, inst.series_uid, inst.sop_uid)
    theirs = await in_thread(native.retrieve_instance, inst.study_uid, inst.series_uid, inst.sop_uid)
    assert ours.SOPInstanceUID == inst.sop_uid and same_dataset(ours, theirs)
    series = await in_thread(proxy.retrieve_series, inst.study_uid, inst.series_uid)
    assert sorted(d.SOPInstanceUID for d in series) == sorted(
        i.sop_uid for i in corpus if i.series_uid == inst.series_uid)
    study = await in_thread(proxy.retrieve_study, inst.study_uid)
    assert len(study) == sum(1 for i in corpus if i.study_uid == inst.study_uid)


@pytest_twisted.ensureDeferred
async def test_wado_metadata_frames_rendered(harmony, proxy, native, corpus):
    mf = next(i for i in corpus if i.modality == "MR")  # the 4-frame instance
    ours = await in_thread(proxy.retrieve_instance_metadata, mf.study_uid, mf.series_uid, mf.sop_uid)
    theirs = await in_thread(native.retrieve_instance_metadata, mf.study_uid, mf.series_uid, mf.sop_uid)
    assert ours["00080018"] == theirs["00080018"]
    bulk = ours.get("7FE00010", {}).get("BulkDataURI")
    if bulk:
        assert bulk.startswith(harmony.url("/dicomweb/"))
    media = [("application/octet-stream", "*")]
    f_ours = await in_thread(proxy.retrieve_instance_frames, mf.study_uid, mf.series_uid, mf.sop_uid, [2, 4],
                             media_types=media)
    f_theirs = await in_thread(native.retrieve_instance_frames, mf.study_uid, mf.series_uid, mf.sop_uid, [2, 4],
                               media_types=media)
    assert f_ours == f_theirs and len(f_ours) == 2 and len(f_ours[0]) == 16 * 16 * 2
    png = await in_thread(proxy.retrieve_instance_rendered, mf.study_uid, mf.series_uid, mf.sop_uid,
                          media_types=("image/png",))
    assert png.startswith(b"\x89PNG")


@pytest_twisted.ensureDeferred
async def test_stow_through_proxy_lands_in_orthanc(harmony, store_orthanc):
    proxy, native = client(harmony.url("/store")), client(store_orthanc.dicomweb_url)
    ds = make_instance(patient_id="STOWB", study_uid="1.2.826.0.1.3680043.10.543.77.1",
                       series_uid="1.2.826.0.1.3680043.10.543.77.1.1", sop_uid="1.2.826.0.1.3680043.10.543.77.1.1.1")
    ds.preamble = b"\0" * 128  # dicomweb-client writes "like original": give it a Part-10 preamble
    result = await in_thread(proxy.store_instances, [ds])
    ref = result.ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert ref.RetrieveURL.startswith(harmony.url("/store/studies/"))
    got = await in_thread(native.retrieve_instance, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert got.PatientID == "STOWB"


@pytest_twisted.ensureDeferred
async def test_per_aet_route_and_unknown_aet(harmony, corpus):
    ok = await treq.get(harmony.url("/dicomweb/aets/ORTHANC/rs/studies?PatientID=PAT002"))
    assert ok.code == 200
    doc = json.loads(await ok.content())
    assert [d["00100020"]["Value"] for d in doc] == [["PAT002"]]
    assert doc[0]["00081190"]["Value"][0].startswith(harmony.url("/dicomweb/aets/ORTHANC/rs/studies/"))
    missing = await treq.get(harmony.url("/dicomweb/aets/NOPE/rs/studies"))
    assert missing.code == 404


@pytest_twisted.ensureDeferred
async def test_forwarded_headers_shape_urls(harmony):
    resp = await treq.get(harmony.url("/dicomweb/studies?PatientID=PAT003"),
                          headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "pacs.example.org"})
    doc = json.loads(await resp.content())
    assert doc[0]["00081190"]["Value"][0].startswith("https://pacs.example.org/dicomweb/studies/")


@pytest_twisted.ensureDeferred
async def test_empty_search_is_200_with_an_empty_array_by_default(harmony, proxy):
    # Orthanc's own DICOMweb client reads 204 as "Bad file format" (issue 12, defect 8).
    resp = await treq.get(harmony.url("/dicomweb/studies?PatientID=NOBODY"))
    assert resp.code == 200 and await resp.content() == b"[]"
    assert await in_thread(proxy.search_for_studies, search_filters={"PatientID": "NOBODY"}) == []


@pytest_twisted.ensureDeferred
async def test_empty_search_status_204_is_an_option(harmony):
    resp = await treq.get(harmony.url("/store/studies?PatientID=NOBODY"))
    assert resp.code == 204 and await resp.content() == b""
    assert not resp.headers.hasHeader("content-type")
    assert await in_thread(client(harmony.url("/store")).search_for_studies,
                           search_filters={"PatientID": "NOBODY"}) == []


@pytest_twisted.ensureDeferred
async def test_unknown_uids_are_404_from_upstream(harmony):
    resp = await treq.get(harmony.url("/dicomweb/studies/1.2.3.4.5.6/metadata"))
    assert resp.code == 404


@pytest_twisted.ensureDeferred
async def test_malformed_stow_never_reaches_upstream(harmony, orthanc):
    before = len(orthanc.instance_ids())
    resp = await treq.post(harmony.url("/dicomweb/studies"), b"DICM" * 10,
                           headers={"Content-Type": "application/dicom"})
    assert resp.code == 415
    resp = await treq.post(harmony.url("/dicomweb/studies"), b"--x\r\n\r\nDICM",
                           headers={"Content-Type": 'multipart/related; type="application/dicom"'})
    assert resp.code == 400
    assert len(orthanc.instance_ids()) == before


AUTH_PIPES = """
[pipelines.dw]
networks = ["default"]
endpoints = ["web"]
backends = ["up"]

[endpoints.web]
service = "dicomweb"
[endpoints.web.options]
path_prefix = "/dw"

[backends.up]
service = "dicomweb"
[backends.up.options]
base_url = "{url}/base"
bearer_token = "s3cret"
"""


@pytest_twisted.ensureDeferred
async def test_auth_header_and_rewriting_of_every_url_field(tmp_path, upstream):
    """A recording upstream (real HTTP on loopback) answers with URLs of its own
    in JSON (nested UR values, BulkDataURI) and in headers: all come back as the proxy's."""
    up = upstream.url + "/base"
    doc = [{"00081190": {"vr": "UR", "Value": [up + "/studies/1.2"]},
            "7FE00010": {"vr": "OW", "BulkDataURI": "http://elsewhere:9/base/studies/1.2/bulk/7FE00010"},
            "00081199": {"vr": "SQ", "Value": [{"00081190": {"vr": "UR", "Value": [up + "/studies/1.2/series/3"]}}]},
            "00100020": {"vr": "LO", "Value": [up + "/not-a-url-field"]}}]
    upstream.respond[b"/base/studies/1.2/metadata"] = (
        200, {"Content-Type": "application/dicom+json", "Content-Location": up + "/studies/1.2/metadata"},
        json.dumps(doc).encode())
    running = await start_harmony(write_config(tmp_path, MINIMAL_MAIN, {"p": AUTH_PIPES.format(url=upstream.url)}))
    me = running.url("/dw")
    try:
        resp = await treq.get(me + "/studies/1.2/metadata", headers={"Authorization": "Basic client"})
        got = json.loads(await resp.content())
    finally:
        await running.stop()
    assert got[0]["00081190"]["Value"] == [me + "/studies/1.2"]
    assert got[0]["7FE00010"]["BulkDataURI"] == me + "/studies/1.2/bulk/7FE00010"
    assert got[0]["00081199"]["Value"][0]["00081190"]["Value"] == [me + "/studies/1.2/series/3"]
    assert got[0]["00100020"]["Value"] == [up + "/not-a-url-field"]  # only URL fields are touched
    assert resp.headers.getRawHeaders("content-location") == [me + "/studies/1.2/metadata"]
    seen = upstream.requests[-1]["headers"]
    assert seen[b"authorization"] == [b"Bearer s3cret"]


POOLED = """
[pipelines.pooled]
networks = ["default"]
endpoints = ["pooled"]
backends = ["pooled"]

[endpoints.pooled]
service = "dicomweb"
[endpoints.pooled.options]
path_prefix = "/pooled"

[backends.pooled]
service = "dicomweb"
targets = ["gone", "pacs"]
[backends.pooled.options]
retries = 1
[backends.pooled.circuit]
failures = 2
open_secs = 60

[targets.gone]
url = "http://127.0.0.1:{dead_port}/dicom-web"
[targets.pacs]
url = "{url}"
"""


@pytest_twisted.ensureDeferred
async def test_targets_are_a_pool_with_retries_and_a_circuit(tmp_path, orthanc, dead_port):
    """Like the http backend: a QIDO the dead target cannot answer is retried on the live one,
    and the dead target's circuit opens (it used to send everything to the first target)."""
    path = write_config(tmp_path, MINIMAL_MAIN, {"p": POOLED.format(url=orthanc.dicomweb_url,
                                                                    dead_port=dead_port)})
    running = await start_harmony(path)
    try:
        for _ in range(6):
            r = await treq.get(running.url("/pooled/studies"), headers={"Accept": "application/dicom+json"})
            assert r.code == 200, await r.text()
            assert json.loads(await r.content())
        pool = running.service.runtime.backends["pooled"].target_pool
        gone, pacs = pool.by_name["gone"], pool.by_name["pacs"]
        assert gone.circuit == "open" and gone.failures_total == 2
        assert pacs.circuit == "closed" and pacs.failures_total == 0
    finally:
        await running.stop()
