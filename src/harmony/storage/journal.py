"""A small ingest journal for a plain folder of files (``dicom_scp``'s ``storage_dir``).

Why it exists: a file in a folder is durable after three things - its data
synced, its name in the folder, the folder synced - and done in that order
they are two flushes in a row (fdatasync, then the folder's fsync after the
rename), each a file-system journal commit.  One flush is enough before a
sender is told Success if the bytes are first made durable somewhere that
needs no metadata written: a log file whose blocks were written and synced
when it was made, so a write over them changes no size and no block map, and
its fdatasync is one data write and a disk cache flush (bench/dimse/README.md
has the numbers: about half a sqlite WAL commit of the same bytes here).

So each process keeps a log (``<folder>/.journal/<pid>.log``, preallocated).
Placing a small file:

1. its bytes are appended to the log as one checksummed record, with one
   ``pwrite`` and one ``fdatasync`` (on Linux one ``pwritev2`` with
   ``RWF_DSYNC``, the same two in one call) - from here on the file survives a crash.
   One writer thread makes every flush: placements handed over while a
   flush runs share the next one (group commit);
2. it is given its name in the folder - a new name with a hard link before its
   data is synced (atomic, fails if the name exists), an existing name
   replaced (:func:`harmony.storage.files.claim_name`) - so a reader finds it
   at once;
3. the caller may answer; a flusher thread makes the files durable in
   batches, every few tens of milliseconds: on Linux one ``syncfs`` of the
   folder's file system for the whole batch, elsewhere each file's fdatasync,
   then one fsync per folder for all the files named in it.

Why ``syncfs`` there (session 11, bench/dimse/README.md): on this ext4 without a
journal each file's ``fdatasync`` writes its data block, its inode's table block
and flushes the disk cache, and the folder's ``fsync`` its block again - three
writes and a cache flush per file, made on a thread of ours, every release of
the GIL around them a chance for the reactor and the writer to fight for it
(``strace -c``: 16 ``futex`` calls an instance).  One ``syncfs`` per batch
writes each block once (files made one after another share inode table and
folder blocks) with one cache flush, and releases the GIL once.  Its price: it
also writes whatever else on that file system is dirty at the time - behind
the answers, bounded by the batch interval.

The log starts again from its beginning (a new *epoch* in its header) at the
first commit that finds every file it holds synced: records of an older epoch
that still lie beyond the new end are never replayed.  Only when syncs lag
behind does the log grow; when it is full a commit waits for the flusher.

An instance received into memory (``dicom_scp``'s C-STORE of a small data
set) is handed over whole with :meth:`FolderJournal.store`: the journal's one
writer thread commits it with whatever else waits, then writes the file and
gives it its name on the same thread, and calls back - one hand-off each way
per instance, no staging file written and read again (bench/dimse: the
hand-offs and re-reads were a third of the path's CPU).

Where the kernel offers io_uring and the journal was given the reactor
(:meth:`FolderJournal.use_ring`, by ``dicom_scp``), an instance stored from the
reactor is written by the reactor itself: the log's write and flush submitted to
the kernel (harmony.compat.uring), the reactor free meanwhile, the file named and
its sender told when the completion comes - no thread hand-off either way
(session 15, docs/architecture.md: +10-18 % instances a second into
``storage_dir``).  Only when nothing in it can block (the log made and with room,
the folder known, a spare temporary file ready); anything else goes to the
writer thread, and the two never write the log at once.  The log is written
around the page cache (``O_DIRECT``, :class:`_DirectLog`) where its file system
allows, on either path.

A process that starts replays the logs of processes that are gone (the
pid-named files, as :class:`harmony.dicom.files.Staging` does): the records of
the log's current epoch up to the first damaged one (a write a power loss cut
short was never acknowledged), the latest for each name, are written again,
durably, then the log is removed.  Files larger than ``max_bytes`` skip the
log and are moved the classic way (sync, rename, folder sync); one that
replaces a name the log still holds waits for that name's sync and is then
recorded as *forgotten* so a replay cannot put the older bytes back.

A replay can also bring back a file that a consumer deleted from the folder
after it was placed but before the log started again (milliseconds, or as
long as syncs lag): delivery is at least once, never lost.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import select
import struct
import threading
import uuid
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from twisted.internet import threads

from harmony.compat.spin import await_completions, watch_threads
from harmony.compat.uring import Ring, RingReader
from harmony.dicom.files import durable_move, process_alive
from harmony.log import get_logger
from harmony.storage.files import claim_name, fsync_dir, make_dirs, syncfs, write_all

log = get_logger("harmony.storage.journal")

#: Files up to this size are journaled; larger ones are moved the classic way.
JOURNAL_MAX_BYTES = 256 * 1024
#: The log's size, written with zeros and synced once when it is made.
LOG_BYTES = 8 * 1024 * 1024

#: The flusher gathers files this long (seconds) after the first, unless this many wait (or
#: the log is full): the files are durable in the log meanwhile, and one sync round a batch
#: costs about the same whatever the batch's size.
SYNC_INTERVAL = 0.05
SYNC_BATCH = 512

#: Log header: magic, format version, epoch; CRC-32 of those.
_HEADER = struct.Struct("<4sIQI")
_MAGIC = b"HJL1"
#: A record: epoch, kind, name length, data length; CRC-32 of header fields, name and data.
_RECORD = struct.Struct("<QBHII")
_PLACED, _FORGOTTEN = 1, 2
#: A forgotten record's data: the epoch and [from, to) offsets of the name's records it forgets.
_RANGE = struct.Struct("<QQQ")
#: Temporary files kept created ahead for held files (by the flusher, after each sync round):
#: at least this many, twice what the last round took, at most SPARE_TEMPS_MAX.
SPARE_TEMPS = 16
SPARE_TEMPS_MAX = 128
#: Held files the flusher may keep open while they wait for their sync (each saves an open and a close).
MAX_OPEN_TO_SYNC = 256
#: Threads that read staged files into the journal while their callers check them (the writer flushes).
COMMIT_THREADS = 4
#: How long (seconds) a close waits for the reactor to reap the ring's last write.
RING_CLOSE_WAIT = 30.0
_SUFFIX = ".log"
#: Held files are written under ``<pid>.<n>.part`` in the journal's folder, then renamed into place.
_TEMP = ".part"


class _Batch:
    """Records waiting for one write and one flush."""

    __slots__ = ("records", "size", "done", "error")

    def __init__(self):
        #: [kind, relpath, data, epoch, offset, held] - epoch and offset set when written;
        #: *held*: a :class:`_Held` file to write and name after the flush (:meth:`FolderJournal.store`).
        self.records: list[list] = []
        self.size = 0
        self.done = False
        self.error: BaseException | None = None


class _Held:
    """A file handed over in memory (:meth:`FolderJournal.store`): where it goes, the
    temporary name it is written under first, and whom to tell."""

    __slots__ = ("dest", "temp", "done", "fd")

    def __init__(self, dest: str, temp: str, done):
        self.dest, self.temp, self.done = dest, temp, done
        #: The file, written and still open: the flusher syncs it without opening it again.
        self.fd: int | None = None


class Placement:
    """A file being journaled (:meth:`FolderJournal.begin`): claim it or withdraw it."""

    def __init__(self, journal: FolderJournal, src: Path, dest: Path, relpath: str):
        self.journal, self.src, self.dest, self.relpath = journal, src, dest, relpath
        self.committed: Future = Future()

    def claim(self) -> None:
        """Wait for the journal's flush, then give the file its name: on return
        it survives a crash."""
        self.committed.result()  # an OSError when the journal refused it
        journal = self.journal
        try:
            claim_name(self.src, self.dest, journal.folder, journaled=True)
        except OSError:
            try:
                durable_move(self.src, self.dest)  # another file system (EXDEV): copied, synced, renamed
            finally:
                journal._synced([self.relpath])  # settled either way: the log may start again
            return
        journal._placed(self.relpath, self.dest)

    def withdraw(self) -> None:
        """The file is not to be placed (it failed its checks): its record is
        withdrawn, durably, so a replay does not write it either."""
        try:
            epoch, offset = self.committed.result()
        except OSError:
            return  # never journaled
        try:
            self.journal._commit(_FORGOTTEN, self.relpath, _RANGE.pack(epoch, offset, offset + 1))
        finally:
            self.journal._synced([self.relpath])


class FolderJournal:
    """The journal of one process for *folder* (see the module docstring)."""

    def __init__(self, folder: Path, max_bytes: int = JOURNAL_MAX_BYTES, log_bytes: int = LOG_BYTES):
        self.folder = Path(folder)
        self.dir = self.folder / ".journal"
        #: *folder* as the start of a path string (:meth:`store` takes strings).
        self._prefix = f"{self.folder}/"
        self.max_bytes = max_bytes
        # Whole blocks: a direct write (:class:`_DirectLog`) pads the last one, never past the end.
        smallest = max(log_bytes, _HEADER.size + _RECORD.size + 4096 + max_bytes)
        self.log_bytes = -(-smallest // _DirectLog.BLOCK) * _DirectLog.BLOCK
        self._pid = os.getpid()
        self.path = self.dir / f"{self._pid}{_SUFFIX}"
        self._fd: int | None = None
        #: The log opened around the page cache, where the file system allows it (its writes).
        self._direct: _DirectLog | None = None
        # One lock; the writer and the flusher each sleep on a condition of their own, so
        # waking one does not wake every thread that waits on the journal.
        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        self._wake_flusher = threading.Condition(lock)
        #: The batch the writer's next flush carries.
        self._batch = _Batch()
        self._epoch = 0
        self._end = 0        # where the next record goes
        #: Names recorded in this epoch -> files of theirs not yet synced.
        self._names: dict[str, int] = {}
        #: Placed files written to the log whose sync has not finished.
        self._written_unsynced = 0
        #: A write to the log failed: its state is unknown, every later placement is refused.
        self._write_failed: BaseException | None = None
        #: Files named but not yet synced, for the flusher: (relpath, path).
        self._to_sync: list[tuple[str, Path | str, int | None]] = []
        #: Descriptors of held files waiting in _to_sync (bounded: past MAX_OPEN_TO_SYNC, synced by name).
        self._open_to_sync = 0
        #: The log is full and a commit waits for the flusher: no gathering.
        self._hurry = False
        #: The log's file system (``st_dev``): the one a ``syncfs`` of the log makes durable.
        self._log_dev: int | None = None
        self._flusher: threading.Thread | None = None
        #: The one thread that writes and flushes the log (every commit is its work).
        self._writer: threading.Thread | None = None
        self._writer_done = False
        #: The writer sleeps reading this eventfd (made with the thread): a wake-up is a
        #: ``write``, which lets go of the GIL, where notifying a Condition did not -- and the
        #: woken writer preempting the reactor in it was a fifth of the reactor's GIL samples.
        self._writer_event: int | None = None
        self._writer_asleep = False
        #: Who writes the log now: the writer thread, or the reactor's ring (one at a time).
        self._thread_writing = False
        self._ring_writing = False
        #: The reactor's io_uring (:meth:`use_ring`), its reader, and the thread it serves.
        self._ring: Ring | None = None
        self._ring_reader: RingReader | None = None
        self._ring_reactor: Any = None
        self._ring_thread: int | None = None
        self._committer: ThreadPoolExecutor | None = None
        #: Placements handed to the committer and not yet journaled (under the lock).
        self._committing = 0
        #: Folders known to exist (a file named in one needs no mkdir check).
        self._folders: set[str] = set()
        self._temps = itertools.count()
        #: Temporary files the flusher created ahead for held files: (path, descriptor).  The
        #: flusher appends, the writer pops (each atomic under the GIL); emptied at close.
        self._spare_temps: list[tuple[str, int]] = []
        #: Spares the writer has taken so far, and that count at the flusher's last top-up.
        self._spares_taken = 0
        self._spares_seen = 0
        #: Files have been handed over in memory (:meth:`store`): spares are worth making.
        self._holding = False
        #: Log flushes so far (one per group of placements), and how many of them the reactor's ring made.
        self.flushes = 0
        self.ring_flushes = 0
        #: A file's or folder's sync failed: the log must survive for the next start to replay.
        self.broken = False
        self.closed = False
        watch_threads(self)   # the reactor does not spin while the journal works

    # ------------------------------------------------------------------ start and stop

    def open(self) -> int:
        """Replay the logs of processes that are gone; returns the files written again."""
        self._pid = os.getpid()
        self.path = self.dir / f"{self._pid}{_SUFFIX}"  # this process's (a worker made from a fork has its own)
        make_dirs(self.dir, self.folder)
        replayed = 0
        for other in sorted(self.dir.glob("*")):
            if other.suffix == _TEMP and other.name.split(".")[0].isdigit() \
                    and not process_alive(int(other.name.split(".")[0])):
                _remove(other)  # a held file a stopped process was writing: never answered for
                continue
            if other.suffix not in (_SUFFIX, ".sqlite") or other == self.path or not other.stem.isdigit() \
                    or process_alive(int(other.stem)):
                continue
            replayed += self._replay(other)
        if replayed:
            log.info("storage journal {folder}: {n} file(s) a stopped process had journaled written again",
                     folder=str(self.folder), n=replayed)
        return replayed

    def _replay(self, journal: Path) -> int:
        files = read_log(journal.read_bytes()) if journal.suffix == _SUFFIX else _read_sqlite_journal(journal)
        for relpath, data in files.items():
            dest = self.folder / relpath
            if not _inside(self.folder, dest):
                continue
            make_dirs(dest.parent, self.folder)
            tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fdatasync(f.fileno())
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        for suffix in ("", "-wal", "-shm"):
            _remove(Path(f"{journal}{suffix}"))
        return len(files)

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until every placed file's own syncs have finished (or one failed)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._written_unsynced or self.broken, timeout)

    def close(self) -> None:
        """Wait for the syncs; remove the log if every file is synced."""
        if self.closed:
            return
        with self._cond:
            self.closed = True
            self._cond.notify_all()
            self._wake_flusher.notify()
            committer = self._committer
            wake, self._writer_asleep = self._writer_asleep, False
        self._stop_ring()
        with self._cond:
            # Taken after the ring's last write: the files it named went to the flusher (which
            # it may have started), and the flusher waited for them (_flush_loop).
            flusher = self._flusher
            self._wake_flusher.notify()
        if wake:
            os.eventfd_write(self._writer_event, 1)
        if committer is not None:
            committer.shutdown(wait=True)
        with self._cond:
            writer = self._writer
        if writer is not None:
            writer.join()   # what was handed over before the close is written first
            os.close(self._writer_event)
        if flusher is not None:
            flusher.join()
        spares, self._spare_temps = self._spare_temps, []
        for temp, fd in spares:
            os.close(fd)
            _discard(temp)
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            if self.broken or self._written_unsynced or self._write_failed is not None:
                return  # the next start replays it
        _remove(self.path)

    # ------------------------------------------------------------------ placing (any thread)

    def place(self, src: Path, dest: Path) -> None:
        """Move the file *src* (ours) to *dest* inside the folder, durably: on
        return it survives a crash (see the module docstring)."""
        placement = self.begin(src, dest, at_once=True)
        if placement is None:
            self._place_large(src, dest, dest.relative_to(self.folder).as_posix())
        else:
            placement.claim()

    def begin(self, src: Path, dest: Path, at_once: bool = False, size: int | None = None) -> Placement | None:
        """Start journaling *src* for *dest* on a commit thread, so the caller
        can check the file meanwhile; then :meth:`Placement.claim` (it is
        placed) or :meth:`Placement.withdraw` (it is not).  ``None`` (and
        nothing done) when the file is too large for the journal.
        *at_once*: journal it on this thread (nothing to do meanwhile); *size*:
        the file's, when the caller knows it."""
        if self.closed:
            raise OSError(5, "the storage journal is closed")
        relpath = dest.relative_to(self.folder).as_posix()
        if (src.stat().st_size if size is None else size) > self.max_bytes:
            return None
        placement = Placement(self, src, dest, relpath)
        if at_once:
            placement.committed.set_result(self._commit(_PLACED, relpath, src.read_bytes()))
        else:
            with self._cond:
                if self._committer is None:
                    self._committer = ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="harmony-journal-commit")
                committer = self._committer
            with self._cond:
                self._committing += 1
            try:
                placement.committed = committer.submit(self._commit_counted, relpath, src)
            except RuntimeError:  # closed meanwhile
                with self._cond:
                    self._committing -= 1
                raise OSError(5, "the storage journal is closed") from None
        return placement

    def _commit_counted(self, relpath: str, src: Path):
        """:meth:`_commit` of a placement on a commit thread, counted in :attr:`working`."""
        try:
            return self._commit(_PLACED, relpath, src.read_bytes())
        finally:
            with self._cond:
                self._committing -= 1

    def _placed(self, relpath: str, dest: Path | str) -> None:
        """*dest* has its name: its syncs go to the flusher."""
        self._placed_many([(relpath, dest, None)])

    def _placed_many(self, named: list[tuple[str, Path | str, int | None]]) -> None:
        """Files that have their names, each (relpath, path, its descriptor still open or
        None): their syncs go to the flusher."""
        with self._cond:
            before = len(self._to_sync)
            for relpath, dest, fd in named:
                if fd is not None:
                    if self._open_to_sync >= MAX_OPEN_TO_SYNC:
                        os.close(fd)   # syncs lag: no descriptor held per file waiting, it is opened again
                        fd = None
                    else:
                        self._open_to_sync += 1
                self._to_sync.append((relpath, dest, fd))
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name="harmony-journal-flush",
                                                 daemon=True)
                self._flusher.start()
            # What the flusher waits for (files at all, then a full batch); not a wake-up per file.
            if not before or before < SYNC_BATCH <= len(self._to_sync):
                self._wake_flusher.notify()

    def _place_large(self, src: Path, dest: Path, relpath: str) -> None:
        with self._cond:
            while self._names.get(relpath) and not self.broken:
                self._cond.wait()   # the journaled older copy synced first: never older bytes over newer
            held, epoch, before = relpath in self._names, self._epoch, self._end
        durable_move(src, dest)
        if held:  # the older copies in the log are forgotten, so a replay cannot put them back
            self._commit(_FORGOTTEN, relpath, _RANGE.pack(epoch, 0, before))

    def _commit(self, kind: int, relpath: str, data: bytes) -> tuple[int, int]:
        """One record durable in the log; waits for the writer's flush that carries it
        (with every record handed over meanwhile: group commit).  Returns the record's
        (epoch, offset)."""
        with self._cond:
            record, batch = self._enqueue(kind, relpath, data, None)
            self._wake_writer()
            while not batch.done:
                self._cond.wait()
            if batch.error is not None:
                raise OSError(5, f"the storage journal refused a write: {batch.error}")
            return record[3], record[4]

    def store(self, dest: str, data: bytes, done) -> None:
        """Journal *data* (held in memory, at most ``max_bytes``) as the file *dest*
        inside the folder and give it that name, all on the writer thread; then
        ``done(None)`` there (the file survives a crash and readers find it), or
        ``done(error)`` (an ``OSError``: nothing of it is left to replay).  *dest*
        is a path string (no :class:`~pathlib.Path` per instance)."""
        if len(data) > self.max_bytes:
            raise ValueError("a file larger than the journal takes")
        prefix = self._prefix
        relpath = dest[len(prefix):] if dest.startswith(prefix) else os.path.relpath(dest, self.folder)
        if "/../" in f"/{relpath}/":
            raise ValueError(f"{dest} is outside {self.folder}")
        temp = f"{self.dir}/{self._pid}.{next(self._temps)}{_TEMP}"
        with self._cond:
            if self.closed:
                raise OSError(5, "the storage journal is closed")
            self._holding = True
            self._enqueue(_PLACED, relpath, data, _Held(dest, temp, done))
        if self._ring is not None and threading.get_ident() == self._ring_thread:
            self._ring_write()
        else:
            self._wake_writer()

    # ------------------------------------------------------------------ the reactor's own writes (io_uring)

    def use_ring(self, reactor) -> bool:
        """Let the files stored (:meth:`store`) from *reactor*'s thread be journaled by that thread
        itself, through an io_uring (harmony.compat.uring), instead of by the writer
        thread: no hand-off either way, and the reactor may poll for the completion
        (harmony.compat.spin) where it could not for a thread that needs the GIL to
        report.  Their ``done`` is then called on the reactor.  Call it on the reactor's
        thread; ``False`` (and the writer thread does it all) where no ring can be had."""
        if self._ring is not None:
            return True
        ring = Ring.make()
        if ring is None:
            return False
        self._ring, self._ring_reactor, self._ring_thread = ring, reactor, threading.get_ident()
        self._ring_reader = RingReader(ring, reactor)
        reactor.addReader(self._ring_reader)
        await_completions(ring)   # the reactor polls for the write it waits for, rather than sleep
        return True

    def _ring_write(self) -> None:
        """On the reactor: the waiting batch written to the log by the ring, unless something
        else writes it now (it takes the batch when done) or the batch needs anything that
        could block - the log made, a full log waited out, a folder made, a temporary file
        created, a failed log's refusals: those go to the writer thread, as before."""
        ring = self._ring
        assert ring is not None
        with self._cond:
            batch = self._batch
            if self._ring_writing or self._thread_writing or not batch.records:
                return
            offset = None
            if not self.closed and self._write_failed is None and self._ready_for_ring(batch):
                offset = self._make_room(batch.size, wait=False)
            if offset is None:
                wake, self._writer_asleep = self._writer_asleep, False
            else:
                self._batch = _Batch()
                self._ring_writing = True
        if offset is None:
            if wake:
                os.eventfd_write(self._writer_event, 1)
            return
        self._write_held(batch)   # spare files' page cache: no sync, no file made
        blob, offset = self._blob(batch, offset)
        direct = self._direct
        data: bytes | memoryview
        if direct is None:
            assert self._fd is not None
            fd, data, at = self._fd, blob, offset
        else:
            fd, (data, at) = direct.fd, direct.blocks(blob, offset)
        size = len(data)
        try:
            ring.write(fd, data, at, os.RWF_DSYNC,
                       lambda result: self._ring_wrote(batch, offset, blob, size if result == size else
                                                       -errno.EIO if result >= 0 else result))
        except OSError:
            # The ring refused it at submission (nothing written): the reactor's thread pool
            # makes this one write instead, and the ring is tried again for the next batch.
            reactor = self._ring_reactor
            threads.deferToThreadPool(reactor, reactor.getThreadPool(), _write_durably, fd, data, at) \
                .addCallbacks(lambda _: self._ring_wrote(batch, offset, blob, size),
                              lambda failure: self._ring_wrote(batch, offset, blob,
                                                               -(getattr(failure.value, "errno", 0) or errno.EIO)))

    def _ready_for_ring(self, batch: _Batch) -> bool:
        """Whether each held file of *batch* has a spare temporary file and a known folder
        (called with the lock held)."""
        held = 0
        for record in batch.records:
            if record[5] is not None and record[0] == _PLACED:
                held += 1
                if os.path.dirname(record[5].dest) not in self._folders:
                    return False
        return held <= len(self._spare_temps)

    def _ring_wrote(self, batch: _Batch, offset: int, blob: bytes, result: int) -> None:
        """The ring's write of *batch* finished with *result* (all written, or -errno):
        as the writer thread would go on after :func:`_write_durably` (:meth:`_serve`)."""
        error: BaseException | None = None
        if result >= 0:
            self._wrote(offset, blob)
            self.ring_flushes += 1
        else:
            error = OSError(-result, os.strerror(-result))
        with self._cond:
            self._written(batch, error)
        try:
            self._name_held(batch, error)
        finally:
            with self._cond:
                self._ring_writing = False
                self._cond.notify_all()
                if self.closed:
                    # A closing flusher waits for this write's files (_flush_loop).  Only then:
                    # a wake-up of the flusher per ring write was a thread switch per instance.
                    self._wake_flusher.notify()
        self._ring_write()   # what was handed over meanwhile

    def _stop_ring(self) -> None:
        """The ring released on the reactor once its last write is done (:meth:`close`)."""
        ring, reader, reactor = self._ring, self._ring_reader, self._ring_reactor
        if ring is None:
            return
        if threading.get_ident() == self._ring_thread:
            while ring.pending:   # closing on the reactor: nothing else reaps
                select.select([ring.fileno()], [], [], 1.0)
                ring.reap()
        else:
            with self._cond:
                if not self._cond.wait_for(lambda: not self._ring_writing, RING_CLOSE_WAIT):
                    # The reactor never reaped it: the record may be in the log, unanswered -
                    # the log stays for the next start to replay.  The writer and the flusher
                    # stop waiting for it (the writer refuses what is left: the write failed).
                    self._write_failed = OSError(5, "the storage journal closed during a write")
                    self._ring_writing = False
                    self._cond.notify_all()
        self._ring = self._ring_reader = None

        def release():
            reactor.removeReader(reader)
            ring.close()
        if threading.get_ident() == self._ring_thread:
            release()
        else:
            reactor.callFromThread(release)

    def _enqueue(self, kind: int, relpath: str, data: bytes, held: _Held | None) -> tuple[list, _Batch]:
        """*data* as a record of the writer's next flush (called with the lock held)."""
        if self._writer_done:
            raise OSError(5, "the storage journal is closed")
        record: list = [kind, relpath, data, 0, 0, held]
        batch = self._batch
        batch.records.append(record)
        batch.size += _RECORD.size + len(relpath.encode()) + len(data)
        if kind == _PLACED:
            self._names[relpath] = self._names.get(relpath, 0) + 1
        if self._writer is None:
            self._writer_event = os.eventfd(0, os.EFD_CLOEXEC)
            self._writer = threading.Thread(target=self._write_loop, name="harmony-journal-writer", daemon=True)
            self._writer.start()
        return record, batch

    @property
    def working(self) -> bool:
        """The writer has a batch or a placement is being journaled (read without the
        lock: a hint, for harmony.compat.spin).  The flusher does not count: nothing
        waits for its syncs (the answers went before them), so its moments with the GIL
        may wait out a spin; counted, the reactor never spun between one association's
        instances into ``storage_dir``, and with it not counted that row went +5 % (884
        against 843 inst/s, bench/dimse/store_dir.py against ``poll_spin_us = 0``)."""
        if self.closed:
            return False
        return (self._writer is not None and not self._writer_asleep and not self._writer_done) \
            or self._committing > 0

    def _wake_writer(self) -> None:
        """Wake the writer if it sleeps (it sleeps only on an empty batch; one write per sleep)."""
        with self._cond:
            wake, self._writer_asleep = self._writer_asleep, False
        if wake:
            os.eventfd_write(self._writer_event, 1)

    def _write_loop(self) -> None:
        """The writer: every record handed over since its last flush, in one durable
        write (:func:`_write_durably`); then the held files named (:meth:`store`)."""
        while True:
            with self._cond:
                # While the reactor's ring writes the log, what waits is the ring's to take
                # when it is done (it wakes this thread for what it cannot take).
                ring_busy = self._ring_writing and not self.closed
                asleep = self._writer_asleep = (not self._batch.records or ring_busy) and not self.closed
            if asleep:
                os.eventfd_read(self._writer_event)
                continue
            with self._cond:
                while self._ring_writing:   # closing: the ring's last write first
                    self._cond.wait()
                batch = self._batch
                if not batch.records:
                    self._writer_done = True
                    return
                self._batch = _Batch()
                self._thread_writing = True
            try:
                self._serve(batch)
            except Exception as e:  # noqa: BLE001 - a writer that died would leave every sender waiting
                log.failure("storage journal {folder}: writing a batch failed", folder=str(self.folder))
                with self._cond:
                    if not batch.done:
                        self._finish(batch, e)
                for record in batch.records:
                    _tell(record, OSError(5, f"the storage journal failed: {e}"))
            finally:
                with self._cond:
                    self._thread_writing = False

    def _serve(self, batch: _Batch) -> None:
        self._write_held(batch)
        with self._cond:
            try:
                if self._write_failed is not None:
                    raise self._write_failed
                offset = self._make_room(batch.size)
            except Exception as e:  # noqa: BLE001 - every waiter is told, the writer goes on
                self._finish(batch, e)
                error: BaseException | None = e
            else:
                error = None
        if error is None:
            try:
                self._write(batch, offset)
            except Exception as e:  # noqa: BLE001 - as above
                error = e
            with self._cond:
                self._written(batch, error)
        with self._cond:
            # The log is free: a file stored from the reactor meanwhile may go by its ring
            # while these are named (their senders told, and the next file handed over at once).
            self._thread_writing = False
        self._name_held(batch, error)

    def _written(self, batch: _Batch, error: BaseException | None) -> None:
        """The log's write of *batch* is over, by the writer or the ring (called with the
        lock held): after a failed one the log's state is unknown, and every later
        placement is refused."""
        if error is not None:
            self._write_failed = OSError(5, f"a write to the storage journal failed: {error}")
        self._finish(batch, error)

    def _top_up_spares(self) -> None:
        """Temporary files for the next held files, created on the flusher thread after
        its sync round, where the answers do not wait for them: creating a file here
        scans the inodes its group freed in the last minutes (ext4 without a journal,
        ``recently_deleted``: 0.1-2 ms an inode while tests delete files by the
        thousand).  Until session 11 the writer made them whenever it was idle, and
        the next instance, arriving 0.2-0.5 ms after the answer, waited for it."""
        if not self._holding:
            return
        taken = self._spares_taken
        want = min(SPARE_TEMPS_MAX, max(SPARE_TEMPS, 2 * (taken - self._spares_seen)))
        self._spares_seen = taken
        while len(self._spare_temps) < want and not self.closed:
            temp = f"{self.dir}/{self._pid}.{next(self._temps)}{_TEMP}"
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except OSError:
                self._holding = False   # the next held file creates its own, and meets the error
                return
            self._spare_temps.append((temp, fd))

    def _write_held(self, batch: _Batch) -> None:
        """Write each held file of *batch* under its temporary name, before the flush:
        one that cannot even be written (a full disk) leaves the batch unrecorded and
        its sender is refused."""
        refused = []
        for record in batch.records:
            held = record[5]
            if held is not None and record[0] == _PLACED:
                try:
                    if self._spare_temps:
                        held.temp, held.fd = self._spare_temps.pop()
                        self._spares_taken += 1
                        write_all(held.fd, record[2])
                    else:
                        held.fd = _write_file(held.temp, record[2])
                except OSError as e:
                    refused.append((record, e))
        if not refused:
            return
        with self._cond:
            for record, _e in refused:
                batch.records.remove(record)
                batch.size -= _RECORD.size + len(record[1].encode()) + len(record[2])
                self._drop_name(record[1])
        for record, error in refused:
            _tell(record, error)

    def _name_held(self, batch: _Batch, error: BaseException | None) -> None:
        """After the flush: each held file renamed into place (journaled, so an existing
        name is replaced at once) and its sender told, then the batch handed to the
        flusher (its syncs are behind the answer: the log holds the file meanwhile)."""
        named = []
        for record in batch.records:
            held = record[5]
            if held is None:
                continue
            if record[0] != _PLACED:   # the record forgetting a file that could not be named
                _tell(record, error)
                continue
            if error is not None:
                _tell(record, OSError(5, f"the storage journal refused a write: {error}"))
                continue
            try:
                self._rename(held.temp, held.dest)
            except OSError as e:
                self._forget(record, e)
                continue
            named.append((record[1], held.dest, held.fd))
            held.fd = None
            _tell(record, None)
        if named:
            self._placed_many(named)

    def _rename(self, temp: str, dest: str) -> None:
        folder = os.path.dirname(dest)
        if folder not in self._folders:
            make_dirs(Path(folder), self.folder)
            self._folders.add(folder)
        try:
            os.rename(temp, dest)
        except FileNotFoundError:   # its folder was taken away since: made again
            make_dirs(Path(folder), self.folder)
            os.rename(temp, dest)

    def _forget(self, record: list, error: OSError) -> None:
        """A journaled file that could not be named: its record is forgotten, durably (in
        the writer's next flush) before its sender hears of the refusal, so a replay
        never writes a file nobody was told is stored."""
        held, record[5] = record[5], None
        _close(held)
        _discard(held.temp)
        relpath = record[1]

        def forgotten(_forget_error):
            self._synced([relpath])
            held.done(error)
        with self._cond:
            self._enqueue(_FORGOTTEN, relpath, _RANGE.pack(record[3], record[4], record[4] + 1),
                          _Held("", "", forgotten))

    def _finish(self, batch: _Batch, error: BaseException | None) -> None:
        batch.done, batch.error = True, error
        for kind, relpath, *_ in batch.records:
            if kind == _PLACED:
                if error is None:
                    self._written_unsynced += 1
                else:
                    self._drop_name(relpath)
        self._cond.notify_all()

    def _make_room(self, size: int, wait: bool = True) -> int | None:
        """Where a batch of *size* bytes goes, -1 for the top of a new epoch
        (called with the lock held): the log starts again when every file
        written to it is synced; when it is full, the batch waits for the flusher.
        Not *wait*: ``None`` instead of making the log or waiting (the ring's case)."""
        if self._fd is None and not wait:
            return None
        if self._fd is None:
            self._fd = _make_log(self.path, self.log_bytes)
            self._log_dev = os.fstat(self._fd).st_dev
            self._direct = _DirectLog.open(self.path)
            self._end = 0
        if size > self.log_bytes - _HEADER.size:
            raise OSError(27, "a batch larger than the storage journal")
        while True:
            if self._end == 0 or (self._written_unsynced == 0 and not self.broken):
                self._epoch += 1
                self._names = {r: n for r, n in self._names.items() if n}  # the synced ones leave the log
                return -1
            if self._end + size <= self.log_bytes:
                return self._end
            if self.broken:
                raise OSError(28, "the storage journal is full and a sync failed")
            if not wait:
                return None
            self._hurry = True
            self._wake_flusher.notify()
            self._cond.wait()

    def _write(self, batch: _Batch, offset: int) -> None:
        blob, offset = self._blob(batch, offset)
        direct = self._direct
        if direct is None:
            assert self._fd is not None
            _write_durably(self._fd, blob, offset)
        else:
            blocks, start = direct.blocks(blob, offset)
            _write_durably(direct.fd, blocks, start)
        self._wrote(offset, blob)

    def _wrote(self, offset: int, blob: bytes) -> None:
        self._end = offset + len(blob)  # only the log's owner (writer thread or ring) touches it
        if self._direct is not None:
            self._direct.wrote(self._end)
        self.flushes += 1

    def _blob(self, batch: _Batch, offset: int) -> tuple[bytes, int]:
        """*batch*'s records as the bytes to write at *offset* (-1: a new epoch's
        header first), and where they go; each record learns its epoch and offset."""
        parts = []
        if offset < 0:  # a new epoch: header first, records right after it
            head = struct.pack("<4sIQ", _MAGIC, 1, self._epoch)
            parts.append(head + struct.pack("<I", zlib.crc32(head)))
            offset = 0
        at = offset + sum(map(len, parts))
        for record in batch.records:
            kind, relpath, data = record[:3]
            name = relpath.encode()
            head = _RECORD.pack(self._epoch, kind, len(name), len(data), 0)[:-4]
            crc = zlib.crc32(data, zlib.crc32(name, zlib.crc32(head)))
            parts.append(head + struct.pack("<I", crc) + name + data)
            record[3], record[4] = self._epoch, at
            at += len(parts[-1])
        return b"".join(parts), offset

    # ------------------------------------------------------------------ syncing behind the answers

    def _flush_loop(self) -> None:
        while True:
            with self._cond:
                # Closing, it stays for the files of a ring write still in flight: named on the
                # reactor after the close began, they would be left unsynced (and the log kept).
                while not self._to_sync and (not self.closed or self._ring_writing):
                    self._wake_flusher.wait()
                # Some milliseconds to gather more files into one sync (they are durable in the log meanwhile).
                if not self.closed and not self._hurry and len(self._to_sync) < SYNC_BATCH:
                    self._wake_flusher.wait_for(
                        lambda: self.closed or self._hurry or len(self._to_sync) >= SYNC_BATCH, SYNC_INTERVAL)
                batch, self._to_sync = self._to_sync, []
                self._open_to_sync = 0
                self._hurry = False
                if not batch and self.closed:
                    return
            synced, failed = self._sync(batch)
            if failed:
                with self._cond:
                    self.broken = True
                    self._cond.notify_all()
                log.error("storage journal {folder}: a file or folder sync failed; the next start writes "
                          "it again from the journal", folder=str(self.folder))
            self._synced(synced)
            self._top_up_spares()

    def _sync(self, batch: list[tuple[str, Path | str, int | None]]) -> tuple[list[str], bool]:
        """Make the named files of *batch* durable: one ``syncfs`` of the log's file
        system for the files on it (:meth:`_on_log_fs`: in practice all of them), and
        for any other, or without ``syncfs``, each file's fdatasync, then each
        folder's fsync once for all the files named in it."""
        synced: list[str] = []
        failed = False
        if _syncfs is not None and self._fd is not None:
            batch, on_log_fs = self._on_log_fs(batch)
            if on_log_fs:
                try:
                    _syncfs(self._fd)
                except OSError:
                    failed = True
                else:
                    synced += on_log_fs
        folders: dict[str, list[str]] = {}
        for relpath, path, fd in batch:
            try:
                if fd is None:
                    _sync_path(path, os.fdatasync)
                else:
                    try:
                        os.fdatasync(fd)
                    finally:
                        os.close(fd)
            except FileNotFoundError:
                pass  # replaced or taken away since: nothing of it left to sync
            except OSError:
                failed = True
                continue
            folders.setdefault(os.path.dirname(path), []).append(relpath)
        for folder, names in folders.items():
            try:
                _sync_path(folder, os.fsync)
            except OSError:
                failed = True
                continue
            synced += names
        return synced, failed

    def _on_log_fs(self, batch: list[tuple[str, Path | str, int | None]]) -> tuple[list, list[str]]:
        """*batch* split into the files a ``syncfs`` of the log may not cover, and the
        names of those it does: a held file (written in the log's folder and renamed,
        which never crosses file systems; its descriptor closed here), or a file on
        the log's device.  The rest (a folder mounted inside ``storage_dir``) is
        synced file by file."""
        rest: list[tuple[str, Path | str, int | None]] = []
        names: list[str] = []
        for entry in batch:
            relpath, path, fd = entry
            if fd is not None:
                os.close(fd)
                names.append(relpath)
                continue
            try:
                same = os.stat(path).st_dev == self._log_dev
            except OSError:
                same = False   # gone or unreadable: the file-by-file path decides
            if same:
                names.append(relpath)
            else:
                rest.append(entry)
        return rest, names

    def _synced(self, relpaths: list[str]) -> None:
        with self._cond:
            for relpath in relpaths:
                self._drop_name(relpath)
                self._written_unsynced -= 1
            self._cond.notify_all()

    def _drop_name(self, relpath: str) -> None:
        left = self._names.get(relpath, 0) - 1
        if left > 0:
            self._names[relpath] = left
        else:
            self._names[relpath] = 0  # still recorded in this epoch (a large file over it must be forgotten)


