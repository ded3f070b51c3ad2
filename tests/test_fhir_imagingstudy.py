"""The FHIR ImagingStudy façade (etc/examples/fhir-imagingstudy) against a real
Orthanc loaded with the synthetic corpus.

The shipped example configuration is copied and pointed at the session Orthanc
(only host, port, AE and listening port change), so what is tested is what
ships.  Every Bundle is validated with fhir.resources' R4B models (no plain R4
package exists; ImagingStudy and Bundle are structurally the same in R4 and
R4B), and its counts are compared with Orthanc's own answers to a C-FIND sent
straight to it.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import pytest_twisted
import treq
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.operationoutcome import OperationOutcome
from pydicom.dataset import Dataset
from twisted.internet import reactor
from twisted.internet.protocol import Factory

from tests.dimse_helpers import direct_find
from tests.harness import start_harmony
from tests.peers import free_port

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "examples" / "fhir-imagingstudy"
STUDY = "1.2.826.0.1.3680043.10.543.1.{}"


def copy_example(tmp_path: Path, *, aet: str, port: int) -> Path:
    folder = tmp_path / "example"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("var"))
    main = folder / "harmony.toml"
    main.write_text(main.read_text().replace("bind_port = 8080", "bind_port = 0"))
    pacs = folder / "pipelines" / "pacs.toml"
    text = pacs.read_text().replace('aet = "ORTHANC"', f'aet = "{aet}"').replace("port = 4242", f"port = {port}")
    pacs.write_text(text.replace("dimse_timeout_secs = 30", "dimse_timeout_secs = 5"))
    return main


@pytest.fixture(scope="module")
def corpus_studies(corpus):
    """study UID -> (patient, series count, instance count, modalities) from the corpus itself."""
    out = {}
    for i in corpus:
        pid, series, count, mods = out.get(i.study_uid, (i.patient_id, set(), 0, set()))
        out[i.study_uid] = (pid, series | {i.series_uid}, count + 1, mods | {i.modality})
    return {uid: (pid, len(series), count, mods) for uid, (pid, series, count, mods) in out.items()}


@pytest.fixture(scope="module")
def facade(tmp_path_factory, orthanc):
    orthanc.add_modality("harmony_facade", "HARMONY", free_port())
    main = copy_example(tmp_path_factory.mktemp("facade"), aet=orthanc.aet, port=orthanc.dicom_port)
    running = pytest_twisted.blockon(start_harmony(main))
    yield running
    pytest_twisted.blockon(running.stop())


def orthanc_studies(orthanc, **keys) -> dict:
    """Orthanc's own study-level C-FIND answer: study UID -> (series, instances)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    ds.NumberOfStudyRelatedSeries = ""
    ds.NumberOfStudyRelatedInstances = ""
    for k, v in keys.items():
        setattr(ds, k, v)
    out = {}
    for match in direct_find("127.0.0.1", orthanc.dicom_port, orthanc.aet, ds, calling="HARMONY"):
        out[match["0020000D"]["Value"][0].rstrip("\0 ")] = (int(match["00201206"]["Value"][0]),
                                                            int(match["00201208"]["Value"][0]))
    return out


async def bundle(response, status=200) -> dict:
    body = await response.content()
    assert response.code == status, body
    assert response.headers.getRawHeaders("content-type")[0].startswith("application/fhir+json")
    doc = json.loads(body)
    Bundle.model_validate(doc)
    assert doc["resourceType"] == "Bundle" and doc["type"] == "searchset"
    return doc


async def outcome(response, status, code=None) -> dict:
    body = await response.content()
    assert response.code == status, body
    assert response.headers.getRawHeaders("content-type")[0].startswith("application/fhir+json")
    doc = json.loads(body)
    OperationOutcome.model_validate(doc)
    if code:
        assert doc["issue"][0]["code"] == code, doc
    return doc["issue"][0]


def uids(doc) -> set:
    return {e["resource"]["id"] for e in doc.get("entry", [])}


