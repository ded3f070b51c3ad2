"""``dicom_scu`` backend against a real Orthanc: HTTP -> dicom_scu, and the
ResultStream contract consumed directly.  Results must equal Orthanc's own
answers (pynetdicom straight to Orthanc) and retrieved files must carry the
very bytes Orthanc stores."""

import json
import time

import pytest
import pytest_twisted
import treq
from pydicom.dataset import Dataset
from twisted.internet import tcp, threads

from harmony.backends.dicom_scu import ALL, QUERY, RECEIVE_BYTES
from harmony.dicom.results import DicomInstance
from harmony.envelope import RequestEnvelope
from harmony.state import DicomRequestFacts, RequestState
from tests.dicom_data import make_instance, save
from tests.dimse_helpers import canonical, dataset_bytes, direct_find, parse_multipart, silent_peer
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.peers import free_port

PIPES = """
[pipelines.scu]
networks = ["default"]
endpoints = ["q"]
backends = ["pacs"]

[endpoints.q]
service = "http"
[endpoints.q.options]
path_prefix = "/q"

[backends.pacs]
service = "dicom_scu"
[backends.pacs.options]
aet = "{aet}"
host = "127.0.0.1"
port = {port}
dimse_retrieve_mode = "{mode}"
incoming_store_port = {store_port}
persistent_store_scp = {persistent}
connect_timeout_secs = 2
acse_timeout_secs = {acse}
dimse_timeout_secs = 5
"""


def config(tmp_path, aet, port, mode="get", store_port=0, persistent="false", acse=5):
    return write_config(tmp_path, MINIMAL_MAIN + '\n[storage.options]\npath = "var"\n', {"p": PIPES.format(
        aet=aet, port=port, mode=mode, store_port=store_port or free_port(), persistent=persistent, acse=acse)})


@pytest.fixture
def harmony(tmp_path, orthanc):
    running = pytest_twisted.blockon(start_harmony(config(tmp_path, orthanc.aet, orthanc.dicom_port)))
    orthanc.add_modality("harmony_scu", "HARMONY_SCU", free_port())
    yield running
    pytest_twisted.blockon(running.stop())


@pytest.fixture
def harmony_move(tmp_path, orthanc):
    store_port = free_port()
    orthanc.add_modality("harmony_scu", "HARMONY_SCU", store_port)
    running = pytest_twisted.blockon(start_harmony(
        config(tmp_path, orthanc.aet, orthanc.dicom_port, mode="move", store_port=store_port)))
    yield running
    pytest_twisted.blockon(running.stop())


def post(running, doc):
    return treq.post(running.url("/q"), json.dumps(doc).encode(), headers={"Content-Type": ["application/json"]})


def study_find(**keys):
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds.PatientID = ""
    ds.StudyDate = ""
    ds.AccessionNumber = ""
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


@pytest_twisted.ensureDeferred
async def test_echo_over_http(harmony):
    r = await post(harmony, {"dimse_op": "C-ECHO", "identifier": {}})
    assert r.code == 200
    assert (await r.json())["dimse_status"] == 0


QUERIES = [
    ("study", study_find()),
    ("study", study_find(PatientID="PAT001")),
    ("patient", Dataset.from_json({"00080052": {"vr": "CS", "Value": ["PATIENT"]}, "00100020": {"vr": "LO"},
                                   "00100010": {"vr": "PN"}})),
    ("study", Dataset.from_json({"00080052": {"vr": "CS", "Value": ["SERIES"]},
                                 "0020000D": {"vr": "UI", "Value": ["1.2.826.0.1.3680043.10.543.1.1"]},
                                 "0020000E": {"vr": "UI"}, "00080060": {"vr": "CS"}})),
    ("patient", Dataset.from_json({"00080052": {"vr": "CS", "Value": ["IMAGE"]},
                                   "00100020": {"vr": "LO", "Value": ["PAT002"]},
                                   "0020000D": {"vr": "UI", "Value": ["1.2.826.0.1.3680043.10.543.1.3"]},
                                   "0020000E": {"vr": "UI", "Value": ["1.2.826.0.1.3680043.10.543.1.3.1"]},
                                   "00080018": {"vr": "UI"}})),
]


@pytest.mark.parametrize("model,identifier", QUERIES, ids=["study", "study-filtered", "patient-root", "series",
                                                            "image-patient-root"])
