"""The one UID policy (harmony.dicom.uids), and defect 9 of issue 12: an
instance with leading-zero UID components, as real modalities send them, was
filed by the store but refused by ``dicom_scp`` (0xC000) and by the DICOMweb
routes (400).  Now ``storescu`` stores it and WADO-RS returns it."""

from __future__ import annotations

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st

from harmony.dicom import uids
from harmony.dicomweb.uids import check_uid
from harmony.errors import BadRequest
from harmony.jmix.dicom import valid_uid as jmix_valid
from harmony.storage.errors import InvalidInstance
from harmony.storage.uids import clean_uid
from tests.dicom_data import make_instance, save
from tests.dicomweb_helpers import client, in_thread, same_dataset
from tests.endpoints.test_dicom_scp_peers import run

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

#: Shaped like a GE scanner's UIDs: "0113654" has a leading zero.
LEADING_ZERO_ROOT = "1.2.840.0113654.2.70.1.99"


@pytest.mark.parametrize("value,ok", [
    ("1.2.840.10008.5.1.4.1.1.2", True), ("0", True), ("1.02", True), (LEADING_ZERO_ROOT, True),
    ("1" * 64, True), ("1" * 65, False), ("", False), (".", False), ("1.", False), (".1", False),
    ("1..2", False), ("../x", False), ("1/2", False), ("1.2\x00", False), ("1.2 ", False), ("1.2a", False),
    ("１.２", False), (None, False), (12, False),
])
def test_one_rule_everywhere(value, ok):
    assert uids.is_uid(value) is ok
    # Every former holder of its own regex now answers the same.
    assert jmix_valid(value) is ok
    if isinstance(value, str):
        if ok:
            assert check_uid(value) == value
        else:
            with pytest.raises(BadRequest):
                check_uid(value)


def test_padding_is_stripped_on_input():
    assert uids.clean("1.2.3\x00") == "1.2.3"
    assert uids.clean("1.02 ") == "1.02"
    assert uids.clean("1..2") is None
    assert clean_uid("1.02\x00") == "1.02"
    with pytest.raises(InvalidInstance):
        clean_uid("..")


@given(st.text(max_size=80))
def test_whatever_passes_is_path_safe(text):
    if uids.is_uid(text):
        parts = text.split(".")
        assert all(p.isdigit() and p.isascii() for p in parts)
        assert "/" not in text and "\\" not in text and text not in (".", "..") and len(text) <= 64


@pytest_twisted.ensureDeferred
async def test_leading_zero_instance_stores_and_retrieves(gateway, tmp_path):
    ds = make_instance(patient_id="UIDPOLICY", study_uid=LEADING_ZERO_ROOT + ".1",
                       series_uid=LEADING_ZERO_ROOT + ".1.01", sop_uid=LEADING_ZERO_ROOT + ".1.01.001")
    path = save(ds, tmp_path / "lz.dcm")
    r = await run("storescu", "-aec", "HARMONY", "127.0.0.1", gateway.archive_port, path)
    assert r.returncode == 0 and b"E:" not in r.stderr, r.stderr
    assert b"0xc000" not in r.stderr.lower(), r.stderr
    web = client(gateway.url("/dicomweb"))
    got = await in_thread(web.retrieve_instance, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                          media_types=[("application/dicom", "*")])
    assert got.SOPInstanceUID == LEADING_ZERO_ROOT + ".1.01.001"
    assert same_dataset(got, ds)
    found = await in_thread(web.search_for_instances, ds.StudyInstanceUID)
    assert [f["00080018"]["Value"][0] for f in found] == [ds.SOPInstanceUID]
