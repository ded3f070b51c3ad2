"""Data sets on an association: identifiers in memory, instances straight to disk.

A C-STORE data set is written to a Part-10 file as its fragments arrive
(:class:`PartTenSink`): the file meta information is made from the command and
the negotiated transfer syntax, so the file on disk is a complete DICOM file
the moment the last fragment lands, memory stays at one PDU whatever the
instance's size, and nothing is decoded on the way in.  Identifiers (C-FIND,
C-GET, C-MOVE) are small and kept in memory with a cap (:class:`MemorySink`).

A C-FIND match relayed from a PACS to a DIMSE client is carried as the bytes
the PACS sent (:class:`ReceivedIdentifier`): decoding and re-encoding each match
with pydicom was ~40 % of a proxied C-FIND's CPU (bench/dimse).  It *is* a
pydicom Dataset, decoded the first time anything looks inside it (a middleware,
the DICOMweb bridge, a JSON rendering); :func:`encode_relayed` sends the received
bytes unchanged only while nothing has, and only in the syntax they came in.
"""

from __future__ import annotations

import functools
import os
import re
import struct
import zlib
from io import BytesIO
from pathlib import Path

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from harmony.dicom import fastcmd
from harmony.dicom.rawjson import value_json
from harmony.dicom.ul.pdu import PDUError

#: Largest identifier accepted (a C-FIND identifier with every return key is a few KiB).
MAX_IDENTIFIER_BYTES = 1024 * 1024
DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1442.1"
#: (0002,0013) of the files Harmony writes (the same name it gives in A-ASSOCIATE).
IMPLEMENTATION_VERSION = "HARMONY_UL_1"


class MemorySink:
    """A data set received into memory, up to *limit* bytes."""

    def __init__(self, limit: int = MAX_IDENTIFIER_BYTES):
        self.limit = limit
        self.data = bytearray()

    def write(self, fragment) -> None:
        if len(self.data) + len(fragment) > self.limit:
            raise PDUError(f"data set over the limit of {self.limit} bytes", reason=0x00)
        self.data += fragment

    def close(self):
        return bytes(self.data)

    def abort(self) -> None:
        self.data = bytearray()


class DiscardSink:
    """A data set read and dropped (it cannot be kept: the service answers with a failure status)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.received = 0

    def write(self, fragment) -> None:
        self.received += len(fragment)
        if self.received > self.limit:
            raise PDUError(f"data set over the limit of {self.limit} bytes", reason=0x00)

    def close(self):
        return None

    def abort(self) -> None:
        pass


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                    source_aet: str | None = None) -> bytes:
    """Preamble, ``DICM`` and the group-0002 elements of a Part-10 file
    (Explicit VR Little Endian, PS3.10 §7.1), written directly: pydicom's
    ``FileMetaDataset`` and ``write_file_meta_info`` took ~1 ms per received
    instance on the reactor thread (profiled, bench/dimse C-STORE into
    storage_dir).  tests/dicom/ul/test_datasets.py compares it with pydicom's."""
    before, after = _meta_around_instance(sop_class_uid, transfer_syntax, source_aet)
    instance = _meta(0x0003, "UI", sop_instance_uid)
    return b"".join((_PREAMBLE_AND_LENGTH_TAG, _UL.pack(len(before) + len(instance) + len(after)), before, instance,
                     after))


_PREAMBLE_AND_LENGTH_TAG = b"\0" * 128 + b"DICM" + struct.pack("<HH2sH", 0x0002, 0x0000, b"UL", 4)
_UL = struct.Struct("<I")


@functools.lru_cache(maxsize=256)
def _meta_around_instance(sop_class_uid: str, transfer_syntax: str, source_aet: str | None) -> tuple[bytes, bytes]:
    """The group-0002 elements before and after (0002,0003), the same for every instance
    of a SOP class from one sender in one syntax: only the instance UID is written per
    instance (the whole header was ~20 % of the receive path's CPU, bench/dimse/receive_cpu.py)."""
    before = _meta(0x0001, "OB", b"\0\1") + _meta(0x0002, "UI", sop_class_uid)
    after = [_meta(0x0010, "UI", transfer_syntax), _meta(0x0012, "UI", IMPLEMENTATION_CLASS_UID),
             _meta(0x0013, "SH", IMPLEMENTATION_VERSION)]
    if source_aet:
        after.append(_meta(0x0016, "AE", source_aet))
    return before, b"".join(after)


