"""Orthanc 1.10's DICOMweb client (``"DicomWeb": {"Servers": {"harmony": ...}}``)
against Harmony's ``dicomweb`` endpoint over the default archive and over the
bridge to a PACS: QIDO-RS with matches, metadata, WADO-RS retrieve (the
RLE-compressed and the multi-frame instance included).

STOW-RS from Orthanc is in test_orthanc_dicomweb_stow.py, the empty search
in test_orthanc_dicomweb_empty_qido.py and compressed retrieves needing
decompression in test_decompression.py.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from tests.dicom_data import uid
from tests.interop.support import clear, orthanc_file, orthanc_ok, orthanc_sops

SHAPES = ["archive", "router"]

#: QIDO resource, arguments -> the corpus UIDs it must answer (attribute, predicate)
SEARCHES = {
    "studies": ("/studies", {"PatientID": "PAT001"}, "0020000D", lambda i: i.patient_id == "PAT001",
                lambda i: i.study_uid),
    "series": (f"/studies/{uid(1, 1)}/series", {"Modality": "CT"}, "0020000E",
               lambda i: i.study_uid == uid(1, 1), lambda i: i.series_uid),
    "instances": (f"/studies/{uid(1, 3)}/series/{uid(1, 3, 1)}/instances", {}, "00080018",
                  lambda i: i.series_uid == uid(1, 3, 1), lambda i: i.sop_uid),
    "wildcard": ("/studies", {"PatientName": "TEST^B*"}, "0020000D", lambda i: i.patient_id == "PAT002",
                 lambda i: i.study_uid),
}


def orthanc_qido(client, server: str, path: str, arguments: dict) -> list[dict]:
    """Orthanc's QIDO-RS client (``/dicom-web/servers/{server}/qido``): parsed answers."""
    return orthanc_ok(client, "POST", f"/dicom-web/servers/{server}/qido", {"Uri": path, "Arguments": arguments})


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("search", list(SEARCHES))
def test_orthanc_qido(shape, search, request, corpus):
    stack = request.getfixturevalue(shape)
    path, arguments, tag, keep, key = SEARCHES[search]
    answers = orthanc_qido(stack.client, "harmony", path, arguments)
    assert sorted(a[tag]["Value"] for a in answers) == sorted({key(i) for i in corpus if keep(i)})
    if stack.pacs is not None and search != "wildcard":
        # The same client asking the PACS's own DICOMweb server gets the same UIDs (not
        # for wildcards: Orthanc's own QIDO does not percent-decode query values).
        native = orthanc_qido(stack.client, "pacs", path, arguments)
        assert sorted(a[tag]["Value"] for a in native) == sorted(a[tag]["Value"] for a in answers)


@pytest.mark.parametrize("shape", SHAPES)
def test_orthanc_metadata(shape, request, corpus):
    stack = request.getfixturevalue(shape)
    inst = next(i for i in corpus if i.series_uid == uid(1, 2, 1))  # the multi-frame MR instance
    meta = orthanc_ok(stack.client, "POST", "/dicom-web/servers/harmony/get",
                      {"Uri": f"/studies/{inst.study_uid}/series/{inst.series_uid}/instances/{inst.sop_uid}/metadata"})
    [item] = meta
    assert item["00080018"]["Value"] == [inst.sop_uid]
    assert item["00280008"]["Value"] in (["4"], [4])
    assert "BulkDataURI" in item["7FE00010"]


@pytest.mark.parametrize("shape", SHAPES)
def test_orthanc_wado_retrieve(shape, request, corpus):
    """``/dicom-web/servers/harmony/retrieve`` of the study holding the RLE
    instance: every instance arrives in the client, pixels unchanged."""
    stack = request.getfixturevalue(shape)
    study = uid(1, 3)
    clear(stack.client)
    job = orthanc_ok(stack.client, "POST", "/dicom-web/servers/harmony/retrieve",
                     {"Resources": [{"Study": study}]})
    want = [i for i in corpus if i.study_uid == study]
    assert int(job["ReceivedInstancesCount"]) == len(want), job
    assert orthanc_sops(stack.client) == {i.sop_uid for i in want}
    for inst in want:
        got = orthanc_file(stack.client, inst.sop_uid)
        assert np.array_equal(got.pixel_array, pydicom.dcmread(inst.path).pixel_array), inst.sop_uid


@pytest.mark.parametrize("shape", SHAPES)
def test_orthanc_wado_retrieve_series(shape, request, corpus):
    stack = request.getfixturevalue(shape)
    clear(stack.client)
    series = uid(1, 2, 1)
    orthanc_ok(stack.client, "POST", "/dicom-web/servers/harmony/retrieve",
               {"Resources": [{"Study": uid(1, 2), "Series": series}]})
    assert orthanc_sops(stack.client) == {i.sop_uid for i in corpus if i.series_uid == series}
