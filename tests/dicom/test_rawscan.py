"""harmony.dicom.rawscan: a file's UIDs, index attributes and stored metadata read from its bytes
equal what pydicom's parse gives, a file pydicom refuses is refused, and what it cannot tell it
leaves to pydicom.

The files are written byte by byte here (not by pydicom), so odd lengths, undefined-length
sequences and items, implicit VR, encapsulated pixel data, values pydicom reads leniently and
cut-short files all occur; pydicom reading them is the oracle.
"""

from __future__ import annotations

import json
import struct
import warnings

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from harmony.dicom.files import CorruptDataset, check_complete
from harmony.dicom import rawscan
from harmony.dicom.rawscan import ScanDeclined, scan_bytes, scan_file
from harmony.dicom.ul.datasets import file_meta_bytes
from harmony.storage.errors import InvalidInstance
from harmony.storage.store import _header_of_dataset, _header_of_scan

EXPLICIT, IMPLICIT, JPEG = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}
#: Standard tags whose dictionary VR is the one given (so implicit VR reads them the same).
TAGS = {
    "AE": 0x00080054, "AS": 0x00101010, "CS": 0x00080060, "DA": 0x00080020, "DT": 0x0008002A,
    "TM": 0x00080030, "LO": 0x00081030, "SH": 0x00080050, "UC": 0x00080119, "PN": 0x00100010,
    "LT": 0x00204000, "ST": 0x00080081, "UT": 0x00400602, "IS": 0x00200013, "DS": 0x00280030,
    "US": 0x00280010, "SS": 0x00189219, "UL": 0x00081161, "SL": 0x00186020, "FL": 0x00181320,
    "FD": 0x00189089, "OB": 0x00420011, "OW": 0x00660023, "OF": 0x00660016, "OD": 0x00660022,
    "OL": 0x00660040, "AT": 0x00280009,
}
BINARY_SIZE = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "OB": 1, "OW": 2, "OF": 4, "OD": 8, "OL": 4,
               "AT": 4}
SQ_TAG = 0x00082218  # Anatomic Region Sequence
CODE_TAGS = {0x00080100: "SH", 0x00080102: "SH", 0x00080104: "LO"}  # inside items
SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
TEXT = st.text(st.sampled_from(list("AZaz09 .\\\0=+-^:") + ["\u00e9"]), max_size=20)
NUMBER_TEXT = st.text(st.sampled_from(list("0123456789 .\\+-eE")), max_size=16)
#: Mostly one plain UID; sometimes two, a leading space, or empty (pydicom's own rules decide).
STUDY_UIDS = st.sampled_from(["1.2.3"] * 6 + ["1.2.3\\1.2.4 ", " 1.2.30", ""])
ASCII_TEXT = st.text(st.sampled_from(list("AZaz09 .^")), max_size=20)


def element(tag: int, vr: str, value: bytes, implicit: bool, undefined: bool = False) -> bytes:
    length = 0xFFFFFFFF if undefined else len(value)
    if implicit:
        return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, length) + value
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), length) + value


def sequence(tag: int, items: list[bytes], implicit: bool, undefined: bool, undefined_items: bool) -> bytes:
    body = b""
    for item in items:
        if undefined_items:
            body += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + item + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        else:
            body += struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item
    if undefined:
        body += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return element(tag, "SQ", body, implicit, undefined)


def uid_value(text: str) -> bytes:
    raw = text.encode()
    return raw + b"\0" if len(raw) % 2 else raw


@st.composite
def value_of(draw, vr: str) -> bytes:
    if vr in BINARY_SIZE:
        if draw(st.integers(0, 3)) == 0:
            return draw(st.binary(max_size=40))   # any length, a whole number of values or not
        return draw(st.binary(min_size=BINARY_SIZE[vr], max_size=BINARY_SIZE[vr])) * draw(st.integers(0, 3))
    alphabet = NUMBER_TEXT if vr in ("IS", "DS") and draw(st.booleans()) else (
        TEXT if draw(st.integers(0, 3)) == 0 else ASCII_TEXT)
    return draw(alphabet).encode("latin-1")