@pytest_twisted.ensureDeferred
async def test_find_over_http_equals_orthanc(harmony, orthanc, model, identifier):
    expected = await threads.deferToThread(direct_find, "127.0.0.1", orthanc.dicom_port, orthanc.aet,
                                           identifier, model)
    assert expected
    r = await post(harmony, {"dimse_op": "C-FIND", "query_model": model, "identifier": identifier.to_json_dict()})
    assert r.code == 200
    assert r.headers.getRawHeaders("content-type") == ["application/dicom+json"]
    got = await r.json()
    assert canonical(got) == canonical(expected)
    # A query association reads with Twisted's 64 KiB buffer: a 1 MiB read cost ~20 us more
    # however little came (bench/dimse, C-FIND); retrieve associations keep large reads.
    assert [assoc.transport.bufferSize for idle in _idle(harmony, QUERY) for assoc, _since in idle] == [
        tcp.Connection.bufferSize]
    # ... and reads once more before a delivery's put-off work while a C-FIND is outstanding
    # (Association._read_on: the PACS's final response goes out with its matches); a retrieve
    # association, whose reads may be paused, does not.
    assert [assoc.read_on for idle in _idle(harmony, QUERY) for assoc, _since in idle] == [True]


def _idle(running, kind):
    pool = running.service.runtime.backends["pacs"].pool
    return [idle for (_target, k), idle in pool.idle.items() if k == kind]


@pytest_twisted.ensureDeferred
async def test_get_over_http_returns_orthanc_bytes(harmony, corpus):
    study = [i for i in corpus if i.study_uid.endswith(".1.3")]  # the study with the RLE instance
    ident = {"00080052": {"vr": "CS", "Value": ["STUDY"]}, "0020000D": {"vr": "UI", "Value": [study[0].study_uid]}}
    r = await post(harmony, {"dimse_op": "C-GET", "identifier": ident})
    assert r.code == 200
    ctype = r.headers.getRawHeaders("content-type")[0]
    assert ctype.startswith('multipart/related; type="application/dicom"')
    parts = parse_multipart(await r.content(), ctype)
    assert len(parts) == len(study)
    by_uid = {i.sop_uid: i for i in study}
    from pydicom import dcmread
    import io
    for part in parts:
        ds = dcmread(io.BytesIO(part))
        original = by_uid.pop(ds.SOPInstanceUID)
        assert ds.file_meta.TransferSyntaxUID == dcmread(original.path).file_meta.TransferSyntaxUID
        assert dataset_bytes(part) == dataset_bytes(original.path)
    assert not by_uid
    assert [assoc.transport.bufferSize for idle in _idle(harmony, ALL) for assoc, _since in idle] == [RECEIVE_BYTES]
    assert [assoc.read_on for idle in _idle(harmony, ALL) for assoc, _since in idle] == [False]


@pytest_twisted.ensureDeferred
async def test_move_streams_instances_via_incoming_store_scp(harmony_move, corpus, tmp_path):
    series = [i for i in corpus if i.series_uid.endswith(".1.2.1")]
    ident = {"00080052": {"vr": "CS", "Value": ["SERIES"]},
             "0020000D": {"vr": "UI", "Value": [series[0].study_uid]},
             "0020000E": {"vr": "UI", "Value": [series[0].series_uid]}}
    r = await post(harmony_move, {"dimse_op": "C-MOVE", "identifier": ident})
    assert r.code == 200
    parts = parse_multipart(await r.content(), r.headers.getRawHeaders("content-type")[0])
    assert sorted(dataset_bytes(p) for p in parts) == sorted(dataset_bytes(i.path) for i in series)
    # staged files are released once sent
    assert not list((tmp_path / "var" / "dimse-staging" / "pacs").rglob("*.dcm"))


@pytest_twisted.ensureDeferred
async def test_result_stream_contract(harmony, corpus):
    backend = harmony.service.runtime.backends["pacs"]
    # metadata (as an endpoint or middleware sets it) wins over the identifier's own level
    ident = {"00080052": {"vr": "CS", "Value": ["IMAGE"]},
             "0020000D": {"vr": "UI", "Value": [corpus[0].study_uid]},
             "0020000E": {"vr": "UI", "Value": [corpus[0].series_uid]}}
    req = RequestEnvelope(metadata={"dimse_op": "C-GET", "query_level": "SERIES"}, normalized=ident)
    resp = await backend.send(req)
    stream = resp.state.dicom_results
    items = await stream.collect()
    assert all(isinstance(i, DicomInstance) and i.owned and i.path.exists() for i in items)
    assert {i.sop_instance_uid for i in items} == {c.sop_uid for c in corpus if c.series_uid == corpus[0].series_uid}
    assert stream.status == 0 and stream.completed == len(items) and stream.failed == 0
    for i in items:
        i.release()
        assert not i.path.exists()


