"""A Part-10 file's elements read straight from its bytes, without a pydicom Dataset.

Why: every instance Harmony files (C-STORE into an archive, STOW-RS, the
``storage_dir`` path) is parsed once to learn its UIDs, its index attributes and
its stored WADO-RS metadata.  pydicom's ``dcmread`` of a small received instance
cost 230-350 us of the ~2.2 ms of CPU an archived C-STORE took (bench/dimse,
"CPU per instance"), most of it building objects nobody keeps.  For the files
Harmony stages itself (little endian, explicit or implicit VR, any encapsulated
syntax) this module walks the element table with ``struct`` and hands out
``(tag, VR, offset, length)`` records, sequences walked by their lengths or
delimiters and their items kept; values are converted to DICOM JSON by
:func:`harmony.dicom.rawjson.value_json`, the one bytes -> JSON converter.

It reads, it does not judge: :func:`scan_file` raises
:class:`~harmony.dicom.files.CorruptDataset` for what cannot be a complete file
(an element running past the end, a sequence without its delimiter: what
:func:`harmony.dicom.files.check_complete` refuses) and :class:`ScanDeclined`
for what it leaves to pydicom - big endian, deflated, a file without ``DICM``,
elements out of order, a VR it does not know, an implicit VR the dictionary does
not settle where the answer matters, an undefined length outside a sequence or
the pixel data, and any value :func:`~harmony.dicom.rawjson.value_json` will not
convert (non-ASCII text among them).  :meth:`ScannedFile.dataset` is that
fallback: pydicom's parse of the same bytes (``check_complete``), made once.

tests/dicom/test_rawscan.py checks, on generated files, that the UIDs, index
attributes and stored metadata equal the pydicom path's, and that a file pydicom
refuses is refused here too.

Stable API (used by the store's ingest, and open to the ``storage_dir`` and
STOW-RS paths): :func:`scan_file`, :func:`scan_bytes`, :class:`ScannedFile`
(``transfer_syntax_uid``, ``sop_class_uid``, ``sop_instance_uid``,
``study_instance_uid``, ``series_instance_uid``, ``elements``, ``data``,
:meth:`~ScannedFile.element_json`, :meth:`~ScannedFile.dataset`),
:class:`Element`, :class:`ScanDeclined`.
"""

from __future__ import annotations

import base64
import functools
import mmap
import os
import struct

from pydicom.uid import UID

from harmony.dicom.files import WHOLE_READ_BYTES, CorruptDataset, check_complete
from harmony.dicom.rawjson import implicit_vr, value_json


class ScanDeclined(Exception):
    """Not a file this scanner reads: ask pydicom (:meth:`ScannedFile.dataset`)."""


class Element:
    """One element: *vr* as the file says (explicit VR) or the dictionary settles it
    (implicit VR; ``None`` when it does not), the value at ``data[offset:offset + length]``
    (*length* is ``UNDEFINED`` for encapsulated pixel data and undefined-length
    sequences), and for a sequence its *items*, each a list of elements."""

    __slots__ = ("tag", "vr", "offset", "length", "items", "json")

    def __init__(self, tag: int, vr: str | None, offset: int, length: int, items: list | None = None):
        self.tag = tag
        self.vr = vr
        self.offset = offset
        self.length = length
        self.items = items
        #: Its DICOM JSON once made (:meth:`ScannedFile.element_json`): the index and the metadata share it.
        self.json: dict | None = None

    def __repr__(self) -> str:
        return f"Element({self.tag:08X}, {self.vr}, @{self.offset}, {self.length})"


UNDEFINED = 0xFFFFFFFF
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
PIXEL_DATA = 0x7FE00010
SOP_CLASS_UID, SOP_INSTANCE_UID = 0x00080016, 0x00080018
STUDY_INSTANCE_UID, SERIES_INSTANCE_UID = 0x0020000D, 0x0020000E
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
#: VRs with a 4-byte length in explicit VR (PS3.5 7.1.2).
_LONG = frozenset(("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"))
_VRS = {vr.encode("ascii"): vr for vr in _LONG | {
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "PN", "SH", "SL", "SS", "ST", "TM",
    "UI", "UL", "US"}}
