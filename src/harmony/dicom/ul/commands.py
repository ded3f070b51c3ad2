"""DIMSE command sets (PS3.7 §9.3, §E): group 0000, implicit VR little endian.

A command set is a dozen small elements; decoding and encoding them with
pydicom's general dataset code cost ~0.2 ms each way (the largest CPU cost
per DIMSE message, profiled in issue 4).  Here a command is a plain ``dict``
keyed by pydicom keyword, decoded and encoded with ``struct`` from a fixed
table of the group-0000 elements PS3.7 defines.  An element outside the table
is kept as raw bytes and sent back unchanged.
"""

from __future__ import annotations

import struct

# tag -> (keyword, VR); PS3.7 Annex E.
ELEMENTS = {
    0x00000000: ("CommandGroupLength", "UL"),
    0x00000002: ("AffectedSOPClassUID", "UI"),
    0x00000003: ("RequestedSOPClassUID", "UI"),
    0x00000100: ("CommandField", "US"),
    0x00000110: ("MessageID", "US"),
    0x00000120: ("MessageIDBeingRespondedTo", "US"),
    0x00000600: ("MoveDestination", "AE"),
    0x00000700: ("Priority", "US"),
    0x00000800: ("CommandDataSetType", "US"),
    0x00000900: ("Status", "US"),
    0x00000901: ("OffendingElement", "AT"),
    0x00000902: ("ErrorComment", "LO"),
    0x00000903: ("ErrorID", "US"),
    0x00001000: ("AffectedSOPInstanceUID", "UI"),
    0x00001001: ("RequestedSOPInstanceUID", "UI"),
    0x00001002: ("EventTypeID", "US"),
    0x00001005: ("AttributeIdentifierList", "AT"),
    0x00001008: ("ActionTypeID", "US"),
    0x00001020: ("NumberOfRemainingSuboperations", "US"),
    0x00001021: ("NumberOfCompletedSuboperations", "US"),
    0x00001022: ("NumberOfFailedSuboperations", "US"),
    0x00001023: ("NumberOfWarningSuboperations", "US"),
    0x00001030: ("MoveOriginatorApplicationEntityTitle", "AE"),
    0x00001031: ("MoveOriginatorMessageID", "US"),
}
TAG_OF = {keyword: tag for tag, (keyword, _vr) in ELEMENTS.items()}

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF
RESPONSE_BIT = 0x8000
NAMES = {C_STORE_RQ: "C-STORE-RQ", C_STORE_RSP: "C-STORE-RSP", C_GET_RQ: "C-GET-RQ", C_GET_RSP: "C-GET-RSP",
         C_FIND_RQ: "C-FIND-RQ", C_FIND_RSP: "C-FIND-RSP", C_MOVE_RQ: "C-MOVE-RQ", C_MOVE_RSP: "C-MOVE-RSP",
         C_ECHO_RQ: "C-ECHO-RQ", C_ECHO_RSP: "C-ECHO-RSP", C_CANCEL_RQ: "C-CANCEL-RQ"}

#: CommandDataSetType value meaning "no data set follows".
NO_DATASET = 0x0101
HAS_DATASET = 0x0000

_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UL = struct.Struct("<I")
#: Largest command set accepted (a real one is ~200 bytes).
MAX_COMMAND_BYTES = 64 * 1024


class CommandError(ValueError):
    """A command set that cannot be decoded."""


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").rstrip("\0 ").lstrip(" ")


#: Command sets decoded lately (:func:`decode`), by their bytes with the message id's value
#: cut out; bounded in entries and in the size of a command kept (a hostile peer's flood of
#: distinct commands costs at most ``_MAX_DECODED * _MAX_CACHED_BYTES``).
_DECODED: dict = {}
_MAX_DECODED = 512
_MAX_CACHED_BYTES = 1024
#: The header of a MessageID and of a MessageIDBeingRespondedTo element (US, length 2).
_ID_HEADERS = ((b"\x00\x00\x10\x01\x02\x00\x00\x00", "MessageID"),
               (b"\x00\x00\x20\x01\x02\x00\x00\x00", "MessageIDBeingRespondedTo"))


