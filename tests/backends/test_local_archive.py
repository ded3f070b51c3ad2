"""``local_archive`` through a real Pipeline, over a real store holding the
synthetic corpus; C-FIND answers are compared with a real Orthanc's answers for
the same corpus (the session ``orthanc`` fixture), queried with pynetdicom."""

from __future__ import annotations

import pydicom
import pytest
import pytest_twisted
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind
from twisted.internet import threads

from harmony.backends.local_archive import LocalArchiveBackend
from harmony.endpoints.base import HttpEndpointBase
from harmony.envelope import RequestEnvelope
from harmony.pipeline import Pipeline
from harmony.state import DicomRequestFacts, RequestState
from tests.conftest import INDEXES
from tests.postgres import database_for
from tests.dicom_data import UID_ROOT
from tests.peers import free_port

CALLING_AET = "HARMONYARCH"
UID1 = UID_ROOT + "1.1"
UID2 = UID_ROOT + "1.2"
UID3 = UID_ROOT + "1.3"


def Endpoint():
    """The pipeline needs an endpoint; the base's hooks are no-ops."""
    return HttpEndpointBase("test")


@pytest.fixture(scope="module", params=INDEXES)
def archive(request, tmp_path_factory, corpus):
    """The corpus in a local archive, on each index implementation (the same
    answers are expected from both: SQL narrows, Python decides)."""
    store = database_for(request, request.param)(tmp_path_factory.mktemp("archive"), min_free_bytes=0)
    for inst in corpus:
        store.put_file_sync(inst.path)
    backend = LocalArchiveBackend("archive", store)
    yield Pipeline("archive", [], [backend])
    store.close()


@pytest.fixture(scope="module")
def orthanc_find(orthanc):
    orthanc.add_modality("harmonyarch", CALLING_AET, free_port())

    def find(identifier: Dataset, model: str) -> list[Dataset]:
        ae = AE(ae_title=CALLING_AET)
        ctx = (PatientRootQueryRetrieveInformationModelFind if model == "patient"
               else StudyRootQueryRetrieveInformationModelFind)
        ae.add_requested_context(ctx)
        assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
        assert assoc.is_established
        out = []
        try:
            for status, ds in assoc.send_c_find(identifier, ctx):
                assert status is not None and status.Status in (0x0000, 0xFF00, 0xFF01), status
                if status.Status in (0xFF00, 0xFF01):
                    out.append(ds)
        finally:
            assoc.release()
        return out

    return find


def identifier(level: str, **keys) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


async def archive_call(pipeline, op: str, ds: Dataset, model="study"):
    request = RequestEnvelope(method="POST", metadata={"dimse_op": op, "query_level": ds.QueryRetrieveLevel,
                                                       "query_model": model},
                              normalized=ds.to_json_dict())
    response = await pipeline.handle(request, Endpoint())
    assert response.status == 200, response.body
    stream = response.state.dicom_results
    items = await stream.collect()
    assert stream.status == 0x0000
    return items, stream


def normal(ds: Dataset, keys) -> dict:
    """Keyword -> comparable text: padding trimmed, multi-values sorted."""
    out = {}
    for k in keys:
        v = ds.get(k, "")
        if v is None:
            v = ""
        if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
            v = "\\".join(sorted(str(x).strip() for x in v))
        out[k] = str(v).strip()
    return out


COUNTS = ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances")

STUDY_KEYS = dict(PatientID="", PatientName="", StudyInstanceUID="", StudyDate="", StudyTime="", StudyDescription="",
                  AccessionNumber="", ModalitiesInStudy="", NumberOfStudyRelatedSeries="",
                  NumberOfStudyRelatedInstances="")
SERIES_KEYS = dict(StudyInstanceUID="", SeriesInstanceUID="", Modality="", SeriesNumber="", SeriesDescription="",
                   NumberOfSeriesRelatedInstances="")
IMAGE_KEYS = dict(StudyInstanceUID="", SeriesInstanceUID="", SOPInstanceUID="", SOPClassUID="", InstanceNumber="")
PATIENT_KEYS = dict(PatientID="", PatientName="", PatientBirthDate="", PatientSex="")