#: Binary VRs whose DICOM JSON is the value in base64 (``InlineBinary``); UN is
#: left to pydicom, which replaces it with a known tag's own VR.
_INLINE_BINARY = frozenset(("OB", "OD", "OF", "OL", "OV", "OW"))
_HEAD = struct.Struct("<HHI")
_EXPLICIT_HEAD = struct.Struct("<HH2sH")
_LONG_LENGTH = struct.Struct("<I")
_PREAMBLE = 128
#: Element JSON already made, by (tag, VR, value bytes): the instances of a series, filed one
#: after another, repeat most of their values (patient, study, series, equipment), and
#: ``value_json`` of the same bytes is the same JSON.  Shared like a file's own (callers
#: never change it); bounded in entries and in the values kept (a short value's bytes).
_seen_json: dict[tuple[int, str, bytes], dict] = {}
SEEN_VALUES = 4096
SEEN_VALUE_BYTES = 64


class ScannedFile:
    """A Part-10 file's meta information and top-level elements (see the module docstring)."""

    def __init__(self, data, meta: dict[int, str], elements: list[Element], implicit: bool, path=None):
        #: The file's bytes (``bytes`` when read whole, else an ``mmap``); values are slices of it.
        self.data = data
        #: Where it was read from (:func:`scan_file`), else ``None``.
        self.path = path
        self.meta = meta
        self.elements = elements
        self.implicit = implicit
        self._by_tag: dict[int, Element] | None = None
        self._dataset = None

    @property
    def transfer_syntax_uid(self) -> str:
        return self.meta.get(0x00020010, "")

    def get(self, tag: int) -> Element | None:
        if self._by_tag is None:
            self._by_tag = {e.tag: e for e in self.elements}
        return self._by_tag.get(tag)

    def uid(self, tag: int) -> str | None:
        """A single-valued UID element's value, padding stripped (``None`` when absent,
        ``""`` when empty); :class:`ScanDeclined` when it holds more than one value or non-ASCII."""
        element = self.get(tag)
        if element is None:
            return None
        if element.vr not in ("UI", None) or element.length == UNDEFINED:
            raise ScanDeclined(f"({tag:08X}) is not a UI element")
        value = self.value(element)
        if not value.isascii() or b"\\" in value:
            raise ScanDeclined(f"({tag:08X}) is not one ASCII UID")
        return value.decode("ascii").strip("\0 ")

    @property
    def sop_class_uid(self) -> str | None:
        return self.uid(SOP_CLASS_UID) or self.meta.get(0x00020002) or None

    @property
    def sop_instance_uid(self) -> str | None:
        return self.uid(SOP_INSTANCE_UID) or self.meta.get(0x00020003) or None

    @property
    def study_instance_uid(self) -> str | None:
        return self.uid(STUDY_INSTANCE_UID)

    @property
    def series_instance_uid(self) -> str | None:
        return self.uid(SERIES_INSTANCE_UID)

    def value(self, element: Element) -> bytes:
        return bytes(self.data[element.offset:element.offset + element.length])

    def element_json(self, element: Element) -> dict:
        """*element*'s DICOM JSON exactly as pydicom's ``to_json_dict`` makes it (values
        inline; UIDs without padding); a sequence's items are not converted here (the
        caller walks them).  :class:`ScanDeclined` when only pydicom can tell.  Made once
        per element and shared: callers must not change it."""
        if element.json is None:
            element.json = self._convert(element)
        return element.json

    def _convert(self, element: Element) -> dict:
        vr = element.vr
        if vr is None or vr == "UN" or element.length == UNDEFINED:
            raise ScanDeclined(f"({element.tag:08X}): its VR or length needs pydicom")
        if vr == "SQ":
            return {"vr": "SQ"}
        value = self.value(element)
        if vr in _INLINE_BINARY:
            return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")} if value else {"vr": vr}
        key = (element.tag, vr, value) if element.length <= SEEN_VALUE_BYTES else None
        if key is not None:
            attr = _seen_json.get(key)
            if attr is not None:
                return attr
        attr = value_json(element.tag, vr, value)
        if attr is None:
            raise ScanDeclined(f"({element.tag:08X}) {vr}: its value needs pydicom")
        if key is not None:
            if len(_seen_json) >= SEEN_VALUES:
                _seen_json.clear()
            _seen_json[key] = attr
        return attr

    def dataset(self):
        """pydicom's parse of the same bytes, checked whole (:func:`~harmony.dicom.files.check_complete`):
        the fallback for what this scanner declines, made at most once."""
        if self._dataset is None:
            whole = self.path is None or isinstance(self.data, bytes)
            self._dataset = check_complete(bytes(self.data) if whole else self.path)
        return self._dataset

    def close(self) -> None:
        if isinstance(self.data, mmap.mmap):
            self.data.close()


