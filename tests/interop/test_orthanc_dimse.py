"""Orthanc 1.10 as a DICOM client (its ``/modalities`` REST features) against
Harmony: the default ``etc/`` archive and a router in front of a second Orthanc.

Oracle: for the router, the same client Orthanc asking the PACS directly; for
the archive, the synthetic corpus it was loaded with.  C-MOVE from the default
archive: test_orthanc_dimse_default_move.py.
"""

from __future__ import annotations

import pydicom
import pytest

from tests.dicom_data import make_instance, save, uid
from tests.interop.data import COMPRESSED
from tests.interop.support import clear, orthanc_file, orthanc_find, orthanc_ok, orthanc_sops, upload

#: Orthanc level -> (query, keys compared between the answers)
LEVELS = {
    "Patient": ({"PatientID": "PAT00*", "PatientName": ""}, ("PatientID", "PatientName")),
    "Study": ({"PatientID": "PAT001", "StudyInstanceUID": "", "StudyDate": "", "AccessionNumber": "",
               "StudyDescription": ""}, ("StudyInstanceUID", "StudyDate", "AccessionNumber", "StudyDescription")),
    "Series": ({"StudyInstanceUID": uid(1, 1), "SeriesInstanceUID": "", "Modality": "", "SeriesDescription": ""},
               ("SeriesInstanceUID", "Modality", "SeriesDescription")),
    "Instance": ({"StudyInstanceUID": uid(1, 3), "SeriesInstanceUID": uid(1, 3, 1), "SOPInstanceUID": "",
                  "InstanceNumber": ""}, ("SOPInstanceUID",)),
}


def keyed(answers, keys) -> list[tuple]:
    return sorted(tuple(str(a.get(k, "")).rstrip("\x00 ") for k in keys) for a in answers)


def expected_from_corpus(corpus, level) -> list[tuple]:
    query, keys = LEVELS[level]
    if level == "Patient":
        return sorted({(i.patient_id, {"PAT001": "TEST^ALPHA", "PAT002": "TEST^BRAVO", "PAT003": "TEST^CHARLIE"}
                        [i.patient_id]) for i in corpus})
    if level == "Study":
        return sorted({(i.study_uid,) for i in corpus if i.patient_id == "PAT001"})
    if level == "Series":
        return sorted({(i.series_uid,) for i in corpus if i.study_uid == query["StudyInstanceUID"]})
    return sorted((i.sop_uid,) for i in corpus if i.series_uid == query["SeriesInstanceUID"])


def fresh_instances(folder, study: int, n: int = 3):
    """*n* new instances (their own study) for a store test."""
    return [save(make_instance(patient_id=f"IOPST{study}", study_uid=uid(7, 3, study),
                               series_uid=uid(7, 3, study, 1), sop_uid=uid(7, 3, study, 1, i), instance_number=i,
                               seed=900 + i), folder / f"{study}-{i}.dcm") for i in range(1, n + 1)]


@pytest.mark.parametrize("shape", ["archive", "router"])
def test_orthanc_echo(shape, request):
    stack = request.getfixturevalue(shape)
    assert orthanc_ok(stack.client, "POST", "/modalities/harmony/echo", {}) == {}


@pytest.mark.parametrize("level", list(LEVELS))
def test_orthanc_find_archive(archive, corpus, level):
    query, keys = LEVELS[level]
    answers = orthanc_find(archive.client, "harmony", level, query)
    got = keyed(answers, keys[:1] if level != "Patient" else keys)
    assert got == expected_from_corpus(corpus, level)
    if level == "Study":
        # The return keys are filled from the stored instances, not just echoed.
        assert {a["StudyDate"] for a in answers} == {"20240102", "20240315"}


@pytest.mark.parametrize("level", list(LEVELS))
def test_orthanc_find_router_matches_pacs(router, level):
    query, keys = LEVELS[level]
    through = orthanc_find(router.client, "harmony", level, query)
    direct = orthanc_find(router.client, "pacs", level, query)
    assert direct, "the oracle found nothing: the query is wrong"
    assert keyed(through, keys) == keyed(direct, keys)


