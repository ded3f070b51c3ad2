"""A direct encoder for the identifiers an SCP sends (C-FIND matches), in
place of pydicom's general dataset writer.

A match Harmony relays from a PACS is still the dataset pydicom decoded, all
raw elements, and when it goes out in the encoding it came in, pydicom's
writer would copy each raw value anyway -- at ~0.2 ms per match, the largest
CPU cost of a proxied C-FIND when it was profiled.  :func:`encode_dataset`
copies such a dataset's raw elements straight out, also across Implicit and
Explicit VR Little Endian (the value bytes are the same; the VR comes from
the data dictionary); changed or converted elements still go through
pydicom's ``write_data_element``, and anything pydicom would have to
re-encode (a sequence across VR encodings, an ambiguous or private VR,
another character set, big endian) goes to pydicom whole.

The native DIMSE engine calls it for every data set it sends
(:func:`harmony.dicom.ul.datasets.encode`); command sets have their own
encoder there (:mod:`harmony.dicom.ul.commands`).  The module name is from
the pynetdicom era, when it also replaced pynetdicom's command-set encoder.
tests/dicom/test_fastcmd.py checks it byte for byte against pydicom.
"""

from __future__ import annotations

import struct

from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pynetdicom import dsutils as _dsutils

from harmony.compat.pydicom import dataset_character_set

_original = _dsutils.encode
#: VRs whose values pydicom strips of trailing padding when it converts a raw element
_STRINGS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}


class _Unsupported(Exception):
    pass


def _raw_vr(elem, from_implicit: bool) -> str:
    """The VR to write a raw element with in Explicit VR, or :class:`_Unsupported`."""
    if not from_implicit:
        return elem.VR
    try:
        vr = dictionary_VR(elem.tag)
    except KeyError:
        raise _Unsupported(elem.tag) from None  # private or unknown: pydicom decides (UN)
    if len(vr) != 2 or vr == "SQ":
        raise _Unsupported(elem.tag)  # "US or SS" (resolved from context), or items to re-encode
    return vr


def _as_converted(vr: str, value: bytes) -> bytes:
    """*value* as pydicom writes it after converting the raw element: trailing
    padding stripped, then padded to an even length again."""
    pad = b"\0" if vr == "UI" else b" "
    stripped = value.rstrip(pad)
    return stripped + pad if len(stripped) % 2 else stripped


def encode_raw(ds, is_implicit_vr: bool) -> bytes:
    """Little Endian bytes of a decoded dataset made of raw elements: what
    pydicom's ``write_dataset`` writes, with its per-element work skipped; or
    :class:`_Unsupported` for anything that needs pydicom (a converted or
    changed element when the encoding changes, a sequence whose items would
    need re-encoding, an ambiguous or private VR, another character set)."""
    original = ds.original_encoding
    if None in original or not original[1] or ds.original_character_set != dataset_character_set(ds):
        raise _Unsupported("encoding")
    same = original[0] == is_implicit_vr
    fp = DicomBytesIO()
    fp.is_implicit_VR = is_implicit_vr
    fp.is_little_endian = True
    charset = ds.get("SpecificCharacterSet", default_encoding)
    for tag in sorted(ds.keys()):
        if tag.element == 0 and tag.group > 6:
            continue  # group lengths: pydicom drops them too
        elem = ds.get_item(tag)
        value = elem.value
        raw = getattr(elem, "is_raw", False)
        if not (raw and not elem.is_buffered and isinstance(value, bytes) and len(value) == elem.length):
            # As pydicom's write_dataset would; across VR encodings only for a
            # converted element with a definite VR (no sequence to re-encode).
            if same or (not raw and isinstance(elem.VR, str) and len(elem.VR) == 2 and elem.VR != "SQ"):
                write_data_element(fp, elem, charset)
                continue
            raise _Unsupported(tag)
        if not same and elem.VR == "SQ":
            raise _Unsupported(tag)  # its items are encoded in the old VR encoding
        vr = None if same and is_implicit_vr else _raw_vr(elem, original[0])
        if not same and vr in _STRINGS and _as_converted(vr, value) != value:
            # Across VR encodings pydicom converts the element, which drops
            # padding beyond one byte (a name of spaces becomes empty).
            raise _Unsupported(tag)
        if is_implicit_vr:
            fp.write(struct.pack("<HHI", tag.group, tag.element, len(value)))
            fp.write(value)
            continue
        if not isinstance(vr, str) or len(vr) != 2:
            raise _Unsupported(tag)
        if vr in EXPLICIT_VR_LENGTH_32:
            fp.write(struct.pack("<HH2sHI", tag.group, tag.element, vr.encode("ascii"), 0, len(value)))
        elif len(value) <= 0xFFFF:
            fp.write(struct.pack("<HH2sH", tag.group, tag.element, vr.encode("ascii"), len(value)))
        else:
            raise _Unsupported(tag)  # pydicom rewrites it as UN, with a warning
        fp.write(value)
    return fp.getvalue()


def encode_dataset(ds, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False):
    """``pynetdicom.dsutils.encode``, fast for an unchanged decoded dataset."""
    if is_little_endian and not deflated:
        try:
            return encode_raw(ds, is_implicit_vr)
        except Exception:  # noqa: BLE001 - pydicom's path reports (returns None) as pynetdicom expects
            pass
    return _original(ds, is_implicit_vr, is_little_endian, deflated)

