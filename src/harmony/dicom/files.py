"""DICOM files on disk: validated UIDs, staging folders and durable writes.

Paths are never built from raw input: only from UIDs that pass
:func:`valid_uid` (Harmony's one UID policy, :mod:`harmony.dicom.uids`) or from names Harmony made itself, so a crafted
SOP Instance UID like ``../../etc`` can never leave the storage folder.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian

from harmony.dicom.results import DicomInstance
from harmony.dicom.uids import is_uid as valid_uid  # noqa: F401 - re-exported: harmony.dicom.files.valid_uid
from harmony.dicom.uids import strip_padding

#: Files up to this size are read whole and parsed from memory (see check_complete).
WHOLE_READ_BYTES = 1024 * 1024
_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]


def read_instance(path: Path, owned: bool = False, ds=None) -> DicomInstance:
    """Describe a Part-10 file without loading its pixel data (*ds*: its
    already parsed header, e.g. from :func:`check_complete`)."""
    path = Path(path)
    if ds is None:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    meta = ds.file_meta
    return DicomInstance(
        path=path,
        sop_class_uid=strip_padding(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "")),
        sop_instance_uid=strip_padding(ds.get("SOPInstanceUID", "") or meta.get("MediaStorageSOPInstanceUID", "")),
        transfer_syntax_uid=strip_padding(meta.get("TransferSyntaxUID", "")),
        study_instance_uid=strip_padding(ds.get("StudyInstanceUID", "")),
        series_instance_uid=strip_padding(ds.get("SeriesInstanceUID", "")),
        size=path.stat().st_size,
        owned=owned,
    )


class Staging:
    """A private folder for instances in flight (retrieved, not yet sent on).

    Each process stages under ``<base>/<pid>`` (worker processes share the
    storage path), names are random so two retrieves of the same instance never
    collide, and whatever a consumer never released is removed when the owner
    closes - or, after a crash, by the next process that starts staging there.
    """

    def __init__(self, base: Path):
        self.base = Path(base)
        self.folder = self.base / str(os.getpid())
        self._ready = False

    def ensure(self) -> "Staging":
        if not self._ready:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._purge_dead()
            self._ready = True
        return self

    def _purge_dead(self) -> None:
        for child in self.base.iterdir():
            if child.is_dir() and child.name.isdigit() and child != self.folder and not process_alive(int(child.name)):
                shutil.rmtree(child, ignore_errors=True)

    def new_path(self) -> Path:
        return self.folder / f"{uuid.uuid4().hex}.dcm"

    def adopt(self, src: Path) -> Path:
        """Move a finished temporary file into staging (a rename when possible)."""
        dst = self.new_path()
        shutil.move(str(src), dst)
        return dst

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self._ready = False


def process_alive(pid: int) -> bool:
    """Whether process *pid* still runs (a folder or journal named after a process is
    another live process's while it does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_copy(src: Path, dst: Path) -> Path:
    """Copy *src* to *dst* so that *dst* is either absent or complete and on disk:
    write a temporary file beside it, fsync, rename, fsync the folder."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fdatasync(fout.fileno())  # data and size; the rename below is made durable by the folder fsync
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(dst.parent)
    return dst


def durable_move(src: Path, dst: Path) -> Path:
    """Move *src* (a file we own, e.g. a received instance in staging) to *dst* durably:
    its data synced, renamed into place, the folder synced.  A rename when both are on
    one file system (staging beside the store is), :func:`durable_copy` otherwise."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        durable_copy(src, dst)
        os.unlink(src)
        return dst
    fsync_dir(dst.parent)
    return dst


class CorruptDataset(ValueError):
    pass


def stamp_of(path) -> tuple:
    """What tells cheaply whether a file is still the one parsed: its name, size,
    modification time and inode (a rename, a rewrite or a replacement changes it)."""
    st = os.stat(path)
    return (os.fspath(Path(path)), st.st_size, st.st_mtime_ns, st.st_ino)


def parse_stamped(path: Path) -> tuple:
    """``(stamp, dataset)``: :func:`check_complete` of *path* with the stamp it had
    before the parse, so a parse can be handed on (``DicomInstance.parsed``) and
    reused only while the file is unchanged."""
    stamp = stamp_of(path)
    return stamp, check_complete(path)


def check_complete(path: Path | bytes):
    """Raise :class:`CorruptDataset` unless every element of the file fits in it;
    return the parsed dataset (large values deferred, not loaded).  *path* may
    also be the file's bytes, already read.

    pydicom reads a truncated file or an element whose length overruns the file
    without complaint when values are deferred, so the element table is checked
    against the file size - without loading large values into memory.
    """
    source: Path | BytesIO
    if isinstance(path, bytes):
        size, source = len(path), BytesIO(path)
    else:
        path = source = Path(path)
        size = path.stat().st_size
    if size <= WHOLE_READ_BYTES and not isinstance(source, BytesIO):
        # One read, then parsed from memory: pydicom reading the file itself asks
        # the kernel for its position at every element (an lseek each; best of 8: 286 -> 232 us
        # per parse of a received instance, bench/dimse "CPU per instance").
        # Deferred values are then read from these bytes, which live as long as
        # the dataset.
        with open(path, "rb") as fp:
            data = fp.read()
        size, source = len(data), BytesIO(data)
    try:
        ds = dcmread(source, defer_size=256)
        if len(ds) == 0:
            raise CorruptDataset("the dataset has no elements")
        if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            # Offsets are into the inflated stream, not the file: read it whole
            # instead (a truncated deflate stream fails to inflate).
            return dcmread(BytesIO(path) if isinstance(path, bytes) else path)
        for tag in list(ds.keys()):
            raw = ds.get_item(tag, keep_deferred=True)
            length = getattr(raw, "length", 0)
            tell = getattr(raw, "value_tell", None)
            if tell is not None and length != 0xFFFFFFFF and tell + length > size:
                raise CorruptDataset(f"element {tag} runs past the end of the data")
        return ds
    except CorruptDataset:
        raise
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for bad input
        raise CorruptDataset(f"cannot decode the dataset: {e}") from None
