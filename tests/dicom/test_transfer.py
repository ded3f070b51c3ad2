"""harmony.dicom.transfer: transfer syntax names, decoders, presentation contexts per instance and
the uncompressed copy WADO-RS answers with, on synthetic pydicom files."""

from __future__ import annotations

from pydicom import dcmread
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)

from harmony.dicom import status as dimse
from harmony.dicom.transfer import SyntaxRefused, can_decompress, contexts_for, explicit_copy, name
from tests.dicom_data import make_instance, save


def test_names_and_decoders():
    assert name(RLELossless) == "RLE Lossless" and name("1.2.3.4") == "1.2.3.4"
    assert can_decompress(ExplicitVRLittleEndian) and can_decompress(RLELossless)


def test_one_context_per_syntax_stored_first_then_the_fallbacks():
    contexts = contexts_for(CTImageStorage, RLELossless)
    assert [str(c.transfer_syntax[0]) for c in contexts] == [RLELossless, ExplicitVRLittleEndian,
                                                             ImplicitVRLittleEndian]
    assert len(contexts_for(CTImageStorage, ExplicitVRLittleEndian)) == 2  # no duplicate


def test_a_refusal_explains_itself_within_a_dimse_comment():
    refused = SyntaxRefused(CTImageStorage, JPEGBaseline8Bit, [ImplicitVRLittleEndian])
    assert refused.status == dimse.UNABLE_TO_PROCESS_TRANSFER_SYNTAX
    assert "Implicit VR Little Endian" in str(refused) and len(refused.comment) <= 64
    assert "byte orders" in str(SyntaxRefused(CTImageStorage, ExplicitVRBigEndian, []))


def test_an_explicit_copy_is_decompressed_with_the_same_uid(tmp_path):
    original = make_instance(rows=8, cols=8, transfer_syntax=RLELossless, seed=3)
    path = save(original, tmp_path / "rle.dcm")
    copy = dcmread(explicit_copy(path, tmp_path / "out"))
    assert copy.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert copy.SOPInstanceUID == original.SOPInstanceUID
    assert (copy.pixel_array == dcmread(path).pixel_array).all()
