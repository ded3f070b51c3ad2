"""harmony.dicom.ul.datasets: the group-0002 header of every received instance
(written directly, equal to what pydicom writes), and identifiers and matches relayed
as received: ``identifier_json`` gives exactly the DICOM JSON pydicom gives (middleware
reads it) or ``None``; ``ReceivedIdentifier`` is a Dataset like any other once looked
into, and the received bytes only while nobody did."""

from __future__ import annotations

from io import BytesIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info

from harmony.dicom.dicomjson import identifier_to_json
from harmony.dicom.ul import datasets
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


IMPLICIT, EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
KEYWORDS = ["PatientName", "PatientID", "StudyDate", "StudyTime", "ModalitiesInStudy", "StudyInstanceUID",
            "AccessionNumber", "QueryRetrieveLevel", "StudyDescription", "ReferringPhysicianName", "PatientSex",
            "RetrieveAETitle", "PatientAge", "AcquisitionDateTime", "NumberOfStudyRelatedInstances",
            "SOPClassesInStudy"]
TEXT = st.text(alphabet="AB1.^ -*?\\", max_size=10)


def encoded(ds: Dataset, syntax: str) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, syntax == IMPLICIT
    write_dataset(out, ds)
    return out.getvalue()


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the odd values drawn
@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYWORDS), TEXT, min_size=1), st.sampled_from([IMPLICIT, EXPLICIT]))
def test_identifier_json_is_pydicoms_json(values, syntax):
    ds = _drawn_identifier(values)
    fast, reference = _fast_and_pydicom_json(ds, syntax)
    assert fast is None or fast == reference


def _drawn_identifier(values: dict) -> Dataset:
    """An identifier of the drawn text values, numbers and UIDs made of what their VRs allow."""
    ds = Dataset()
    for keyword, value in values.items():
        if keyword == "NumberOfStudyRelatedInstances":
            value = "".join(c for c in value if c.isdigit())[:4]
        elif keyword.endswith("UID") or keyword == "SOPClassesInStudy":
            value = "".join(c for c in value if c in "1.\\")
        setattr(ds, keyword, value)
    return ds


def _fast_and_pydicom_json(ds: Dataset, syntax: str) -> tuple:
    """(identifier_json's DICOM JSON, pydicom's) of *ds* written in *syntax*; both ``None``
    when pydicom itself cannot write or read the drawn values back."""
    try:
        data = encoded(ds, syntax)
        reference = identifier_to_json(datasets.decode(data, syntax))
    except Exception:  # noqa: BLE001 - a value pydicom itself cannot write or read back
        return None, None
    return datasets.identifier_json(data, syntax), reference


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the odd values drawn
@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYWORDS), TEXT, min_size=1), st.sampled_from([IMPLICIT, EXPLICIT]),
       st.sampled_from(["STUDY", "SERIES", "IMAGE", "study", " STUDY", "STUDY\\SERIES", ""]))
def test_identifier_level_is_read_only_from_identifiers_identifier_json_converts(values, syntax, level):
    """dicom_scp makes a C-FIND's JSON only when read: an identifier whose level it read
    without converting must convert later (so none that should be refused goes to the PACS),
    with that level as its one plain value (so dicom_scu may relay it as received)."""
    ds = _drawn_identifier(values)
    ds.QueryRetrieveLevel = level
    try:
        data = encoded(ds, syntax)
    except Exception:  # noqa: BLE001 - a value pydicom itself cannot write
        return
    read = datasets.identifier_level(data, syntax)
    # Read again, from the cache of recent identifiers: the same answer as reading the bytes.
    assert datasets.identifier_level(data, syntax) == read == datasets._identifier_level(data, syntax)
    if read is None:
        return
    doc = datasets.identifier_json(data, syntax)
    assert doc is not None
    assert read == (level if level else "")
    assert doc["00080052"].get("Value", [""]) == [read] if read else "Value" not in doc["00080052"]


def test_identifier_level_declines_what_identifier_json_would_not_take():
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = "SYN-1"
    assert datasets.identifier_level(encoded(ds, IMPLICIT), IMPLICIT) == "STUDY"
    assert datasets.identifier_level(encoded(ds, EXPLICIT), EXPLICIT) == "STUDY"
    assert datasets.identifier_level(encoded(Dataset(), IMPLICIT), IMPLICIT) == ""
    ds.NumberOfStudyRelatedInstances = "3"           # a number identifier_json checks: converted at once
    assert datasets.identifier_level(encoded(ds, IMPLICIT), IMPLICIT) is None
    del ds.NumberOfStudyRelatedInstances
    ds.PatientName = "Yamada^Tarou=山田^太郎"          # not ASCII
    ds.SpecificCharacterSet = "ISO_IR 192"
    assert datasets.identifier_level(encoded(ds, EXPLICIT), EXPLICIT) is None
    del ds.PatientName, ds.SpecificCharacterSet
    ds.PatientName = "A=B"                           # a PN identifier_json leaves to pydicom
    assert datasets.identifier_level(encoded(ds, EXPLICIT), EXPLICIT) is None
    del ds.PatientName
    ds.ReferencedStudySequence = [Dataset()]        # not flat
    assert datasets.identifier_level(encoded(ds, EXPLICIT), EXPLICIT) is None
    del ds.ReferencedStudySequence
    whole = encoded(ds, IMPLICIT)
    assert datasets.identifier_level(whole[:-3], IMPLICIT) is None            # cut short
    assert datasets.identifier_level(whole, "1.2.840.10008.1.2.2") is None    # big endian