def decode(data: bytes) -> dict:
    """The command set in *data* as ``{keyword: value}`` (unknown tags as ``(tag, bytes)`` pairs).

    A proxied C-FIND sees the same commands again and again, differing only in their
    message id (the client's request, the PACS's pending and final responses): they
    decode from a small cache keyed by the bytes without the id's two value bytes, and
    the id is read into a fresh copy (callers own it).  The key is used only when the
    element found is the one the full decode read there, so a hit equals a full decode."""
    if len(data) > _MAX_CACHED_BYTES:
        return _decode(data)
    data = bytes(data)
    key: tuple[int, bytes] | bytes
    for header, id_keyword in _ID_HEADERS:
        at = data.find(header)
        if at >= 0:
            keyword, value_at = id_keyword, at + 8
            key = (value_at, data[:value_at] + data[value_at + 2:])
            break
    else:
        keyword, value_at, key = None, -1, data
    known = _DECODED.get(key)
    if known is not None:
        command = known.copy()
        if keyword is not None:
            command[keyword] = _US.unpack_from(data, value_at)[0]
        return command
    command = _decode(data)
    if keyword is not None and not _is_element_at(data, value_at - 8):
        return command      # the id's header bytes sit inside another value: no shortcut
    if len(_DECODED) >= _MAX_DECODED:
        _DECODED.clear()
    _DECODED[key] = command
    return command.copy()


def _is_element_at(data: bytes, wanted: int) -> bool:
    """Whether an element of the (valid) command set *data* starts at *wanted*."""
    offset = 0
    while offset < wanted:
        offset += 8 + _UL.unpack_from(data, offset + 4)[0]
    return offset == wanted


#: element number -> (keyword, how its value is read) for :func:`_decode`.
_US_VALUE, _UL_VALUE, _AT_VALUE, _TEXT_VALUE = range(4)
_READ = {tag & 0xFFFF: (keyword, {"US": _US_VALUE, "UL": _UL_VALUE, "AT": _AT_VALUE}.get(vr, _TEXT_VALUE))
         for tag, (keyword, vr) in ELEMENTS.items()}


def _decode(data: bytes) -> dict:
    command: dict = {}
    offset = 0
    end = len(data)
    unpack = _ELEMENT.unpack_from
    read = _READ
    while offset < end:
        if end - offset < 8:
            raise CommandError("truncated command element")
        group, element, length = unpack(data, offset)
        offset += 8
        if group != 0 or offset + length > end:
            raise CommandError(f"bad command element ({group:04X},{element:04X}) of length {length}")
        entry = read.get(element)
        if entry is None:
            command.setdefault("_unknown", []).append((element, bytes(data[offset:offset + length])))
        else:
            keyword, kind = entry
            if kind == _US_VALUE:
                if length == 2:
                    command[keyword] = _US.unpack_from(data, offset)[0]
                elif length == 0:
                    command[keyword] = None
                else:
                    command[keyword] = list(struct.unpack_from(f"<{length // 2}H", data, offset))
            elif kind == _TEXT_VALUE:
                command[keyword] = _text(bytes(data[offset:offset + length]))
            elif kind == _UL_VALUE:
                command[keyword] = _UL.unpack_from(data, offset)[0] if length == 4 else None
            else:
                command[keyword] = bytes(data[offset:offset + length])
        offset += length
    if "CommandField" not in command:
        raise CommandError("command set without CommandField")
    return command


def _encode_value(vr: str, value) -> bytes:
    if value is None:
        return b""
    if vr == "US":
        if isinstance(value, (list, tuple)):
            return struct.pack(f"<{len(value)}H", *value)
        return struct.pack("<H", value)
    if vr == "UL":
        return struct.pack("<I", value)
    if vr == "AT":
        return bytes(value)
    raw = value.encode("ascii") if isinstance(value, str) else bytes(value)
    if len(raw) % 2:
        raw += b"\0" if vr == "UI" else b" "
    return raw