QUERIES = [
    ("study", "all studies", identifier("STUDY", **STUDY_KEYS)),
    ("study", "name wildcard", identifier("STUDY", **{**STUDY_KEYS, "PatientName": "TEST^A*"})),
    ("study", "name case-insensitive", identifier("STUDY", **{**STUDY_KEYS, "PatientName": "test^bravo"})),
    ("study", "date range", identifier("STUDY", **{**STUDY_KEYS, "StudyDate": "20230101-20241231"})),
    ("study", "open date range", identifier("STUDY", **{**STUDY_KEYS, "StudyDate": "-20231231"})),
    ("study", "modality in study", identifier("STUDY", **{**STUDY_KEYS, "ModalitiesInStudy": "MR"})),
    ("study", "accession", identifier("STUDY", **{**STUDY_KEYS, "AccessionNumber": "ACC003"})),
    ("study", "patient id wildcard", identifier("STUDY", **{**STUDY_KEYS, "PatientID": "PAT00?"})),
    ("study", "UID list", identifier("STUDY", **{**STUDY_KEYS, "StudyInstanceUID": [UID1, UID3]})),
    ("study", "description wildcard", identifier("STUDY", **{**STUDY_KEYS, "StudyDescription": "*ES*"})),
    ("study", "series of a study", identifier("SERIES", **{**SERIES_KEYS, "StudyInstanceUID": UID1})),
    ("study", "series by modality", identifier("SERIES", **{**SERIES_KEYS, "StudyInstanceUID": UID2,
                                                            "Modality": "MR"})),
    ("study", "series by description", identifier("SERIES", **{**SERIES_KEYS, "StudyInstanceUID": UID1,
                                                               "SeriesDescription": "AX*"})),
    ("study", "images of a series", identifier("IMAGE", **{**IMAGE_KEYS, "StudyInstanceUID": UID1,
                                                           "SeriesInstanceUID": UID1 + ".1"})),
    ("study", "one image", identifier("IMAGE", **{**IMAGE_KEYS, "StudyInstanceUID": UID3,
                                                  "SeriesInstanceUID": UID3 + ".1", "SOPInstanceUID": UID3 + ".1.1"})),
    ("study", "images by number", identifier("IMAGE", **{**IMAGE_KEYS, "StudyInstanceUID": UID1,
                                                         "SeriesInstanceUID": UID1 + ".1", "InstanceNumber": "2"})),
    ("patient", "patients", identifier("PATIENT", **PATIENT_KEYS)),
    ("patient", "patient by name", identifier("PATIENT", **{**PATIENT_KEYS, "PatientName": "*CHARLIE"})),
    ("patient", "studies of a patient", identifier("STUDY", **{**STUDY_KEYS, "PatientID": "PAT001"})),
]


@pytest.mark.parametrize("model,what,query", QUERIES, ids=[q[1] for q in QUERIES])
@pytest_twisted.ensureDeferred
async def test_find_answers_match_orthanc(archive, orthanc_find, corpus, model, what, query):
    keys = [e.keyword for e in query if e.keyword != "QueryRetrieveLevel"]
    ours, _ = await archive_call(archive, "C-FIND", query, model)
    theirs = await threads.deferToThread(orthanc_find, query, model)
    # The session Orthanc may also hold other tests' instances: compare on the corpus only.
    studies = {i.study_uid for i in corpus}
    patients = {i.patient_id for i in corpus}
    if query.QueryRetrieveLevel == "PATIENT":
        theirs = [d for d in theirs if d.PatientID in patients]
    else:
        theirs = [d for d in theirs if d.StudyInstanceUID in studies]
    assert all(d.QueryRetrieveLevel == query.QueryRetrieveLevel for d in ours)
    got = sorted((normal(d, keys) for d in ours), key=repr)
    want = sorted((normal(d, keys) for d in theirs), key=repr)
    assert got, f"{what}: no match at all"
    assert got == want


@pytest_twisted.ensureDeferred
async def test_patient_counts(archive, corpus):
    ours, _ = await archive_call(archive, "C-FIND", identifier("PATIENT", PatientID="", **{k: "" for k in COUNTS}),
                                 "patient")
    expected = {}
    for i in corpus:
        e = expected.setdefault(i.patient_id, [set(), set(), 0])
        e[0].add(i.study_uid)
        e[1].add(i.series_uid)
        e[2] += 1
    assert {d.PatientID: [int(d.get(k)) for k in COUNTS] for d in ours} == \
        {p: [len(s), len(se), n] for p, (s, se, n) in expected.items()}


