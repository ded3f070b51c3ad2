"""DICOMweb -> DIMSE bridge end to end: dicomweb-client -> Harmony (dicomweb
endpoint, dicomweb_bridge, dicom_scu) -> the real Orthanc's DIMSE port,
every answer compared with Orthanc's own DICOMweb plugin for the same data."""

from __future__ import annotations

import io
import json

import numpy as np
import pydicom
import pytest
import pytest_twisted
import treq
from PIL import Image
from twisted.internet import threads

from tests.dicom_data import make_instance
from tests.dicomweb_helpers import (QIDO_CASES, assert_wado_equal, bridge_pipeline, client, in_thread, multipart,
                                    orthanc_qido, same_dataset, summaries)
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.peers import free_port


def bridge_pipes(name: str = "bridge", prefix: str = "/dicomweb") -> str:
    """TOML for endpoint -> dicomweb_bridge -> dicom_scu; ``{aet}``/``{port}`` name the PACS."""
    return bridge_pipeline(name, f"{name}_pacs", prefix, middleware=name) + f"""
[backends.{name}_pacs]
service = "dicom_scu"
[backends.{name}_pacs.options]
aet = "{{aet}}"
host = "127.0.0.1"
port = {{port}}
local_aet = "HARMONY_DW"
"""


PIPES = bridge_pipes()
#: The same bridge in front of an empty Orthanc, for tests that store.
STORE_PIPES = bridge_pipes("store", "/store")


@pytest.fixture(scope="module")
def harmony(tmp_path_factory, orthanc, store_orthanc):
    folder = tmp_path_factory.mktemp("bridge")
    orthanc.add_modality("harmony_dw", "HARMONY_DW", free_port())
    store_orthanc.add_modality("harmony_dw", "HARMONY_DW", free_port())
    path = write_config(folder, MINIMAL_MAIN + '\n[storage.options]\npath = "var"\n',
                        {"p": PIPES.format(aet=orthanc.aet, port=orthanc.dicom_port),
                         "s": STORE_PIPES.format(aet=store_orthanc.aet, port=store_orthanc.dicom_port)})
    running = pytest_twisted.blockon(start_harmony(path))
    running.folder = folder
    yield running
    pytest_twisted.blockon(running.stop())


@pytest.fixture
def proxy(harmony):
    return client(harmony.url("/dicomweb"))


@pytest.fixture
def native(orthanc):
    return client(orthanc.dicomweb_url)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("fn,kwargs,path,params", QIDO_CASES)
async def test_qido_equals_orthanc_native(proxy, orthanc, fn, kwargs, path, params):
    ours = await in_thread(getattr(proxy, fn), **kwargs)
    theirs = await in_thread(orthanc_qido, orthanc, path, params)
    assert ours
    assert summaries(ours) == summaries(theirs)
    if "fields" in kwargs:
        assert all("00081030" in r for r in ours)


@pytest_twisted.ensureDeferred
async def test_qido_paging_on_a_pacs_that_cannot_page(harmony, proxy, native):
    everything = await in_thread(native.search_for_studies)
    uids = sorted(r["0020000D"]["Value"][0] for r in everything)
    pages = []
    for offset in range(0, len(uids), 3):
        pages.append(await in_thread(proxy.search_for_studies, limit=3, offset=offset))
    assert [len(p) for p in pages] == [min(3, len(uids) - o) for o in range(0, len(uids), 3)]
    assert len(pages) >= 2  # the corpus alone has 4 studies
    assert sorted(r["0020000D"]["Value"][0] for p in pages for r in p) == uids
    resp = await treq.get(harmony.url("/dicomweb/studies?limit=2"))
    assert resp.code == 200 and "additional results" in resp.headers.getRawHeaders("warning")[0]
    assert len(json.loads(await resp.content())) == 2


@pytest_twisted.ensureDeferred
async def test_qido_retrieve_url_and_empty_result(harmony, proxy):
    results = await in_thread(proxy.search_for_series, search_filters={"Modality": "MR"})
    assert results[0]["00081190"]["Value"][0].startswith(harmony.url("/dicomweb/studies/1.2.826"))
    resp = await treq.get(harmony.url("/dicomweb/studies?PatientID=NOBODY"))
    assert resp.code == 200 and await resp.content() == b"[]"
    assert resp.headers.getRawHeaders("content-type") == ["application/dicom+json"]