async def search(facade, query: str):
    return await bundle(await treq.get(facade.url("/fhir/ImagingStudy" + query)))


@pytest_twisted.ensureDeferred
async def test_patient_search_is_a_valid_bundle_matching_orthanc(facade, orthanc, corpus_studies):
    doc = await search(facade, "?patient=PAT001")
    direct = await _in_thread(orthanc_studies, orthanc, PatientID="PAT001")
    assert doc["total"] == len(direct) == 2
    assert uids(doc) == set(direct) == {STUDY.format(1), STUDY.format(2)}
    port = facade.port()
    for entry in doc["entry"]:
        study = entry["resource"]
        uid = study["id"]
        pid, n_series, n_instances, modalities = corpus_studies[uid]
        assert (study["numberOfSeries"], study["numberOfInstances"]) == direct[uid] == (n_series, n_instances)
        assert {m["code"] for m in study["modality"]} == modalities
        assert all(m["system"] == "http://dicom.nema.org/resources/ontology/DCM" for m in study["modality"])
        assert study["subject"] == {"reference": "Patient/PAT001"}
        assert study["identifier"][0] == {"system": "urn:dicom:uid", "value": "urn:oid:" + uid}
        assert study["identifier"][1]["type"]["coding"][0]["code"] == "ACSN"
        assert study["status"] == "available" and entry["search"] == {"mode": "match"}
        assert entry["fullUrl"] == f"http://127.0.0.1:{port}/fhir/ImagingStudy/{uid}"
        endpoints = {e["id"]: e for e in study["contained"]}
        assert [e["reference"] for e in study["endpoint"]] == ["#dicomweb", "#jmix"]
        assert endpoints["dicomweb"]["address"] == f"http://127.0.0.1:{port}/dicomweb"
        assert endpoints["dicomweb"]["connectionType"]["code"] == "dicom-wado-rs"
        assert endpoints["jmix"]["address"] == f"http://127.0.0.1:{port}/jmix/api/jmix?studyInstanceUid={uid}"
    started = {e["resource"]["id"]: e["resource"]["started"] for e in doc["entry"]}
    assert started == {STUDY.format(1): "2024-01-02", STUDY.format(2): "2024-03-15"}
    assert doc["link"][0]["relation"] == "self"


@pytest_twisted.ensureDeferred
async def test_endpoint_links_lead_to_the_study(facade):
    doc = await search(facade, "?identifier=urn:oid:" + STUDY.format(3))
    study = doc["entry"][0]["resource"]
    wado = {e["id"]: e for e in study["contained"]}["dicomweb"]["address"]
    resp = await treq.get(f"{wado}/studies?StudyInstanceUID={study['id']}")
    qido = json.loads(await resp.content())
    assert resp.code == 200 and len(qido) == 1
    assert qido[0]["0020000D"]["Value"] == [study["id"]]
    assert int(qido[0]["00201208"]["Value"][0]) == study["numberOfInstances"]


async def _in_thread(fn, *args, **kwargs):
    from twisted.internet import threads
    return await threads.deferToThread(fn, *args, **kwargs)


@pytest.mark.parametrize("query, expected", [
    ("", {1, 2, 3, 4}),
    ("?patient=Patient/PAT002", {3}),
    ("?subject=PAT003", {4}),
    ("?patient=NOBODY", set()),
    ("?started=ge2024-01-01", {1, 2}),
    ("?started=2023", {3}),
    ("?started=2024-03", {2}),
    ("?started=lt2023-01-01", {4}),
    ("?started=gt2024-01-02", {2}),
    ("?started=ge2023-01-01&started=le2024-01-31", {1, 3}),
    ("?started=2024-01-02T10:00:00Z", {1}),
    ("?modality=CT", {1, 3}),
    ("?modality=http://dicom.nema.org/resources/ontology/DCM|MR", {2}),
    ("?modality=CT&patient=PAT001", {1}),
    ("?modality=MR,OT", {2, 4}),
    ("?identifier=urn:oid:1.2.826.0.1.3680043.10.543.1.2", {2}),
    ("?identifier=urn:dicom:uid|1.2.826.0.1.3680043.10.543.1.4", {4}),
    ("?_id=1.2.826.0.1.3680043.10.543.1.1,1.2.826.0.1.3680043.10.543.1.4", {1, 4}),
    ("?patient=PAT001&unknownparam=x", {1, 2}),
])
@pytest_twisted.ensureDeferred
async def test_search_parameters_map_to_cfind(facade, orthanc, query, expected):
    doc = await search(facade, query)
    assert uids(doc) == {STUDY.format(n) for n in expected}
    assert doc["total"] == len(expected)


