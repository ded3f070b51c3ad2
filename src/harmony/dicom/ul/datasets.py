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

import os
import zlib
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from harmony.dicom import fastcmd
from harmony.dicom.ul.pdu import PDUError

#: Largest identifier accepted (a C-FIND identifier with every return key is a few KiB).
MAX_IDENTIFIER_BYTES = 1024 * 1024
DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1442.1"


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
    """Preamble, ``DICM`` and the group-0002 elements of a Part-10 file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    if source_aet:
        meta.SourceApplicationEntityTitle = source_aet
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + buffer.getvalue()


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
