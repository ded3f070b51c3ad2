"""harmony.dicom.rawjson: an element's DICOM JSON from its bytes equals pydicom's, or is left to pydicom."""

from __future__ import annotations

import json
import struct

from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.tag import Tag

from harmony.dicom.rawjson import element_json, finite_json

#: One standard tag per VR (their dictionary VR is the same, for the implicit-VR case).
TAG_OF_VR = {
    "AE": 0x00080054, "AS": 0x00101010, "CS": 0x00080060, "DA": 0x00080020, "DT": 0x0008002A,
    "TM": 0x00080030, "UI": 0x0020000D, "LO": 0x00081030, "SH": 0x00080050, "UC": 0x00080120,
    "PN": 0x00100010, "LT": 0x00204000, "ST": 0x00080081, "UT": 0x00400602, "IS": 0x00200013,
    "DS": 0x00280030, "US": 0x00280010, "SS": 0x00189219, "UL": 0x00081161, "SL": 0x00186020,
    "FL": 0x00181320, "FD": 0x00189089, "AT": 0x00280009,
}
TEXT_CHARS = st.sampled_from(list("AZaz09 .\\\0=+-eE^:") + ["\u00e9"])
NUMERIC_TEXT = st.sampled_from(list("0123456789 .\\+-eE"))


def pydicom_json(raw) -> str:
    """pydicom's JSON, NaN and infinities as strings the way Harmony writes every element's."""
    elem = convert_raw_data_element(raw)
    return json.dumps(finite_json(DataElement.to_json_dict(elem, None, 1 << 30)), sort_keys=True)


def raw_element(vr: str, value: bytes, implicit: bool) -> RawDataElement:
    return RawDataElement(Tag(TAG_OF_VR[vr]), None if implicit else vr, len(value), value, 0, implicit, True)


@st.composite
def values(draw):
    vr = draw(st.sampled_from(sorted(TAG_OF_VR)))
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "AT"):
        value = draw(st.binary(max_size=24))
    else:
        alphabet = NUMERIC_TEXT if vr in ("IS", "DS") and draw(st.booleans()) else TEXT_CHARS
        text = draw(st.text(alphabet, max_size=24))
        value = text.encode("latin-1")
    return vr, value, draw(st.booleans())


@settings(max_examples=1500, deadline=None)
@given(values())
@example(("FD", struct.pack("<2d", float("nan"), 1.5), False))
@example(("DS", b"1e999\\-1e999", False))   # out of a double's range: infinite
def test_equals_pydicom_or_declines(case):
    vr, value, implicit = case
    raw = raw_element(vr, value, implicit)
    fast = element_json(raw)
    if fast is None:
        return
    try:
        expected = pydicom_json(raw)
    except Exception:  # noqa: BLE001 - pydicom refused a value we converted: a difference
        raise AssertionError(f"pydicom refuses {vr} {value!r}, rawjson gave {fast}") from None
    assert json.dumps(fast, sort_keys=True) == expected, (vr, value)


def test_common_elements_take_the_fast_way():
    """The shapes real instances carry are converted here, not declined (else nothing is saved)."""
    cases = [("UI", b"1.2.840.10008.5.1.4.1.1.2\0", {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]}),
             ("PN", b"Doe^John", {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}),
             ("CS", b"ORIGINAL\\PRIMARY ", {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY"]}),
             ("DS", b"0.5\\0.5 ", {"vr": "DS", "Value": [0.5, 0.5]}),
             ("IS", b"12", {"vr": "IS", "Value": [12]}),
             ("US", struct.pack("<H", 512), {"vr": "US", "Value": [512]}),
             ("FD", struct.pack("<2d", 1.5, -2.0), {"vr": "FD", "Value": [1.5, -2.0]}),
             ("FL", struct.pack("<3f", float("nan"), float("inf"), -float("inf")),
              {"vr": "FL", "Value": ["NaN", "Infinity", "-Infinity"]}),
             ("LO", b"", {"vr": "LO"})]
    for vr, value, expected in cases:
        for implicit in (False, True):
            raw = raw_element(vr, value, implicit)
            assert element_json(raw) == expected
            assert json.loads(pydicom_json(raw)) == expected


def test_declines_what_pydicom_must_decide():
    assert element_json(raw_element("LO", "Müller".encode("latin-1"), False)) is None   # the character set's
    assert element_json(raw_element("PN", b"Yamada^Tarou=\x1b$B;3ED\x1b(B", False)) is None
    assert element_json(raw_element("IS", b"1.0", False)) is None
    assert element_json(RawDataElement(Tag(0x00281101), "US", 6, b"\0\x80\0\0\x10\0", 0, False, True)) is None
    deferred = RawDataElement(Tag(0x00081030), "LO", 300, None, 0, False, True)
    assert element_json(deferred) is None
    private = RawDataElement(Tag(0x00091010), None, 2, b"AB", 0, True, True)
    assert element_json(private) is None


def test_whole_instances_describe_as_before(tmp_path, monkeypatch):
    """The index attributes and stored WADO-RS metadata of a varied instance (explicit and implicit
    VR, a sequence, a private element, Latin-1 text) are the same with and without the fast way."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.uid import ImplicitVRLittleEndian

    from harmony.dicomweb import dicomjson
    from harmony.storage import query
    from harmony.storage.store import metadata_of
    from tests.dicom_data import make_instance, save

    for syntax in (None, ImplicitVRLittleEndian):
        ds = make_instance(sop_uid="1.2.826.0.1.3680043.10.1442.77.1", **({"transfer_syntax": syntax} if syntax
                                                                          else {}))
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Müller^Jürgen"
        ds.PixelSpacing = ["0.5", "0.5"]
        ds.ImagePositionPatient = ["-125.0", "-125.0", "12.5"]
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.ImageComments = "x" * 400    # deferred at ingest (over defer_size)
        ds.SliceThickness = "1.25"
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-D3000", "SRT", "Chest"
        ds.AnatomicRegionSequence = [item]
        ds.add_new(0x00090010, "LO", "ACME")
        ds.add_new(0x00091001, "LO", "private text")
        path = save(ds, tmp_path / f"{syntax or 'explicit'}.dcm")

        def describe():
            parsed = dcmread(path, defer_size=256)
            return query.attrs_from_dataset(parsed), metadata_of(parsed, "1.2", "1.2.3", "1.2.3.4")

        fast = describe()
        monkeypatch.setattr(dicomjson, "element_json", lambda raw: None)
        monkeypatch.setattr(query, "element_json", lambda raw: None)
        assert fast == describe()
        monkeypatch.undo()
        assert fast[0]["00100010"]["Value"] == [{"Alphabetic": "Müller^Jürgen"}]
        assert fast[0]["00280030"]["Value"] == [0.5, 0.5]