def _meta(element: int, vr: str, value) -> bytes:
    """One group-0002 element; text padded to an even length (UI with NUL, others with a space)."""
    if isinstance(value, str):
        value = value.encode("ascii")
        if len(value) % 2:
            value += b"\0" if vr == "UI" else b" "
    if vr == "OB":
        return struct.pack("<HH2sHI", 0x0002, element, b"OB", 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr.encode("ascii"), len(value)) + value


class PartTenSink:
    """A C-STORE data set written to *path* as a Part-10 file while it arrives, up to *limit* bytes.

    On the way it reads the Study and Series Instance UIDs from the head of the
    data set (:func:`head_uids`), so a retrieved instance can be described on the
    reactor: :attr:`described` is ``(study, series)`` once both were seen, else
    ``None`` (and whoever needs them reads the file).
    """

    def __init__(self, path: Path, command: dict, transfer_syntax: str, limit: int, source_aet: str = "",
                 file=None):
        self.path = Path(path)
        self.limit = limit
        self.received = 0
        self.described: tuple[str, str] | None = None
        #: *file*: *path* already created and open for writing (see dicom_scp's spare files);
        #: otherwise one write per instance of ordinary size rather than one per PDU.
        self._file = file if file is not None else open(self.path, "wb", buffering=FILE_BUFFER)
        meta = file_meta_bytes(command.get("AffectedSOPClassUID", ""), command.get("AffectedSOPInstanceUID", ""),
                               transfer_syntax, source_aet)
        self.meta_length = len(meta)
        self._file.write(meta)
        implicit = HEAD_SYNTAXES.get(transfer_syntax)
        self._head: bytearray | None = bytearray() if implicit is not None else None
        self._implicit = bool(implicit)

    def write(self, fragment) -> None:
        self.received += len(fragment)
        if self.received > self.limit:
            raise PDUError(f"data set over the limit of {self.limit} bytes", reason=0x00)
        self._file.write(fragment)
        if self._head is not None:
            self._read_head(fragment)

    def _read_head(self, fragment) -> None:
        head = self._head
        head += fragment
        try:
            self.described = head_uids(head, self._implicit)
        except _NeedMore:
            if len(head) < MAX_HEAD_BYTES:
                return
        except (ValueError, struct.error):
            pass
        self._head = None

    def close(self) -> Path:
        self._file.close()
        return self.path

    def abort(self) -> None:
        self._file.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class HeldSink:
    """A C-STORE data set kept in memory as a whole Part-10 file while it is at most
    *hold* bytes (file meta included), handed to a writer that takes bytes
    (``dicom_scp``'s ``storage_dir`` journal): no staging file written, closed and
    read back twice (bench/dimse: ~a third of that path's CPU per instance).  A data
    set that grows past *hold* goes on into the sink *spill()* makes (a
    :class:`PartTenSink`), and :meth:`close` gives what that one gives (its path).

    :meth:`close` gives the file's ``bytes``; :attr:`meta_length` says where the
    data set starts in them."""

    __slots__ = ("limit", "hold", "received", "meta_length", "_data", "_spill", "spilled")

    def __init__(self, command: dict, transfer_syntax: str, limit: int, hold: int, spill, source_aet: str = ""):
        self.limit = limit
        self.hold = hold
        self.received = 0
        meta = file_meta_bytes(command.get("AffectedSOPClassUID", ""), command.get("AffectedSOPInstanceUID", ""),
                               transfer_syntax, source_aet)
        self.meta_length = len(meta)
        self._data: bytearray | None = bytearray(meta)
        self._spill = spill
        #: The sink the data set went on into once it outgrew *hold*.
        self.spilled: PartTenSink | DiscardSink | None = None

    @property
    def described(self):
        return getattr(self.spilled, "described", None)

    def write(self, fragment) -> None:
        self.received += len(fragment)
        if self.received > self.limit:
            raise PDUError(f"data set over the limit of {self.limit} bytes", reason=0x00)
        data = self._data
        if data is None:
            self.spilled.write(fragment)   # type: ignore[union-attr]
        elif self.meta_length + self.received <= self.hold:
            data += fragment
        else:
            self._data = None
            self.spilled = self._spill()
            self.spilled.write(memoryview(data)[self.meta_length:])
            self.spilled.write(fragment)
            self.received = self.spilled.received

    def close(self):
        if self._data is None:
            return self.spilled.close()   # type: ignore[union-attr]
        data, self._data = self._data, None
        return bytes(data)

    def abort(self) -> None:
        self._data = None
        if self.spilled is not None:
            self.spilled.abort()