def encode(command: dict) -> bytes:
    """*command* (``{keyword: value}``) as an encoded command set, with its group length.

    ``CommandDataSetType`` defaults to :data:`NO_DATASET`.
    """
    elements = []
    if "CommandDataSetType" not in command:
        command = dict(command, CommandDataSetType=NO_DATASET)
    for keyword, value in command.items():
        if keyword in ("CommandGroupLength", "_unknown"):
            continue
        tag = TAG_OF.get(keyword)
        if tag is None:
            raise CommandError(f"{keyword} is not a command element")
        elements.append((tag, _encode_value(ELEMENTS[tag][1], value)))
    for element, raw in command.get("_unknown", ()):
        elements.append((element, raw))
    elements.sort()
    body = b"".join(_ELEMENT.pack(0, tag & 0xFFFF, len(raw)) + raw for tag, raw in elements)
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<I", len(body)) + body


#: Templates by their command's fixed fields (:func:`encode_with_id`); bounded.
_TEMPLATES: dict = {}
_MAX_TEMPLATES = 256


def encode_with_id(fields: tuple, id_keyword: str, message_id: int) -> bytes:
    """``encode(dict(fields, **{id_keyword: message_id}))``, from a template.

    The commands of a busy association differ only in their message id (a proxied
    C-FIND's request to the PACS, the final response to its client): the set is
    encoded once per *fields* (a tuple of ``(keyword, value)`` pairs, hashable) with
    the id's two bytes left out, and each call joins them back -- encoding the dict
    was ~6 % of a proxied C-FIND's CPU (bench/dimse)."""
    template = _TEMPLATES.get((fields, id_keyword))
    if template is None:
        encoded = encode(dict(fields, **{id_keyword: 0}))
        tag = TAG_OF[id_keyword]
        offset = 0
        while offset < len(encoded):  # the id's element, found in what encode wrote
            group, element, length = _ELEMENT.unpack_from(encoded, offset)
            if element == tag & 0xFFFF:
                break
            offset += 8 + length
        value = offset + 8
        template = (encoded[:value], encoded[value + 2:])
        if len(_TEMPLATES) >= _MAX_TEMPLATES:
            _TEMPLATES.clear()
        _TEMPLATES[(fields, id_keyword)] = template
    head, tail = template
    return head + _US.pack(message_id) + tail


#: (0000,0100) CommandField C-STORE-RSP, (0000,0120) the id, (0000,0800) no data set, (0000,0900) the status.
_STORE_RSP_MIDDLE = struct.Struct("<HHIH HHIH HHIH HHIH")


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def store_response(sop_class_uid: str, sop_instance_uid: str, message_id: int, status: int,
                   comment: str | None = None) -> bytes:
    """``encode()`` of a C-STORE-RSP, written directly: one per received instance, and
    the dict, its sort and a join per element were a visible share of answering one
    (bench/dimse, "storage_dir").  The same bytes as :func:`encode` (tests/dicom/ul)."""
    if message_id is None:   # a request without one (malformed, answered all the same)
        command = {"AffectedSOPClassUID": sop_class_uid, "CommandField": C_STORE_RSP,
                   "MessageIDBeingRespondedTo": None, "Status": status, "AffectedSOPInstanceUID": sop_instance_uid}
        return encode(command if comment is None else dict(command, ErrorComment=comment))
    sop_class, sop_instance = _ui(sop_class_uid), _ui(sop_instance_uid)
    parts = [_ELEMENT.pack(0, 0x0002, len(sop_class)), sop_class,
             _STORE_RSP_MIDDLE.pack(0, 0x0100, 2, C_STORE_RSP, 0, 0x0120, 2, message_id, 0, 0x0800, 2, NO_DATASET,
                                    0, 0x0900, 2, status)]
    if comment is not None:
        text = _encode_value("LO", comment)
        parts += (_ELEMENT.pack(0, 0x0902, len(text)), text)
    parts += (_ELEMENT.pack(0, 0x1000, len(sop_instance)), sop_instance)
    body = b"".join(parts)
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<I", len(body)) + body


def has_dataset(command: dict) -> bool:
    return command.get("CommandDataSetType", NO_DATASET) != NO_DATASET


def is_response(command: dict) -> bool:
    return bool(command["CommandField"] & RESPONSE_BIT)
