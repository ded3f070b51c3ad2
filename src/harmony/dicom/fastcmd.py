"""Direct encoders for DIMSE command sets and relayed identifiers, in place of
pydicom's general dataset writer.

pynetdicom encodes every DIMSE message's command set twice with pydicom's
dataset writer (once to compute *Command Group Length*, once to send it).  A
command set is a handful of group-0000 elements in Implicit VR Little Endian,
yet the general writer costs ~0.2 ms each; on a proxied C-FIND that was the
largest single CPU cost of the process (profiled: a third of the SCP's time in
``send_msg``).

:func:`encode` writes such a command set with ``struct`` for the VRs command
sets use (UL, US, UI and the text VRs) and hands everything else -- data sets,
other transfer syntaxes, an unexpected VR or value -- to pynetdicom's own
``encode`` unchanged.

:func:`encode_dataset` does the same for the identifiers an SCP sends (C-FIND
matches): a match Harmony relays from a PACS is still the dataset pydicom
decoded, all raw elements, and when it goes out in the encoding it came in,
pydicom's writer would copy each raw value anyway -- at ~0.2 ms per match.
Such a dataset's raw elements are copied straight out, also across Implicit
and Explicit VR Little Endian (the value bytes are the same; the VR comes from
the data dictionary); changed or converted elements still go through pydicom's
``write_data_element``, and anything pydicom would have to re-encode (a
sequence across VR encodings, an ambiguous or private VR, another character
set, big endian) goes to pydicom whole.

tests/test_dicom_fastcmd.py checks both byte for byte against pydicom.
:func:`install` points ``pynetdicom.dimse_messages.encode`` (called there for
command sets only) and ``pynetdicom.service_class.encode`` (identifiers and
data sets the SCP services send) at them.
"""

from __future__ import annotations

import struct

from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pynetdicom import dimse_messages as _messages
from pynetdicom import dsutils as _dsutils
from pynetdicom import service_class as _services

_original = _dsutils.encode
_TEXT_PAD = {"AE": b" ", "CS": b" ", "LO": b" ", "SH": b" ", "ST": b" ", "LT": b" ", "UI": b"\0"}
_NUMBER = {"UL": "<I", "US": "<H"}
#: VRs whose values pydicom strips of trailing padding when it converts a raw element
_STRINGS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}


class _Unsupported(Exception):
    pass


def _value_bytes(vr: str, value) -> bytes:
    if value is None or value == "" or value == b"":
        return b""
    fmt = _NUMBER.get(vr)
    if fmt is not None:
        values = value if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") else [value]
        return b"".join(struct.pack(fmt, int(v)) for v in values)
    pad = _TEXT_PAD.get(vr)
    if pad is None:
        raise _Unsupported(vr)
    if isinstance(value, bytes):
        raw = value
    elif isinstance(value, str):
        raw = value.encode("ascii")
    elif isinstance(value, (list, tuple)) or hasattr(value, "__iter__"):
        raw = "\\".join(str(v) for v in value).encode("ascii")
    else:
        raise _Unsupported(type(value))
    return raw + pad if len(raw) % 2 else raw


def encode_command(ds) -> bytes:
    """Implicit VR Little Endian bytes of a command set (group 0000 only), or
    :class:`_Unsupported`."""
    out = []
    for elem in ds:
        tag = elem.tag
        if tag.group != 0:
            raise _Unsupported(tag)
        value = _value_bytes(elem.VR, elem.value)
        out.append(struct.pack("<HHI", 0, tag.element, len(value)))
        out.append(value)
    return b"".join(out)


def encode(ds, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False):
    """``pynetdicom.dsutils.encode``, fast for Implicit VR LE command sets."""
    if is_implicit_vr and is_little_endian and not deflated:
        try:
            return encode_command(ds)
        except (_Unsupported, UnicodeEncodeError, TypeError, ValueError, struct.error):
            pass
    return _original(ds, is_implicit_vr, is_little_endian, deflated)


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
    if None in original or not original[1] or ds.original_character_set != ds._character_set:
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


def install() -> None:
    _messages.encode = encode
    _services.encode = encode_dataset


def uninstall() -> None:
    _messages.encode = _original
    _services.encode = _original