#: Transfer syntax -> implicit VR? for the syntaxes :func:`head_uids` reads (little
#: endian, not deflated; encapsulated ones are explicit VR LE up to the pixel data).
HEAD_SYNTAXES = {"1.2.840.10008.1.2": True, "1.2.840.10008.1.2.1": False}
#: Write buffer of a received instance's file.
FILE_BUFFER = 256 * 1024
#: How much of a data set's head is kept while looking for its UIDs.
MAX_HEAD_BYTES = 64 * 1024
_STUDY_UID, _SERIES_UID = 0x0020000D, 0x0020000E
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"))
_UNDEFINED = 0xFFFFFFFF
_TAG_LENGTH = struct.Struct("<HHI")
_TAG_VR_LENGTH = struct.Struct("<HH2sH")


class _NeedMore(Exception):
    """The head read so far ends before the UIDs."""


def head_uids(data, implicit: bool) -> tuple[str, str] | None:
    """(Study, Series Instance UID) from the start of a little-endian data set, or
    ``None`` when it has passed (0020,000E) without both; :class:`_NeedMore` when
    *data* ends first.  Sequences before them are skipped, nested or not."""
    found: dict[int, str] = {}
    offset, end = 0, len(data)
    while True:
        if offset + 8 > end:
            raise _NeedMore
        tag, vr, length, offset = _element(data, offset, implicit)
        if tag > _SERIES_UID:
            break
        if length == _UNDEFINED:
            offset = _skip_sequence(data, offset, implicit or vr == b"UN")
            continue
        if offset + length > end:
            raise _NeedMore
        if tag in (_STUDY_UID, _SERIES_UID):
            found[tag] = bytes(data[offset:offset + length]).decode("ascii").rstrip("\0 ")
            if len(found) == 2:
                break
        offset += length
    if len(found) != 2:
        return None
    return found[_STUDY_UID], found[_SERIES_UID]


def _element(data, offset: int, implicit: bool):
    group, element, length = _TAG_LENGTH.unpack_from(data, offset)
    tag = group << 16 | element
    if implicit or group == 0xFFFE:
        return tag, None, length, offset + 8
    _g, _e, vr, short = _TAG_VR_LENGTH.unpack_from(data, offset)
    if vr in _LONG_VRS:
        if offset + 12 > len(data):
            raise _NeedMore
        return tag, vr, struct.unpack_from("<I", data, offset + 8)[0], offset + 12
    return tag, vr, short, offset + 8


def _skip_sequence(data, offset: int, implicit: bool) -> int:
    """Past an undefined-length sequence's delimiter (its items defined or undefined in length)."""
    end = len(data)
    while True:
        if offset + 8 > end:
            raise _NeedMore
        tag, _vr, length, offset = _element(data, offset, True)
        if tag == _SEQUENCE_END:
            return offset
        if tag != _ITEM:
            raise ValueError("sequence without its item")
        if length != _UNDEFINED:
            offset += length
            continue
        while True:   # an undefined-length item: its elements until the item delimiter
            if offset + 8 > end:
                raise _NeedMore
            tag, vr, length, offset = _element(data, offset, implicit)
            if tag == _ITEM_END:
                break
            if length == _UNDEFINED:
                offset = _skip_sequence(data, offset, implicit or vr == b"UN")
            else:
                offset += length


#: VRs whose values :func:`identifier_json` reads (text, single-byte ASCII; numbers in text
#: and binary, little endian), each converted by :func:`harmony.dicom.rawjson.value_json`.
_TEXT_VRS = frozenset(("AE", "AS", "CS", "DA", "DT", "LO", "SH", "TM", "UI", "PN"))
_NUMBER_VRS = frozenset(("IS", "DS", "US", "SS", "UL", "SL"))


def identifier_json(data: bytes, transfer_syntax: str) -> dict | None:
    """A C-FIND/C-GET/C-MOVE identifier (or a C-FIND match) as DICOM JSON, for the
    common shape only: flat, ASCII, little endian, text VRs, IS/DS and US/UL/SS/SL
    numbers (and empty elements of any VR), each value converted by
    :func:`harmony.dicom.rawjson.value_json`; ``None`` for anything else, which
    pydicom then decodes.  The same JSON as pydicom's ``to_json_dict`` (property-tested
    against it) in a tenth of the time: decoding the identifier and converting it
    was a fifth of a proxied C-FIND's CPU, and each match's a fifth of a QIDO-RS
    answer's through the DICOMweb bridge."""
    implicit = HEAD_SYNTAXES.get(transfer_syntax)
    if implicit is None:
        return None
    doc: dict = {}
    offset, end = 0, len(data)
    try:
        while offset < end:
            tag, vr, length, offset = _element(data, offset, implicit)
            if length == _UNDEFINED or offset + length > end:
                return None
            if implicit:
                vr = _dictionary_vr(tag)
            else:
                vr = vr.decode("ascii")
            if vr is None or (length and vr not in _TEXT_VRS and vr not in _NUMBER_VRS):
                return None
            if tag >> 16 == 0x0002 or tag & 0xFFFF == 0:
                return None   # file meta or a group length: not in an identifier
            key = f"{tag:08X}"
            raw = data[offset:offset + length]
            offset += length
            attr = value_json(tag, vr, raw) if length else {"vr": vr}
            if attr is None:
                return None
            doc[key] = attr
    except (_NeedMore, struct.error, UnicodeDecodeError):
        return None
    return doc