def test_orthanc_store_into_archive(archive, tmp_path):
    files = fresh_instances(tmp_path, 1)
    ids = upload(archive.client, files)
    job = orthanc_ok(archive.client, "POST", "/modalities/harmony/store", {"Resources": ids, "Synchronous": True})
    assert job["FailedInstancesCount"] == 0 and job["InstancesCount"] == len(files), job
    answers = orthanc_find(archive.client, "harmony", "Instance",
                           {"StudyInstanceUID": uid(7, 3, 1), "SeriesInstanceUID": uid(7, 3, 1, 1),
                            "SOPInstanceUID": ""})
    assert keyed(answers, ("SOPInstanceUID",)) == sorted((uid(7, 3, 1, 1, i),) for i in range(1, 4))


def test_orthanc_store_through_router(router, tmp_path):
    files = fresh_instances(tmp_path, 2)
    ids = upload(router.client, files)
    job = orthanc_ok(router.client, "POST", "/modalities/harmony/store", {"Resources": ids, "Synchronous": True})
    assert job["FailedInstancesCount"] == 0 and job["InstancesCount"] == len(files), job
    assert {uid(7, 3, 2, 1, i) for i in range(1, 4)} <= orthanc_sops(router.pacs)


def test_orthanc_retrieve_query_through_router(router, corpus):
    """``/queries/{id}/retrieve``: Orthanc C-MOVEs to itself through Harmony,
    which fetches from the PACS and C-STOREs each instance back to Orthanc
    (the RLE-compressed one and the multi-frame one included)."""
    study = uid(1, 3)
    clear(router.client)
    q = orthanc_ok(router.client, "POST", "/modalities/harmony/query",
                   {"Level": "Study", "Query": {"StudyInstanceUID": study}})
    job = orthanc_ok(router.client, "POST", f"/queries/{q['ID']}/retrieve",
                     {"TargetAet": router.client.aet, "Synchronous": True})
    assert job is not None
    want = {i.sop_uid for i in corpus if i.study_uid == study}
    assert want <= orthanc_sops(router.client)


def test_orthanc_move_series_through_router(router, corpus):
    """``/modalities/{id}/move`` at series level (the multi-frame MR series)."""
    series = uid(1, 2, 1)
    clear(router.client)
    orthanc_ok(router.client, "POST", "/modalities/harmony/move",
               {"Level": "Series", "TargetAet": router.client.aet, "Synchronous": True,
                "Resources": [{"StudyInstanceUID": uid(1, 2), "SeriesInstanceUID": series}]})
    assert {i.sop_uid for i in corpus if i.series_uid == series} <= orthanc_sops(router.client)


def test_orthanc_move_unknown_destination_is_refused(router):
    """A destination Harmony does not know: Orthanc reports the C-MOVE failure (0xA801), nothing hangs."""
    from tests.interop.support import call
    status, body = call(router.client.url, "POST", "/modalities/harmony/move",
                        {"Level": "Study", "TargetAet": "NOWHERE", "Synchronous": True,
                         "Resources": [{"StudyInstanceUID": uid(1, 4)}]})
    assert status != 200, body
    assert "a801" in str(body).lower() or "move" in str(body).lower(), body


def orthanc_store_compressed(stack, item):
    """Orthanc C-STOREs *item* to Harmony; the instance as Harmony's store (or the PACS behind it) holds it."""
    from tests.dicomweb_helpers import client
    ids = upload(stack.client, [item.path])
    job = orthanc_ok(stack.client, "POST", "/modalities/harmony/store", {"Resources": ids, "Synchronous": True})
    assert job["FailedInstancesCount"] == 0, job
    if stack.pacs is not None:
        return orthanc_file(stack.pacs, item.sop_uid)
    return client(stack.web_url).retrieve_instance(item.study_uid, item.series_uid, item.sop_uid,
                                                   media_types=[("application/dicom", "*")])


@pytest.mark.parametrize("shape", ["archive", "router"])
@pytest.mark.parametrize("variant", list(COMPRESSED))
def test_orthanc_store_compressed(shape, variant, request, compressed):
    """Orthanc sends each instance in its own syntax; it is kept (archive) or
    forwarded (router) as sent (through the router JPEG extended and JPEG-LS
    failed with 0xC001 before defect 4's fix)."""
    item = compressed[variant]
    held = orthanc_store_compressed(request.getfixturevalue(shape), item)
    assert str(held.file_meta.TransferSyntaxUID) == item.transfer_syntax
    assert held.PixelData == pydicom.dcmread(item.path).PixelData
