"""harmony.dicom.ul.datasets.file_meta_bytes: the group-0002 header of every
received instance, written directly, equal to what pydicom writes."""

from __future__ import annotations

from io import BytesIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info

from harmony.dicom.ul.datasets import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, file_meta_bytes

UIDS = st.from_regex(r"\A[1-9][0-9]{0,10}(\.[1-9][0-9]{0,8}){1,6}\Z")
AETS = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\"), min_size=1,
               max_size=16)


def pydicom_meta(sop_class, sop_instance, syntax, aet) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    if aet:
        meta.SourceApplicationEntityTitle = aet
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + buffer.getvalue()


@settings(max_examples=200, deadline=None)
@given(sop_class=UIDS, sop_instance=UIDS, syntax=UIDS, aet=st.one_of(st.none(), AETS))
def test_byte_identical_to_pydicom(sop_class, sop_instance, syntax, aet):
    assert file_meta_bytes(sop_class, sop_instance, syntax, aet) == pydicom_meta(sop_class, sop_instance, syntax,
                                                                                   aet)


@pytest.mark.parametrize("aet", [None, "STORESCU", "ODD"])
def test_pydicom_reads_it_back(aet):
    raw = file_meta_bytes("1.2.840.10008.5.1.4.1.1.7", "1.2.3.45", "1.2.840.10008.1.2.1", aet)
    ds = dcmread(BytesIO(raw + b"\x08\x00\x16\x00UI\x02\x001\x00"), force=False)
    meta = ds.file_meta
    assert meta.MediaStorageSOPInstanceUID == "1.2.3.45" and meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION
    assert meta.get("SourceApplicationEntityTitle") == aet
    assert meta.FileMetaInformationGroupLength == len(raw) - 128 - 4 - 12
