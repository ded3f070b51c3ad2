"""The façade's parts without a PACS: ``fhir_cfind`` (search -> identifier),
``dicom_results_json`` (ResultStream -> paged JSON, DIMSE failures -> errors),
the shipped JOLT spec (golden), and ``transform``'s ``content_type``.
tests/test_fhir_imagingstudy.py runs them together against Orthanc."""

import json
from pathlib import Path

import pytest
import pytest_twisted
from fhir.resources.R4B.bundle import Bundle
from pydicom.dataset import Dataset
from twisted.internet import defer
from twisted.web.http_headers import Headers

from harmony.dicom import status as dimse
from harmony.dicom.results import ResultStream
from harmony.envelope import RequestEnvelope, ResponseEnvelope
from harmony.errors import BadRequest, HarmonyError, NotFound
from harmony.middleware.dicom_results import DicomResultsJson
from harmony.middleware.fhir_cfind import FhirCFind
from harmony.transform import load_spec
from tests.middleware_harness import assert_option_error, build_pipeline

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "examples" / "fhir-imagingstudy"
GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def keys(doc) -> dict:
    """DICOM JSON -> {keyword: values} for the keys that carry a value."""
    ds = Dataset.from_json(doc)
    return {e.keyword: (list(e.value) if e.VM > 1 else e.value) for e in ds if e.value not in ("", None)}


@pytest.mark.parametrize("pairs, expected", [
    ([("patient", "Patient/P1")], {"PatientID": "P1"}),
    ([("patient", "https://fhir.example.org/Patient/P1")], {"PatientID": "P1"}),
    ([("started", "2024")], {"StudyDate": "20240101-20241231"}),
    ([("started", "2024-02")], {"StudyDate": "20240201-20240229"}),
    ([("started", "eq2024-02-03")], {"StudyDate": "20240203"}),
    ([("started", "gt2024-02-03")], {"StudyDate": "20240204-"}),
    ([("started", "gt2024-02-03T10:00:00+01:00")], {"StudyDate": "20240203-"}),
    ([("started", "lt2024-02-03")], {"StudyDate": "-20240202"}),
    ([("started", "le2024"), ("started", "sa2022-12-31")], {"StudyDate": "20230101-20241231"}),
    ([("modality", "CT,MR")], {"ModalitiesInStudy": ["CT", "MR"]}),
    ([("_id", "1.2.3,urn:oid:1.2.4")], {"StudyInstanceUID": ["1.2.3", "1.2.4"]}),
    ([("identifier", "urn:dicom:uid|1.2.3"), ("_id", "1.2.3")], {"StudyInstanceUID": "1.2.3"}),
    ([("_count", "5"), ("_format", "json"), ("whatever", "x")], {}),
])
def test_search_parameters_become_a_study_identifier(pairs, expected):
    doc = FhirCFind("s").identifier(pairs)
    assert doc["00080052"] == {"vr": "CS", "Value": ["STUDY"]}
    assert keys(doc) == {"QueryRetrieveLevel": "STUDY", **expected}
    # Every return key is asked for, matched or not.
    for tag in ("0020000D", "00201206", "00201208", "00080061", "00100020"):
        assert tag in doc


def test_conflicting_parameters_on_one_key_are_refused():
    with pytest.raises(BadRequest, match="conflicts"):
        FhirCFind("s").identifier([("_id", "1.2.3"), ("identifier", "urn:oid:1.2.4")])


def test_strict_handling_names_the_unknown_parameter():
    with pytest.raises(BadRequest, match="'bodysite'"):
        FhirCFind("s").identifier([("bodysite", "x")], strict=True)


@pytest_twisted.ensureDeferred
async def test_request_gets_operation_level_and_identifier():
    req = RequestEnvelope(method="GET", query=[("patient", "P9")],
                          metadata={"fhir.interaction": "search-type", "fhir.resource_type": "ImagingStudy"})
    out = await FhirCFind("s").on_request(req)
    assert out.metadata["dimse_op"] == "C-FIND" and out.metadata["query_level"] == "STUDY"
    assert keys(out.normalized)["PatientID"] == "P9"
    req.metadata["fhir.resource_type"] = "Patient"
    with pytest.raises(NotFound):
        await FhirCFind("s").on_request(req)


