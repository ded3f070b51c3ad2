"""harmony.dicom.dicomjson: identifiers as DICOM JSON and back; malformed ones refused early."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from harmony.dicom.dicomjson import identifier_from_json, identifier_to_json, query_level
from harmony.errors import BadRequest


def test_an_identifier_goes_round_trip():
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = "SYN-1"
    ds.StudyInstanceUID = ""
    doc = identifier_to_json(ds)
    assert doc["00100020"] == {"vr": "LO", "Value": ["SYN-1"]}
    back = identifier_from_json(doc)
    assert back.PatientID == "SYN-1" and back.StudyInstanceUID == ""
    assert len(identifier_from_json(None)) == 0


@pytest.mark.parametrize("doc", [[1, 2], "text", {"00100020": {"vr": "ZZ", "Value": ["x"]}},
                                 {"00100020": {"Value": ["no vr"]}}])
def test_malformed_json_is_a_bad_request(doc):
    with pytest.raises(BadRequest):
        identifier_from_json(doc)


def test_the_query_level_comes_from_metadata_or_the_identifier():
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES "
    assert query_level(ds) == "SERIES"
    assert query_level(ds, "patient") == "PATIENT"
    with pytest.raises(BadRequest, match="none"):
        query_level(Dataset())
    with pytest.raises(BadRequest):
        query_level(ds, "FRAME")