@st.composite
def instances(draw):
    """A Part-10 file's bytes, its elements' shapes drawn at random, and the syntax."""
    syntax = draw(st.sampled_from([EXPLICIT, EXPLICIT, IMPLICIT, JPEG]))
    implicit = syntax == IMPLICIT
    sop = "1.2.826.0.1.3680043.10.1442.9." + str(draw(st.integers(1, 10**6)))
    parts: dict[int, bytes] = {
        0x00080016: element(0x00080016, "UI", uid_value(SOP_CLASS), implicit),
        0x00080018: element(0x00080018, "UI", uid_value(sop), implicit),
        0x0020000D: element(0x0020000D, "UI", uid_value(draw(STUDY_UIDS)), implicit),
        0x0020000E: element(0x0020000E, "UI", uid_value("1.2.3.4"), implicit),
    }
    if draw(st.integers(0, 9)) == 0:
        del parts[draw(st.sampled_from(sorted(parts)))]
    for vr in draw(st.lists(st.sampled_from(sorted(TAGS)), max_size=12, unique=True)):
        parts[TAGS[vr]] = element(TAGS[vr], vr, draw(value_of(vr)), implicit)
    if draw(st.booleans()):
        items = []
        for _ in range(draw(st.integers(0, 2))):
            item = b""
            for tag in sorted(draw(st.lists(st.sampled_from(sorted(CODE_TAGS)), max_size=3, unique=True))):
                item += element(tag, CODE_TAGS[tag], draw(value_of(CODE_TAGS[tag])), implicit)
            items.append(item)
        parts[SQ_TAG] = sequence(SQ_TAG, items, implicit, draw(st.booleans()), draw(st.booleans()))
    odd = draw(st.integers(0, 11))
    if odd == 0:      # a private creator and element
        parts[0x00090010] = element(0x00090010, "LO", b"ACME", implicit)
        parts[0x00091001] = element(0x00091001, "LO", b"private", implicit)
    elif odd == 1:    # a group length
        parts[0x00080000] = element(0x00080000, "UL", struct.pack("<I", 10), implicit)
    elif odd == 2:    # an implicit VR the dictionary leaves open (US or SS)
        parts[0x00280106] = element(0x00280106, "US", struct.pack("<H", 7), implicit)
    elif odd == 3:    # a known tag sent as UN
        parts[0x00081030] = element(0x00081030, "UN", b"UNKNOWN ", implicit)
    elif odd == 4:    # a character set
        parts[0x00080005] = element(0x00080005, "CS", b"ISO_IR 100", implicit)
    if syntax == JPEG:
        fragments = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, len(f)) + f
                             for f in (b"", draw(st.binary(min_size=2, max_size=64))))
        parts[0x7FE00010] = element(0x7FE00010, "OB", fragments + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0),
                                    implicit, undefined=True)
    elif draw(st.booleans()):
        parts[0x7FE00010] = element(0x7FE00010, "OW", bytes(draw(st.integers(0, 3000)) * 2), implicit)
    if draw(st.integers(0, 15)) == 0:
        parts[0xFFFCFFFC] = element(0xFFFCFFFC, "OB", b"\0" * 6, implicit)   # trailing padding
    body = b"".join(parts[tag] for tag in sorted(parts))
    return file_meta_bytes(SOP_CLASS, sop, syntax) + body


def by_pydicom(data: bytes):
    """The store's header from pydicom's parse alone (the way before the scanner)."""
    try:
        ds = check_complete(data)
    except CorruptDataset:
        return "corrupt"
    return _described(lambda: _header_of_dataset(ds))


def by_scan(data: bytes):
    """The store's header from the scanner, or 'declined' where it leaves the file to pydicom."""
    try:
        scan = scan_bytes(data)
    except ScanDeclined:
        return "declined"
    except CorruptDataset:
        return "corrupt"
    try:
        return _described(lambda: _header_of_scan(scan))
    except ScanDeclined:
        return "declined"


