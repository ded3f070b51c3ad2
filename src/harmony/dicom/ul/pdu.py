"""PDU framing with limits, and the few PDUs built without pynetdicom.

Every PDU starts with a six-byte header: type, a reserved byte, a big-endian
32-bit length.  :class:`PDUFramer` cuts PDUs out of the byte stream as it
arrives and *checks the declared length before buffering a byte of the body*:
a peer declaring 4 GiB is refused at the header, not after 256 MiB were read
into memory.  Before an association is established only association-control
PDUs are legal and their size is capped separately (an A-ASSOCIATE-RQ with
128 presentation contexts is ~16 KiB).

P-DATA-TF, A-RELEASE and A-ABORT are simple enough to build with ``struct``;
the hot path (P-DATA) must not construct pynetdicom PDU objects per fragment.
"""

from __future__ import annotations

import struct

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
KNOWN_TYPES = frozenset(range(1, 8))

#: Largest association-negotiation PDU accepted (RQ/AC). 128 contexts with a
#: dozen transfer syntaxes each, plus user information, fit easily.
MAX_ASSOCIATE_PDU = 256 * 1024

_HEADER = struct.Struct(">BxI")
_PDV_HEADER = struct.Struct(">BxIIBB")   # PDU type, reserved, PDU length, item length, context id, control
#: A PDV item's header: item length, context id, message control header.
PDV_ITEM = struct.Struct(">IBB")


class PDUError(Exception):
    """The peer broke the framing rules; the association must be aborted.

    ``reason`` is the A-ABORT provider reason (PS3.8 Table 9-26).
    """

    def __init__(self, message: str, reason: int = 0x00):
        super().__init__(message)
        self.reason = reason


class PDUFramer:
    """Cut whole PDUs out of a byte stream, refusing oversized ones at the header.

    ``max_length`` is the largest PDU *body* accepted now; the association
    raises it once negotiation is over (to our maximum receive length plus
    slack for peers that count the PDV header differently).
    """

    __slots__ = ("_buffer", "max_length")

    def __init__(self, max_length: int = MAX_ASSOCIATE_PDU):
        self._buffer = bytearray()
        self.max_length = max_length

    def feed(self, data: bytes) -> list[tuple[int, bytes | memoryview]]:
        """The whole PDUs *data* completes, as (type, body).  A P-DATA-TF body cut from
        *data* itself (nothing buffered before it, the common case: a peer's PDU in one
        read) is a view of *data*, not a copy; every other body is ``bytes``."""
        buf = self._buffer
        source: bytes | bytearray
        if buf or type(data) is not bytes:
            buf += data
            source = buf
        else:
            source = data
        pdus: list[tuple[int, bytes | memoryview]] = []
        offset = 0
        end = len(source)
        view = None
        while end - offset >= 6:
            pdu_type, length = _HEADER.unpack_from(source, offset)
            if pdu_type not in KNOWN_TYPES:
                raise PDUError(f"unknown PDU type 0x{pdu_type:02X}", reason=0x01)
            if length > self.max_length:
                raise PDUError(f"PDU type 0x{pdu_type:02X} declares {length} bytes, over the limit of "
                               f"{self.max_length}", reason=0x06)
            if end - offset - 6 < length:
                break
            if view is None:
                view = memoryview(source)
            if source is data and pdu_type == P_DATA_TF:
                pdus.append((pdu_type, view[offset + 6:offset + 6 + length]))
            else:
                # One copy through a view (bytes(buf[a:b]) made a bytearray first, and for a
                # 525 KB P-DATA PDU that was 6 ms against 0.1 ms; issue 13, WADO via the bridge).
                pdus.append((pdu_type, bytes(view[offset + 6:offset + 6 + length])))
            offset += 6 + length
        if source is buf:
            if view is not None:
                view.release()   # the buffer cannot shrink while a view of it is held
            if offset:
                del buf[:offset]
        elif offset < end:
            buf += data[offset:] if offset else data
        return pdus

    @property
    def buffered(self) -> int:
        return len(self._buffer)


def header(pdu_type: int, body_length: int) -> bytes:
    return _HEADER.pack(pdu_type, body_length)


def release_rq() -> bytes:
    return _HEADER.pack(A_RELEASE_RQ, 4) + b"\0\0\0\0"


def release_rp() -> bytes:
    return _HEADER.pack(A_RELEASE_RP, 4) + b"\0\0\0\0"


def abort(source: int = 0x02, reason: int = 0x00) -> bytes:
    """A-ABORT: source 0 = service user, 2 = service provider (with a reason)."""
    return _HEADER.pack(A_ABORT, 4) + bytes((0, 0, source, reason if source == 2 else 0))


def associate_rj(result: int, source: int, reason: int) -> bytes:
    return _HEADER.pack(A_ASSOCIATE_RJ, 4) + bytes((0, result, source, reason))


def pdata(context_id: int, control: int, fragment: bytes | memoryview) -> bytes:
    """One P-DATA-TF PDU carrying one PDV (the only shape we send)."""
    n = len(fragment)
    return _PDV_HEADER.pack(P_DATA_TF, n + 6, n + 2, context_id, control) + bytes(fragment)


def pdvs(body: bytes):
    """The (context id, control header, fragment) of each PDV in a P-DATA-TF body."""
    offset = 0
    end = len(body)
    while offset < end:
        if end - offset < 6:
            raise PDUError("truncated PDV item", reason=0x06)
        (item_length,) = struct.unpack_from(">I", body, offset)
        if item_length < 2 or offset + 4 + item_length > end:
            raise PDUError(f"PDV item length {item_length} does not fit its PDU", reason=0x06)
        yield body[offset + 4], body[offset + 5], memoryview(body)[offset + 6:offset + 4 + item_length]
        offset += 4 + item_length


def parse_abort(body: bytes) -> tuple[int, int]:
    """(source, reason) of an A-ABORT body."""
    if len(body) < 4:
        return 0, 0
    return body[2], body[3]


def parse_rj(body: bytes) -> tuple[int, int, int]:
    """(result, source, reason) of an A-ASSOCIATE-RJ body."""
    if len(body) < 4:
        return 1, 1, 1
    return body[1], body[2], body[3]
