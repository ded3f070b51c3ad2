"""DICOM JSON (PS3.18 F.2) of one element straight from its received bytes.

Why: every instance Harmony archives is described twice as DICOM JSON at ingest
(the index's attributes and the stored WADO-RS metadata).  pydicom makes each
element's JSON by building a ``DataElement`` from the raw one, converting its
value to Python types, then converting those again (``to_json_dict``,
``convert_to_python_number``): profiled, that was over a third of the CPU of a
C-STORE into ``local_archive`` (bench/dimse, "CPU per instance").  The common
elements - ASCII text, decimal and integer strings, binary numbers - are
converted here in a few string operations; anything else (non-ASCII text,
values pydicom would reject or read leniently, implicit-VR elements whose VR the
dictionary does not settle, deferred values) gets ``None`` and goes the pydicom
way.  tests/dicom/test_rawjson.py checks the result equals pydicom's, element by
element, on generated values.

Both ways end in :func:`finite_json`: JSON has no number for NaN or infinity
(RFC 8259 section 6), and a binary float (FL, FD) may hold either, so
``json.dumps`` would write the tokens ``NaN``/``Infinity`` that strict parsers
(a browser's ``JSON.parse``) refuse, and one odd element would make a whole
study's metadata unreadable.  PS3.18 F.2.3 does not say how to write them; the
strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` are what fo-dicom reads and
writes (fo-dicom#1063, #1726) and what Azure's DICOM service sends.
"""

from __future__ import annotations

import functools
import math
import re
import struct

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement

#: Text VRs whose values split on backslashes (PS3.5 6.2: VM may exceed 1).
_SPLIT_TEXT = frozenset(("AE", "AS", "CS", "DA", "DT", "TM", "UI", "LO", "SH", "UC", "PN"))
#: Text VRs of one value, backslashes included (pydicom strips the end only).
_SINGLE_TEXT = frozenset(("LT", "ST", "UT"))
#: pydicom strips each value's end for these (``convert_text``), an AE both ends.
_STRIP_EACH = frozenset(("LO", "SH", "UC"))
#: Binary numbers: struct code per value.
_BINARY = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
#: The characters pydicom's IS and DS readers accept without a second look.
#: LUT descriptors: pydicom reads their first value as unsigned whatever the VR says.
_LUT_DESCRIPTORS = frozenset((0x00281101, 0x00281102, 0x00281103, 0x00283002))
#: VRs whose JSON values are floats, so may be NaN or infinite.
_FLOAT_VRS = frozenset(("FL", "FD", "DS"))
_IS_TEXT = re.compile(r"[ +\-0-9\\]*\Z")
_DS_TEXT = re.compile(r"[ +\-0-9.eE\\]*\Z")


@functools.lru_cache(maxsize=4096)
def implicit_vr(tag: int) -> str | None:
    """The VR of an implicit-VR element when the dictionary settles it (not private,
    not ``US or SS``); ``None`` when only pydicom can tell."""
    if tag >> 16 & 1:   # private: pydicom looks in its private dictionaries
        return None
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    return vr if len(vr) == 2 else None


def element_json(raw) -> dict | None:
    """*raw* (a pydicom ``RawDataElement`` whose value is loaded) as DICOM JSON,
    exactly as ``DataElement.to_json_dict`` makes it, or ``None`` when this
    cannot tell (the caller then asks pydicom)."""
    if type(raw) is not RawDataElement:
        return None
    value = raw.value
    if value is None or not raw.is_little_endian:
        return None
    vr = raw.VR if raw.VR else implicit_vr(raw.tag)
    if vr is None:
        return None
    return value_json(raw.tag, vr, value)


def value_json(tag: int, vr: str, value: bytes) -> dict | None:
    """The DICOM JSON of element *tag* of *vr* whose little-endian value is *value*,
    as pydicom would make it, or ``None`` when this cannot tell.  The one place
    Harmony converts element bytes to DICOM JSON: :func:`element_json` for parsed
    data sets, and :func:`harmony.dicom.ul.datasets.identifier_json` for received
    C-FIND identifiers and matches."""
    if tag in _LUT_DESCRIPTORS:
        return None
    code = _BINARY.get(vr)
    if code is not None:
        size = struct.calcsize(code)
        count, rest = divmod(len(value), size)
        if rest:
            return None
        if not count:
            return {"vr": vr}
        attr = {"vr": vr, "Value": list(struct.unpack(f"<{count}{code}", value))}
        return finite_json(attr) if vr in _FLOAT_VRS else attr
    if vr == "AT":   # tags as (group, element) pairs of 16-bit numbers, in JSON as 8 hex digits
        count, rest = divmod(len(value), 4)
        if rest:
            return None
        pairs = struct.unpack(f"<{2 * count}H", value)
        return {"vr": vr, "Value": [f"{pairs[i] << 16 | pairs[i + 1]:08X}" for i in range(0, 2 * count, 2)]
                } if count else {"vr": vr}
    if vr not in _SPLIT_TEXT and vr not in _SINGLE_TEXT and vr not in ("IS", "DS"):
        return None
    if not value.isascii() or b"\x1b" in value:   # other characters: pydicom decodes with the character set
        return None
    text = value.decode("ascii")
    if vr in _SINGLE_TEXT:
        text = text.rstrip("\0 ")
        return {"vr": vr, "Value": [text]} if text else {"vr": vr}
    if vr == "IS" or vr == "DS":
        return _numbers(vr, text)
    if vr == "AE":   # pydicom strips each title's spaces (not NULs), nothing before the split
        values = [v.strip() for v in text.split("\\")]
        return {"vr": vr, "Value": values} if values != [""] else {"vr": vr}
    text = text.rstrip("\0 ")
    if not text:
        return {"vr": vr}
    values = text.split("\\")
    if vr in _STRIP_EACH:
        values = [v.rstrip("\0 ") for v in values]
    elif vr == "UI":   # pydicom's UID class strips both ends
        values = [v.strip() for v in values]
    if vr == "PN":
        if "=" in text or "" in values:
            return None
        return {"vr": vr, "Value": [{"Alphabetic": v} for v in values]}
    return {"vr": vr, "Value": values}


def _numbers(vr: str, text: str) -> dict | None:
    if not (_IS_TEXT if vr == "IS" else _DS_TEXT).match(text):
        return None
    text = text.strip() if vr == "DS" else text.rstrip(" \0")
    if not text.strip():
        return {"vr": vr}
    values = text.split("\\")
    convert = int if vr == "IS" else float
    try:
        attr = {"vr": vr, "Value": [convert(v) for v in values]}
    except ValueError:   # an empty value among others, "1.0" as IS: pydicom's own rules
        return None
    return finite_json(attr) if vr == "DS" else attr


def _spelled(value):
    """A float JSON cannot hold as a number, as the string fo-dicom uses; anything else as is."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    return value


def finite_json(attr: dict) -> dict:
    """*attr* (an element's DICOM JSON, changed in place) with each NaN or infinite
    float value as a string, so that any JSON parser reads it; the rest untouched.
    Every element's JSON passes here, whether made from bytes or by pydicom."""
    values = attr.get("Value")
    if values and attr.get("vr") in _FLOAT_VRS and not all(
            not isinstance(v, float) or math.isfinite(v) for v in values):
        attr["Value"] = [_spelled(v) for v in values]
    return attr