def read_log(content: bytes) -> dict[str, bytes]:
    """The files a log holds: its current epoch's records up to the first
    damaged one, the latest not forgotten for each name."""
    placed: dict[str, list[tuple[int, bytes]]] = {}
    if len(content) < _HEADER.size:
        return {}
    magic, version, epoch, crc = _HEADER.unpack_from(content)
    if magic != _MAGIC or version != 1 or crc != zlib.crc32(content[:_HEADER.size - 4]):
        return {}
    at = _HEADER.size
    while at + _RECORD.size <= len(content):
        rec_epoch, kind, name_len, data_len, crc = _RECORD.unpack_from(content, at)
        end = at + _RECORD.size + name_len + data_len
        if rec_epoch != epoch or kind not in (_PLACED, _FORGOTTEN) or end > len(content):
            break
        head = content[at:at + _RECORD.size - 4]
        name = content[at + _RECORD.size:at + _RECORD.size + name_len]
        data = content[at + _RECORD.size + name_len:end]
        if zlib.crc32(data, zlib.crc32(name, zlib.crc32(head))) != crc:
            break  # a write a crash cut short: never acknowledged, nor anything after it
        relpath = name.decode()
        if kind == _PLACED:
            placed.setdefault(relpath, []).append((at, data))
        elif len(data) == _RANGE.size:
            of_epoch, lo, hi = _RANGE.unpack(data)
            if of_epoch == epoch:
                placed[relpath] = [(o, d) for o, d in placed.get(relpath, []) if not lo <= o < hi]
        at = end
    return {relpath: versions[-1][1] for relpath, versions in placed.items() if versions}