@pytest_twisted.ensureDeferred
async def test_retrieve_gives_the_stored_files(archive, corpus):
    for level, keys, want in [
        ("STUDY", {"StudyInstanceUID": UID1}, [i for i in corpus if i.study_uid == UID1]),
        ("SERIES", {"StudyInstanceUID": UID2, "SeriesInstanceUID": UID2 + ".1"},
         [i for i in corpus if i.series_uid == UID2 + ".1"]),
        ("IMAGE", {"SOPInstanceUID": UID3 + ".1.1"}, [i for i in corpus if i.sop_uid == UID3 + ".1.1"]),
        ("PATIENT", {"PatientID": "PAT003"}, [i for i in corpus if i.patient_id == "PAT003"]),
    ]:
        model = "patient" if level == "PATIENT" else "study"
        for op in ("C-GET", "C-MOVE"):
            items, stream = await archive_call(archive, op, identifier(level, **keys), model)
            assert stream.remaining == len(want)
            assert sorted(i.sop_instance_uid for i in items) == sorted(w.sop_uid for w in want)
            by_uid = {w.sop_uid: w for w in want}
            for item in items:
                assert not item.owned  # the store's own file: consumers must not delete it
                assert item.path.read_bytes() == by_uid[item.sop_instance_uid].path.read_bytes()
                assert item.transfer_syntax_uid and item.sop_class_uid == by_uid[item.sop_instance_uid].sop_class


@pytest_twisted.ensureDeferred
async def test_echo_store_and_errors(archive, tmp_path):
    _, stream = await archive_call(archive, "C-ECHO", identifier("STUDY"))
    assert stream.status == 0
    from tests.dicom_data import make_instance, save
    ds = make_instance(patient_id="NEWPAT", study_uid=UID_ROOT + "9.1", series_uid=UID_ROOT + "9.1.1",
                       sop_uid=UID_ROOT + "9.1.1.1")
    from harmony.dicom.results import DicomInstance
    path = save(ds, tmp_path / "new.dcm")
    request = RequestEnvelope(method="POST", metadata={"dimse_op": "C-STORE"},
                              state=RequestState(dicom=DicomRequestFacts(instance=DicomInstance(path=path))))
    response = await archive.handle(request, Endpoint())
    assert response.status == 200 and response.state.dimse_status == 0
    items, _ = await archive_call(archive, "C-FIND", identifier("STUDY", PatientID="NEWPAT", StudyInstanceUID=""))
    assert [d.StudyInstanceUID for d in items] == [UID_ROOT + "9.1"]
    # A PATIENT level in the study root, and a retrieve with no key, are the client's errors.
    for op, ds, model in [("C-FIND", identifier("PATIENT", PatientID=""), "study"),
                          ("C-GET", identifier("STUDY"), "study"),
                          ("C-FIND", identifier("WARD"), "study")]:
        request = RequestEnvelope(metadata={"dimse_op": op, "query_level": ds.QueryRetrieveLevel,
                                            "query_model": model}, normalized=ds.to_json_dict())
        response = await archive.handle(request, Endpoint())
        assert response.status == 400, (op, ds)


@pytest_twisted.ensureDeferred
async def test_cancel_stops_the_scan(archive):
    """C-CANCEL reaches the storage thread: a scan that would never end stops."""
    store = archive.backends[0].store

    def endless(should_stop):
        n = 0
        while not should_stop():
            yield n
            n += 1

    stream = store.stream(endless)
    assert await stream.next() == 0
    stream.cancel()
    rest = await stream.collect()
    assert stream.status == 0xFE00 and rest == list(range(1, len(rest) + 1))


# ---------------------------------------------------------------------- DICOM JSON read path (issue 14)

def _ascii_and_unicode_store(new_store, tmp_path, corpus):
    """The corpus plus an instance whose name is not ASCII, on a fresh store."""
    from tests.dicom_data import make_instance, save
    store = new_store(tmp_path / "store", min_free_bytes=0)
    for inst in corpus:
        store.put_file_sync(inst.path)
    ds = make_instance(patient_id="UNI001", patient_name="Yamada^Tarou=山田^太郎", study_uid=UID_ROOT + "77.1",
                       series_uid=UID_ROOT + "77.1.1", sop_uid=UID_ROOT + "77.1.1.1", study_description="Ωμέγα")
    ds.SpecificCharacterSet = "ISO_IR 192"
    store.put_file_sync(save(ds, tmp_path / "unicode.dcm"))
    return store


