"""Crash-safe file writing: temp file in the same filesystem, fsync, rename,
directory fsync - the sequence after which a file survives power loss.

The store may also *overlap* those flushes (:func:`claim_name`): a file given a
name nobody had yet is synced together with its folder and its index commit,
and the store's start-up recovery checks whatever such a crash leaves (see
:mod:`harmony.storage.store`, "Overlapped flushes").

Also the disk-space guard: :class:`SpaceGuard` refuses a write *before* it
would take the filesystem below a configured floor, and re-checks while a
stream of unknown length is being written, so the disk never fills and a
refusal never follows a partial write that anybody was told about.
"""

from __future__ import annotations

import ctypes
import os
import sys
import uuid
from pathlib import Path
from typing import BinaryIO

from harmony.dicom.files import fsync_dir as fsync_path
from harmony.storage.errors import StorageFailure, StorageFull

CHUNK = 1024 * 1024
#: While streaming, re-check free space after this many bytes.
RECHECK_EVERY = 16 * 1024 * 1024


# One fsync helper for files and folders (a folder fsync makes a rename or create in it durable).
fsync_dir = fsync_file = fsync_path


def _linux_syncfs():
    """``syncfs(2)`` through libc (Linux: the os module has no binding; the call
    lets go of the GIL), or None where there is none.

    Why: the flushes no answer waits for (harmony.storage.journal's named files,
    the store's journaled instances) are many small files and their folders.  One
    ``syncfs`` writes them all back together - data, inodes and folder blocks
    merged, one device flush - where a ``fdatasync`` each was a device flush per
    file and its inode block written alone (bench/dimse "storage_dir", bench/ingest
    "C-STORE, session 13").  The price: it also writes whatever else is dirty on
    that file system, behind the answers.  Since Linux 5.8 it reports a write-back
    error met on the file system since the descriptor was opened."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    call.argtypes, call.restype = [ctypes.c_int], ctypes.c_int

    def syncfs(fd: int) -> None:
        if call(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
    return syncfs


#: ``syncfs(fd)``: every dirty file and folder of *fd*'s file system written and flushed; None
#: where there is none (callers sync file by file then).
syncfs = _linux_syncfs()


def fdatasync_file(path: Path | str) -> None:
    """A file's data and size on disk (what a later rename needs; its name is made
    durable by the folder fsync, and timestamps need not be)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data) -> None:
    """Write all of *data* to the file descriptor *fd* (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def make_dirs(path: Path, stop: Path) -> None:
    """``mkdir -p`` that fsyncs each parent it adds an entry to (below *stop*)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p == stop or p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        fsync_dir(d.parent)


class SpaceGuard:
    """Keeps ``min_free_bytes`` free on the store's filesystem.

    ``free_bytes`` is injectable so the refusal path can be tested without
    filling a real disk.
    """

    def __init__(self, root: Path, min_free_bytes: int, free_bytes=None):
        self.root = Path(root)
        self.min_free_bytes = int(min_free_bytes)
        self._free_bytes = free_bytes or self._statvfs_free

    def _statvfs_free(self) -> int:
        where = self.root
        while True:
            try:   # one statvfs per check (it runs per instance ingested), no exists() first
                st = os.statvfs(where)
                break
            except (FileNotFoundError, NotADirectoryError):
                if where.parent == where:
                    raise
                where = where.parent  # not created yet: its filesystem is its nearest parent's
        return st.f_bavail * st.f_frsize

    def free_bytes(self) -> int:
        return self._free_bytes()

    def check(self, incoming: int) -> None:
        """Refuse (StorageFull) if writing *incoming* more bytes crosses the floor."""
        free = self.free_bytes()
        if free - incoming < self.min_free_bytes:
            raise StorageFull(f"refusing {incoming} bytes: {free} bytes free, floor is {self.min_free_bytes}")


