"""Issue 12, defect 3: Orthanc's STOW-RS client sends a 73-character boundary
(``<uuid>-<uuid>``) with ``Transfer-Encoding: chunked``, which Harmony refused
(400 "boundary parameter of 1-70 characters").  Orthanc stores into Harmony
(archive and bridge) with ``/dicom-web/servers/harmony/stow``, the compressed
instances included (through the bridge JPEG extended and JPEG-LS failed
before defect 4's fix).
"""

from __future__ import annotations

import pytest

from tests.dicom_data import make_instance, save, uid
from tests.interop.support import orthanc_file, orthanc_find, orthanc_ok, orthanc_sops, upload


def stow(stack, paths) -> None:
    ids = upload(stack.client, paths)
    orthanc_ok(stack.client, "POST", "/dicom-web/servers/harmony/stow", {"Resources": ids, "Synchronous": True})


def stored_in_harmony(stack, study: str) -> set[str]:
    """SOP Instance UIDs of *study* that Harmony answers for (C-FIND through Orthanc)."""
    answers = orthanc_find(stack.client, "harmony", "Instance", {"StudyInstanceUID": study, "SOPInstanceUID": ""})
    return {a["SOPInstanceUID"] for a in answers}


@pytest.mark.parametrize("shape,study", [("archive", 1), ("router", 2)])
def test_orthanc_stow(shape, study, request, tmp_path):
    stack = request.getfixturevalue(shape)
    files = [save(make_instance(patient_id=f"IOPSTOW{study}", study_uid=uid(7, 4, study),
                                series_uid=uid(7, 4, study, 1), sop_uid=uid(7, 4, study, 1, i), instance_number=i,
                                seed=1000 + i), tmp_path / f"{i}.dcm") for i in range(1, 4)]
    stow(stack, files)
    want = {uid(7, 4, study, 1, i) for i in range(1, 4)}
    assert stored_in_harmony(stack, uid(7, 4, study)) == want
    if stack.pacs is not None:
        assert want <= orthanc_sops(stack.pacs)


def test_orthanc_stow_compressed_into_archive(archive, compressed):
    stow(archive, [c.path for c in compressed.values()])
    study = next(iter(compressed.values())).study_uid
    assert {c.sop_uid for c in compressed.values()} <= stored_in_harmony(archive, study)


def test_orthanc_stow_compressed_through_bridge(router, compressed):
    """Orthanc's STOW-RS through the bridge: each instance reaches the PACS in its own transfer syntax."""
    stow(router, [c.path for c in compressed.values()])
    for c in compressed.values():
        assert str(orthanc_file(router.pacs, c.sop_uid).file_meta.TransferSyntaxUID) == c.transfer_syntax, c.name