_QUERY_LEVEL = 0x00080052


#: :func:`identifier_level`'s answers for identifiers seen lately, by (bytes, syntax): a
#: client polling with the same query (a worklist, "today's studies", the bench's) costs a
#: dict lookup.  Bounded in entries and in the size of an identifier kept, as the DIMSE
#: command cache is (``commands.decode``): a flood of distinct ones costs at most ~0.5 MiB.
_LEVELS: dict = {}
_MAX_LEVELS = 512
_MAX_LEVEL_BYTES = 1024


def identifier_level(data: bytes, transfer_syntax: str) -> str | None:
    """The Query/Retrieve Level of an identifier that :func:`identifier_json` surely
    converts (flat, ASCII text, no numbers to check; a single, plain level), read
    without converting it: ``""`` when it has none, ``None`` for any other identifier
    (convert that one at once, and refuse it when it cannot be).  ``dicom_scp`` makes
    a C-FIND's DICOM JSON only when something reads it (bench/dimse)."""
    if len(data) > _MAX_LEVEL_BYTES:
        return _identifier_level(data, transfer_syntax)
    key = (bytes(data), str(transfer_syntax))
    try:
        return _LEVELS[key]
    except KeyError:
        pass
    level = _LEVELS[key] = _identifier_level(data, transfer_syntax)
    if len(_LEVELS) > _MAX_LEVELS:
        _LEVELS.clear()
    return level


def _identifier_level(data: bytes, transfer_syntax: str) -> str | None:
    implicit = HEAD_SYNTAXES.get(transfer_syntax)
    if implicit is None:
        return None
    level = ""
    offset, end = 0, len(data)
    try:
        while offset < end:
            tag, vr, length, offset = _element(data, offset, implicit)
            if length == _UNDEFINED or offset + length > end or tag >> 16 == 0x0002 or tag & 0xFFFF == 0:
                return None
            vr = _dictionary_vr(tag) if implicit else vr.decode("ascii")
            if vr is None:
                return None
            if length:
                raw = data[offset:offset + length]
                if vr not in _TEXT_VRS or not raw.isascii() or b"\x1b" in raw:
                    return None
                text = raw.rstrip(b"\0 ")
                if vr == "PN" and (b"=" in raw or text and b"" in text.split(b"\\")):
                    return None   # what identifier_json leaves to pydicom
                if tag == _QUERY_LEVEL:
                    level = text.decode("ascii")
                    if level != level.strip().upper() or "\\" in level:
                        return None
                offset += length
    except (_NeedMore, struct.error, UnicodeDecodeError):
        return None
    return level


#: VRs with a 2-byte length in explicit VR (PS3.5 §7.1.2): what :func:`identifier_bytes` writes.
_SHORT_VRS = frozenset(("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "PN", "SH",
                        "SL", "SS", "ST", "TM", "UI", "UL", "US"))
_TAG_KEY = re.compile(r"^[0-9A-Fa-f]{8}$")


def identifier_bytes(doc: dict, transfer_syntax: str) -> bytes | None:
    """A DICOM JSON identifier encoded for *transfer_syntax*, for the common shape
    only: flat, ASCII text values of text VRs (PN as its alphabetic group), empty
    elements of VRs with a short length; ``None`` for anything else (pydicom's
    ``Dataset.from_json`` and writer then do it, validating as they go).  The same
    bytes (property-tested), without a Dataset: JSON -> Dataset -> bytes was a
    fifth of a QIDO-RS request's CPU through the DICOMweb bridge."""
    implicit = HEAD_SYNTAXES.get(transfer_syntax)
    if implicit is None or not isinstance(doc, dict):
        return None
    elements = []
    for key, attr in doc.items():
        if not isinstance(key, str) or not _TAG_KEY.match(key) or not isinstance(attr, dict):
            return None
        tag = int(key, 16)
        vr = attr.get("vr")
        if tag >> 16 == 0x0002 or tag & 0xFFFF == 0 or vr not in _SHORT_VRS or len(attr) > 2:
            return None
        values = attr.get("Value")
        if len(attr) == 2 and values is None:
            return None    # another member (InlineBinary, BulkDataURI): pydicom's
        if not values:
            raw = b""
        else:
            if vr not in _TEXT_VRS or not isinstance(values, list):
                return None
            if vr == "PN":
                if not all(isinstance(v, dict) and set(v) == {"Alphabetic"} for v in values):
                    return None
                values = [v["Alphabetic"] for v in values]
            if not all(isinstance(v, str) and v and v.isascii() and "\\" not in v for v in values):
                return None
            raw = "\\".join(values).encode("ascii")
            if len(raw) % 2:
                raw += b"\0" if vr == "UI" else b" "
            if len(raw) > 0xFFFF:
                return None
        elements.append((tag, vr, raw))
    elements.sort()
    out = []
    for tag, vr, raw in elements:
        if implicit:
            out.append(_TAG_LENGTH.pack(tag >> 16, tag & 0xFFFF, len(raw)))
        else:
            out.append(_TAG_VR_LENGTH.pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), len(raw)))
        out.append(raw)
    return b"".join(out)