def _described(describe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # pydicom warns about the odd values drawn above
        try:
            header = describe()
        except InvalidInstance as e:
            return f"invalid: {e}"
    header.pop("bytes", None)
    return header


def float_instance(values: dict[str, list[float]]) -> bytes:
    """A file with FL/FD elements holding *values* (NaN and infinities included)."""
    sop = "1.2.826.0.1.3680043.10.1442.9.7"
    parts = [element(0x00080016, "UI", uid_value(SOP_CLASS), False),
             element(0x00080018, "UI", uid_value(sop), False),
             element(0x0020000D, "UI", uid_value("1.2.3"), False),
             element(0x0020000E, "UI", uid_value("1.2.3.4"), False)]
    for vr, numbers in values.items():
        code = "f" if vr == "FL" else "d"
        parts.append(element(TAGS[vr], vr, struct.pack(f"<{len(numbers)}{code}", *numbers), False))
    return file_meta_bytes(SOP_CLASS, sop, EXPLICIT) + b"".join(sorted(parts, key=lambda p: struct.unpack("<HH", p[:4])))


NAN, INF = float("nan"), float("inf")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
@example(float_instance({"FL": [NAN], "FD": [1.5, NAN]}))   # NaN never equals itself: once found by this test
def test_scan_describes_as_pydicom_or_declines(data):
    fast = by_scan(data)
    if fast == "declined":
        return
    assert fast == by_pydicom(data)


def refuse_constant(token):
    raise AssertionError(f"{token} is not JSON (RFC 8259): a browser's JSON.parse refuses it")


@pytest.mark.parametrize("describe", [by_scan, by_pydicom], ids=["scan", "pydicom"])
def test_nan_and_infinite_floats_are_strict_json(describe):
    """FL/FD values JSON cannot hold as numbers are strings, the same both ways, in the
    stored metadata and the index attributes alike."""
    header = describe(float_instance({"FL": [NAN, 2.5], "FD": [INF, -INF, NAN]}))
    assert isinstance(header, dict), header
    metadata = json.loads(header["metadata"], parse_constant=refuse_constant)
    assert metadata["00181320"] == {"vr": "FL", "Value": ["NaN", 2.5]}
    assert metadata["00189089"] == {"vr": "FD", "Value": ["Infinity", "-Infinity", "NaN"]}
    assert json.loads(json.dumps(header["attrs"]), parse_constant=refuse_constant)["00181320"]["Value"] == [
        "NaN", 2.5]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(), st.floats(0.0, 1.0))
def test_a_file_cut_short_is_refused_when_pydicom_refuses_it(data, where):
    """A cut-short file: whatever pydicom refuses the scanner refuses (or leaves to pydicom);
    what both accept is described the same."""
    cut = data[:int(len(data) * where)]
    fast, slow = by_scan(cut), by_pydicom(cut)
    if fast == "declined":
        return
    if slow == "corrupt":
        assert fast == "corrupt"
    elif fast != "corrupt":
        assert fast == slow


def common_instance(syntax: str) -> bytes:
    implicit = syntax == IMPLICIT
    parts = [element(0x00080005, "CS", b"ISO_IR 100", implicit),
             element(0x00080008, "CS", b"ORIGINAL\\PRIMARY\\AXIAL ", implicit),
             element(0x00080016, "UI", uid_value(SOP_CLASS), implicit),
             element(0x00080018, "UI", uid_value("1.2.826.0.1.3680043.10.1442.9.1"), implicit),
             element(0x00080020, "DA", b"20240102", implicit),
             element(0x00080060, "CS", b"CT", implicit),
             sequence(SQ_TAG, [element(0x00080100, "SH", b"T-D3000 ", implicit)], implicit, True, False),
             element(0x00100010, "PN", b"Doe^John", implicit),
             element(0x0020000D, "UI", uid_value("1.2.3"), implicit),
             element(0x0020000E, "UI", uid_value("1.2.3.4"), implicit),
             element(0x00200013, "IS", b"12", implicit),
             element(0x00280010, "US", struct.pack("<H", 16), implicit),
             element(0x00280030, "DS", b"0.5\\0.5 ", implicit),
             element(0x7FE00010, "OW", bytes(512), implicit)]
    return file_meta_bytes(SOP_CLASS, "1.2.826.0.1.3680043.10.1442.9.1", syntax) + b"".join(parts)