class TempFile:
    """A temp file in *folder* that becomes durable only by :meth:`commit`.

    Use as a context manager: leaving the block without a commit (an exception,
    a refusal) deletes the temp file, so nothing half-written is ever left
    where a reader could find it.
    """

    def __init__(self, folder: Path, guard: SpaceGuard | None = None, fsync: bool = True):
        self.path = Path(folder) / f".{uuid.uuid4().hex}.part"
        self.guard = guard
        self.fsync = fsync
        self.size = 0
        self._since_check = 0
        self._fh: BinaryIO | None = None
        self.committed = False

    def __enter__(self):
        self._fh = open(self.path, "xb")
        return self

    def write(self, data: bytes) -> None:
        if self.guard is not None:
            self._since_check += len(data)
            if self._since_check >= RECHECK_EVERY:
                self._since_check = 0
                self.guard.check(len(data))
        try:
            self._fh.write(data)
        except OSError as e:
            raise _io_error(e) from None
        self.size += len(data)

    def copy_from(self, source: Path) -> None:
        with open(source, "rb") as src:
            while True:
                chunk = src.read(CHUNK)
                if not chunk:
                    break
                self.write(chunk)

    def close(self, sync: bool = True) -> None:
        """Flush and fsync the data (the rename comes later, in :meth:`commit`);
        *sync* False leaves the fsync to the caller (:func:`claim_name`)."""
        if self._fh is not None:
            try:
                self._fh.flush()
                if self.fsync and sync:
                    os.fdatasync(self._fh.fileno())  # data and size: the folder fsync makes the name durable
            except OSError as e:
                raise _io_error(e) from None
            finally:
                self._fh.close()
                self._fh = None

    def claim(self, final: Path, stop: Path) -> bool:
        """Close the file and give it the name *final* without syncing anything
        yet (:func:`claim_name`); True when *final* is a new name whose data the
        caller still has to sync (always False without ``fsync``)."""
        self.close(sync=False)
        if self.fsync:
            fresh = claim_name(self.path, final, stop)
        else:
            make_dirs(final.parent, stop)
            os.replace(self.path, final)
            fresh = False
        self.committed = True
        return fresh

    def commit(self, final: Path, stop: Path, sync_folder: bool = True) -> None:
        """Atomically move the (closed, synced) file to *final*; fsync its folder
        unless the caller does that for a batch of files (*sync_folder* False)."""
        self.close()
        make_dirs(final.parent, stop)
        os.replace(self.path, final)
        if self.fsync and sync_folder:
            fsync_dir(final.parent)
        self.committed = True

    def __exit__(self, *exc):
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if not self.committed:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        return False


def claim_name(src: Path | str, final: Path, stop: Path, journaled: bool = False, keep_source: bool = False) -> bool:
    """Give the closed file *src* (ours, same filesystem) the name *final*.

    A name nobody has yet is claimed at once with a hard link - atomic, and it
    fails if the name exists, so two writers never both think the name new -
    and True is returned: *src*'s data is NOT synced yet, the caller syncs it
    (and the folder) before telling anybody the file is durable.  An existing
    name (the same instance again) is only ever replaced by synced data:
    *src* is fdatasync'd first, then renamed over it, and False is returned.
    Either way only the folder fsync is left to make the name durable.

    *journaled*: *src*'s bytes are already durable elsewhere (a journal that
    writes them again after a crash), so an existing name is replaced at once
    too, and True is returned (the data sync is still the caller's).

    *keep_source*: a new name leaves *src*'s name in place too (a second link to
    the same file), for the caller to remove later, off its critical path; an
    existing name still takes *src* by rename.

    The folders are made only when the link finds them missing: the usual
    instance goes into a series folder that exists, and a ``stat`` of each of
    its parents first was a wasted system call per instance.
    """
    try:
        try:
            os.link(src, final)
        except FileNotFoundError:
            make_dirs(final.parent, stop)
            os.link(src, final)
    except FileExistsError:
        if journaled:
            os.replace(src, final)
            return True
        fdatasync_file(src)
        os.replace(src, final)
        return False
    if not keep_source:
        os.unlink(src)  # the temp name: gone or not after a crash, the temp sweep deletes it
    return True


def _io_error(e: OSError):
    import errno
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull("the disk is full")
    return StorageFailure(f"write failed: {e.strerror}")


def clear_temp(folder: Path) -> int:
    """Delete temp files a crash left behind (none of them was acknowledged)."""
    n = 0
    for p in Path(folder).glob(".*.part"):
        try:
            p.unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n


__all__ = ["SpaceGuard", "TempFile", "claim_name", "fdatasync_file", "fsync_dir", "fsync_file", "make_dirs",
           "clear_temp"]