def received_json(ds) -> dict | None:
    """:func:`identifier_json` of a :class:`ReceivedIdentifier` nobody looked into yet, else ``None``."""
    received = ds.__dict__.get("received") if isinstance(ds, ReceivedIdentifier) else None
    return None if received is None else identifier_json(received, ds.received_syntax)


@functools.lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str | None:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    return vr if vr in _TEXT_VRS or vr.isalpha() and len(vr) == 2 else None


class ReceivedIdentifier(Dataset):
    """An identifier as received in *transfer_syntax*, decoded on first use.

    Every Dataset method reaches the elements through ``self._dict``; here that
    is a property that decodes the received bytes the first time it is read.
    Until then :attr:`received` holds them; afterwards it is ``None`` (what a
    consumer saw it may have changed, so the bytes no longer speak for it).
    Character sets need no care: undecoded, the bytes keep the Specific
    Character Set they were written in; decoded, pydicom reads them with it.
    """

    def __init__(self, data: bytes, transfer_syntax: str):
        # Dataset.__init__'s state, copied from a template (its dozen __setattr__
        # calls cost as much as relaying the match); the mutable parts are fresh.
        state = self.__dict__
        state.update(_EMPTY_STATE)
        state["_private_blocks"] = {}
        state["_pixel_array_opts"] = {"use_pdh": False}
        state["_pixel_id"] = {}
        state["_elements"] = None
        state["received"] = bytes(data)
        state["received_syntax"] = str(transfer_syntax)

    @property
    def _dict(self):
        elements = self.__dict__.get("_elements")
        if elements is None:
            decoded = decode(self.received, self.received_syntax)
            elements = decoded._dict
            for name in ("_read_little", "_read_implicit", "_read_charset", "_is_little_endian",
                         "_is_implicit_VR"):
                if name in decoded.__dict__:
                    object.__setattr__(self, name, decoded.__dict__[name])
            object.__setattr__(self, "_elements", elements)
            object.__setattr__(self, "received", None)
        return elements

    @_dict.setter
    def _dict(self, value):
        object.__setattr__(self, "_elements", value)

    @property
    def decoded(self) -> bool:
        return self.__dict__.get("_elements") is not None


_EMPTY_STATE = {k: v for k, v in Dataset().__dict__.items() if k not in ("_dict",)}
_EMPTY_STATE.pop("_elements", None)


def encode_relayed(ds: Dataset, transfer_syntax: str) -> bytes:
    """*ds* encoded for *transfer_syntax*; a :class:`ReceivedIdentifier` nobody
    looked into goes as received when it came in that syntax."""
    received = ds.__dict__.get("received") if isinstance(ds, ReceivedIdentifier) else None
    if received is not None and ds.received_syntax == transfer_syntax:
        return received
    return encode(ds, transfer_syntax)


def decode(data: bytes, transfer_syntax: str) -> Dataset:
    """An identifier received in *transfer_syntax* as a pydicom Dataset."""
    ts = UID(transfer_syntax)
    if ts == DEFLATED:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    return read_dataset(BytesIO(data), ts.is_implicit_VR, ts.is_little_endian)


def encode(ds: Dataset, transfer_syntax: str) -> bytes:
    """*ds* encoded for *transfer_syntax* (fast for relayed, unchanged data sets)."""
    ts = UID(transfer_syntax)
    deflated = ts == DEFLATED
    data = fastcmd.encode_dataset(ds, ts.is_implicit_VR, ts.is_little_endian, deflated)
    if data is None:
        raise ValueError("the data set cannot be encoded in the negotiated transfer syntax")
    return data