@pytest_twisted.ensureDeferred
async def test_wado_instance_series_study_equal_orthanc(proxy, native, corpus):
    await in_thread(assert_wado_equal, proxy, native, corpus, corpus[0])


@pytest_twisted.ensureDeferred
async def test_wado_explicit_le_request_decompresses_rle(harmony, proxy, native, corpus):
    rle = next(i for i in corpus if i.study_uid.endswith(".1.3") and i.sop_uid.endswith(".1.3.1.1"))
    ours = await in_thread(proxy.retrieve_instance, rle.study_uid, rle.series_uid, rle.sop_uid,
                           media_types=[("application/dicom", "1.2.840.10008.1.2.1")])
    assert ours.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    stored = await in_thread(native.retrieve_instance, rle.study_uid, rle.series_uid, rle.sop_uid,
                             media_types=[("application/dicom", "*")])
    assert stored.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(ours.pixel_array, stored.pixel_array)
    # No transfer-syntax parameter at all: PS3.18's default, Explicit VR Little Endian.
    resp = await treq.get(harmony.url(f"/dicomweb/studies/{rle.study_uid}/series/{rle.series_uid}/instances/"
                                      f"{rle.sop_uid}"), headers={"Accept": 'multipart/related; type="application/dicom"'})
    body = await resp.content()
    assert resp.code == 200 and b"transfer-syntax=1.2.840.10008.1.2.1" in body[:300]
    location = harmony.url(f"/dicomweb/studies/{rle.study_uid}/series/{rle.series_uid}/instances/{rle.sop_uid}")
    assert b"Content-Location: " + location.encode() in body[:500]


@pytest_twisted.ensureDeferred
async def test_wado_metadata_equals_orthanc_with_bulkdata_uris(harmony, proxy, native, corpus):
    inst = next(i for i in corpus if i.modality == "MR")
    ours = await in_thread(proxy.retrieve_series_metadata, inst.study_uid, inst.series_uid)
    theirs = await in_thread(native.retrieve_series_metadata, inst.study_uid, inst.series_uid)
    assert summaries(ours) == summaries(theirs)
    for doc in ours:
        bulk = doc["7FE00010"]["BulkDataURI"]
        assert bulk.startswith(harmony.url("/dicomweb/studies/")) and bulk.endswith("/bulkdata/7FE00010")
    # The BulkDataURI answers with the pixel data itself.
    uri = next(d for d in ours if d["00080018"]["Value"][0] == inst.sop_uid)["7FE00010"]["BulkDataURI"]
    resp = await treq.get(uri, headers={"Accept": "application/octet-stream"})
    assert resp.code == 200
    stored = pydicom.dcmread(inst.path)
    assert await resp.content() == stored.PixelData


@pytest_twisted.ensureDeferred
async def test_metadata_etag_and_cache(harmony, corpus):
    inst = corpus[5]
    url = harmony.url(f"/dicomweb/studies/{inst.study_uid}/series/{inst.series_uid}/metadata")
    remote = {"X-Forwarded-For": ["198.51.100.7"]}  # treq accepts gzip: a remote one gets it
    first, second = await treq.get(url, headers=remote), await treq.get(url, headers=remote)
    assert first.code == second.code == 200
    etag = first.headers.getRawHeaders("etag")[0]
    assert etag.startswith("W/")  # the gzipped answer has a weak ETag
    assert second.headers.getRawHeaders("etag") == [etag]
    assert await first.content() == await second.content()
    again = await treq.get(url, headers={"If-None-Match": etag, **remote})
    assert again.code == 304 and again.headers.getRawHeaders("etag") == [etag]
    plain = await treq.get(url, headers={"If-None-Match": etag})  # the strong form matches weakly too
    assert plain.code == 304
    bridge = harmony.service.runtime.middleware["bridge"]
    assert await threads.deferToThread(bridge.cache.db.read, lambda c: c.execute(
        "SELECT count(*) FROM dicomweb_metadata").fetchone()[0]) >= 1


