"""harmony.dicomweb.dicomjson: instances as DICOM JSON with BulkDataURIs, C-FIND matches trimmed."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from harmony.dicomweb.dicomjson import dataset_to_json, find_result_to_json, instance_metadata
from tests.dicom_data import make_instance, save


def test_pixel_data_and_large_binaries_become_bulk_data_uris(tmp_path):
    path = save(make_instance(rows=4, cols=4), tmp_path / "i.dcm")
    doc = instance_metadata(path, "https://h.test/dicomweb/studies/1/series/2/instances/3")
    assert doc["7FE00010"] == {"vr": "OW",
                               "BulkDataURI": "https://h.test/dicomweb/studies/1/series/2/instances/3/bulkdata/7FE00010"}
    assert doc["00100020"] == {"vr": "LO", "Value": ["PAT001"]}
    assert not any(k.startswith("0002") for k in doc)  # file meta stays out


def test_nested_binaries_are_addressed_by_their_path():
    item = Dataset()
    item.add_new(0x00181072, "OB", b"\x01" * 2000)
    ds = Dataset()
    ds.add_new(0x00540016, "SQ", Sequence([item]))
    doc = dataset_to_json(ds, "base")
    assert doc["00540016"]["Value"][0]["00181072"]["BulkDataURI"] == "base/bulkdata/00540016/0/00181072"
    inline = dataset_to_json(ds, None)
    assert "InlineBinary" in inline["00540016"]["Value"][0]["00181072"]


def test_a_find_match_loses_dimse_details_and_uid_padding():
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.RetrieveAETitle = "PACS"
    with pytest.warns(UserWarning):  # pydicom frowns on the NUL padding some DIMSE peers send
        ds.StudyInstanceUID = "1.2.3\0"
    assert find_result_to_json(ds) == {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}
