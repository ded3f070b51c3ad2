"""Harmony as a DICOMweb archive over its own store: dicomweb-client ->
``dicomweb`` endpoint -> ``dicomweb_bridge`` -> ``local_archive``.

The corpus goes in by STOW-RS; QIDO-RS and WADO-RS answers are then compared
with Orthanc's own DICOMweb plugin holding the same corpus (the session
``orthanc`` fixture), and retrieved instances are the bytes that were stored.
"""

from __future__ import annotations

import json
import subprocess

import pydicom
import pytest
import pytest_twisted
import treq

from tests.dicomweb_helpers import (COMPARE, QIDO_CASES, assert_wado_equal, bridge_pipeline, client, in_thread,
                                    multipart, orthanc_qido, summaries)
from tests.harness import MINIMAL_MAIN, start_harmony, write_config

ARCHIVE_WEB = """
[storage.options]
path = "store"
min_free_mb = {min_free_mb}

[backends.archive]
service = "local_archive"
""" + bridge_pipeline("web", "archive")
#: Counts of a parent level: NumberOfStudyRelatedSeries/-Instances, NumberOfSeriesRelatedInstances.
PARENT_COUNTS = {"search_for_studies": (), "search_for_series": ("00201206", "00201208"),
                 "search_for_instances": ("00201206", "00201208", "00201209")}


def archive_config(folder, min_free_mb=0):
    return write_config(folder, MINIMAL_MAIN + ARCHIVE_WEB.format(min_free_mb=min_free_mb))


@pytest.fixture(scope="module")
def web_archive(tmp_path_factory, corpus):
    folder = tmp_path_factory.mktemp("archive-web")
    harmony = pytest_twisted.blockon(start_harmony(archive_config(folder)))
    datasets = [pydicom.dcmread(i.path) for i in corpus]
    harmony.stow_result = pytest_twisted.blockon(
        in_thread(client(harmony.url("/dicomweb")).store_instances, datasets))
    yield harmony
    pytest_twisted.blockon(harmony.stop())


@pytest.fixture
def proxy(web_archive):
    return client(web_archive.url("/dicomweb"))


@pytest.fixture
def native(orthanc):
    return client(orthanc.dicomweb_url)


def test_stow_lists_every_instance_and_files_it(web_archive, corpus):
    result = web_archive.stow_result
    assert sorted(r.ReferencedSOPInstanceUID for r in result.ReferencedSOPSequence) == sorted(i.sop_uid for i in corpus)
    assert "FailedSOPSequence" not in result
    store = web_archive.service.runtime.backends["archive"].store
    indexed = store.read_sync(lambda c: [r[0] for r in c.execute("SELECT sop_uid FROM instances")])
    assert sorted(indexed) == sorted(i.sop_uid for i in corpus)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("fn,kwargs,path,params", QIDO_CASES)
async def test_qido_over_the_archive_equals_orthanc(proxy, orthanc, fn, kwargs, path, params):
    ours = await in_thread(getattr(proxy, fn), **kwargs)
    theirs = await in_thread(orthanc_qido, orthanc, path, params)
    assert ours
    # The archive also returns the parent levels' counts (PS3.18 lists the
    # study/series attributes in a search without them in the path); Orthanc
    # leaves them out.
    keys = tuple(k for k in COMPARE if k not in PARENT_COUNTS[fn])
    assert summaries(ours, keys=keys) == summaries(theirs, keys=keys)


@pytest_twisted.ensureDeferred
async def test_qido_paging_and_empty_result(web_archive, proxy, native):
    everything = await in_thread(native.search_for_studies)
    pages = [await in_thread(proxy.search_for_studies, limit=3, offset=o) for o in (0, 3)]
    assert [len(p) for p in pages] == [3, len(everything) - 3]
    assert (sorted(r["0020000D"]["Value"][0] for p in pages for r in p)
            == sorted(r["0020000D"]["Value"][0] for r in everything))
    resp = await treq.get(web_archive.url("/dicomweb/studies?PatientID=NOBODY"))
    assert resp.code == 200 and await resp.content() == b"[]"