@pytest_twisted.ensureDeferred
async def test_frames_equal_orthanc_and_rendered(proxy, native, corpus):
    mf = next(i for i in corpus if i.modality == "MR")  # 4 frames
    media = [("application/octet-stream", "*")]
    ours = await in_thread(proxy.retrieve_instance_frames, mf.study_uid, mf.series_uid, mf.sop_uid, [1, 3],
                           media_types=media)
    theirs = await in_thread(native.retrieve_instance_frames, mf.study_uid, mf.series_uid, mf.sop_uid, [1, 3],
                             media_types=media)
    assert ours == theirs and len(ours) == 2
    png = await in_thread(proxy.retrieve_instance_rendered, mf.study_uid, mf.series_uid, mf.sop_uid,
                          media_types=("image/png",))
    assert Image.open(io.BytesIO(png)).size == (16, 16)
    jpeg = await in_thread(proxy.retrieve_instance_frames_rendered, mf.study_uid, mf.series_uid, mf.sop_uid,
                           [2], media_types=("image/jpeg",))
    assert jpeg[:2] == b"\xff\xd8"


@pytest_twisted.ensureDeferred
async def test_frames_of_rle_instance_as_stored_and_decoded(harmony, corpus):
    rle = next(i for i in corpus if i.study_uid.endswith(".1.3") and i.sop_uid.endswith(".1.3.1.1"))
    base = harmony.url(f"/dicomweb/studies/{rle.study_uid}/series/{rle.series_uid}/instances/{rle.sop_uid}")
    resp = await treq.get(base + "/frames/1", headers={"Accept": "application/octet-stream"})
    assert resp.code == 200
    raw = await resp.content()
    stored = pydicom.dcmread(rle.path)
    assert raw == stored.pixel_array.astype("<u2").tobytes()
    missing = await treq.get(base + "/frames/7", headers={"Accept": "application/octet-stream"})
    assert missing.code == 404


@pytest_twisted.ensureDeferred
async def test_stow_stores_through_c_store(harmony, store_orthanc):
    proxy, native = client(harmony.url("/store")), client(store_orthanc.dicomweb_url)
    study = "1.2.826.0.1.3680043.10.543.88.1"
    good = [make_instance(patient_id="STOWBR", study_uid=study, series_uid=study + ".1", sop_uid=f"{study}.1.{n}",
                          instance_number=n) for n in (1, 2)]
    for ds in good:
        ds.preamble = b"\0" * 128
    result = await in_thread(proxy.store_instances, good, study_instance_uid=study)
    assert sorted(r.ReferencedSOPInstanceUID for r in result.ReferencedSOPSequence) == [f"{study}.1.1", f"{study}.1.2"]
    assert result.ReferencedSOPSequence[0].RetrieveURL.startswith(harmony.url("/store/studies/" + study))
    got = await in_thread(native.retrieve_instance, study, study + ".1", f"{study}.1.2")
    assert got.PatientID == "STOWBR"


