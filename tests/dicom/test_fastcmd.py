"""harmony.dicom.fastcmd writes relayed C-FIND identifiers byte for byte as pydicom does.

(Command sets: tests/dicom/ul/test_commands.py.)"""

from io import BytesIO

from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom.dsutils import decode
from pynetdicom.dsutils import encode as pydicom_encode

from harmony.dicom import fastcmd


def match(name="DOE^JANE", study="1.2.840.99.1", charset=None) -> Dataset:
    ds = Dataset()
    if charset:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = name
    ds.PatientID = "P1"
    ds.StudyInstanceUID = study
    ds.StudyDate = "20240102"
    ds.ModalitiesInStudy = ["CT", "MR"]
    ds.NumberOfStudyRelatedInstances = 12
    ds.RetrieveAETitle = "PACS"
    ds.add_new(0x00091010, "LO", "private")
    return ds


def relayed(ds, implicit):
    return decode(BytesIO(pydicom_encode(ds, implicit, True)), implicit, True)


def test_a_relayed_match_goes_out_byte_identical():
    for implicit in (True, False):
        for ds in (match(), match(study="1.2.3.4.5.6.7.8.9.10"), match(charset="ISO_IR 192"), match(name="")):
            wire = relayed(ds, implicit)
            expected = pydicom_encode(relayed(ds, implicit), implicit, True)
            assert fastcmd.encode_dataset(wire, implicit, True) == expected
            if ds.PatientName:  # the direct path, not the fallback (pydicom converts some empty values)
                assert fastcmd.encode_raw(wire, implicit) == expected


def test_padding_beyond_one_byte_follows_pydicom_across_vr_encodings():
    """A name of spaces (or a value with extra trailing spaces) relayed from
    Explicit to Implicit VR: pydicom converts the element and writes it
    without the extra padding, and so must the fast path (found by the
    property test below, as name=' ', explicit in, implicit out)."""
    for name in (" ", "DOE^JANE   ", "A ^B  "):
        for implicit in (True, False):
            ds = match(name=name)
            wire = relayed(ds, implicit)
            assert fastcmd.encode_dataset(wire, not implicit, True) == pydicom_encode(relayed(ds, implicit),
                                                                                       not implicit, True), name


@settings(max_examples=100, deadline=None)
@given(name=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"), max_size=40),
       pid=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\"), max_size=16),
       count=st.integers(0, 2 ** 31 - 1), implicit=st.booleans(), out_implicit=st.booleans())
def test_relayed_matches_match_pydicom(name, pid, count, implicit, out_implicit):
    ds = match(name=name)
    ds.PatientID = pid
    ds.NumberOfStudyRelatedInstances = count
    wire = relayed(ds, implicit)
    assert fastcmd.encode_dataset(wire, out_implicit, True) == pydicom_encode(relayed(ds, implicit),
                                                                              out_implicit, True)


def test_changed_converted_or_reencoded_matches_go_to_pydicom():
    wire = relayed(match(), True)
    wire.PatientName = "CHANGED^BY^MIDDLEWARE"
    out = fastcmd.encode_dataset(wire, True, True)
    assert b"CHANGED^BY^MIDDLEWARE" in out
    assert out == pydicom_encode(wire, True, True)

    wire = relayed(match(), True)
    _ = wire.PatientName  # converted on access
    assert fastcmd.encode_dataset(wire, True, True) == pydicom_encode(relayed(match(), True), True, True)

    for implicit in (True, False):  # in one VR encoding, out in the other
        wire = relayed(match(), implicit)
        expected = pydicom_encode(relayed(match(), implicit), not implicit, True)
        assert fastcmd.encode_dataset(wire, not implicit, True) == expected
        public, reference = relayed(match(charset="ISO_IR 100"), implicit), relayed(match(charset="ISO_IR 100"),
                                                                                      implicit)
        del public[0x00091010], reference[0x00091010]  # without the private element: the direct path
        assert fastcmd.encode_raw(public, not implicit) == pydicom_encode(reference, not implicit, True)

    with_seq = match()
    item = Dataset()
    item.CodeValue = "X"
    with_seq.ProcedureCodeSequence = Sequence([item])
    for implicit in (True, False):
        wire = relayed(with_seq, implicit)
        assert fastcmd.encode_dataset(wire, implicit, True) == pydicom_encode(relayed(with_seq, implicit),
                                                                             implicit, True)
    built = match()  # never decoded: no original encoding
    assert fastcmd.encode_dataset(built, True, True) == pydicom_encode(match(), True, True)