@pytest_twisted.ensureDeferred
async def test_store_over_http_and_from_a_pipeline(tmp_path, store_orthanc):
    orthanc = store_orthanc
    running = await start_harmony(config(tmp_path / "h", orthanc.aet, orthanc.dicom_port))

    def in_orthanc(ds):
        return len(orthanc.rest("POST", "/tools/find", json.dumps(
            {"Level": "Instance", "Query": {"SOPInstanceUID": str(ds.SOPInstanceUID)}}).encode()))
    try:
        ds = make_instance(patient_id="PATSTORE", seed=7)
        data = save(ds, tmp_path / "new.dcm").read_bytes()
        r = await treq.post(running.url("/q"), data, headers={"Content-Type": ["application/dicom"]})
        assert r.code == 400  # no operation named: refused clearly, nothing stored
        assert "dimse_op" in (await r.json())["detail"] and in_orthanc(ds) == 0
        r = await treq.post(running.url("/q?dimse_op=C-STORE"), data, headers={"Content-Type": ["application/dicom"]})
        assert r.code == 200 and (await r.json())["dimse_status"] == 0
        assert in_orthanc(ds) == 1
        r = await treq.post(running.url("/q?dimse_op=C-STORE"), b"not dicom",
                            headers={"Content-Type": ["application/dicom"]})
        assert r.code == 400
        # as a pipeline step would: an instance handed over in context
        ds2 = make_instance(patient_id="PATSTORE", seed=8)
        from harmony.dicom.files import read_instance
        instance = read_instance(save(ds2, tmp_path / "new2.dcm"))
        backend = running.service.runtime.backends["pacs"]
        resp = await backend.send(RequestEnvelope(metadata={"dimse_op": "C-STORE"},
                                                  state=RequestState(dicom=DicomRequestFacts(instance=instance))))
        assert resp.status == 200 and resp.state.dicom_results.status == 0
        assert in_orthanc(ds2) == 1 and instance.path.exists()  # not owned: left in place
        # a storage class that does not fit in the pooled association's 128 contexts
        from pynetdicom.sop_class import RespiratoryWaveformStorage
        ds3 = make_instance(patient_id="PATSTORE", seed=9)
        ds3.SOPClassUID = ds3.file_meta.MediaStorageSOPClassUID = RespiratoryWaveformStorage
        r = await treq.post(running.url("/q?dimse_op=C-STORE"), save(ds3, tmp_path / "wave.dcm").read_bytes(),
                            headers={"Content-Type": ["application/dicom"]})
        assert r.code == 200 and (await r.json())["dimse_status"] == 0
        assert in_orthanc(ds3) == 1
        assert not list((tmp_path / "h" / "var" / "dimse-staging").rglob("*.dcm"))  # spooled bodies are removed
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_malformed_identifier_is_400(harmony):
    r = await post(harmony, {"dimse_op": "C-FIND", "identifier": {"0020000D": {"vr": "XX", "Value": [1]}}})
    assert r.code == 400
    r = await post(harmony, {"dimse_op": "C-FIND", "identifier": {"00100020": {"vr": "LO"}}})
    assert r.code == 400  # no query level
    r = await post(harmony, {"dimse_op": "C-FROB", "identifier": {}})
    assert r.code == 400


@pytest_twisted.ensureDeferred
async def test_pacs_down_is_502_quickly(tmp_path, dead_port):
    running = await start_harmony(config(tmp_path, "NOBODY", dead_port))
    try:
        started = time.monotonic()
        r = await post(running, {"dimse_op": "C-FIND", "identifier": study_find().to_json_dict()})
        assert r.code == 502
        assert time.monotonic() - started < 2  # refused connections fail at once, not at a timeout
        assert (await r.json())["status"] == 502
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_pacs_silent_is_504(tmp_path):
    port = silent_peer()
    running = await start_harmony(config(tmp_path, "SILENT", port.getHost().port, acse=0.5))
    try:
        r = await post(running, {"dimse_op": "C-ECHO", "identifier": {}})
        assert r.code == 504
    finally:
        await running.stop()
        await port.stopListening()


def test_staged_instances_hold_the_pacs_back_once_over_the_limit(tmp_path):
    """Retrieved instances wait in staging (memory-backed when /dev/shm exists) until
    the consumer takes them; beyond ``max_staged_mb`` the next C-STORE sub-operation
    is answered only once the consumer caught up, so staging stays bounded."""
    from harmony.dicom.results import BoundedResultStream, DicomInstance

    stream = BoundedResultStream(None, limit=300)
    first = stream.next()                      # a consumer already waiting: nothing is queued
    stream.put(DicomInstance(tmp_path / "a", size=200))
    assert first.called and stream.queued_bytes == 0
    stream.put(DicomInstance(tmp_path / "b", size=200))
    assert stream.room().called                # 200 < 300
    stream.put(DicomInstance(tmp_path / "c", size=200))
    room = stream.room()
    assert not room.called and stream.queued_bytes == 400
    stream.next()
    assert room.called and stream.queued_bytes == 200
    stream.put(DicomInstance(tmp_path / "d", size=500))
    held = stream.room()
    stream.cancel()                            # a cancelled retrieve never holds the PACS
    assert held.called
