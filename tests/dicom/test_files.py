"""harmony.dicom.files and dicomjson: UID validation, staging, durable writes,
corrupt-data detection, identifier parsing (synchronous, in memory or tmp_path)."""

import os

import pytest

from harmony.dicom.dicomjson import identifier_from_json, query_level
from harmony.dicom.files import CorruptDataset, Staging, check_complete, durable_copy, read_instance, valid_uid
from harmony.errors import BadRequest
from tests.dicom_data import make_instance, save


@pytest.mark.parametrize("uid,ok", [
    ("1.2.840.10008.5.1.4.1.1.2", True), ("0.1", True), ("1", True),
    ("", False), ("../../etc/passwd", False), ("1..2", False), ("1.02", True), ("1.2.", False),
    ("1" * 65, False), ("1.2/3", False), ("1.2\x00", False), (None, False),
])
def test_valid_uid(uid, ok):
    assert valid_uid(uid) is ok


def test_durable_copy_and_instance_header(tmp_path):
    ds = make_instance(seed=1)
    src = save(ds, tmp_path / "a.dcm")
    dst = durable_copy(src, tmp_path / "out" / "x" / "b.dcm")
    assert dst.read_bytes() == src.read_bytes()
    assert [p.name for p in dst.parent.iterdir()] == ["b.dcm"]  # no temporary file left
    inst = read_instance(dst)
    assert (inst.sop_instance_uid, inst.study_instance_uid) == (ds.SOPInstanceUID, ds.StudyInstanceUID)
    assert inst.size == dst.stat().st_size and not inst.owned


def test_durable_copy_into_a_file_fails_cleanly(tmp_path):
    src = save(make_instance(seed=1), tmp_path / "a.dcm")
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(OSError):
        durable_copy(src, tmp_path / "blocker" / "b.dcm")


def test_check_complete_finds_truncation(tmp_path):
    good = save(make_instance(seed=2), tmp_path / "good.dcm")
    assert check_complete(good).SOPInstanceUID
    data = good.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 40)
    for name in ("cut.dcm", "junk.dcm"):
        with pytest.raises(CorruptDataset):
            check_complete(tmp_path / name)


def test_staging_is_per_process_and_cleans_up_after_dead_ones(tmp_path):
    dead = tmp_path / "99999999"
    dead.mkdir()
    (dead / "left.dcm").write_bytes(b"x")
    staging = Staging(tmp_path).ensure()
    assert staging.folder == tmp_path / str(os.getpid()) and staging.folder.is_dir()
    assert not dead.exists()
    p = staging.new_path()
    p.write_bytes(b"y")
    staging.clear()
    assert not staging.folder.exists()


def test_identifier_parsing():
    ds = identifier_from_json({"00080052": {"vr": "CS", "Value": ["SERIES"]}, "0020000D": {"vr": "UI"}})
    assert query_level(ds) == "SERIES" and query_level(ds, "study") == "STUDY"
    for bad in ([1], "x", {"0020000D": {"vr": "ZZ", "Value": ["1"]}}, {"nottag": {}}):
        with pytest.raises(BadRequest):
            identifier_from_json(bad)
    with pytest.raises(BadRequest):
        query_level(identifier_from_json({}))


@pytest.mark.parametrize("error,op,status", [
    ("BadRequest", "C-FIND", 0xA900), ("BadRequest", "C-STORE", 0xC000),
    ("BackendUnavailable", "C-GET", 0xC001), ("BackendTimeout", "C-MOVE", 0xC002),
    ("Forbidden", "C-STORE", 0x0124), ("AuthenticationFailed", "C-FIND", 0xC000),
    ("InsufficientStorage", "C-STORE", 0xA700), ("InsufficientStorage", "C-GET", 0xA702),
    ("MiddlewareFailed", "C-STORE", 0x0110), ("MiddlewareFailed", "C-FIND", 0xC000),
])
def test_harmony_errors_map_to_dimse_statuses(error, op, status):
    from harmony import errors
    from harmony.endpoints.dicom_scp import DicomScpEndpoint, dimse_status_for
    from harmony.envelope import RequestEnvelope
    err = getattr(errors, error)("detail")
    assert dimse_status_for(err, op) == status
    ep = DicomScpEndpoint("scp", None, local_aet="H")
    resp = ep.error_response(err, RequestEnvelope(metadata={"dimse_op": op}))
    assert resp.state.dimse_status == status and resp.metadata["dimse_status"] == f"0x{status:04X}"
    assert resp.status == err.status
