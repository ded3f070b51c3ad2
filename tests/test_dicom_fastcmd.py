"""harmony.dicom.fastcmd writes DIMSE command sets byte for byte as pydicom does."""

from io import BytesIO

from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pynetdicom import dimse, dimse_messages
from pynetdicom import dimse_primitives as P
from pynetdicom.dsutils import encode as pydicom_encode

from harmony.dicom import fastcmd, net  # noqa: F401 - net installs the encoder

FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def primitive(cls, **values):
    p = cls()
    for key, value in values.items():
        setattr(p, key, value)
    return p


def command_set(p) -> Dataset:
    table = dimse._RQ_TO_MESSAGE if p.MessageIDBeingRespondedTo is None else dimse._RSP_TO_MESSAGE
    msg = table[p.__class__]()
    msg.primitive_to_message(p)
    return msg.command_set


CASES = [
    primitive(P.C_ECHO, MessageID=1, AffectedSOPClassUID="1.2.840.10008.1.1"),
    primitive(P.C_ECHO, MessageIDBeingRespondedTo=1, AffectedSOPClassUID="1.2.840.10008.1.1", Status=0),
    primitive(P.C_FIND, MessageID=7, AffectedSOPClassUID=FIND, Priority=2, Identifier=BytesIO(b"xx")),
    primitive(P.C_FIND, MessageIDBeingRespondedTo=7, AffectedSOPClassUID=FIND, Status=0xFF00,
              Identifier=BytesIO(b"xx")),
    primitive(P.C_STORE, MessageID=65535, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.2",
              AffectedSOPInstanceUID="1.2.3.44", Priority=0, MoveOriginatorApplicationEntityTitle="ORIG",
              MoveOriginatorMessageID=3, DataSet=BytesIO(b"xx")),
    primitive(P.C_STORE, MessageIDBeingRespondedTo=9, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.2",
              AffectedSOPInstanceUID="1.2.3.4", Status=0xA700, ErrorComment="no room left"),
    primitive(P.C_MOVE, MessageID=3, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.2.2.2", Priority=0,
              MoveDestination="DEST", Identifier=BytesIO(b"xx")),
    primitive(P.C_GET, MessageIDBeingRespondedTo=3, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.2.2.3",
              Status=0xFF00, NumberOfRemainingSuboperations=5, NumberOfCompletedSuboperations=0,
              NumberOfFailedSuboperations=1, NumberOfWarningSuboperations=0),
    primitive(P.C_CANCEL, MessageIDBeingRespondedTo=3),
]


def test_installed_for_pynetdicom_messages():
    assert dimse_messages.encode is fastcmd.encode


def test_every_dimse_c_command_set_is_byte_identical():
    for p in CASES:
        ds = command_set(p)
        assert fastcmd.encode_command(ds) == pydicom_encode(ds, True, True), type(p).__name__


@settings(max_examples=200, deadline=None)
@given(msg_id=st.integers(0, 0xFFFF), status=st.integers(0, 0xFFFF),
       uid=st.from_regex(r"\A[1-9][0-9]{0,15}(\.[1-9][0-9]{0,8}){1,4}\Z"),
       comment=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=64),
       remaining=st.integers(0, 0xFFFF))
def test_store_and_get_responses_match_pydicom(msg_id, status, uid, comment, remaining):
    for p in (primitive(P.C_STORE, MessageIDBeingRespondedTo=msg_id, AffectedSOPClassUID=uid,
                        AffectedSOPInstanceUID=uid, Status=status, ErrorComment=comment or None),
              primitive(P.C_GET, MessageIDBeingRespondedTo=msg_id, AffectedSOPClassUID=uid, Status=status,
                        NumberOfRemainingSuboperations=remaining, NumberOfCompletedSuboperations=msg_id)):
        ds = command_set(p)
        assert fastcmd.encode(ds, True, True) == pydicom_encode(ds, True, True)


def test_anything_but_a_command_set_goes_to_pydicom():
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.StudyInstanceUID = "1.2.3"
    assert fastcmd.encode(ds, True, True) == pydicom_encode(ds, True, True)
    assert fastcmd.encode(ds, False, True) == pydicom_encode(ds, False, True)
    odd = Dataset()
    odd.OffendingElement = [0x00100010]  # AT: not a VR the direct path writes
    assert fastcmd.encode(odd, True, True) == pydicom_encode(odd, True, True)


# --------------------------------------------------------------------------- relayed identifiers

from pydicom.sequence import Sequence  # noqa: E402
from pynetdicom import service_class  # noqa: E402
from pynetdicom.dsutils import decode  # noqa: E402


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


def test_identifier_encoder_installed_for_scp_services():
    assert service_class.encode is fastcmd.encode_dataset


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