@pytest_twisted.ensureDeferred
async def test_search_agrees_with_orthanc_by_date_and_modality(facade, orthanc):
    for query, keys in [("?started=ge2024-01-01", {"StudyDate": "20240101-"}),
                        ("?modality=CT", {"ModalitiesInStudy": "CT"})]:
        doc = await search(facade, query)
        direct = await _in_thread(orthanc_studies, orthanc, **keys)
        assert {e["resource"]["id"]: (e["resource"]["numberOfSeries"], e["resource"]["numberOfInstances"])
                for e in doc["entry"]} == direct


@pytest_twisted.ensureDeferred
async def test_count_pages_through_every_study_via_next_links(facade):
    doc = await search(facade, "?_count=3")
    assert doc["total"] == 4 and len(doc["entry"]) == 3
    links = {link["relation"]: link["url"] for link in doc["link"]}
    assert "previous" not in links
    nxt = urlsplit(links["next"])
    assert nxt.netloc == f"127.0.0.1:{facade.port()}" and nxt.path == "/fhir/ImagingStudy"
    page2 = await bundle(await treq.get(links["next"]))
    assert len(page2["entry"]) == 1 and page2["total"] == 4
    links2 = {link["relation"]: link["url"] for link in page2["link"]}
    assert "next" not in links2 and "_offset=0" in links2["previous"]
    assert uids(doc) | uids(page2) == {STUDY.format(n) for n in range(1, 5)}
    assert not uids(doc) & uids(page2)
    only_total = await search(facade, "?_count=0")
    assert only_total["total"] == 4 and "entry" not in only_total


@pytest_twisted.ensureDeferred
async def test_full_urls_resolve_by_read(facade):
    """Every entry's fullUrl is a read through the proxy giving the same resource."""
    from fhir.resources.R4B.imagingstudy import ImagingStudy
    doc = await search(facade, "?patient=PAT001")
    for entry in doc["entry"]:
        resp = await treq.get(entry["fullUrl"])
        body = await resp.content()
        assert resp.code == 200, body
        assert resp.headers.getRawHeaders("content-type")[0].startswith("application/fhir+json")
        study = json.loads(body)
        ImagingStudy.model_validate(study)
        assert study == entry["resource"]
    await outcome(await treq.get(facade.url("/fhir/ImagingStudy/1.2.3.999")), 404, "not-found")
    await outcome(await treq.get(facade.url("/fhir/ImagingStudy/not-a-uid")), 400, "invalid")


@pytest_twisted.ensureDeferred
async def test_post_search_form_body(facade):
    resp = await treq.post(facade.url("/fhir/ImagingStudy/_search"), b"patient=PAT002",
                           headers={"Content-Type": ["application/x-www-form-urlencoded"]})
    doc = await bundle(resp)
    assert uids(doc) == {STUDY.format(3)}


@pytest_twisted.ensureDeferred
async def test_forwarded_headers_shape_the_links(facade):
    resp = await treq.get(facade.url("/fhir/ImagingStudy?patient=PAT003"),
                          headers={"X-Forwarded-Proto": ["https"], "X-Forwarded-Host": ["pacs.example.org"]})
    doc = await bundle(resp)
    assert doc["entry"][0]["fullUrl"] == f"https://pacs.example.org/fhir/ImagingStudy/{STUDY.format(4)}"
    assert doc["link"][0]["url"].startswith("https://pacs.example.org/fhir/ImagingStudy?")


