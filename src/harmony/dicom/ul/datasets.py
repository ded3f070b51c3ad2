"""Data sets on an association: identifiers in memory, instances straight to disk.

A C-STORE data set is written to a Part-10 file as its fragments arrive
(:class:`PartTenSink`): the file meta information is made from the command and
the negotiated transfer syntax, so the file on disk is a complete DICOM file
the moment the last fragment lands, memory stays at one PDU whatever the
instance's size, and nothing is decoded on the way in.  Identifiers (C-FIND,
C-GET, C-MOVE) are small and kept in memory with a cap (:class:`MemorySink`).
"""

from __future__ import annotations

import os
import struct
import zlib
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from harmony.dicom import fastcmd
from harmony.dicom.ul.association import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION  # even lengths
from harmony.dicom.ul.pdu import PDUError

#: Largest identifier accepted (a C-FIND identifier with every return key is a few KiB).
MAX_IDENTIFIER_BYTES = 1024 * 1024
DEFLATED = "1.2.840.10008.1.2.1.99"


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
    """Preamble, ``DICM`` and the group-0002 elements of a Part-10 file.

    Encoded by hand (explicit VR little endian, as PS3.10 fixes for group 0002):
    it runs once per received instance, and pydicom's writer cost ~0.5-0.9 ms
    of GIL for these few elements (this: ~8 us).  tests/test_dicom_files.py checks it byte for
    byte against pydicom's ``write_file_meta_info``.
    """
    elements = [_short(0x0002, b"UI", _uid(sop_class_uid)), _short(0x0003, b"UI", _uid(sop_instance_uid)),
                _short(0x0010, b"UI", _uid(transfer_syntax)), _short(0x0012, b"UI", _uid(IMPLEMENTATION_CLASS_UID)),
                _short(0x0013, b"SH", IMPLEMENTATION_VERSION.encode("ascii"))]
    if source_aet:
        aet = source_aet.encode("ascii", "replace")
        elements.append(_short(0x0016, b"AE", aet + b" " * (len(aet) % 2)))
    body = _VERSION + b"".join(elements)
    return b"\0" * 128 + b"DICM" + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body


#: (0002,0001) File Meta Information Version: OB, 2 reserved bytes, 32-bit length, 00 01.
_VERSION = struct.pack("<HH2s2xI", 2, 1, b"OB", 2) + b"\0\1"


def _uid(uid: str) -> bytes:
    raw = uid.encode("ascii", "replace")
    return raw + b"\0" * (len(raw) % 2)


def _short(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 2, element, vr, len(value)) + value


class PartTenSink:
    """A C-STORE data set written to *path* as a Part-10 file while it arrives, up to *limit* bytes."""

    def __init__(self, path: Path, command: dict, transfer_syntax: str, limit: int, source_aet: str = ""):
        self.path = Path(path)
        self.limit = limit
        self.received = 0
        self._file = open(self.path, "wb")
        self._file.write(file_meta_bytes(command.get("AffectedSOPClassUID", ""),
                                         command.get("AffectedSOPInstanceUID", ""), transfer_syntax, source_aet))

    def write(self, fragment) -> None:
        self.received += len(fragment)
        if self.received > self.limit:
            raise PDUError(f"data set over the limit of {self.limit} bytes", reason=0x00)
        self._file.write(fragment)

    def close(self) -> Path:
        self._file.close()
        return self.path

    def abort(self) -> None:
        self._file.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


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