NUMBERS = st.fixed_dictionaries({}, optional={
    "SliceThickness": st.from_regex(r"\A ?[+-]?[0-9]{1,4}(\.[0-9]{0,3})?\Z"),
    "WindowCenter": st.lists(st.from_regex(r"\A[+-]?[0-9]{1,3}(\.[0-9]{1,2})?(e[+-]?[0-9])?\Z"), min_size=1,
                             max_size=3).map("\\".join),
    "InstanceNumber": st.from_regex(r"\A ?[+-]?[0-9]{1,6}\Z"),
    "NumberOfStudyRelatedInstances": st.from_regex(r"\A[0-9]{0,4}\Z"),
    "Rows": st.integers(0, 65535), "PixelPaddingValue": st.integers(-32768, 32767)})


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=300, deadline=None)
@given(NUMBERS, st.sampled_from([IMPLICIT, EXPLICIT]))
def test_identifier_json_gives_numbers_as_pydicom_does(values, syntax):
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    for keyword, value in values.items():
        if keyword == "PixelPaddingValue":
            ds.add_new(0x00280120, "SS", value)   # "US or SS" in the dictionary: the VR given
        else:
            setattr(ds, keyword, value)
    fast, reference = _fast_and_pydicom_json(ds, syntax)
    assert fast == reference or fast is None and syntax == IMPLICIT and "PixelPaddingValue" in values


def test_identifier_json_leaves_the_rest_to_pydicom():
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Hans"
    assert datasets.identifier_json(encoded(ds, EXPLICIT), EXPLICIT) is None      # not ASCII
    ds = Dataset()
    ds.NumberOfStudyRelatedInstances = "3"
    assert datasets.identifier_json(encoded(ds, IMPLICIT), IMPLICIT) == {"00201208": {"vr": "IS", "Value": [3]}}
    ds.NumberOfStudyRelatedInstances = "3.0"                                        # not an integer string
    assert datasets.identifier_json(encoded(ds, IMPLICIT), IMPLICIT) is None
    assert datasets.identifier_json(b"\x08\x00\x52\x00CS\x06\x00STUDY ", "1.2.840.10008.1.2.2") is None  # big endian


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the odd values drawn
@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYWORDS), TEXT, min_size=1), st.sampled_from([IMPLICIT, EXPLICIT]),
       st.sets(st.sampled_from(["00201206", "00080061", "00100030", "00081190", "00200011"])))
def test_identifier_bytes_are_the_bytes_pydicom_writes(values, syntax, empty):
    from harmony.dicom import charset
    from harmony.dicom.dicomjson import identifier_from_json
    from harmony.dicomweb.qido import vr_of

    ds = Dataset()
    for keyword, value in values.items():
        if keyword == "NumberOfStudyRelatedInstances":
            value = ""
        elif keyword.endswith("UID") or keyword == "SOPClassesInStudy":
            value = "".join(c for c in value if c in "1.\\")
        setattr(ds, keyword, value)
    try:
        doc = identifier_to_json(ds)
    except Exception:  # noqa: BLE001 - a value pydicom cannot give as JSON
        return
    for tag in empty:
        doc.setdefault(tag, {"vr": vr_of(tag)})
    try:
        reference = datasets.encode(charset.declare(identifier_from_json(doc)), syntax)
    except Exception:  # noqa: BLE001 - what pydicom cannot write is never taken on the fast path either
        assert datasets.identifier_bytes(doc, syntax) is None
        return
    fast = datasets.identifier_bytes(doc, syntax)
    assert fast is None or fast == reference