@pytest.mark.parametrize("query, words", [
    ("?started=2024-13-01", "not a valid date"),
    ("?started=yesterday", "not a FHIR date"),
    ("?started=ge2025-01-01&started=le2024-01-01", "empty"),
    ("?started=ap2024-01-01", "cannot be searched"),
    ("?identifier=http://hospital.example.org|ACC001", "only DICOM study UIDs"),
    ("?_id=not-a-uid", "not a DICOM UID"),
    ("?patient=PAT*", "not a value"),
    ("?patient=Group/g1", "only Patient references"),
    ("?patient=PAT001&patient=PAT002", "repeating"),
    ("?patient:exact=PAT001", "modifiers"),
    ("?_count=many", "_count"),
])
@pytest_twisted.ensureDeferred
async def test_bad_search_values_are_400_outcomes(facade, query, words):
    issue = await outcome(await treq.get(facade.url("/fhir/ImagingStudy" + query)), 400, "invalid")
    assert words in issue["diagnostics"]


@pytest_twisted.ensureDeferred
async def test_strict_handling_refuses_unknown_parameters(facade):
    resp = await treq.get(facade.url("/fhir/ImagingStudy?patient=PAT001&bodysite=chest"),
                          headers={"Prefer": ["handling=strict"]})
    issue = await outcome(resp, 400, "invalid")
    assert "bodysite" in issue["diagnostics"]


@pytest.mark.parametrize("method, path", [
    ("GET", "/fhir/Patient?name=x"),
    ("GET", "/fhir/ImagingStudy/1.2.3/_history/1"),
    ("GET", "/fhir/ImagingStudy/1.2.3"),
    ("DELETE", "/fhir/ImagingStudy?patient=PAT001"),
])
@pytest_twisted.ensureDeferred
async def test_other_interactions_are_404_outcomes(facade, method, path):
    await outcome(await treq.request(method, facade.url(path)), 404, "not-found")


@pytest_twisted.ensureDeferred
async def test_xml_is_406_outcome(facade):
    await outcome(await treq.get(facade.url("/fhir/ImagingStudy?patient=PAT001&_format=xml")), 406, "not-supported")


@pytest_twisted.ensureDeferred
async def test_pacs_down_is_502_outcome(tmp_path):
    port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    dead = port.getHost().port
    await port.stopListening()
    running = await start_harmony(copy_example(tmp_path, aet="NOBODY", port=dead))
    try:
        issue = await outcome(await treq.get(running.url("/fhir/ImagingStudy?patient=PAT001")), 502, "transient")
        assert "could not be reached" in issue["diagnostics"]
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_pacs_refusing_the_query_is_an_outcome(tmp_path, orthanc):
    """Orthanc refuses C-FIND from an AE it does not know: the failure status
    must come back as an OperationOutcome, never as DICOM-flavoured JSON."""
    main = copy_example(tmp_path, aet=orthanc.aet, port=orthanc.dicom_port)
    pacs = main.parent / "pipelines" / "pacs.toml"
    pacs.write_text(pacs.read_text().replace('local_aet = "HARMONY"', 'local_aet = "STRANGER"'))
    running = await start_harmony(main)
    try:
        resp = await treq.get(running.url("/fhir/ImagingStudy?patient=PAT001"))
        issue = await outcome(resp, resp.code)
        assert resp.code >= 500 and issue["severity"] == "fatal"
        assert "PACS" in issue["diagnostics"]
    finally:
        await running.stop()


def test_harmony_check_passes_on_the_example(tmp_path):
    main = tmp_path / "example" / "harmony.toml"
    shutil.copytree(EXAMPLE, main.parent, ignore=shutil.ignore_patterns("var"))
    proc = subprocess.run([sys.executable, "-m", "harmony.cli", "check", "-c", str(main)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fhir_imagingstudy" in proc.stdout and "OK" in proc.stdout
