"""harmony.middleware.dicom_results (``dicom_results_json``) in memory: a C-FIND result stream as one
paged JSON document with absolute links, DIMSE failures as the proxy errors they mean."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from harmony.dicom import status as dimse
from harmony.dicom.results import ResultStream
from harmony.errors import BackendUnavailable, BadRequest, HarmonyError
from harmony.middleware.dicom_results import DicomResultsJson
from harmony.state import ResponseState
from tests.memory import build, failure_of, request, response, result_of


def _stream(n, final=dimse.SUCCESS, asked=None):
    stream = ResultStream(on_cancel=lambda: asked.append("C-CANCEL") if asked is not None else None)
    for i in range(n):
        ds = Dataset()
        ds.PatientID = f"SYN-{i}"
        stream.put(ds)
    if final is not None:
        stream.finish(final)
    return stream


def _search(query=(), **kwargs):
    return request("GET", "/ImagingStudy", path="/fhir/ImagingStudy", query=list(query), host="harmony.test",
                   scheme="https", metadata={"fhir.base_path": "/fhir"}, **kwargs)


def _answer(stream, status=200):
    return response(status, state=ResponseState(dicom_results=stream))


def test_a_page_with_total_and_links():
    mw = build(DicomResultsJson, {"default_count": 2})
    req = _search([("patient", "SYN"), ("_offset", "2")])
    doc = result_of(mw.on_response(req, _answer(_stream(5)))).normalized
    assert (doc["total"], doc["offset"], doc["count"]) == (5, 2, 2)
    assert [m["00100020"]["Value"][0] for m in doc["matches"]] == ["SYN-2", "SYN-3"]
    assert doc["links"]["next"] == "https://harmony.test/fhir/ImagingStudy?patient=SYN&_count=2&_offset=4"
    assert doc["links"]["previous"].endswith("_count=2&_offset=0")
    assert doc["base_url"] == "https://harmony.test/fhir"


def test_counts_are_capped_and_matches_stop_at_the_limit():
    mw = build(DicomResultsJson, {"max_count": 3, "max_matches": 4, "public_base_url": "https://public.test"})
    asked = []
    stream = _stream(10, final=None, asked=asked)  # the PACS is still sending
    doc = result_of(mw.on_response(_search([("_count", "50")]), _answer(stream))).normalized
    assert doc["count"] == 3 and "total" not in doc and asked == ["C-CANCEL"]  # stopped past max_matches
    assert doc["origin"] == "https://public.test"


def test_a_client_leaving_mid_query_cancels_it():
    """The pipeline is cancelled (the client left) while the matches arrive: the C-FIND is
    cancelled upstream and the stream given up, so the target pool counts a client abort
    once the PACS ends it (``when_abandoned``); before, the PACS ran on and nothing was counted."""
    from twisted.internet import defer
    mw = build(DicomResultsJson)
    asked: list[str] = []
    stream = _stream(2, final=None, asked=asked)  # the PACS is still sending
    abandoned = stream.when_abandoned()
    answer = mw.on_response(_search(), _answer(stream))
    answer.cancel()
    failure_of(answer, defer.CancelledError)
    assert asked == ["C-CANCEL"] and stream.given_up
    stream.put(Dataset())  # sent before the PACS heard the C-CANCEL: taken and dropped
    stream.finish(dimse.CANCEL)
    assert abandoned.called and not stream.queued()


def test_dimse_failures_are_proxy_errors():
    mw = build(DicomResultsJson)
    refused = _answer(_stream(0, final=0xA700), status=502)
    assert "0xA700" in failure_of(mw.on_response(_search(), refused), HarmonyError).detail
    part_way = _answer(_stream(2, final=0xC001))
    failure_of(mw.on_response(_search(), part_way), BackendUnavailable)


@pytest.mark.parametrize("value", ["-1", "ten", "9" * 19])
def test_bad_paging_parameters_are_400(value):
    failure_of(build(DicomResultsJson).on_response(_search([("_count", value)]), _answer(_stream(1))), BadRequest)


def test_anything_else_passes_untouched():
    plain = response(200, body=b"not DICOM")
    assert result_of(build(DicomResultsJson).on_response(_search(), plain)) is plain
