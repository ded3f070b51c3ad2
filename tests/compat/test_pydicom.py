"""Each private pydicom name in harmony.compat.pydicom still exists and works."""

from __future__ import annotations

import io

from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_preamble
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from harmony.compat import pydicom as compat


def _part10(charset: str = "ISO_IR 192") -> bytes:
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.PatientName = "Synthetic^Ünïcode"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_read_file_meta_info_stops_where_the_data_set_starts():
    data = _part10()
    f = io.BytesIO(data)
    read_preamble(f, False)
    meta = compat.read_file_meta_info(f)
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert data[f.tell():f.tell() + 4] == b"\x08\x00\x05\x00"  # (0008,0005) Specific Character Set


def test_dataset_character_set_is_the_decoded_encoding():
    ds = dcmread(io.BytesIO(_part10("ISO_IR 192")))
    assert compat.dataset_character_set(ds) == ["UTF8"] == ds.original_character_set
    latin = dcmread(io.BytesIO(_part10("ISO_IR 100")))
    assert compat.dataset_character_set(latin) != compat.dataset_character_set(ds)