def scan_file(path) -> ScannedFile:
    """Scan the Part-10 file at *path*: read whole up to ``WHOLE_READ_BYTES``, mapped
    (values never read unless asked for) beyond.  :class:`CorruptDataset` for a file
    that cannot be complete, :class:`ScanDeclined` for one left to pydicom;
    ``OSError`` as reading raises it."""
    with open(path, "rb") as fp:
        size = os.fstat(fp.fileno()).st_size
        if size <= WHOLE_READ_BYTES:
            return scan_bytes(fp.read(), path)
        data = mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return scan_bytes(data, path)
    except BaseException:
        data.close()
        raise


def scan_bytes(data, path=None) -> ScannedFile:
    """:func:`scan_file` of a Part-10 file already in memory (``bytes`` or ``mmap``;
    *path*: where it was read from, if anywhere)."""
    if len(data) < _PREAMBLE + 4 or data[_PREAMBLE:_PREAMBLE + 4] != b"DICM":
        raise ScanDeclined("no DICM prefix")
    meta, offset = _meta(data, _PREAMBLE + 4)
    implicit = _syntax(meta.get(0x00020010, ""))
    elements, _end = _dataset(data, offset, len(data), implicit, top=True)
    if not elements:
        raise CorruptDataset("the dataset has no elements")
    return ScannedFile(data, meta, elements, implicit, path)


def _meta(data, offset: int) -> tuple[dict[int, str], int]:
    """The group-0002 elements (always explicit VR little endian): their text values."""
    meta: dict[int, str] = {}
    end = len(data)
    while offset + 8 <= end:
        group, element, raw_vr, length = _EXPLICIT_HEAD.unpack_from(data, offset)
        if group != 0x0002:
            break
        vr = _VRS.get(raw_vr)
        if vr is None:
            raise ScanDeclined("file meta information not in explicit VR")
        head = 8
        if vr in _LONG:
            if offset + 12 > end:
                raise CorruptDataset("the file meta information is cut short")
            length = _LONG_LENGTH.unpack_from(data, offset + 8)[0]
            head = 12
        if length == UNDEFINED or offset + head + length > end:
            raise CorruptDataset("the file meta information is cut short")
        if vr in ("UI", "SH", "AE"):
            value = bytes(data[offset + head:offset + head + length])
            if not value.isascii():
                raise ScanDeclined("non-ASCII file meta information")
            meta[0x00020000 | element] = value.decode("ascii").strip("\0 ")
        offset += head + length
    return meta, offset


@functools.lru_cache(maxsize=64)
def _syntax(uid: str) -> bool:
    """Implicit VR? for a little-endian, not deflated transfer syntax; :class:`ScanDeclined` otherwise."""
    if uid == IMPLICIT_VR_LITTLE_ENDIAN:
        return True
    ts = UID(uid)
    if not ts.is_transfer_syntax or not ts.is_little_endian or ts.is_implicit_VR or ts.is_deflated:
        raise ScanDeclined(f"transfer syntax {uid!r}")
    return False