def test_configured_params_and_levels(tmp_path):
    rt = build_pipeline(tmp_path, {"s": '''
        type = "fhir_cfind"
        resource = "ImagingSeries"
        level = "SERIES"
        return_keys = ["SeriesInstanceUID", "Modality"]
        [middleware.s.params]
        study = "StudyInstanceUID:uid"
        modality = "Modality:token"
    '''})
    mw = rt.pipelines["main"].middleware[0]
    doc = mw.identifier([("study", "1.2.3"), ("modality", "CT")])
    assert keys(doc) == {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.2.3", "Modality": "CT"}
    assert set(doc) == {"00080052", "0020000E", "00080060", "0020000D"}


@pytest.mark.parametrize("body, key, message", [
    ('level = "WARD"', "level", "must be one of"),
    ('[middleware.s.params]\nx = "NoSuchKeyword:string"', "params.x", "not a DICOM keyword"),
    ('[middleware.s.params]\nx = "PatientID:fuzzy"', "params.x", "kind must be one of"),
    ('return_keys = ["Nope"]', "return_keys", "not a DICOM keyword"),
])
def test_bad_options_name_their_key(tmp_path, body, key, message):
    assert_option_error(tmp_path, {"s": 'type = "fhir_cfind"\n' + body}, "s", key, message)


# ---------------------------------------------------------------- dicom_results_json

def match(n: int) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = f"1.2.{n}"
    return ds


def results(items, status=0x0000):
    stream = ResultStream()
    for item in items:
        stream.put(item)
    stream.finish(status)
    resp = ResponseEnvelope(status=200, headers=Headers({"Content-Type": ["application/dicom+json"]}))
    resp.state.dicom_results = stream
    return resp, stream


def request(query=(), path="/fhir/ImagingStudy"):
    return RequestEnvelope(method="GET", path=path, subpath=path[len("/fhir"):], query=list(query),
                           host="proxy.example:8080", metadata={"fhir.base_path": "/fhir"})


@pytest_twisted.ensureDeferred
async def test_results_become_one_paged_document():
    resp, _ = results([match(n) for n in range(5)])
    out = await DicomResultsJson("r").on_response(request([("patient", "P"), ("_count", "2"), ("_offset", "2")]), resp)
    doc = json.loads(out.body)
    assert out.header("content-type") == "application/json" and out.normalized == doc
    assert (doc["total"], doc["offset"], doc["count"]) == (5, 2, 2)
    assert [m["0020000D"]["Value"][0] for m in doc["matches"]] == ["1.2.2", "1.2.3"]
    assert doc["origin"] == "http://proxy.example:8080" and doc["base_url"] == "http://proxy.example:8080/fhir"
    base = "http://proxy.example:8080/fhir/ImagingStudy?patient=P&_count=2&_offset="
    assert doc["links"] == {"self": base + "2", "next": base + "4", "previous": base + "0"}


@pytest_twisted.ensureDeferred
async def test_too_many_matches_cancel_the_query_and_drop_the_total():
    resp, stream = results([match(n) for n in range(5)])
    stream._done = False  # still running at the PACS
    out = await DicomResultsJson("r", max_matches=3).on_response(request(), resp)
    doc = json.loads(out.body)
    assert stream.cancelled and len(doc["matches"]) == 3 and "total" not in doc


@pytest_twisted.ensureDeferred
async def test_failure_after_matches_is_502():
    resp, _ = results([match(1)], status=0xA700)
    with pytest.raises(HarmonyError) as e:
        await DicomResultsJson("r").on_response(request(), resp)
    assert e.value.status == 502 and "0xA700" in e.value.detail


@pytest_twisted.ensureDeferred
async def test_backend_dimse_failure_document_becomes_an_error():
    # dicom_scu's failure answer: a JSON rendering for HTTP clients, the status in the typed state.
    resp = ResponseEnvelope.json(502, {"dimse_op": "C-FIND", "dimse_status": 0xA700, "error_comment": "no"})
    dimse.record(resp, 0xA700, "no")
    with pytest.raises(HarmonyError) as e:
        await DicomResultsJson("r").on_response(request(), resp)
    assert e.value.status == 502 and "0xA700 (no)" in e.value.detail


@pytest_twisted.ensureDeferred
async def test_non_dicom_responses_pass_untouched():
    resp = ResponseEnvelope.json(200, {"a": 1})
    assert await DicomResultsJson("r").on_response(request(), resp) is resp


# ---------------------------------------------------------------- the shipped spec

def test_spec_golden_and_valid_r4b():
    spec = load_spec(EXAMPLE / "cfind_to_imagingstudy_bundle.json")
    out = spec.apply(json.loads((EXAMPLE / "sample_results.json").read_text()))
    assert out == json.loads((GOLDEN / "cfind_to_imagingstudy_bundle.expected.json").read_text())
    Bundle.model_validate(out)
    # A match without StudyDate, description or accession still makes a valid resource.
    second = out["entry"][1]["resource"]
    assert "started" not in second and "description" not in second and len(second["identifier"]) == 1


def test_spec_on_no_matches_is_an_empty_valid_searchset():
    spec = load_spec(EXAMPLE / "cfind_to_imagingstudy_bundle.json")
    out = spec.apply({"total": 0, "offset": 0, "count": 0, "origin": "http://h", "base_url": "http://h/fhir",
                      "links": {"self": "http://h/fhir/ImagingStudy?patient=x"}, "matches": []})
    Bundle.model_validate(out)
    assert out == {"resourceType": "Bundle", "type": "searchset", "total": 0,
                   "link": [{"relation": "self", "url": "http://h/fhir/ImagingStudy?patient=x"}]}


@pytest_twisted.ensureDeferred
async def test_transform_content_type_option(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "wrap.json").write_text(json.dumps([{"operation": "shift", "spec": {"a": "resourceType"}}]))
    rt = build_pipeline(tmp_path, {"t": 'type = "transform"\nspec_path = "wrap.json"\n'
                                        'content_type = "application/fhir+json"'}, transforms_path=str(folder))
    mw = rt.pipelines["main"].middleware[0]
    resp = ResponseEnvelope.json(200, {"a": "Bundle"})
    out = await mw.on_response(RequestEnvelope(), resp)
    assert out.header("content-type") == "application/fhir+json" and json.loads(out.body) == {"resourceType": "Bundle"}
    # An answer the spec did not rewrite keeps its own type.
    err = ResponseEnvelope.json(500, {"a": "x"})
    assert (await defer.maybeDeferred(mw.on_response, RequestEnvelope(), err)).header("content-type") == "application/json"


@pytest.mark.parametrize("offset", ["9" * 5000, "\u00b2", "1" * 19])
@pytest_twisted.ensureDeferred
async def test_absurd_paging_numbers_are_the_clients_error(offset):
    """int() refuses 4,301+ digits and isdigit() admits superscripts: both used to be a 500."""
    from harmony.errors import BadRequest
    resp, _ = results([match(1)])
    with pytest.raises(BadRequest):
        await DicomResultsJson("r").on_response(request([("_offset", offset)]), resp)