def test_identifier_bytes_take_a_qido_identifier_and_leave_the_rest_to_pydicom():
    doc = {"00080052": {"vr": "CS", "Value": ["STUDY"]}, "00100020": {"vr": "LO", "Value": ["BENCH"]},
           "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^J*"}]}, "0020000D": {"vr": "UI"},
           "00201208": {"vr": "IS"}, "00080020": {"vr": "DA", "Value": ["20200101-20201231"]}}
    for syntax in (IMPLICIT, EXPLICIT):
        data = datasets.identifier_bytes(doc, syntax)
        assert data is not None and datasets.identifier_json(data, syntax) == doc
    for odd in ({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller"}]}},          # not ASCII
                {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "A", "Ideographic": "B"}]}},
                {"00201208": {"vr": "IS", "Value": [3]}},                                # a number
                {"00081110": {"vr": "SQ", "Value": [{}]}},                               # a sequence
                {"0010002": {"vr": "LO"}}, {"00100020": {"vr": "LO", "Value": "X"}}):
        assert datasets.identifier_bytes(odd, IMPLICIT) is None, odd
    assert datasets.identifier_bytes(doc, "1.2.840.10008.1.2.1.99") is None             # deflated


def test_a_received_match_is_sent_as_received_until_looked_into():
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Hans"
    ds.StudyInstanceUID = "1.2.3"
    data = encoded(ds, IMPLICIT)
    match = datasets.ReceivedIdentifier(data, IMPLICIT)
    assert not match.decoded
    assert datasets.encode_relayed(match, IMPLICIT) is match.received
    assert datasets.encode_relayed(match, EXPLICIT) == encoded(ds, EXPLICIT)   # another syntax: re-encoded
    match = datasets.ReceivedIdentifier(data, IMPLICIT)
    assert str(match.PatientName) == "Müller^Hans" and match.decoded
    match.PatientName = "Other^Name"                                           # what a middleware may do
    ds.PatientName = "Other^Name"
    assert datasets.encode_relayed(match, IMPLICIT) == encoded(ds, IMPLICIT)
    assert match == ds


def test_the_head_of_a_data_set_names_its_study_and_series():
    from pydicom.sequence import Sequence
    ds = Dataset()
    ds.SOPClassUID = "1.2"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    ds.ReferencedImageSequence = Sequence([item])
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.5"
    for syntax in (IMPLICIT, EXPLICIT):
        data = encoded(ds, syntax)
        assert datasets.head_uids(data, syntax == IMPLICIT) == ("1.2.3.4", "1.2.3.4.5")


def _store_command(sop_instance="1.2.3.4.5.6"):
    return {"AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.1.7", "AffectedSOPInstanceUID": sop_instance}


def test_a_small_instance_is_held_whole_as_the_part_ten_file_a_file_sink_writes(tmp_path):
    """The held bytes are the very file PartTenSink would have written: meta, then the data set."""
    fragments = [b"\x08\x00\x16\x00" + b"x" * 60, b"y" * 300, b"z" * 7]
    held = datasets.HeldSink(_store_command(), EXPLICIT, limit=10_000, hold=4096, spill=None, source_aet="MOD")
    on_disk = datasets.PartTenSink(tmp_path / "f.dcm", _store_command(), EXPLICIT, limit=10_000, source_aet="MOD")
    for fragment in fragments:
        held.write(memoryview(fragment))
        on_disk.write(memoryview(fragment))
    assert held.close() == on_disk.close().read_bytes()
    assert held.received == sum(map(len, fragments)) and held.spilled is None


def test_a_held_instance_that_outgrows_the_hold_goes_on_into_a_file(tmp_path):
    made = []

    def spill():
        made.append(datasets.PartTenSink(tmp_path / "big.dcm", _store_command(), EXPLICIT, limit=100_000))
        return made[0]
    held = datasets.HeldSink(_store_command(), EXPLICIT, limit=100_000, hold=1000, spill=spill)
    chunks = [bytes([i]) * 400 for i in range(5)]
    for chunk in chunks:
        held.write(chunk)
    assert len(made) == 1 and held.spilled is made[0]
    path = held.close()
    assert path == tmp_path / "big.dcm"
    assert path.read_bytes()[held.meta_length:] == b"".join(chunks)
    assert held.received == 2000


def test_a_held_instance_over_the_limit_is_refused_and_abort_drops_it(tmp_path):
    held = datasets.HeldSink(_store_command(), EXPLICIT, limit=500, hold=4096, spill=None)
    held.write(b"a" * 400)
    with pytest.raises(datasets.PDUError):
        held.write(b"b" * 200)
    held.abort()


def test_identifier_levels_kept_are_bounded_and_large_identifiers_are_not_kept():
    """A flood of distinct identifiers (a hostile client) cannot grow the cache of levels."""
    for n in range(3 * datasets._MAX_LEVELS):
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.PatientID = f"SYN-{n}"
        assert datasets.identifier_level(encoded(ds, IMPLICIT), IMPLICIT) == "STUDY"
        assert len(datasets._LEVELS) <= datasets._MAX_LEVELS
    ds.StudyDescription = "X" * 2000
    datasets._LEVELS.clear()
    assert datasets.identifier_level(encoded(ds, IMPLICIT), IMPLICIT) == "STUDY"
    assert not datasets._LEVELS