def _read_sqlite_journal(journal: Path) -> dict[str, bytes]:
    """The files in a journal an earlier version kept in sqlite (one row a file),
    so a crash before an upgrade loses nothing."""
    import sqlite3
    conn = sqlite3.connect(journal, isolation_level=None)
    try:
        return dict(conn.execute("SELECT relpath, data FROM pending").fetchall())
    except sqlite3.OperationalError:
        return {}  # made but never written to
    finally:
        conn.close()


def _make_log(path: Path, size: int) -> int:
    """The log file, its blocks written (zeros) and synced with its name, so a
    later write over them changes no metadata."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        zeros = bytes(1024 * 1024)
        for at in range(0, size, len(zeros)):
            os.pwrite(fd, zeros[:min(len(zeros), size - at)], at)
        os.fsync(fd)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        os.close(fd)
        _remove(tmp)
        raise
    return fd


class _DirectLog:
    """The log's writes made around the page cache (``O_DIRECT``), in whole blocks.

    Why: a write with ``RWF_DSYNC`` through the page cache dirties a page, writes it
    back and waits; the same bytes written directly go to the device at once, and
    the data sync is then only the cache flush.  Measured here (``pwritev2`` of
    4 KiB with ``RWF_DSYNC`` over blocks already written, 400 each, three runs):
    through the page cache p50 230-365 us, direct 144-193 us - on the path of every
    instance C-STOREd into ``storage_dir``.

    A direct write must cover whole blocks from a block boundary, from memory aligned
    the same way: each batch is written from the start of the block the log's end is
    in, so the bytes of that block already written (kept here, :attr:`_tail`) go
    again, unchanged, before the batch's records, and zeros after them to the
    block's end.  A crash tearing that write leaves each sector old or new, and the
    earlier records' bytes are the same in both; the zeros are where the next batch
    goes, and stop a replay as any record of no epoch does.
    """

    #: The alignment a direct write needs on every Linux block device and file system here.
    BLOCK = 4096

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        #: Page-aligned memory the blocks are assembled in (grown, never shrunk).
        self._buffer = mmap.mmap(-1, 64 * 1024)
        #: The log's bytes from the block boundary before its end to its end.
        self._tail = b""
        #: Where the last blocks went, and the bytes of them that are the log's.
        self._start = self._length = 0

    @classmethod
    def open(cls, path: Path) -> _DirectLog | None:
        """The log opened for direct writes, ``None`` where its file system refuses them (tmpfs)."""
        if not hasattr(os, "O_DIRECT"):
            return None
        try:
            return cls(path)
        except OSError:
            return None

    def close(self) -> None:
        os.close(self.fd)

    def blocks(self, blob: bytes, offset: int) -> tuple[memoryview, int]:
        """*blob*, to go at *offset* (the log's end), as whole blocks and where they go."""
        block = self.BLOCK
        start = offset - offset % block
        prefix = self._tail if offset > start else b""
        assert len(prefix) == offset - start, "the log's end moved without this log"
        total = len(prefix) + len(blob)
        padded = -(-total // block) * block
        if padded > len(self._buffer):
            # Replaced, not closed: a write still in flight may hold the old one.
            self._buffer = mmap.mmap(-1, 1 << (padded - 1).bit_length())
        buffer = self._buffer
        buffer[:len(prefix)] = prefix
        buffer[len(prefix):total] = blob
        buffer[total:padded] = bytes(padded - total)
        self._start, self._length = start, total
        return memoryview(buffer)[:padded], start

    def wrote(self, end: int) -> None:
        """The blocks of the last :meth:`blocks` are on the disk, and the log ends at *end*."""
        assert end == self._start + self._length, "not the end the last blocks were made for"
        keep = end % self.BLOCK
        self._tail = bytes(self._buffer[self._length - keep:self._length])


def _write_durably(fd: int, blob, offset: int) -> None:
    """*blob* at *offset* of the log, on the disk when this returns: one ``pwritev2``
    with ``RWF_DSYNC`` (Linux 4.7+: the write and its data sync in one system call,
    one release of the GIL on the answers' path) where the kernel takes it, else
    ``pwrite`` and ``fdatasync``."""
    global _dsync_writes
    if _dsync_writes:
        try:
            written = os.pwritev(fd, [blob], offset, os.RWF_DSYNC)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            _dsync_writes = False   # not offered here: two calls from now on
        else:
            if written != len(blob):
                raise OSError(5, "a short write to the storage journal")
            return
    if os.pwrite(fd, blob, offset) != len(blob):
        raise OSError(5, "a short write to the storage journal")
    os.fdatasync(fd)


#: ``pwritev2(RWF_DSYNC)`` is worth trying (Linux; cleared when the kernel refuses it).
_dsync_writes = hasattr(os, "RWF_DSYNC") and hasattr(os, "pwritev")


#: ``syncfs(fd)``, or None (each file and folder is synced on its own then); a module
#: global so that tests can take it away.
_syncfs = syncfs


def _tell(record: list, error: BaseException | None) -> None:
    """A held record's sender told (once); a file left under its temporary name removed."""
    held, record[5] = record[5], None
    if held is None:
        return
    if error is not None and held.temp:
        _close(held)
        _discard(held.temp)
    held.done(error)


def _close(held: _Held) -> None:
    fd, held.fd = held.fd, None
    if fd is not None:
        os.close(fd)


def _sync_path(path, sync) -> None:
    """*sync* (``os.fdatasync``, ``os.fsync``) of the file or folder at *path*."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        sync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes) -> int:
    """*data* as the new file *path* (not synced: the journal holds it); its descriptor, still open."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        write_all(fd, data)
    except BaseException:
        os.close(fd)
        _discard(path)
        raise
    return fd


def _discard(path: str) -> None:
    """Remove a temporary file, whatever stands in the way (the writer thread goes on)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _inside(folder: Path, path: Path) -> bool:
    return folder.resolve() in path.resolve().parents


def _remove(journal: Path) -> None:
    try:
        os.unlink(journal)
    except FileNotFoundError:
        pass