@pytest_twisted.ensureDeferred
async def test_stow_study_mismatch_is_409_and_partial_is_202(harmony):
    study = "1.2.826.0.1.3680043.10.543.88.2"
    other = make_instance(study_uid="1.2.826.0.1.3680043.10.543.88.3", sop_uid="1.2.826.0.1.3680043.10.543.88.3.1.1")
    good = make_instance(study_uid=study, sop_uid=study + ".1.1")
    parts = [_part_bytes(other)]
    body, ctype = multipart(parts)
    resp = await treq.post(harmony.url(f"/store/studies/{study}"), body, headers={"Content-Type": ctype})
    assert resp.code == 409
    doc = json.loads(await resp.content())
    assert doc["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
    body, ctype = multipart([_part_bytes(good), b"this is not DICOM"])
    resp = await treq.post(harmony.url(f"/store/studies/{study}"), body, headers={"Content-Type": ctype})
    assert resp.code == 202
    doc = json.loads(await resp.content())
    assert doc["00081199"]["Value"][0]["00081155"]["Value"] == [study + ".1.1"]
    assert doc["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]


@pytest_twisted.ensureDeferred
async def test_stow_malformed_multipart_is_400(harmony):
    resp = await treq.post(harmony.url("/store/studies"), b"--B\r\nContent-Type: application/dicom\r\n\r\nDICM",
                           headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary="B"'})
    assert resp.code == 400
    assert "closing boundary" in json.loads(await resp.content())["detail"]


@pytest_twisted.ensureDeferred
async def test_unknown_uids_are_404(harmony):
    resp = await treq.get(harmony.url("/dicomweb/studies/1.2.3.4.5.999"),
                          headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert resp.code == 404
    resp = await treq.get(harmony.url("/dicomweb/studies/1.2.3.4.5.999/metadata"))
    assert resp.code == 404


def _part_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest_twisted.ensureDeferred
async def test_pacs_down_metadata_waiters_do_not_hang(tmp_path, dead_port):
    """Concurrent identical metadata requests share one fetch; when it fails
    (nothing listens on the PACS port) every waiter gets the error, and the
    next request tries again instead of waiting on a dead fetch."""
    from twisted.internet import defer
    dead = dead_port
    path = write_config(tmp_path, MINIMAL_MAIN + '\n[storage.options]\npath = "var"\n',
                        {"p": PIPES.format(aet="NOBODY", port=dead).replace(
                            'local_aet = "HARMONY_DW"', 'local_aet = "HARMONY_DW"\nconnect_timeout_secs = 2')})
    running = await start_harmony(path)
    try:
        url = running.url("/dicomweb/studies/1.2.3/series/1.2.3.4/metadata")
        first = await defer.gatherResults([treq.get(url), treq.get(url)])
        assert [r.code for r in first] == [502, 502]
        for r in first:
            assert json.loads(await r.content())["status"] == 502
        again = await treq.get(url)
        assert again.code == 502
        stow_body = multipart([_part_bytes(make_instance(study_uid="1.2.3", sop_uid="1.2.3.9"))])
        stow = await treq.post(running.url("/dicomweb/studies"), stow_body[0], headers={"Content-Type": stow_body[1]})
        assert stow.code == 503
        doc = json.loads(await stow.content())
        assert doc["00081198"]["Value"][0]["00081197"]["Value"] == [0x0110]
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_thumbnails_and_includefield_all(harmony, corpus):
    inst = corpus[0]
    resp = await treq.get(harmony.url(f"/dicomweb/studies/{inst.study_uid}/series/{inst.series_uid}/thumbnail"))
    assert resp.code == 200 and resp.headers.getRawHeaders("content-type") == ["image/jpeg"]
    image = Image.open(io.BytesIO(await resp.content()))
    assert image.format == "JPEG" and image.size == (16, 16)
    resp = await treq.get(harmony.url(f"/dicomweb/studies?PatientID={inst.patient_id}&includefield=all"))
    docs = json.loads(await resp.content())
    assert docs and all("00081030" in d and "00201208" in d for d in docs)
    resp = await treq.get(harmony.url(f"/dicomweb/studies/{inst.study_uid}/rendered"),
                          headers={"Accept": "image/gif"})
    assert resp.code == 406


@pytest_twisted.ensureDeferred
async def test_concurrent_metadata_requests_make_one_retrieve(harmony, corpus):
    """Three clients ask for the same uncached series metadata at once: one
    C-GET reaches the PACS, all three get the same answer."""
    from twisted.internet import defer
    backend = harmony.service.runtime.backends["bridge_pacs"]
    calls = []
    original = backend.send

    def counting(request):  # instrumentation of the real backend, not a fake
        calls.append(request.metadata.get("dimse_op"))
        return original(request)

    backend.send = counting
    try:
        inst = next(i for i in corpus if i.patient_id == "PAT003")
        url = harmony.url(f"/dicomweb/studies/{inst.study_uid}/series/{inst.series_uid}/metadata")
        responses = await defer.gatherResults([treq.get(url) for _ in range(3)])
        bodies = [await r.content() for r in responses]
    finally:
        backend.send = original
    assert [r.code for r in responses] == [200, 200, 200]
    assert bodies[0] == bodies[1] == bodies[2]
    assert calls == ["C-GET"]


MOVE_PIPES = PIPES.replace('local_aet = "HARMONY_DW"', '''local_aet = "HARMONY_MV"
dimse_retrieve_mode = "move"
incoming_store_port = {store_port}
incoming_store_bind = "127.0.0.1"''')


@pytest_twisted.ensureDeferred
async def test_wado_through_c_move_mode(tmp_path, orthanc, native, corpus):
    """The same WADO-RS retrieve when the backend fetches with C-MOVE to its own store SCP."""
    store_port = free_port()
    orthanc.add_modality("harmony_mv", "HARMONY_MV", store_port)
    path = write_config(tmp_path, MINIMAL_MAIN + '\n[storage.options]\npath = "var"\n',
                        {"p": MOVE_PIPES.format(aet=orthanc.aet, port=orthanc.dicom_port, store_port=store_port)})
    running = await start_harmony(path)
    try:
        inst = corpus[-1]
        media = [("application/dicom", "*")]
        ours = await in_thread(client(running.url("/dicomweb")).retrieve_series, inst.study_uid, inst.series_uid,
                               media_types=media)
        theirs = await in_thread(native.retrieve_series, inst.study_uid, inst.series_uid, media_types=media)
        by_uid = {d.SOPInstanceUID: d for d in theirs}
        assert len(ours) == len(theirs) == 3
        assert all(same_dataset(d, by_uid[d.SOPInstanceUID]) for d in ours)
    finally:
        await running.stop()


AET_PIPES = PIPES.replace('backends = ["bridge_pacs"]', 'backends = ["bridge_pacs", "other"]') + """
[backends.other]
service = "dicom_scu"
[backends.other.options]
aet = "OTHERPACS"
host = "127.0.0.1"
port = {dead}
local_aet = "HARMONY_DW"
connect_timeout_secs = 2
"""


@pytest_twisted.ensureDeferred
async def test_per_aet_routes_pick_the_pacs(tmp_path, orthanc, dead_port):
    orthanc.add_modality("harmony_dw", "HARMONY_DW", free_port())
    path = write_config(tmp_path, MINIMAL_MAIN + '\n[storage.options]\npath = "var"\n',
                        {"p": AET_PIPES.format(aet=orthanc.aet, port=orthanc.dicom_port, dead=dead_port)})
    running = await start_harmony(path)
    try:
        ok = await treq.get(running.url(f"/dicomweb/aets/{orthanc.aet}/rs/studies?PatientID=PAT002"))
        assert ok.code == 200
        doc = json.loads(await ok.content())
        assert doc[0]["00081190"]["Value"][0].startswith(running.url(f"/dicomweb/aets/{orthanc.aet}/rs/studies/"))
        down = await treq.get(running.url("/dicomweb/aets/OTHERPACS/rs/studies"))
        assert down.code == 502  # routed to the other (unreachable) PACS, not to Orthanc
        unknown = await treq.get(running.url("/dicomweb/aets/NOPE/rs/studies"))
        assert unknown.code == 404
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_undecodable_instance_is_406_unless_asked_as_stored(harmony):
    """A JPEG instance whose pixel data cannot be decoded here: asking for
    Explicit VR Little Endian is a clean 406 (before any byte of the body),
    transfer-syntax=* still serves it as stored."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit
    study = "1.2.826.0.1.3680043.10.543.88.5"
    ds = make_instance(study_uid=study, series_uid=study + ".1", sop_uid=study + ".1.1", rows=8, cols=8)
    ds.PixelData = encapsulate([b"\xff\xd8not really a jpeg\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    body, ctype = multipart([_part_bytes(ds)])
    stored = await treq.post(harmony.url("/store/studies"), body, headers={"Content-Type": ctype})
    assert stored.code == 200, await stored.content()
    url = harmony.url(f"/store/studies/{study}/series/{study}.1/instances/{study}.1.1")
    refused = await treq.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert refused.code == 406
    assert "transfer-syntax=*" in json.loads(await refused.content())["detail"]
    as_stored = await treq.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert as_stored.code == 200
    assert b"transfer-syntax=" + JPEGBaseline8Bit.encode() in (await as_stored.content())[:400]