@pytest.mark.parametrize("syntax", [EXPLICIT, IMPLICIT])
def test_common_instances_are_read_without_pydicom(syntax):
    """The shapes real instances carry are scanned, not declined (else nothing is saved)."""
    data = common_instance(syntax)
    header = by_scan(data)
    assert isinstance(header, dict)
    assert header == by_pydicom(data)
    assert (header["study"], header["series"], header["sop"]) == ("1.2.3", "1.2.3.4", "1.2.826.0.1.3680043.10.1442.9.1")
    assert header["attrs"]["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}]}
    assert '"7FE00010":{"vr":"OW","BulkDataURI"' in header["metadata"]


def test_a_value_seen_in_an_earlier_file_reuses_its_json(monkeypatch):
    """The instances of a series repeat most values: the JSON made for one file's value is
    the next file's (the same object), and only for the same tag, VR and bytes; the
    memory of them is bounded."""
    first, second = scan_bytes(common_instance(EXPLICIT)), scan_bytes(common_instance(EXPLICIT))
    name = [e for e in first.elements if e.tag == 0x00100010][0], [e for e in second.elements if e.tag == 0x00100010][0]
    assert second.element_json(name[1]) is first.element_json(name[0])
    other = scan_bytes(common_instance(EXPLICIT).replace(b"Doe^John", b"Doe^Jane"))
    assert other.element_json([e for e in other.elements if e.tag == 0x00100010][0])["Value"] == [{"Alphabetic": "Doe^Jane"}]
    monkeypatch.setattr(rawscan, "_seen_json", {})
    monkeypatch.setattr(rawscan, "SEEN_VALUES", 3)
    fresh = scan_bytes(common_instance(EXPLICIT))
    converted = [fresh.element_json(e) for e in fresh.elements if e.vr not in ("SQ", "OB", "OW")]
    assert len(converted) > 3 and 0 < len(rawscan._seen_json) <= 3


def test_what_pydicom_must_decide_is_left_to_it(tmp_path):
    big_endian = file_meta_bytes(SOP_CLASS, "1.2.3", "1.2.840.10008.1.2.2") + element(0x00080060, "CS", b"CT", False)
    with pytest.raises(ScanDeclined):
        scan_bytes(big_endian)
    deflated = file_meta_bytes(SOP_CLASS, "1.2.3", "1.2.840.10008.1.2.1.99") + b"\x03\x00"
    with pytest.raises(ScanDeclined):
        scan_bytes(deflated)
    with pytest.raises(ScanDeclined):
        scan_bytes(b"\0" * 200)   # no DICM
    latin = common_instance(EXPLICIT).replace(b"Doe^John", "Müller^J".encode("latin-1"))
    scan = scan_bytes(latin)
    with pytest.raises(ScanDeclined):
        _header_of_scan(scan)
    assert scan.dataset().PatientName == "Müller^J"   # the fallback: pydicom's parse of the same bytes


def test_a_large_file_is_mapped_and_its_pixel_data_never_read(tmp_path):
    """Past WHOLE_READ_BYTES the file is mapped, not read: describing it reads the header pages only."""
    data = common_instance(EXPLICIT).replace(element(0x7FE00010, "OW", bytes(512), False),
                                             element(0x7FE00010, "OW", bytes(2 << 20), False))
    path = tmp_path / "large.dcm"
    path.write_bytes(data)
    scan = scan_file(path)
    try:
        assert not isinstance(scan.data, bytes)
        assert scan.get(0x7FE00010).length == 2 << 20
        assert _header_of_scan(scan)["sop"] == "1.2.826.0.1.3680043.10.1442.9.1"
    finally:
        scan.close()


def test_corrupt_files_are_refused():
    data = common_instance(EXPLICIT)
    with pytest.raises(CorruptDataset):
        scan_bytes(data[:-100])   # pixel data cut short
    unterminated = file_meta_bytes(SOP_CLASS, "1.2.3", EXPLICIT) + sequence(SQ_TAG, [b""], False, True, False)[:-8]
    with pytest.raises(CorruptDataset):
        scan_bytes(unterminated)
    with pytest.raises(CorruptDataset):
        scan_bytes(file_meta_bytes(SOP_CLASS, "1.2.3", EXPLICIT))   # no elements


def _spaced(text: bytes) -> bytes:
    """*text* padded with spaces to 64 bytes (as a sender pads text VRs)."""
    assert len(text) <= 64
    return text + b" " * (64 - len(text))


#: The widest DICOM JSON 64 bytes of each VR can make.
WIDEST_64_BYTES = {
    "FD": struct.pack("<8d", *[-2.2250738585072014e-308] * 8), "FL": struct.pack("<16f", *[-1.1754944e-38] * 16),
    "US": struct.pack("<32H", *[65535] * 32), "SS": struct.pack("<32h", *[-32768] * 32),
    "UL": struct.pack("<16I", *[4294967295] * 16), "SL": struct.pack("<16i", *[-2147483648] * 16),
    "AT": struct.pack("<32H", *[0xFFFF] * 32), "DS": _spaced(b"\\".join([b"-1.2345678e-100"] * 4)),
    "IS": _spaced(b"-2147483648\\" * 5 + b"-12"), "PN": _spaced(b"\\".join([b"A"] * 32)),
    "LO": _spaced(b"\\".join([b"x"] * 32)), "DA": _spaced(b"\\".join([b"20260101"] * 7)),
}


@pytest.mark.parametrize("vr", sorted(WIDEST_64_BYTES))
def test_a_value_of_64_bytes_always_fits_the_index(vr):
    """The index skips its length check of values this short (query.ALWAYS_FITS_BYTES):
    the widest rendering of 64 bytes of each VR stays within MAX_VALUE_CHARS."""
    from harmony.storage import query
    value = WIDEST_64_BYTES[vr]
    assert len(value) == query.ALWAYS_FITS_BYTES == 64
    js = rawscan.value_json(TAGS.get(vr, 0x00081030), vr, value)
    assert js is not None and "Value" in js
    assert query._fits(js) and len(str(js["Value"])) <= query.MAX_VALUE_CHARS