def _dataset(data, offset: int, end: int, implicit: bool, top: bool = False,
             delimited: bool = False) -> tuple[list[Element], int]:
    """The elements from *offset* to *end* (a defined length) or, *delimited*, to the
    item delimiter; returns them and the offset after them (and the delimiter)."""
    elements: list[Element] = []
    last = -1
    if offset + 6 <= end:
        _check_vr_style(data, offset, implicit)
    while True:
        if end - offset < 8:
            if delimited or (offset != end and not top):
                raise CorruptDataset("an item ends inside an element")
            return elements, end if top else offset
        group, number, length = _HEAD.unpack_from(data, offset)
        tag = group << 16 | number
        if group == 0xFFFE:
            if delimited and tag == _ITEM_END:
                return elements, offset + 8
            raise ScanDeclined(f"an item tag ({tag:08X}) among elements")
        if tag <= last:
            raise ScanDeclined("elements out of order")
        last = tag
        if implicit:
            vr = implicit_vr(tag)
            head = 8
        else:
            raw_vr = data[offset + 4:offset + 6]
            vr = _VRS.get(raw_vr)
            if vr is None:
                raise ScanDeclined(f"unknown VR {bytes(raw_vr)!r}")
            if vr in _LONG:
                if offset + 12 > end:
                    raise CorruptDataset("an element header runs past the end of the data")
                length = _LONG_LENGTH.unpack_from(data, offset + 8)[0]
                head = 12
            else:
                length >>= 16   # the 2-byte length after the VR
                head = 8
        start = offset + head
        items = None
        if length == UNDEFINED:
            if vr == "SQ":
                items, offset = _undefined_sequence(data, start, end, implicit)
            elif tag == PIXEL_DATA and not implicit:
                offset = _skip_fragments(data, start, end)
            else:
                raise ScanDeclined(f"({tag:08X}) of undefined length")
        else:
            offset = start + length
            if offset > end:
                raise CorruptDataset(f"element ({tag:08X}) runs past the end of the data")
            if vr == "SQ":
                items = _defined_sequence(data, start, offset, implicit)
        elements.append(Element(tag, vr, start, length, items))


def _check_vr_style(data, offset: int, implicit: bool) -> None:
    """pydicom reads a data set in the VR style its first element looks like, whatever
    the transfer syntax says (with a warning): such a file is left to it."""
    if data[offset + 1] == 0xFF and data[offset] == 0xFE:
        return   # an item delimiter: an empty item
    raw_vr = data[offset + 4:offset + 6]
    looks_explicit = 0x40 < raw_vr[0] < 0x5B and 0x40 < raw_vr[1] < 0x5B
    if looks_explicit == implicit:
        raise ScanDeclined("the data set's VR style differs from its transfer syntax")


def _item(data, offset: int, end: int) -> tuple[int, int]:
    if offset + 8 > end:
        raise CorruptDataset("a sequence runs past the end of the data")
    group, number, length = _HEAD.unpack_from(data, offset)
    return group << 16 | number, length


def _items_at(data, offset: int, end: int, implicit: bool, tag: int, length: int) -> tuple[list[Element], int]:
    if tag != _ITEM:
        raise ScanDeclined(f"({tag:08X}) where a sequence item belongs")
    start = offset + 8
    if length == UNDEFINED:
        return _dataset(data, start, end, implicit, delimited=True)
    if start + length > end:
        raise CorruptDataset("a sequence item runs past the end of the data")
    elements, _ = _dataset(data, start, start + length, implicit)
    return elements, start + length


def _defined_sequence(data, offset: int, end: int, implicit: bool) -> list:
    items: list[list[Element]] = []
    while offset < end:
        tag, length = _item(data, offset, end)
        elements, offset = _items_at(data, offset, end, implicit, tag, length)
        items.append(elements)
    return items


def _undefined_sequence(data, offset: int, end: int, implicit: bool) -> tuple[list, int]:
    items: list[list[Element]] = []
    while True:
        tag, length = _item(data, offset, end)
        if tag == _SEQUENCE_END:
            return items, offset + 8
        elements, offset = _items_at(data, offset, end, implicit, tag, length)
        items.append(elements)


def _skip_fragments(data, offset: int, end: int) -> int:
    """Past encapsulated pixel data's sequence delimiter (PS3.5 A.4), fragments unread."""
    while True:
        tag, length = _item(data, offset, end)
        if tag == _SEQUENCE_END:
            return offset + 8
        if tag != _ITEM or length == UNDEFINED:
            raise ScanDeclined("encapsulated pixel data of an unexpected shape")
        offset += 8 + length
        if offset > end:
            raise CorruptDataset("a pixel data fragment runs past the end of the data")