@pytest_twisted.ensureDeferred
async def test_matches_as_dicom_json_equal_the_dataset_round_trip(new_store, tmp_path, corpus):
    """The bridge's hint (results_as = dicom+json) skips the Dataset round trip;
    the QIDO answer it makes must be the one it made from Datasets."""
    from harmony.dicom.results import DICOM_JSON, RESULTS_AS
    from harmony.dicomweb.dicomjson import find_result_json, find_result_to_json
    store = _ascii_and_unicode_store(new_store, tmp_path, corpus)
    pipeline = Pipeline("archive", [], [LocalArchiveBackend("archive", store)])
    unicode_study = identifier("STUDY", **{**STUDY_KEYS, "PatientName": "山田*", "SpecificCharacterSet": ""})
    cases = [(model, ds) for model, _what, ds in QUERIES] + [("study", unicode_study)]
    try:
        for model, ds in cases:
            plain, _ = await archive_call(pipeline, "C-FIND", ds, model)
            request = RequestEnvelope(method="POST", metadata={
                "dimse_op": "C-FIND", "query_level": ds.QueryRetrieveLevel, "query_model": model,
                RESULTS_AS: DICOM_JSON}, normalized=ds.to_json_dict())
            response = await pipeline.handle(request, Endpoint())
            fast = await response.state.dicom_results.collect()
            assert plain and all(isinstance(d, dict) for d in fast)
            assert [find_result_json(d) for d in fast] == [find_result_to_json(d) for d in plain]
        # The non-ASCII match declares UTF-8 on both paths.
        assert any(d.get("00080005", {}).get("Value") == ["ISO_IR 192"] for d in fast)
    finally:
        store.close()


def _file_metadata(inst) -> str:
    import json

    from harmony.dicomweb.cache import BASE_PLACEHOLDER
    from harmony.dicomweb.dicomjson import instance_metadata
    from harmony.dicomweb.routes import resource_path
    base = BASE_PLACEHOLDER + resource_path(inst.study_instance_uid, inst.series_instance_uid,
                                            inst.sop_instance_uid)
    return json.dumps(instance_metadata(inst.path, base), separators=(",", ":"))


def _with_metadata(store):
    return list(store.instances_sync(identifier("PATIENT", PatientID="*"), "PATIENT", "patient", metadata=True))


def test_metadata_made_at_ingest_is_what_the_file_gives(new_store, tmp_path, corpus):
    store = _ascii_and_unicode_store(new_store, tmp_path, corpus)
    try:
        found = _with_metadata(store)
        assert len(found) == len(corpus) + 1
        for inst in found:
            assert inst.metadata_json == _file_metadata(inst), inst.sop_instance_uid
            # The sort key sent with it (the bridge sorts by it without parsing the text).
            assert inst.instance_number == int(pydicom.dcmread(inst.path).get("InstanceNumber") or 0)
        assert store.read_sync(lambda c: c.execute(
            "SELECT count(*) FROM instances WHERE metadata IS NULL").fetchone()[0]) == 0
    finally:
        store.close()


def test_an_index_older_than_the_metadata_column_is_upgraded_in_place(new_store, tmp_path, corpus):
    """An archive an earlier Harmony made (no metadata column) opens, gains the
    column, answers metadata from the files and keeps it for the next time."""
    root = tmp_path / "store"
    store = new_store(root, min_free_bytes=0)
    for inst in corpus:
        store.put_file_sync(inst.path)
    store.write_sync(lambda c: c.execute("ALTER TABLE instances DROP COLUMN metadata"))  # the old schema
    store.close()
    store = new_store(root, min_free_bytes=0)
    try:
        assert store.read_sync(lambda c: c.execute(
            "SELECT count(*) FROM instances WHERE metadata IS NULL").fetchone()[0]) == len(corpus)
        found = _with_metadata(store)
        assert sorted(i.sop_instance_uid for i in found) == sorted(i.sop_uid for i in corpus)
        for inst in found:
            assert inst.metadata_json == _file_metadata(inst)
        kept = dict(store.read_sync(lambda c: c.execute("SELECT sop_uid, metadata FROM instances").fetchall()))
        assert kept == {i.sop_instance_uid: i.metadata_json for i in found}
    finally:
        store.close()