@pytest_twisted.ensureDeferred
async def test_wado_instance_series_study_equal_orthanc(proxy, native, corpus):
    for inst in (corpus[0], next(i for i in corpus if i.modality == "MR"), corpus[-1]):
        await in_thread(assert_wado_equal, proxy, native, corpus, inst)


@pytest_twisted.ensureDeferred
async def test_wado_returns_the_stored_bytes(web_archive, corpus):
    for inst in corpus[:3]:
        resp = await treq.get(web_archive.url(f"/dicomweb/studies/{inst.study_uid}/series/{inst.series_uid}"
                                              f"/instances/{inst.sop_uid}"),
                              headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert resp.code == 200
        assert inst.path.read_bytes() in await resp.content()


@pytest_twisted.ensureDeferred
async def test_wado_metadata_equals_orthanc(proxy, native, corpus):
    inst = next(i for i in corpus if i.modality == "MR")
    ours = await in_thread(proxy.retrieve_series_metadata, inst.study_uid, inst.series_uid)
    theirs = await in_thread(native.retrieve_series_metadata, inst.study_uid, inst.series_uid)
    assert summaries(ours) == summaries(theirs)


@pytest_twisted.ensureDeferred
async def test_unknown_uids_are_404(web_archive):
    resp = await treq.get(web_archive.url("/dicomweb/studies/1.2.3.4.5.999"),
                          headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert resp.code == 404
    resp = await treq.get(web_archive.url("/dicomweb/studies/1.2.3.4.5.999/metadata"))
    assert resp.code == 404


@pytest_twisted.ensureDeferred
async def test_stow_into_a_full_archive_is_507_and_keeps_nothing(tmp_path, corpus):
    harmony = await start_harmony(archive_config(tmp_path, min_free_mb=10**9))
    try:
        body, ctype = multipart([corpus[0].path.read_bytes()])
        resp = await treq.post(harmony.url("/dicomweb/studies"), body, headers={"Content-Type": ctype})
        assert resp.code == 507
        doc = json.loads(await resp.content())
        assert doc["00081198"]["Value"][0]["00081197"]["Value"] == [0xA700]
        assert "00081199" not in doc
        assert list((tmp_path / "store" / "instances").rglob("*.dcm")) == []
    finally:
        await harmony.stop()



@pytest_twisted.ensureDeferred
async def test_wado_study_goes_by_sendfile_to_dicomweb_client_and_curl(web_archive, native, corpus, tmp_path):
    """The study's files reach dicomweb-client and curl by ``os.sendfile``
    (harmony.web.sendfile) and are Orthanc's instances.  A ``Range`` header is
    not honoured on a multipart retrieve: the whole body comes back with 200."""
    from harmony.web import sendfile
    inst = corpus[0]
    study_files = [i for i in corpus if i.study_uid == inst.study_uid]
    media = [("application/dicom", "*")]
    before = sendfile.spliced_total
    ours = await in_thread(client(web_archive.url("/dicomweb")).retrieve_study, inst.study_uid, media_types=media)
    assert sendfile.spliced_total - before == sum(i.path.stat().st_size for i in study_files)
    theirs = {d.SOPInstanceUID: d for d in await in_thread(native.retrieve_study, inst.study_uid, media_types=media)}
    assert sorted(d.SOPInstanceUID for d in ours) == sorted(theirs)
    assert all(d.PixelData == theirs[d.SOPInstanceUID].PixelData for d in ours)

    url = web_archive.url(f"/dicomweb/studies/{inst.study_uid}")
    accept = 'Accept: multipart/related; type="application/dicom"; transfer-syntax=*'
    for extra in ([], ["-H", "Range: bytes=0-99"]):
        out = tmp_path / "body"
        got = await in_thread(subprocess.run, ["curl", "-sS", "-o", str(out), "-w", "%{http_code}", "-H", accept,
                                               *extra, url], capture_output=True, text=True, timeout=60)
        assert got.stdout == "200", got.stderr
        body = out.read_bytes()
        assert all(i.path.read_bytes() in body for i in study_files)


def _curl_stow(url: str, body_file, content_type: str) -> tuple[int, dict]:
    import subprocess
    out = subprocess.run(["/usr/bin/curl", "-sS", "-X", "POST", "--data-binary", f"@{body_file}",
                          "-H", f"Content-Type: {content_type}", "-H", "Accept: application/dicom+json",
                          "-w", "\n%{http_code}", url], check=True, capture_output=True, timeout=60).stdout
    doc, _, code = out.rpartition(b"\n")
    return int(code), json.loads(doc)


@pytest_twisted.ensureDeferred
async def test_curl_stow_files_a_request_in_one_commit_and_answers_in_part_order(tmp_path):
    """curl uploads a STOW-RS body over 256 KB (read through twisted.web's spooled file,
    parsed on a thread) with good parts around a non-DICOM part and another study's
    instance: one group commit for the request's good instances (not one each), the
    answer lists them in part order, and each listed instance is in place and indexed
    when the answer comes."""
    from tests.sf_helpers import make_instances
    study = "1.2.826.0.1.3680043.10.543.77.1"
    good = make_instances(tmp_path / "data", 4, 77, size=256)  # ~130 KB each
    other = make_instances(tmp_path / "other", 1, 78)
    parts = [good[0].read_bytes(), b"not DICOM at all", good[1].read_bytes(), other[0].read_bytes(),
             good[2].read_bytes(), good[3].read_bytes()]
    body, ctype = multipart(parts)
    assert len(body) > 256 * 1024
    (tmp_path / "body").write_bytes(body)
    harmony = await start_harmony(archive_config(tmp_path / "h"))
    try:
        store = harmony.service.runtime.backends["archive"].store
        before = store.committer.batches
        code, doc = await in_thread(_curl_stow, harmony.url(f"/dicomweb/studies/{study}"), tmp_path / "body", ctype)
        assert code == 202
        listed = [e["00081155"]["Value"][0] for e in doc["00081199"]["Value"]]
        assert listed == [pydicom.dcmread(f).SOPInstanceUID for f in good]
        assert [e["00081197"]["Value"] for e in doc["00081198"]["Value"]] == [[0xC000], [0xA900]]
        assert store.committer.batches - before == 1
        rows = store.read_sync(lambda c: dict(c.execute("SELECT sop_uid, relpath FROM instances")))
        assert sorted(rows) == sorted(listed)
        for sop in listed:
            assert store.path_of(rows[sop]).read_bytes() == next(f.read_bytes() for f in good
                                                                 if pydicom.dcmread(f).SOPInstanceUID == sop)
        assert list((tmp_path / "h").rglob("stow-*.part")) == []  # every part file moved in or removed
    finally:
        await harmony.stop()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("body,why", [
    # a 1 MB part header: python-multipart refuses it mid-body, while the rest is still being fed
    (b"--B\r\nContent-Type: application/dicom\r\nX-Junk: " + b"a" * 1_000_000 + b"\r\n\r\nDICM\r\n--B--\r\n",
     "malformed multipart body"),
    # a body over 256 KB cut before its closing boundary: nothing of it is stored
    (b"--B\r\nContent-Type: application/dicom\r\n\r\n" + b"\0" * 400_000, "closing boundary"),
])
async def test_a_large_malformed_stow_body_is_400_and_leaves_no_part_file(tmp_path, body, why):
    """Bodies over 256 KB are parsed on a thread, a batch of chunks at a time: a parse error
    is still a clear 400 with the reason, and every part file written so far is removed."""
    harmony = await start_harmony(archive_config(tmp_path))
    try:
        resp = await treq.post(harmony.url("/dicomweb/studies"), body,
                               headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=B'})
        assert resp.code == 400
        assert why in json.loads(await resp.content())["detail"]
        assert list(tmp_path.rglob("stow-*.part")) == []
        store = harmony.service.runtime.backends["archive"].store
        assert store.committer.entries == 0
    finally:
        await harmony.stop()


@pytest_twisted.ensureDeferred
async def test_a_stow_body_in_memory_is_filed_from_its_bytes_with_one_scan_and_no_pydicom(tmp_path, monkeypatch):
    """A STOW-RS body under 256 KB is cut in memory; each part is scanned from those bytes
    (harmony.dicom.rawscan), and that scan is what the store files: no pydicom parse and
    no second read of the part file.  A part cut short is still refused (0xC000) and the
    rest stored byte for byte."""
    from harmony.dicom import files
    from tests.sf_helpers import make_instances
    good = make_instances(tmp_path / "data", 3, 79, size=64)
    cut = good[0].read_bytes()[:-100]
    body, ctype = multipart([good[0].read_bytes(), cut, good[1].read_bytes(), good[2].read_bytes()])
    parses = []
    real = files.dcmread
    monkeypatch.setattr(files, "dcmread", lambda *a, **k: parses.append(a) or real(*a, **k))

    def no_second_scan(path):
        raise AssertionError(f"the store read {path} again")
    monkeypatch.setattr("harmony.storage.store.scan_file", no_second_scan)
    harmony = await start_harmony(archive_config(tmp_path / "h"))
    try:
        resp = await treq.post(harmony.url("/dicomweb/studies"), body, headers={"Content-Type": ctype})
        assert resp.code == 202
        doc = json.loads(await resp.content())
        assert [e["00081197"]["Value"] for e in doc["00081198"]["Value"]] == [[0xC000]]
        listed = [e["00081155"]["Value"][0] for e in doc["00081199"]["Value"]]
        assert len(listed) == 3 and parses == []
        store = harmony.service.runtime.backends["archive"].store
        rows = store.read_sync(lambda c: dict(c.execute("SELECT sop_uid, relpath FROM instances")))
        assert sorted(rows) == sorted(listed)
        assert sorted(store.path_of(r).read_bytes() for r in rows.values()) == sorted(f.read_bytes() for f in good)
        assert list((tmp_path / "h").rglob("stow-*.part")) == []
    finally:
        await harmony.stop()


def _stow_with_real_clients(base: str, folder, files, other_study_file) -> dict:
    """Blocking (on a thread): STOW-RS bodies under 256 KB from python-requests on one keep-alive
    connection (gzip-coded, plain, another study's instance, then a QIDO and one more STOW after it),
    dicomweb-client, and curl with ``Expect: 100-continue`` and chunked."""
    import gzip

    import requests
    out: dict = {}
    body, ctype = multipart([f.read_bytes() for f in files[:3]])
    with requests.Session() as session:
        coded = session.post(f"{base}/studies", gzip.compress(body), timeout=30, headers={
            "Content-Type": ctype, "Content-Encoding": "gzip", "Accept": "application/dicom+json"})
        plain = session.post(f"{base}/studies", body, headers={"Content-Type": ctype}, timeout=30)
        mismatch_body, _ = multipart([other_study_file.read_bytes()])
        mismatch = session.post(f"{base}/studies/{pydicom.dcmread(files[0]).StudyInstanceUID}", mismatch_body,
                                headers={"Content-Type": ctype}, timeout=30)
        wrong_type = session.post(f"{base}/studies", body, headers={"Content-Type": "application/dicom"}, timeout=30)
        qido = session.get(f"{base}/studies", timeout=30)
        after = session.post(f"{base}/studies", body, headers={"Content-Type": ctype}, timeout=30)
    out["requests"] = [(r.status_code, r.headers.get("Content-Type"), r.headers.get("Content-Encoding"), r.content)
                       for r in (coded, plain, mismatch, wrong_type, qido, after)]
    out["dicomweb-client"] = client(base).store_instances([pydicom.dcmread(f) for f in files[3:5]])
    (folder / "body").write_bytes(body)
    out["curl"] = []
    for extra in (["-H", "Expect: 100-continue"], ["-H", "Transfer-Encoding: chunked"]):
        got = subprocess.run(["/usr/bin/curl", "-sS", "-X", "POST", "--data-binary", f"@{folder / 'body'}",
                              "-H", f"Content-Type: {ctype}", *extra, "-w", "\n%{http_code}", f"{base}/studies"],
                             check=True, capture_output=True, timeout=60).stdout
        out["curl"].append(int(got.rpartition(b"\n")[2]))
    return out


@pytest_twisted.ensureDeferred
async def test_small_stow_bodies_take_the_fast_channel_with_every_stow_behaviour_kept(tmp_path, monkeypatch):
    """STOW-RS bodies held in memory are read by harmony.web.fast_channel, not twisted.web's
    channel: python-requests (gzip-coded body; a 409 for another study's instance; 415 for a
    wrong Content-Type; a QIDO on the same connection hands it to twisted.web, where the next
    STOW still works), dicomweb-client, and curl's ``Expect: 100-continue`` and chunked bodies
    (both twisted.web's) all get their answers, and every instance is filed."""
    from harmony.web.fast_channel import FastChannel
    from tests.sf_helpers import make_instances
    files = make_instances(tmp_path / "data", 5, 81, size=64)
    other = make_instances(tmp_path / "other", 1, 82, size=64)[0]
    fast_posts: list = []
    dispatch = FastChannel._dispatch
    monkeypatch.setattr(FastChannel, "_dispatch", lambda self, head, route, path, content: (
        fast_posts.append(head.method) if head.method == b"POST" else None,
        dispatch(self, head, route, path, content))[1])
    harmony = await start_harmony(archive_config(tmp_path / "h"))
    try:
        got = await in_thread(_stow_with_real_clients, harmony.url("/dicomweb"), tmp_path, files, other)
        coded, plain, mismatch, wrong_type, qido, after = got["requests"]
        for status, ctype, _, content in (coded, plain, after):
            assert status == 200 and ctype == "application/dicom+json"
            assert len(json.loads(content)["00081199"]["Value"]) == 3
        assert coded[2] == "gzip" or coded[2] is None  # answered in the client's coding (requests asks for gzip)
        assert mismatch[0] == 409 and json.loads(mismatch[3])["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
        assert wrong_type[0] == 415 and wrong_type[1].startswith("application/problem+json")
        assert qido[0] == 200 and len(json.loads(qido[3])) == 1
        assert len(got["dicomweb-client"].ReferencedSOPSequence) == 2
        assert got["curl"] == [200, 200]
        # requests: four POSTs before the QIDO on the fast channel; the dicomweb-client's one too
        assert fast_posts == [b"POST"] * 5
        store = harmony.service.runtime.backends["archive"].store
        indexed = store.read_sync(lambda c: [r[0] for r in c.execute("SELECT sop_uid FROM instances")])
        assert sorted(indexed) == sorted(pydicom.dcmread(f).SOPInstanceUID for f in files)
        assert list((tmp_path / "h").rglob("stow-*.part")) == []
    finally:
        await harmony.stop()


def _post_in_pieces(port: int, path: str, body: bytes, content_type: str, cut_sets: list[list[int]]) -> list:
    """Blocking: one keep-alive connection; each request (head and body) sent as pieces cut
    at the given offsets (TCP_NODELAY, one send each); (status, JSON answer) per request."""
    import http.client
    import socket
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for cuts in cut_sets:
            request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                       f"Content-Length: {len(body)}\r\nAccept: application/dicom+json\r\n\r\n").encode() + body
            last = 0
            for cut in sorted({c % len(request) for c in cuts}) + [len(request)]:
                if cut > last:
                    sock.sendall(request[last:cut])
                    last = cut
            response = http.client.HTTPResponse(sock)
            response.begin()
            answers.append((response.status, json.loads(response.read())))
    return answers


def _people(folder) -> list:
    """Instances of one study whose names need UTF-8 and ISO 2022 IR 87 (JIS X 0208)."""
    from tests.dicom_data import UID_ROOT, make_instance, save
    people = [("ISO_IR 192", "Ωμέγα^Άλφα"), ("ISO_IR 192", "山田^花子"),
              (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"), (None, "Plain^Ascii")]
    out = []
    for i, (charset, name) in enumerate(people, 1):
        ds = make_instance(patient_id="CS-HELD", study_uid=f"{UID_ROOT}91.1", series_uid=f"{UID_ROOT}91.1.1",
                           sop_uid=f"{UID_ROOT}91.1.1.{i}", instance_number=i, seed=i)
        if charset is not None:
            ds.SpecificCharacterSet = charset
        ds.PatientName = name
        out.append((save(ds, folder / f"person-{i}.dcm"), name))
    return out


@pytest_twisted.ensureDeferred
async def test_a_held_stow_body_cut_anywhere_with_non_latin_names_is_filed_without_part_files(tmp_path, monkeypatch):
    """A STOW-RS body under 256 KB, arriving in pieces cut at arbitrary points (inside the head,
    a boundary, a part's headers, its data), with names in UTF-8 and in ISO 2022 IR 87: no part
    file is made and the bridge never leaves the reactor for it (the parts go to the store as
    bytes); every request is 200, the stored files are the bytes sent, and dicomweb-client reads
    the names back from the metadata as they were written."""
    import random

    from harmony.dicomweb.multipart import StowParser
    from harmony.middleware.dicomweb_bridge import DicomWebBridge
    people = _people(tmp_path)
    body, ctype = multipart([f.read_bytes() for f, _ in people])
    part_files: list = []
    hops: list = []
    real_part_file, real_off = StowParser._part_file, DicomWebBridge._off_reactor
    monkeypatch.setattr(StowParser, "_part_file", lambda self: part_files.append(1) or real_part_file(self))
    monkeypatch.setattr(DicomWebBridge, "_off_reactor", lambda self, fn, *a: hops.append(fn) or real_off(self, fn, *a))
    rng = random.Random(20261206)
    head = len(body) // 2  # the request's head is ~200 bytes: cuts land in it, and all over the body
    cut_sets = [[rng.randrange(len(body) + head) for _ in range(n)] for n in (1, 7, 40)] + [list(range(0, 400, 3))]
    harmony = await start_harmony(archive_config(tmp_path / "h"))
    try:
        answers = await in_thread(_post_in_pieces, harmony.port(), "/dicomweb/studies", body, ctype, cut_sets)
        sops = [pydicom.dcmread(f).SOPInstanceUID for f, _ in people]
        for status, doc in answers:
            assert status == 200
            assert [e["00081155"]["Value"][0] for e in doc["00081199"]["Value"]] == sops
        assert part_files == [] and hops == []
        store = harmony.service.runtime.backends["archive"].store
        rows = store.read_sync(lambda c: dict(c.execute("SELECT sop_uid, relpath FROM instances")))
        for f, _ in people:
            assert store.path_of(rows[pydicom.dcmread(f).SOPInstanceUID]).read_bytes() == f.read_bytes()
        metadata = await in_thread(client(harmony.url("/dicomweb")).retrieve_study_metadata,
                                   pydicom.dcmread(people[0][0]).StudyInstanceUID)
        names = {m["00080018"]["Value"][0]: m["00100010"]["Value"][0] for m in metadata}
        for (f, name), sop in zip(people, sops, strict=True):
            written = pydicom.dcmread(f).PatientName
            got = names[sop]
            assert got["Alphabetic"] == written.alphabetic
            if "=" in name:
                assert (got["Ideographic"], got["Phonetic"]) == (written.ideographic, written.phonetic)
    finally:
        await harmony.stop()


HOSTILE_HELD = {
    # (body, status, what the answer says)
    "cut before its closing boundary": (multipart([b"\0" * 132])[0][:-30], 400, "closing boundary"),
    "no boundary anywhere": (b"x" * 2000, 400, "boundary"),
    "a part that is not DICOM": (multipart([b"not DICOM at all"])[0], 409, 0xC000),
    "a part without headers": (b"--harmony-test-boundary\r\n\r\nxx\r\n--harmony-test-boundary--\r\n", 409, 0xC000),
    "DICM but cut short": (multipart([b"\0" * 128 + b"DICM\x02\x00\x00\x00UL\x04\x00"])[0], 409, 0xC000),
}


@pytest_twisted.ensureDeferred
async def test_hostile_held_stow_bodies_are_refused_early_and_leave_nothing(tmp_path):
    """Small (held) STOW-RS bodies that are malformed, truncated or not DICOM get the answers
    they always got - 400 with the reason, or 409 naming 0xC000 for the part - and nothing is
    committed or left behind; a good request on the same archive afterwards is filed."""
    from tests.sf_helpers import make_instances
    ctype = multipart([])[1]
    harmony = await start_harmony(archive_config(tmp_path / "h"))
    try:
        store = harmony.service.runtime.backends["archive"].store
        for name, (body, status, says) in HOSTILE_HELD.items():
            resp = await treq.post(harmony.url("/dicomweb/studies"), body, headers={"Content-Type": ctype})
            doc = json.loads(await resp.content())
            assert resp.code == status, name
            if status == 400:
                assert says in doc["detail"], name
            else:
                assert [e["00081197"]["Value"] for e in doc["00081198"]["Value"]] == [[says]], name
        assert store.committer.entries == 0
        assert list((tmp_path / "h").rglob("stow-*.part")) == []
        good = make_instances(tmp_path / "good", 2, 92)
        resp = await treq.post(harmony.url("/dicomweb/studies"), multipart([f.read_bytes() for f in good])[0],
                               headers={"Content-Type": ctype})
        assert resp.code == 200 and store.committer.entries == 2
    finally:
        await harmony.stop()


@pytest_twisted.ensureDeferred
async def test_a_held_body_of_thousands_of_tiny_parts_is_described_off_the_reactor_without_files(tmp_path,
                                                                                               monkeypatch):
    """256 KiB can carry thousands of tiny parts: past HELD_PARTS_ON_REACTOR they are described
    on a thread (the reactor is not held for the lot), still without a part file; each tiny
    part is refused with 0xC000 and the two real instances among them are stored (202)."""
    from harmony.dicomweb.multipart import StowParser
    from harmony.middleware import dicomweb_bridge
    from tests.sf_helpers import make_instances
    good = make_instances(tmp_path / "good", 2, 93)
    parts = [good[0].read_bytes()] + [b"x"] * 3000 + [good[1].read_bytes()]
    body, ctype = multipart(parts)
    assert len(body) <= dicomweb_bridge.HELD_BODY_BYTES
    hops: list = []
    real_off = dicomweb_bridge.DicomWebBridge._off_reactor
    monkeypatch.setattr(dicomweb_bridge.DicomWebBridge, "_off_reactor",
                        lambda self, fn, *a: hops.append(fn.__name__) or real_off(self, fn, *a))
    monkeypatch.setattr(StowParser, "_part_file", lambda self: pytest.fail("a part file was made"))
    harmony = await start_harmony(archive_config(tmp_path / "h"))
    try:
        resp = await treq.post(harmony.url("/dicomweb/studies"), body, headers={"Content-Type": ctype})
        doc = json.loads(await resp.content())
        assert resp.code == 202 and hops == ["_describe_parts"]
        assert [e["00081197"]["Value"] for e in doc["00081198"]["Value"]] == [[0xC000]] * 3000
        assert [e["00081155"]["Value"][0] for e in doc["00081199"]["Value"]] == [
            pydicom.dcmread(f).SOPInstanceUID for f in good]
    finally:
        await harmony.stop()
