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
    elements = [_meta(0x0001, "OB", b"\0\1"),
                _meta(0x0002, "UI", sop_class_uid), _meta(0x0003, "UI", sop_instance_uid),
                _meta(0x0010, "UI", transfer_syntax), _meta(0x0012, "UI", IMPLEMENTATION_CLASS_UID),
                _meta(0x0013, "SH", IMPLEMENTATION_VERSION)]
    if source_aet:
        elements.append(_meta(0x0016, "AE", source_aet))
    body = b"".join(elements)
    return b"\0" * 128 + b"DICM" + _meta(0x0000, "UL", struct.pack("<I", len(body))) + body


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
    """A C-STORE data set written to *path* as a Part-10 file while it arrives, up to *limit* bytes."""

    def __init__(self, path: Path, command: dict, transfer_syntax: str, limit: int, source_aet: str = "",
                 file=None):
        self.path = Path(path)
        self.limit = limit
        self.received = 0
        #: *file*: *path* already created and open for writing (see dicom_scp's spare files).
        self._file = file if file is not None else open(self.path, "wb")
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
