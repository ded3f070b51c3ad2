"""The durable instance store: files in a UID-based layout plus an index database.

    <root>/instances/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    <root>/tmp/          temp files (same filesystem, so the final rename is atomic)
    <root>/index.sqlite  index + store-and-forward queue (WAL, synchronous=FULL)
    <root>/opened-at     when the store was last opened (its mtime and content)
    <root>/clean-shutdown  present only while the store is closed cleanly

With ``[storage] index = "postgresql"`` the index and queue live in the shared
PostgreSQL instead (:mod:`harmony.storage.database`), and temp files and
markers are per node (``tmp/<node>/``, ``clean-shutdown.<node>``) so nodes
sharing the folder never clear each other's work in progress.

An instance is *durable* once :meth:`InstanceStore.put_file_sync` returns (or
the Deferred of :meth:`InstanceStore.put_file` and its siblings fires): the
file's data is synced, it is renamed into place, its folder fsynced, and the
index row (with any queue rows for forwarding) committed.  Only then may a
C-STORE be answered with Success or a STOW part be listed as stored.
Concurrent ingests share the folder fsyncs and the transaction (group commit,
:mod:`harmony.storage.groupcommit`).

Overlapped flushes: the file's data sync, the folder fsync and the index
commit are issued together, not one after the other (ext4 commits them in one
journal commit: one flush's wait per instance instead of three), and the
acknowledgement waits for all three.  A file reaches its name before its data
is synced only under a name that did not exist (a hard link claims it
atomically); an existing name is replaced only by synced data.  Each ingest
transaction also writes an :mod:`harmony.storage.inflight` row, so the
start-up recovery after a crash checks every instance whose flushes may not
have finished: kept (synced, re-indexed from the file) if complete, its rows
removed if not, a copy filed before it restored.

Blocking work runs on the store's own thread pool; the ``*_sync`` methods are
what runs there, the others return Deferreds and are safe on the reactor.

A crash between the rename and the index commit leaves a file in
``instances/`` without an index row (its data possibly not yet synced).  Opening a store that was not closed
cleanly (no ``clean-shutdown`` marker) scans for such files - only in series
folders changed since the previous open (a rename into a folder updates its
mtime), so the cost is a stat per series folder plus the files of the folders
that changed, not a walk of every instance.  Complete, valid instances are
indexed; anything else is removed (it was never acknowledged, the sender
resends).  See docs/storage.md, "Crash recovery".
"""

from __future__ import annotations

import itertools
import os
import re
import sqlite3
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import attr
from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread
from twisted.python.threadpool import ThreadPool

from harmony.compat.spin import watch_threads
from harmony.dicom import status as dimse
from harmony.dicom.files import CorruptDataset, check_complete, stamp_of
from harmony.dicom.rawscan import ScanDeclined, ScannedFile, scan_bytes, scan_file
from harmony.dicom.results import DicomInstance, ResultStream
from harmony.dicomweb.cache import BASE_PLACEHOLDER
from harmony.dicomweb.dicomjson import stored_metadata
from harmony.dicomweb.routes import resource_path
from harmony.log import get_logger
from harmony.storage import blobs as blob_sql
from harmony.storage import index as idx
from harmony.storage import inflight, nodes
from harmony.storage import queue as q
from harmony.storage.blobs import BlobUnavailable, LocalCache
from harmony.storage.database import SQLITE, SqliteDatabase
from harmony.storage.errors import (
    DatabaseUnavailable,
    InvalidInstance,
    MismatchedInstance,
    StorageFailure,
    StorageFull,
)
from harmony.storage.files import (
    SpaceGuard,
    TempFile,
    _io_error,
    claim_name,
    clear_temp,
    fdatasync_file,
    fsync_dir,
    fsync_file,
    make_dirs,
    syncfs,
    write_all,
)
from harmony.storage.groupcommit import GroupCommit
from harmony.storage.query import (
    IMAGE,
    STUDY_ROOT,
    attrs_from_dataset,
    attrs_from_scan,
    levels_for,
    query_keys,
    record_matches,
    response_json,
)
from harmony.storage.threads import WokenThreads
from harmony.storage.uids import clean_uid

log = get_logger("harmony.storage")

DEFAULT_MIN_FREE = 512 * 1024 * 1024
#: Seconds between looks for files still to upload to S3 (after an outage or a crash).
UPLOAD_INTERVAL = 10.0
#: Results are handed to the reactor in batches of this many.
BATCH = 32
#: Markers at the store's root (see the module docstring).
CLEAN_MARKER, OPENED_MARKER = "clean-shutdown", "opened-at"
#: Folder mtimes are compared with this much slack (coarse filesystem timestamps, clock steps).
MTIME_SLACK_SECS = 2.0
#: Instances up to this size ride in their in_flight row (the ingest journal, see
#: harmony.storage.inflight): acknowledged at the index commit, their file's own
#: flushes finishing behind it.  Larger ones are acknowledged after all three flushes.
JOURNAL_MAX_BYTES = 256 * 1024
#: Journaled instances whose file flushes may lag behind at most (then commits wait for them).
MAX_UNFLUSHED = 512
#: How long the flushes behind journaled acknowledgements gather before a round (see _FlushesBehind).
GATHER_SECS = 0.004
#: ``syncfs(fd)`` or None (a module global, so that tests can take it away; see _FlushesBehind).
_syncfs = syncfs
#: Empty temp files the storage threads keep created ahead for instances placed from memory
#: (see _SpareTemps).
SPARE_TEMPS = 16
SPARE_RETRY_SECS = 1.0
#: The index's WAL is checkpointed by an idle storage thread after this many ingest
#: commits (see InstanceStore._tend_spares) ...
CHECKPOINT_COMMITS = 64
#: ... and by the committing thread itself only past this many WAL pages (sqlite's
#: ``wal_autocheckpoint``; its default is 1,000 pages: a C-STORE's commit writes ~11).
WAL_BACKSTOP_PAGES = 8192
#: A group of instances (:meth:`InstanceStore.put_instances`) is placed by one
#: storage thread per this many bytes of them (up to the pool's size).
SHARE_BYTES = 16 * 1024 * 1024
_UID_PART = re.compile(r"[0-9.]+")
_LAYOUT_PATH = re.compile(r"(?:[0-9][0-9.]*/){2}[0-9][0-9.]*\.dcm")


@attr.s(auto_attribs=True, slots=True)
class Placed:
    """An instance renamed into its folder, its rows not yet committed."""

    header: dict
    final: Path
    #: *final* relative to ``instances/`` (the index's relpath).
    rel: str
    size: int
    enqueue: tuple
    now: float | None
    #: The source file itself was renamed into place (not copied).
    moved: bool = False
    #: The data sync of a file given a new name before its data was synced
    #: (:func:`~harmony.storage.files.claim_name`), running on a flush thread.
    data_sync: Future | None = None
    #: The file's bytes, for its journal row (a small instance on sqlite, fsync on).
    data: bytes | None = None
    #: A new name whose data sync waits for the commit: a journaled instance's
    #: syncs are merged into one flush task per batch there (see _commit_placed_sync).
    sync_later: bool = False


class _SpareTemps:
    """Empty temp files created ahead, and used temp names removed late, by storage
    threads with nothing else to do - so that neither is on an instance's way to its
    acknowledgement.

    Creating a file costs 0.2-0.8 ms of wall time a file on this host under a
    C-STORE stream (bench/ingest, "C-STORE latency, session 8"): its ext4 has no
    journal, and hands out a new inode only after scanning every inode freed in the
    last minutes (``recently_deleted``, docs/architecture.md "The index's WAL started
    again"; a journaled ext4 makes a creation wait for its journal commit instead), against
    0.06-0.15 ms to write a file made ahead and link it into place.  Likewise the
    temp name a new file was linked from is removed later (an extra link to the
    same file meanwhile).  The names are the store's temp names (``.*.part`` in
    ``tmp_dir``), so a crash leaves nothing the start-up sweep does not remove;
    a clean close removes them itself.  The storage_dir journal's writer does the
    same with its own (harmony.storage.journal)."""

    def __init__(self, make_name, size: int = SPARE_TEMPS):
        self._make_name = make_name
        self.size = size
        self._lock = threading.Lock()
        self._ready: list[tuple[str, int]] = []
        self._unlink: list[str] = []
        #: Spares to make: one for each taken, or asked for when none was ready (so a
        #: store that never places from memory makes none), up to ``size``.
        self._wanted = 0
        #: The name being created (between its open and joining the spares).
        self._making: str | None = None
        self._tending = threading.Lock()
        #: When creating a spare last failed (a full disk, a broken folder): none is tried
        #: for :data:`SPARE_RETRY_SECS` then (each instance makes its own, and meets the error).
        self.failed_at: float | None = None
        self.closed = False

    def take(self) -> tuple[str, int] | None:
        """A spare ``(path, open descriptor)``, now the caller's; None when none is ready."""
        with self._lock:
            self._wanted = min(self._wanted + 1, self.size)
            return self._ready.pop() if self._ready else None

    def held(self) -> set[Path]:
        """The temp names that are spares', made or still to remove (tests: what is not a leftover)."""
        with self._lock:
            names = {path for path, _ in self._ready} | set(self._unlink) | \
                ({self._making} if self._making is not None else set())
        return {Path(name) for name in names}

    def unlink_later(self, path: str) -> None:
        """*path* (a temp name whose file is also linked elsewhere) is removed when a thread is idle."""
        with self._lock:
            self._unlink.append(path)

    def tend(self, waiting=lambda: 0, wait: bool = False) -> None:
        """Remove the names left to remove, then create spares up to :attr:`size`, one
        at a time while nothing is *waiting* (a callable: the jobs queued).  One thread
        tends at a time: another returns at once (or, with *wait*, waits its turn)."""
        if not self._tending.acquire(blocking=wait):
            return
        try:
            self._tend(waiting)
        finally:
            self._tending.release()

    def _tend(self, waiting) -> None:
        with self._lock:
            gone = list(self._unlink)
        for path in gone:
            _unlink_quietly(path)
            with self._lock:
                self._unlink.remove(path)
        if self.failed_at is not None and time.monotonic() - self.failed_at < SPARE_RETRY_SECS:
            return
        while not waiting():
            with self._lock:
                if self.closed or self._wanted <= 0 or len(self._ready) >= self.size:
                    return
                self._wanted -= 1
                path = self._making = self._make_name()
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except OSError:
                self.failed_at = time.monotonic()
                with self._lock:
                    self._making = None
                    self._wanted += 1   # still wanted, once they can be made
                return
            with self._lock:
                self._making = None
                if self.closed:
                    os.close(fd)
                    _unlink_quietly(path)
                    return
                self._ready.append((path, fd))

    def close(self) -> None:
        """Close and remove every spare and every name left to remove (the store's close)."""
        with self._lock:
            self.closed = True
            ready, self._ready = self._ready, []
            gone, self._unlink = self._unlink, []
        for path, fd in ready:
            os.close(fd)
            _unlink_quietly(path)
        for path in gone:
            _unlink_quietly(path)


class _FlushesBehind:
    """The flushes no acknowledgement waits for - a journaled batch's file data syncs
    and folder fsyncs (its bytes are in its committed in_flight row) - run on one
    thread, everything pending at once, gathered for :data:`GATHER_SECS` first.

    A task per batch on a thread pool woke a flush thread per C-STORE of one
    association: ``ThreadPoolExecutor.submit`` and its ``Condition.notify`` were
    ~17 % of the GIL-holding samples (py-spy, bench/ingest "C-STORE CPU per
    instance, session 7").  Here a task is appended under a lock and the thread is
    woken only when it sleeps with nothing to do; a round then gathers what arrives
    for a few milliseconds (no wake-up per task) and syncs it all, a folder several
    batches share fsynced once per round (every name in that round's tasks was
    linked before the round started).  Nobody waits for these flushes but the
    in_flight rows they let go (and :data:`MAX_UNFLUSHED`).  Each task's *future*
    gets the round's outcome for it: None, or the OSError that stopped it (its rows
    stay for the next start).

    On Linux a round is one ``syncfs`` of *root*'s file system for every file and
    folder on it (harmony.storage.files says why); with four associations a
    ``fdatasync`` per file was 0.2 ms of system time an instance on this thread,
    each one a device flush beside the index commits' own (bench/ingest,
    "C-STORE, session 13").  A folder on another file system (a mount inside
    *root*), or no ``syncfs``: each file's fdatasync and each folder's fsync.
    """

    def __init__(self, root: Path | None = None, after_round=None):
        #: A folder of the store's file system: its descriptor is what ``syncfs`` is given.
        self._root = root
        self._root_fd: int | None = None
        self._root_dev: int | None = None
        #: Called (on this thread) after each round: the store's housekeeping (spare temp
        #: files, the WAL checkpoint), kept off the thread that places held instances.
        self._after_round = after_round
        self._lock = threading.Lock()
        #: wait_idle's and stop's (the thread notifies it as it goes idle or ends).
        self._idle = threading.Condition(self._lock)
        self._pending: list[tuple[list[Path], list[Path], Future]] = []
        self._sleeping = False
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        #: The sleeping thread is woken through an eventfd, written without the lock and
        #: with the GIL let go for the system call (harmony.storage.threads says why): a
        #: ``Condition.notify`` per commit was ~5 % of four associations' GIL samples.
        self._event: int | None = None

    def submit(self, files: list[Path], folders: list[Path]) -> Future:
        future: Future = Future()
        wake = False
        with self._lock:
            if self._stopping:
                raise StorageFailure("the store is closed")
            self._pending.append((files, folders, future))
            if self._thread is None:
                self._event = os.eventfd(0, os.EFD_CLOEXEC)
                self._thread = threading.Thread(target=self._run, args=(self._event,),
                                                name="harmony-storage-flush-behind", daemon=True)
                self._thread.start()
                watch_threads(self)   # the reactor does not spin while a round is on
            elif self._sleeping:   # (not while it gathers a round): woken once
                self._sleeping = False
                wake = True
        if wake:
            os.eventfd_write(self._event, 1)
        return future

    @property
    def working(self) -> bool:
        """A round is gathering or syncing (read without the lock: a hint)."""
        thread = self._thread
        return thread is not None and not self._sleeping and thread.is_alive()

    def _run(self, event: int) -> None:
        try:
            self._rounds(event)
        finally:
            os.close(event)
            if self._root_fd is not None:
                os.close(self._root_fd)
                self._root_fd = None

    def _rounds(self, event: int) -> None:
        while True:
            with self._lock:
                self._busy = False
                while not self._pending:
                    if self._stopping:
                        self._idle.notify_all()
                        return
                    self._idle.notify_all()   # (wait_idle)
                    self._sleeping = True
                    self._lock.release()
                    try:
                        os.eventfd_read(event)   # submit or stop writes it
                    finally:
                        self._lock.acquire()
                    self._sleeping = False
                stopping = self._stopping
            if not stopping:
                time.sleep(GATHER_SECS)   # what is submitted meanwhile joins this round, unwoken
            with self._lock:
                work, self._pending = self._pending, []
                self._busy = True
            try:
                self._sync(work)
            except Exception as e:  # noqa: BLE001 - a round that broke must not leave its tasks (and wait_idle) waiting
                log.failure("storage: a round of flushes behind the answers failed", Failure())
                for _files, _folders, future in work:
                    if not future.done():
                        future.set_exception(OSError(5, f"the flush failed: {e}"))
            if self._after_round is not None:
                try:
                    self._after_round()
                except Exception:  # noqa: BLE001 - never the end of the flushes behind acknowledgements
                    log.failure("storage: after a round of flushes", Failure())

    def _sync(self, work: list[tuple[list[Path], list[Path], Future]]) -> None:
        """Each task's files and folders durable, its future told how that went."""
        if _syncfs is not None and self._root is not None:
            work = self._sync_together(work)
        synced: set[Path] = set()
        for files, folders, future in work:
            try:
                for path in files:
                    fdatasync_file(path)
                for folder in folders:
                    if folder not in synced:
                        fsync_dir(folder)
                        synced.add(folder)
            except OSError as e:
                future.set_exception(e)
            else:
                future.set_result(None)

    def _sync_together(self, work: list) -> list:
        """One ``syncfs`` for the tasks whose folders are all on the store's file system
        (a file is in one of its task's folders, linked there); returns the others."""
        try:
            if self._root_fd is None:
                self._root_fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                self._root_dev = os.fstat(self._root_fd).st_dev
            devices: dict[Path, int | None] = {}
            for _files, folders, _future in work:
                for folder in folders:
                    if folder not in devices:
                        try:
                            devices[folder] = os.stat(folder).st_dev
                        except OSError:
                            devices[folder] = None   # the file-by-file way meets (and reports) it
        except OSError:
            return work
        together: list = []
        rest: list = []
        for job in work:
            (together if all(devices[f] == self._root_dev for f in job[1]) else rest).append(job)
        if together:
            try:
                _syncfs(self._root_fd)
            except OSError as e:
                for _files, _folders, future in together:
                    future.set_exception(e)
            else:
                for _files, _folders, future in together:
                    future.set_result(None)
        return rest

    def wait_idle(self) -> None:
        """Return once every task submitted so far has finished (tests, close)."""
        with self._lock:
            while self._pending or self._busy:
                if self._thread is None:
                    return
                self._idle.wait()

    def stop(self) -> None:
        """Finish what is pending, then end the thread."""
        with self._lock:
            self._stopping = True
            thread = self._thread
            wake = self._sleeping
            self._sleeping = False
        if wake:
            os.eventfd_write(self._event, 1)
        if thread is not None:
            thread.join()


@attr.s(auto_attribs=True)
class Recovery:
    """What the start-up scan found (counts only: UIDs stay out of info logs)."""

    #: Why it ran: "clean" (no scan needed), "unclean" (since the last open), "unknown" (a full scan).
    reason: str = "clean"
    since: float | None = None
    series_scanned: int = 0
    files_checked: int = 0
    indexed: int = 0
    removed: int = 0
    ignored: int = 0
    #: Instances whose flushes were running at the crash (:mod:`harmony.storage.inflight`):
    #: checked, and of those found missing or incomplete (their rows removed).
    in_flight: int = 0
    in_flight_removed: int = 0
    #: Of those, files written again from their journal row.
    in_flight_rewritten: int = 0
    seconds: float = 0.0


class InstanceStore:
    def __init__(self, root, *, reactor=None, min_free_bytes: int = DEFAULT_MIN_FREE, fsync: bool = True,
                 threads: int = 4, free_bytes=None, clock=time.time, database=None, node: str = "",
                 blobs=None, upload_interval: float = UPLOAD_INTERVAL, per_process: bool = False,
                 cache_max_bytes: int = 0):
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self.root = Path(root).resolve()
        self.instances_dir = self.root / "instances"
        self.tmp_dir = self.root / "tmp"
        self.db_path = self.root / "index.sqlite"
        self.reactor = reactor
        self.fsync = fsync
        self.clock = clock
        self.guard = SpaceGuard(self.root, min_free_bytes, free_bytes)
        #: The index and queue: sqlite next to the files unless a shared database is given.
        self.db = database if database is not None else SqliteDatabase(self.db_path, fsync, per_process)
        #: True when other nodes share the index and queue (a PostgreSQL database),
        #: or other processes of this node do (``per_process``: [proxy] workers > 1).
        self.shared = self.db.dialect != SQLITE or per_process
        #: This node's name on the queue's leases (``[storage.options] node``;
        #: default: host name + folder digest, :func:`harmony.storage.nodes.default_node`).
        self.node = node or nodes.default_node(self.root)
        if self.shared:
            # Nodes (or worker processes) may share the folder: each clears and marks only its own.
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.node)
            self.tmp_dir = self.root / "tmp" / safe
            self._markers = (f"{CLEAN_MARKER}.{safe}", f"{OPENED_MARKER}.{safe}")
        else:
            self._markers = (CLEAN_MARKER, OPENED_MARKER)
        #: S3-compatible object storage for the files (None: the folder is the store).
        self.blobs = blobs
        self.upload_interval = upload_interval
        self._uploading = False
        self._upload_again = False
        self._upload_loop: task.LoopingCall | None = None
        self._heartbeat_loop: task.LoopingCall | None = None
        #: Files durable here but not yet in S3, as last counted (metrics).
        self.uploads_pending = 0
        #: The size bound of the local folder in front of S3 (None: unbounded).
        self.cache = (LocalCache(self.instances_dir, cache_max_bytes)
                      if blobs is not None and cache_max_bytes > 0 else None)
        self._conn_lock = threading.Lock()
        self._opened = False
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name="harmony-storage")
        #: Group commits run on a thread of their own: queued behind placements on the
        #: pool (FIFO), a commit would wait for every placement ahead of it.
        self.commit_pool = ThreadPool(minthreads=0, maxthreads=1, name="harmony-storage-commit")
        watch_threads(self.pool)   # the reactor does not spin while one of these works
        watch_threads(self.commit_pool)
        #: Where single instances are placed and committed (harmony.storage.threads).
        self.ingest_threads = WokenThreads(threads, "harmony-storage-ingest", idle=self._tend_spares)
        #: Where instances held in memory (small C-STOREs) are placed and committed: one
        #: thread, holding each placement for the next one queued (see _ingest).
        self.held_threads = WokenThreads(1, "harmony-storage-ingest-held", idle=self._tend_held)
        #: Where C-FIND/QIDO queries run (:meth:`stream`; harmony.storage.threads).
        self.query_threads = WokenThreads(threads, "harmony-storage-query")
        self._shutdown_trigger = None
        self._refs = 0
        self.closed = False
        #: stored / refused_full / refused_invalid / refused_failed, counted on the reactor.
        self.counters: Counter = Counter()
        #: The start-up scan's findings, once it ran (see :meth:`recover_sync`).
        self.recovery: Recovery | None = None
        #: Fires when the start-up scan is done (it runs on a storage thread).
        self.recovered: defer.Deferred | None = None
        #: An index commit failed after its file was placed: not a clean shutdown then.
        self._dirty = False
        #: Files placed whose rows are not committed yet (a close with some left is not clean).
        self._uncommitted = 0
        self._placed_lock = threading.Lock()
        #: Concurrent ingests share fsync rounds and index transactions (see harmony.storage.groupcommit).
        #: Storage threads lead the commits themselves (see harmony.storage.groupcommit).
        self.committer = GroupCommit(lambda fn: self._spawn(self.commit_pool, fn),
                                     lambda batch: self._commit_placed_sync(batch), tell=reactor.callFromThread)
        #: Threads that only wait for fdatasync/fsync, so the flushes of an instance
        #: run at the same time as its index commit (made on first use).
        self._flusher: ThreadPoolExecutor | None = None
        self._flush_threads = 2 * threads + 4
        #: The flushes behind journaled acknowledgements (see _FlushesBehind).
        self._behind = _FlushesBehind(self.instances_dir, after_round=self._tend_behind)
        #: This opening of the store, on its in_flight rows (recovery checks older ones).
        self.opening = uuid.uuid4().hex
        #: Numbers the temp files of instances placed from memory (with ``opening``: unique).
        self._temp_names = itertools.count()
        self._temp_prefix = f"{self.tmp_dir}/.{self.opening}-"
        #: Temp files made ahead for them, temp names removed late (see _SpareTemps).
        self.spares = _SpareTemps(self._temp_name)
        #: Ingest commits since the index's WAL was last checkpointed (sqlite; see _tend_spares).
        self._commits_since_checkpoint = 0
        self._checkpointing = threading.Lock()
        #: Checkpoints idle storage threads made (tests).
        self.checkpoints = 0
        #: ``(sop_uid, relpath)`` of instances durable since their commit: their
        #: in_flight rows go in the next ingest transaction.
        self._settled: list[tuple[str, str]] = []
        #: Journaled instances acknowledged whose file flushes have not finished yet.
        self._unflushed = 0
        #: Small instances ride in their in_flight row (see harmony.storage.inflight):
        #: on the embedded sqlite index, whose commit is a local WAL append.
        self.journal = self.fsync and self.db.dialect == SQLITE

    # ------------------------------------------------------------------ threads and connections

    def open_sync(self) -> None:
        """Create the folders and schema and clear crash leftovers, once.

        Deferred to first use so that building a configuration (``harmony
        check``) never creates a store on disk.
        """
        if self._opened:
            return
        with self._conn_lock:
            if self._opened:
                return
            for d in (self.root, self.instances_dir, self.tmp_dir.parent, self.tmp_dir):
                d.mkdir(parents=True, exist_ok=True)
            left = clear_temp(self.tmp_dir)
            if left:
                log.info("storage {root}: removed {n} temp file(s) left by an earlier run "
                         "(spares, second names of filed instances, writes never acknowledged)",
                         root=str(self.root), n=left)
            self.db.create_schema(schema_sqlite(), schema_pg())
            self.db.transaction(True, q.upgrade)
            self.db.transaction(True, idx.upgrade)
            if self.db.dialect == SQLITE:   # idle storage threads checkpoint (_tend_spares)
                self.db.transaction(False, _wal_backstop)
            if self.shared:
                # Refuses to open while another live process uses this node id.
                self.db.transaction(True, nodes.claim, (self.node, time.time()))
            plan = self._mark_opened()
            self._opened = True
        # The scan reads files and the index: never on the reactor thread.
        if isInIOThread():
            self.recovered = self.run(self.recover_sync, *plan)
        else:
            self.recover_sync(*plan)
            self.recovered = defer.succeed(self.recovery)

    def _mark_opened(self) -> tuple:
        """Consume the clean-shutdown marker and stamp this open; returns the
        ``(reason, since)`` the recovery scan needs."""
        clean = self.root / self._markers[0]
        opened = self.root / self._markers[1]
        if clean.exists():
            reason, since = "clean", None
        else:
            try:
                since = opened.stat().st_mtime - MTIME_SLACK_SECS
                reason = "unclean"
            except FileNotFoundError:
                # Never stamped (a store older than this scan): look at everything, once.
                reason, since = "unknown", None
        opened_at = time.time()  # compared with folder mtimes: the real clock, not self.clock
        opened.write_text(f"{opened_at}\n")
        os.utime(opened, (opened_at, opened_at))
        if self.fsync:
            fsync_file(opened)
        try:
            clean.unlink()
        except FileNotFoundError:
            pass
        if self.fsync:
            fsync_dir(self.root)
        return reason, since

    def _mark_clean(self) -> None:
        """Leave the clean-shutdown marker: every placed file has its row."""
        if not self._opened or self._dirty:
            return
        try:
            marker = self.root / self._markers[0]
            marker.write_text(f"{time.time()}\n")
            if self.fsync:
                fsync_file(marker)
                fsync_dir(self.root)
        except OSError as e:
            log.warn("storage {root}: cannot write the clean-shutdown marker ({error}); the next start "
                     "will scan for unindexed files", root=str(self.root), error=e.strerror)

    # ------------------------------------------------------------------ crash recovery

    def recover_sync(self, reason: str, since: float | None) -> Recovery:
        """Index or remove files a crash left without an index row (storage thread).

        Only series folders whose mtime is at or after *since* are listed
        (``since`` None: all of them).  Instances this run files meanwhile are
        complete and get their own rows, so a scan racing them is harmless.
        """
        started = time.monotonic()
        found = Recovery(reason=reason, since=since)
        self.recovery = found
        if reason == "clean":
            # Every flush finished before the clean stop: the rows are stale.
            self.bookkeep_sync(inflight.forget_earlier_runs, self.node, self.opening)
            return found
        self._recover_in_flight(found)
        conn = self._conn()
        for study in _subdirs(self.instances_dir):
            for series in _subdirs(study):
                try:
                    mtime = series.stat().st_mtime
                except FileNotFoundError:
                    continue
                if since is not None and mtime < since:
                    continue
                found.series_scanned += 1
                for entry in os.scandir(series):
                    if entry.is_file(follow_symlinks=False):
                        self._recover_file(conn, Path(entry.path), found)
        found.seconds = time.monotonic() - started
        if found.indexed or found.removed or found.ignored or found.in_flight or (
                reason == "unknown" and found.series_scanned):
            log.info("storage {root}: start-up scan after an {reason} stop: {in_flight} instance(s) in flight "
                     "checked ({rewritten} written again from the journal, {in_flight_removed} missing or "
                     "incomplete, their rows removed), {series} series "
                     "folder(s) scanned, {indexed} complete instance(s) without an index row indexed, {removed} "
                     "incomplete or invalid file(s) removed, {ignored} unexpected file(s) left alone "
                     "({seconds:.2f} s)", root=str(self.root), reason=reason, in_flight=found.in_flight,
                     rewritten=found.in_flight_rewritten, in_flight_removed=found.in_flight_removed,
                     series=found.series_scanned, indexed=found.indexed, removed=found.removed,
                     ignored=found.ignored, seconds=found.seconds)
        return found

    def _recover_in_flight(self, found: Recovery) -> None:
        """Check the instances whose flushes were running when this node stopped
        (see :mod:`harmony.storage.inflight`); storage thread, before the folder scan."""
        conn = self._conn()
        for sop, rel, prev, data in self.read_sync(inflight.left_by_earlier_runs, self.node, self.opening):
            found.in_flight += 1
            row = conn.execute("SELECT relpath FROM instances WHERE sop_uid=?", (sop,)).fetchone()
            if row is None or row[0] != rel:
                continue  # deleted or filed again since: the folder scan sees any file left
            path = self.path_of(rel)
            if data is not None:
                # Journaled (maybe acknowledged before its file was on disk): the
                # bytes in the row are the instance; write them again, durably.
                with TempFile(self.tmp_dir, self.guard, self.fsync) as tmp:
                    tmp.write(data)
                    tmp.commit(path, self.instances_dir)
                found.in_flight_rewritten += 1
                continue
            try:
                header = self._read_header(path)
                if header["sop"] != sop or self.path_of(self.relpath(
                        header["study"], header["series"], header["sop"])) != path.resolve():
                    raise InvalidInstance("its UIDs do not match its place in the layout")
                st = path.stat()
            except (InvalidInstance, OSError) as e:
                log.debug("storage: an instance in flight at the crash is missing or incomplete ({why})", why=str(e))
                found.in_flight_removed += 1
                self.write_sync(inflight.undo, sop, rel, keep_queue=bool(prev))
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                if prev:
                    prev_path = self.path_of(prev)
                    if prev_path.is_file():
                        self._recover_file(conn, prev_path, found)  # the copy filed before: indexed again
                continue
            self._sync_recovered(path)
            self._index_sync(header, path, st.st_size, (), st.st_mtime)  # the row as the file says
        self.bookkeep_sync(inflight.forget_earlier_runs, self.node, self.opening)

    def _sync_recovered(self, path: Path) -> None:
        """A file the recovery keeps may have lived only in the page cache (kill -9
        before its flushes finished): on disk before its row is trusted."""
        if self.fsync:
            fdatasync_file(path)
            fsync_dir(path.parent)

    def _recover_file(self, conn, path: Path, found: Recovery) -> None:
        rel = path.relative_to(self.instances_dir).as_posix()
        parts = rel.split("/")
        if len(parts) != 3 or not parts[2].endswith(".dcm") or not all(
                _UID_PART.fullmatch(p) for p in (parts[0], parts[1], parts[2][:-4])):
            found.ignored += 1  # not a name the store makes: not ours to delete
            log.warn("storage {root}: unexpected file in instances/ left alone", root=str(self.root))
            return
        found.files_checked += 1
        row = conn.execute("SELECT relpath FROM instances WHERE sop_uid=?", (parts[2][:-4],)).fetchone()
        if row is not None and row[0] == rel:
            return  # indexed: the normal case
        try:
            header = self._read_header(path)
            if self.path_of(self.relpath(header["study"], header["series"], header["sop"])) != path.resolve():
                raise InvalidInstance("its UIDs do not match its place in the layout")
            size = path.stat().st_size
        except (InvalidInstance, OSError) as e:
            log.debug("storage: removing unindexed file {rel}: {why}", rel=rel, why=str(e))
            try:
                path.unlink()
                found.removed += 1
            except FileNotFoundError:
                pass
            return
        self._sync_recovered(path)
        self._index_sync(header, path, size, (), path.stat().st_mtime)
        log.debug("storage: indexed unindexed file {rel}", rel=rel)
        found.indexed += 1

    def _conn(self):
        self.open_sync()
        return self.db.connection()

    def write_sync(self, fn, *args, **kwargs):
        """Run ``fn(conn, *args, **kwargs)`` in one write transaction, durable
        (fsynced) when it commits (storage thread only)."""
        return self._transaction(True, fn, args, kwargs)

    def bookkeep_sync(self, fn, *args, **kwargs):
        """A write transaction that survives a process crash (kill -9) but may be
        lost with the last moments before a power failure: WAL with
        ``synchronous=NORMAL``.  For queue state changes whose loss only means a
        redundant, idempotent re-delivery - never for what an acknowledgement
        depends on."""
        return self._transaction(False, fn, args, kwargs)

    def _transaction(self, durable: bool, fn, args, kwargs):
        self.open_sync()
        return self.db.transaction(durable, fn, args, kwargs)

    def read_sync(self, fn, *args, **kwargs):
        self.open_sync()
        return self.db.read(fn, args, kwargs)

    def run(self, fn, *args, **kwargs) -> defer.Deferred:
        """Run blocking ``fn`` on the store's thread pool."""
        return self._run_on(self.pool, fn, args, kwargs)

    def run_commit(self, fn, *args) -> defer.Deferred:
        """Run a group commit on the store's commit thread."""
        return self._run_on(self.commit_pool, fn, args, {})

    def _run_on(self, pool: ThreadPool, fn, args, kwargs) -> defer.Deferred:
        try:
            self._start_pools()
        except StorageFailure:
            return defer.fail()
        return deferToThreadPool(self.reactor, pool, fn, *args, **kwargs)

    def _spawn(self, pool: ThreadPool | WokenThreads, fn, *args) -> None:
        """Start ``fn(*args)`` on *pool*, which reports back by itself (no Deferred,
        no reactor wake-up when it returns); StorageFailure if the store is closed."""
        self._start_pools()
        if isinstance(pool, WokenThreads):
            pool.call(fn, *args)
        else:
            pool.callInThread(fn, *args)

    def _start_pools(self) -> None:
        if self.closed:
            # Never restart the pool of a closed store: its threads would outlive
            # it, and the shutdown trigger would stop a pool already stopped.
            raise StorageFailure("the store is closed")
        if not self.pool.started:
            self.pool.start()
            self._shutdown_trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self._stop_pool)
            if self.shared and self._heartbeat_loop is None:
                self._heartbeat_loop = task.LoopingCall(self._heartbeat)
                self._heartbeat_loop.clock = self.reactor
                self.reactor.callLater(0, self._heartbeat_loop.start, nodes.HEARTBEAT_SECONDS, now=False)
            if self.blobs is not None and self._upload_loop is None:
                # Also finishes what a crash (kill -9) left pending, at start.
                self._upload_loop = task.LoopingCall(self.upload_soon)
                self._upload_loop.clock = self.reactor
                self.reactor.callLater(0, self._upload_loop.start, self.upload_interval, now=True)
        if not self.commit_pool.started:
            self.commit_pool.start()
        if not self.ingest_threads.started:
            self.ingest_threads.start()
        if not self.held_threads.started:
            self.held_threads.start()
        if not self.query_threads.started:
            self.query_threads.start()

    def write(self, fn, *args, **kwargs) -> defer.Deferred:
        return self.run(self.write_sync, fn, *args, **kwargs)

    def bookkeep(self, fn, *args, **kwargs) -> defer.Deferred:
        return self.run(self.bookkeep_sync, fn, *args, **kwargs)

    def read(self, fn, *args, **kwargs) -> defer.Deferred:
        return self.run(self.read_sync, fn, *args, **kwargs)

    def _heartbeat(self) -> None:
        """Renew this node's claim on its id (reactor; the work on a storage thread)."""
        def renewed(ours):
            if not ours:
                log.critical("storage: node id {node!r} was taken over by another process: two nodes run "
                             "under one id (set [storage.options] node on each)", node=self.node)
        self.bookkeep(nodes.heartbeat, self.node, time.time()).addCallbacks(renewed, lambda f: None)

    def _stop_pool(self):
        self.query_threads.stop()
        self.ingest_threads.stop()
        self.held_threads.stop()   # commits what its last placement held (_tend_held)
        if self.pool.started:
            self.pool.stop()  # placements first: what they placed may still queue a commit
        if self.commit_pool.started:
            self.commit_pool.stop()

    def close(self) -> None:
        """Stop the threads and close every connection (idempotent)."""
        if self.closed:
            return
        self.closed = True
        for loop in (self._upload_loop, self._heartbeat_loop):
            if loop is not None and loop.running:
                loop.stop()
        if self._shutdown_trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(self._shutdown_trigger)
            except ValueError:
                pass
        self._stop_pool()  # joins the storage threads: every write has finished
        self.spares.close()
        if self._flusher is not None:
            self._flusher.shutdown(wait=True)
        self._behind.stop()
        c = self.committer
        if c.entries:
            log.info("storage {root}: {n} instance(s) committed in {batches} commit(s), largest {largest}",
                     root=str(self.root), n=c.entries, batches=c.batches, largest=c.largest)
        if self._uncommitted:
            self._dirty = True  # placed files whose batch never ran: the next start indexes them
        self._mark_clean()
        self.db.close()

    # ------------------------------------------------------------------ layout

    def relpath(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        # clean_uid guarantees digits and dots only: no separator, no "..".
        return f"{clean_uid(study_uid)}/{clean_uid(series_uid)}/{clean_uid(sop_uid)}.dcm"

    def path_of(self, relpath: str) -> Path:
        if _LAYOUT_PATH.fullmatch(relpath):
            # A name relpath() makes (UIDs start with a digit: no "..", no
            # separator inside): inside the store as written, without the
            # realpath() walk that cost a retrieve 15 % of its time (bench/archive).
            return self.instances_dir / relpath
        p = (self.instances_dir / relpath).resolve()
        if self.instances_dir not in p.parents:
            raise InvalidInstance("path outside the store")
        return p

    # ------------------------------------------------------------------ ingest (storage thread)

    def put_file_sync(self, source, *, move: bool = False, enqueue=(), now: float | None = None,
                      parsed=None) -> DicomInstance:
        """File the Part-10 file *source*; durable on return.

        ``move=True`` renames *source* into place when it is on the same
        filesystem (a staging file nobody else needs) instead of copying it.
        *enqueue* names store-and-forward targets to queue it for, in the same
        transaction as the index row.  *parsed*: see :meth:`_place_file_sync`.
        """
        return self._commit_placed_sync([self._place_file_sync(source, move, enqueue, now, parsed)])[0]

    def put_temp_sync(self, tmp: TempFile, *, enqueue=(), now=None) -> DicomInstance:
        """File a :class:`TempFile` already written (and closed) in ``tmp_dir``."""
        return self._commit_placed_sync([self._place_temp_sync(tmp, enqueue, now)])[0]

    def put_bytes_sync(self, data: bytes, *, enqueue=(), now=None) -> DicomInstance:
        """File a small Part-10 body already in memory."""
        return self._commit_placed_sync([self._place_bytes_sync(data, enqueue, now)])[0]

    # An ingest is two steps: *placing* (header parsed, file fsynced and renamed
    # into its folder; runs on any storage thread, several at once) and
    # *committing* (folder fsyncs, then the index and queue rows; one batch of
    # placed instances at a time, see harmony.storage.groupcommit).  A crash
    # between the two leaves files without rows: the start-up scan's case.

    def _place_file_sync(self, source, move: bool, enqueue, now, parsed=None, expect=None) -> Placed:
        """*parsed*: ``(stamp, dataset)`` from :func:`harmony.dicom.files.parse_stamped`
        (or ``(stamp, ScannedFile)`` of its bytes, :mod:`harmony.dicom.rawscan`)
        when the caller already parsed (and checked) *source*: used only while
        the file is unchanged since, so it is never parsed twice.  *expect*:
        ``(SOP Class UID, SOP Instance UID)`` the file must have (it came with
        them, unchecked: :attr:`DicomInstance.unchecked`)."""
        self.open_sync()
        source = Path(source)
        try:
            st = os.stat(source)
        except OSError as e:
            raise InvalidInstance(f"cannot read the instance: {e.strerror}") from None
        size = st.st_size
        # The stamp from the same stat (stamp_of's fields): one stat per instance, not two.
        header = self._read_header(source, parsed, (os.fspath(source), size, st.st_mtime_ns, st.st_ino))
        if expect is not None and (header["sop_class"], header["sop"]) != expect:
            raise MismatchedInstance("the data set does not match the SOP Class and Instance UIDs it came with")
        self.guard.check(size)
        final = self.path_of(self.relpath(header["study"], header["series"], header["sop"]))
        fresh = False
        if move:
            try:
                if self.fsync:
                    fresh = claim_name(source, final, self.instances_dir)
                else:
                    make_dirs(final.parent, self.instances_dir)
                    os.replace(source, final)
            except OSError:
                move = False  # another filesystem (EXDEV) or a read-only source: copy instead
        if not move:
            with TempFile(self.tmp_dir, self.guard, self.fsync) as tmp:
                tmp.copy_from(source)
                fresh = tmp.claim(final, self.instances_dir)
        placed = self._placed(header, final, size, enqueue, now, fresh, journal=True)
        placed.moved = move
        return placed

    def _place_temp_sync(self, tmp: TempFile, enqueue, now) -> Placed:
        """Place a :class:`TempFile` already written (and closed) in ``tmp_dir``."""
        self.open_sync()
        try:
            tmp.close(sync=False)  # synced when placed (claim_name), or alongside the commit
            header = self._read_header(tmp.path)
            final = self.path_of(self.relpath(header["study"], header["series"], header["sop"]))
            fresh = tmp.claim(final, self.instances_dir)
        finally:
            tmp.__exit__(None, None, None)  # deletes the temp file unless it was committed
        return self._placed(header, final, tmp.size, enqueue, now, fresh, journal=True)

    def _place_bytes_sync(self, data, enqueue, now, expect=None, parsed=None) -> Placed:
        """Place a Part-10 instance held in memory (*data*: its bytes, or its fragments
        in order): described from those bytes, written once under a temp name of this
        store's and claimed into place as :meth:`_place_file_sync` does a staged file.
        Against staging it to a file first: no file made ahead, read back, stat'ed and
        renamed (a C-STORE of a small instance, bench/ingest: ~10 system calls and a
        thread hop fewer).  *expect*: see :meth:`_place_file_sync`.  *parsed*:
        ``(_, ScannedFile)`` of these very bytes (the STOW-RS bridge scanned them to
        check the part), used as made rather than scanned again."""
        self.open_sync()
        if not isinstance(data, bytes):
            data = b"".join(data)
        size = len(data)
        self.guard.check(size)
        scan = parsed[1] if parsed is not None and isinstance(parsed[1], ScannedFile) else None
        header = _header_of_bytes(data, scan if scan is not None and scan.data is data else None)
        if expect is not None and (header["sop_class"], header["sop"]) != expect:
            raise MismatchedInstance("the data set does not match the SOP Class and Instance UIDs it came with")
        rel = self.relpath(header["study"], header["series"], header["sop"])
        final = self.path_of(rel)
        spare = self.spares.take()
        tmp = spare[0] if spare is not None else self._temp_name()
        try:
            fd = spare[1] if spare is not None else \
                os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                write_all(fd, data)
            finally:
                os.close(fd)
            if self.fsync:
                fresh = claim_name(tmp, final, self.instances_dir, keep_source=True)
                if fresh:
                    self.spares.unlink_later(tmp)   # linked, not renamed: the temp name goes later
            else:
                make_dirs(final.parent, self.instances_dir)
                os.replace(tmp, final)
                fresh = False
        except OSError as e:
            _unlink_quietly(tmp)
            raise _io_error(e) from None
        header.setdefault("bytes", data)
        return self._placed(header, final, size, enqueue, now, fresh, journal=True, rel=rel)

    def _temp_name(self) -> str:
        """A new temp name of this store's (``opening`` and a counter: unique).  A string,
        not a Path: one is made for every instance placed from memory, and pathlib's
        parsing and formatting of each showed in the C-STORE profile (bench/ingest)."""
        return f"{self._temp_prefix}{next(self._temp_names)}.part"

    def _tend_spares(self, waiting, wait: bool = False) -> None:
        """(A storage thread with no job.) Spare temp files made, used temp names removed,
        and the index's WAL checkpointed when due.

        sqlite checkpoints its WAL inside the commit that takes it past
        ``wal_autocheckpoint`` pages: every ~90 C-STOREs one of them waited for
        ~1,000 pages copied into the database and its fsync.  Here a thread with
        nothing to do checkpoints (PASSIVE: on its own connection, never blocking the
        writer, who goes on appending meanwhile), and the commit's own checkpoint is
        only a backstop for a WAL that idle threads never got to
        (:data:`WAL_BACKSTOP_PAGES`).  *wait*: wait for a thread tending already (tests)."""
        if not self._opened or self.closed:
            return
        self.spares.tend(waiting, wait)
        self._checkpoint_if_due(waiting, wait)

    def _tend_held(self, waiting) -> None:
        """(The held-instance thread, with no job.)  The commit of a placement held for a
        job that is gone (it failed, or was the thread's stop).  Spare temp files and the
        checkpoint are the flush thread's (:meth:`_tend_behind`): creating a file takes
        0.2-0.8 ms here (see :class:`_SpareTemps`), and an instance arriving meanwhile
        would wait for it -- save where no flush thread runs (no ingest journal)."""
        self.committer.kick()
        if not self.journal and self._opened and not self.closed:
            self.spares.tend(waiting)

    def _tend_behind(self) -> None:
        """(The flush thread behind the answers, after a round.)  Spare temp files for the
        held-instance thread, and the WAL checkpoint when due.

        The spares are made whether or not the held-instance thread has work queued: it is
        another thread, and a busy one is exactly the one that needs them.  Made only while
        it had nothing queued (as until session 11), they ran out under four associations,
        and the held thread created 545 of 600 temp files itself, each an ext4 inode scan
        (0.2-0.6 ms here) between an instance's arrival and its commit (strace, bench/ingest)."""
        if self._opened and not self.closed:
            self.spares.tend()
            self._checkpoint_if_due()

    def _checkpoint_if_due(self, waiting=lambda: 0, wait: bool = False) -> None:
        """Checkpoint the index's WAL (PASSIVE) when :data:`CHECKPOINT_COMMITS` commits
        have gone by and nobody *waiting*; see :meth:`_tend_spares`."""
        if not self._opened or self.closed or self.db.dialect != SQLITE or waiting():
            return
        # (With *wait*, the lock first: a checkpoint another thread has begun is over when we look.)
        if not wait and self._commits_since_checkpoint < CHECKPOINT_COMMITS:
            return
        if not self._checkpointing.acquire(blocking=wait):
            return
        try:
            if self._commits_since_checkpoint >= CHECKPOINT_COMMITS:
                self._commits_since_checkpoint = 0
                self.db.checkpoint()
                self.checkpoints += 1
        except sqlite3.Error as e:   # the backstop checkpoints instead; nothing is lost
            log.debug("storage {root}: an idle checkpoint failed: {error}", root=str(self.root), error=str(e))
        finally:
            self._checkpointing.release()

    def _placed(self, header: dict, final: Path, size: int, enqueue, now, fresh: bool = False,
                journal: bool = False, rel: str | None = None) -> Placed:
        """*fresh*: *final* is a new name whose data is not synced yet; the sync
        starts now, on a flush thread.  *journal*: a small instance's bytes go
        into its in_flight row (when this store journals).  *rel*: *final*'s
        relpath when the caller made it (pathlib's relative_to took ~2 % of an
        instance's CPU)."""
        with self._placed_lock:
            self._uncommitted += 1
        if rel is None:
            rel = final.relative_to(self.instances_dir).as_posix()
        placed = Placed(header, final, rel, size, tuple(enqueue), now)
        data = header.pop("bytes", None)   # the file as read to describe it, when read whole
        if journal and self.journal and size <= JOURNAL_MAX_BYTES:
            placed.data = data if data is not None and len(data) == size else final.read_bytes()
        if fresh and placed.data is not None:
            placed.sync_later = True   # acknowledged by its journal row: synced with its batch
        elif fresh:
            placed.data_sync = self._flush(fdatasync_file, final)
        return placed

    def flushes_done_sync(self) -> None:
        """Wait until every file and folder flush started so far has finished (not the reactor)."""
        with self._placed_lock:
            flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.shutdown(wait=True)
        self._behind.wait_idle()

    def _flush(self, fn, *args) -> Future:
        """Run a blocking flush (fdatasync, fsync) on a flush thread."""
        with self._placed_lock:
            if self._flusher is None:
                self._flusher = ThreadPoolExecutor(self._flush_threads, thread_name_prefix="harmony-storage-flush")
            return self._flusher.submit(fn, *args)

    def _read_header(self, path: Path, parsed=None, stamp: tuple | None = None) -> dict:
        """The instance's UIDs, index attributes and stored metadata (and, read whole, its
        ``bytes``): read straight from the file's bytes (:mod:`harmony.dicom.rawscan`),
        pydicom's parse only for what the scanner leaves to it.  A file that cannot be
        complete (every element must fit in it) is refused here, never acknowledged."""
        ds = parsed[1] if parsed is not None and parsed[0] == (stamp or stamp_of(path)) else None
        if ds is not None and not isinstance(ds, ScannedFile):
            return _header_of_dataset(ds)
        scan = ds   # a scan handed on (the STOW-RS bridge scans each part from the body's bytes) is used as made
        try:
            try:
                if scan is None:
                    scan = scan_file(path)
                return _header_of_scan(scan)
            except ScanDeclined:   # pydicom's parse of the same bytes (or file), as before the scanner
                ds = scan.dataset() if scan is not None else check_complete(path)
        except CorruptDataset as e:
            raise InvalidInstance(f"not a complete DICOM Part-10 file: {e}") from None
        except OSError as e:
            raise InvalidInstance(f"cannot read the instance: {e.strerror}") from None
        finally:
            if scan is not None:
                scan.close()
        header = _header_of_dataset(ds)
        if scan is not None and isinstance(scan.data, bytes):
            header["bytes"] = scan.data
        return header

    def _settle_after(self, flushes: list[Future], done: list[tuple[str, str]]) -> None:
        """Once every one of *flushes* has finished, forget *done*'s in_flight rows
        (in the next ingest transaction); a failed flush leaves them for the next
        start (not a clean stop), which writes the files again from the rows."""
        left = [len(flushes), False]

        def finished(flush: Future | None) -> None:
            with self._placed_lock:
                if flush is not None:
                    left[0] -= 1
                    left[1] = left[1] or flush.exception() is not None
                if left[0]:
                    return
                self._unflushed -= len(done)
                if left[1]:
                    self._dirty = True
                else:
                    self._settled.extend(done)
            if left[1]:
                log.error("storage {root}: a file or folder sync failed after its instance was journaled; "
                          "the next start writes it again from the journal", root=str(self.root))

        if not flushes:
            finished(None)
        for flush in flushes:
            flush.add_done_callback(finished)

    def _unsettle(self, settled: list[tuple[str, str]]) -> None:
        """A transaction that was to forget *settled* did not commit: the next one will."""
        with self._placed_lock:
            self._settled[:0] = settled

    def _index_sync(self, header: dict, final: Path, size: int, enqueue, now) -> DicomInstance:
        """Index a file already in place (the start-up scan's case)."""
        return self._commit_placed_sync([self._placed(header, final, size, enqueue, now)], sync_folders=False)[0]

    def _commit_placed_sync(self, batch: list[Placed], sync_folders: bool = True) -> list[DicomInstance]:
        """Make placed instances durable together: each folder they were renamed
        into fsynced once and every index and queue row committed in one
        transaction, the folder fsyncs (and the data syncs of new names, started
        when placed) running while the transaction commits - see "Overlapped
        flushes" in the module docstring.  Returns once all of them are done."""
        overlap = sync_folders and self.fsync
        # Every instance journaled: acknowledged at the commit, its flushes finish behind.
        journaled = overlap and all(p.data is not None for p in batch) and self._unflushed < MAX_UNFLUSHED
        flushes: list[Future] = []
        later = [p.final for p in batch if p.sync_later]
        # The folders from the relpaths' strings: a Path's parent and hash per instance showed in
        # py-spy (~3 % of the storage thread's samples); one Path per folder.
        folders = [self.instances_dir / rel for rel in sorted({p.rel.rpartition("/")[0] for p in batch})] \
            if overlap else []
        if journaled:
            # Not waited for by the acknowledgement: the flush thread behind syncs the
            # batch's files and folders with whatever else is pending (_FlushesBehind).
            flushes = [self._behind.submit(later, folders)]
            flushes += [p.data_sync for p in batch if p.data_sync is not None]
        else:
            late = [self._flush(fdatasync_file, path) for path in later]
            if overlap:
                flushes = [self._flush(fsync_dir, folder) for folder in folders]
                flushes += [p.data_sync for p in batch if p.data_sync is not None] + late
        with self._placed_lock:
            settled, self._settled = self._settled, []
        # Rows in one order whichever batch they come in (PostgreSQL: concurrent
        # nodes lock studies and series in the same order, no deadlock); a stable
        # sort, so the same instance twice in a batch keeps its arrival order.
        order = sorted(range(len(batch)), key=lambda i: batch[i].header["sop"])

        def tx(conn):
            if settled:
                inflight.settle(conn, self.node, settled)
            olds = [None] * len(batch)
            for i in order:
                p = batch[i]
                now = self.clock() if p.now is None else p.now
                olds[i] = idx.upsert_instance(conn, p.header["attrs"], sop_class_uid=p.header["sop_class"],
                                              transfer_syntax_uid=p.header["ts"], relpath=p.rel,
                                              size=p.size, now=now, metadata=p.header.get("metadata"))
                if overlap:
                    prev = olds[i] if olds[i] != p.rel else None
                    inflight.add(conn, self.node, p.header["sop"], p.rel, prev, self.opening,
                                 p.data if journaled else None)
                if p.enqueue:
                    q.enqueue(conn, p.header["sop"], list(p.enqueue), now)
                if self.blobs is not None:
                    blob_sql.mark_pending(conn, p.rel, self.node, now)
            return olds

        try:
            olds = self.write_sync(tx)
        except DatabaseUnavailable:
            # The files are in place without their rows: the next start must scan.
            self._dirty = True
            self._unsettle(settled)
            raise
        except (sqlite3.Error, StorageFailure) as e:
            self._dirty = True
            self._unsettle(settled)
            raise StorageFailure(f"index update failed: {e}") from None
        self._commits_since_checkpoint += 1
        if journaled:
            # Durable now (the bytes are in the committed row); the row goes once
            # the file's own flushes are done.
            with self._placed_lock:
                self._uncommitted -= len(batch)
                self._unflushed += len(batch)
            self._settle_after(flushes, [(p.header["sop"], p.rel) for p in batch])
        else:
            for flush in flushes:
                try:
                    flush.result()
                except OSError as e:
                    # Rows committed for files not known to be on disk: nobody is told
                    # they are stored, and the next start checks them (in_flight rows).
                    self._dirty = True
                    raise StorageFailure(f"cannot sync an instance or its folder: {e.strerror}") from None
            with self._placed_lock:
                self._uncommitted -= len(batch)
                if overlap:
                    self._settled.extend((p.header["sop"], p.rel) for p in batch)
        # A copy filed elsewhere before goes - unless it is where the row now
        # points (the same instance twice in one batch, at the same place).
        indexed_at = {batch[i].header["sop"]: batch[i].rel for i in order}
        for i, old in enumerate(olds):
            if old and old != indexed_at[batch[i].header["sop"]]:
                try:
                    os.unlink(self.path_of(old))
                except (FileNotFoundError, InvalidInstance):
                    pass
        if self.blobs is not None:
            self.reactor.callFromThread(self.upload_soon)
        return [DicomInstance(path=p.final, sop_class_uid=p.header["sop_class"], sop_instance_uid=p.header["sop"],
                              transfer_syntax_uid=p.header["ts"], study_instance_uid=p.header["study"],
                              series_instance_uid=p.header["series"], size=p.size, owned=False) for p in batch]

    def delete_sync(self, sop_uid: str) -> bool:
        rel = self.write_sync(idx.delete_instance, sop_uid)
        if rel is None:
            return False
        try:
            os.unlink(self.path_of(rel))
        except FileNotFoundError:
            pass
        if self.blobs is not None:
            self.write_sync(lambda conn: conn.execute("DELETE FROM blob_uploads WHERE relpath=?", (rel,)))
            try:
                self.blobs.delete_sync(rel)
            except (BlobUnavailable, FileNotFoundError):
                log.warn("storage: could not delete an object from S3 (left for the bucket's lifecycle rules)")
        return True

    def get_sync(self, sop_uid: str) -> DicomInstance | None:
        row = self.read_sync(lambda conn: conn.execute(
            "SELECT i.relpath, i.sop_class_uid, i.transfer_syntax_uid, i.size, se.series_uid, st.study_uid "
            "FROM instances i JOIN series se ON i.series_pk=se.pk JOIN studies st ON se.study_pk=st.pk "
            "WHERE i.sop_uid=?", (sop_uid,)).fetchone())
        if row is None:
            return None
        return DicomInstance(path=self.local_copy_sync(row[0]), sop_class_uid=row[1], sop_instance_uid=sop_uid,
                             transfer_syntax_uid=row[2], size=row[3], series_instance_uid=row[4],
                             study_instance_uid=row[5], owned=False)

    # ------------------------------------------------------------------ object storage (S3)

    def local_copy_sync(self, relpath: str) -> Path:
        """The file of *relpath* in the folder, fetched from S3 first if this
        node does not have it (storage thread)."""
        path = self.path_of(relpath)
        if self.blobs is None:
            return path
        if path.exists():
            if self.cache is not None:
                self.cache.touch(path)
            return path
        with TempFile(self.tmp_dir, self.guard, self.fsync) as tmp:
            try:
                self.blobs.download_sync(relpath, tmp._fh)
            except FileNotFoundError:
                raise BlobUnavailable("the instance is not in S3 yet (its upload is pending on the node "
                                      "that received it)") from None
            tmp.commit(path, self.instances_dir)
        if self.cache is not None:
            self.cache.added(path.stat().st_size)
            if self.cache.due():
                self.reactor.callFromThread(self.upload_soon)  # evicts on its storage thread
        return path

    def upload_soon(self) -> None:
        """Upload this node's pending files now (reactor; one run at a time)."""
        if self.closed or self.blobs is None:
            return
        if self._uploading:
            self._upload_again = True
            return
        self._uploading = True
        self._upload_again = False

        def done(more):
            self._uploading = False
            if (more or self._upload_again) and not self.closed:
                self.upload_soon()

        def failed(f):
            self._uploading = False
            if not f.check(BlobUnavailable, StorageFailure):
                log.failure("storage: upload to S3 failed", f)
            # S3 or the database away: the periodic run tries again.
        self.run(self.upload_pending_sync).addCallbacks(done, failed)

    def upload_pending_sync(self, limit: int = 64) -> bool:
        """Upload up to *limit* of this node's pending files; True if more remain."""
        try:
            return self._upload_some_sync(limit)
        finally:
            if self.cache is not None and self.cache.due():
                # Also while S3 is away (fetched files can still go).  The pending set
                # is read before the walk: a file made pending after it was renamed
                # into place moments ago, inside the cache's grace.
                self.cache.evict_sync(self.read_sync(blob_sql.pending_set, self.node))

    def _upload_some_sync(self, limit: int) -> bool:
        self.uploads_pending = self.read_sync(blob_sql.backlog)
        rels = self.read_sync(blob_sql.pending, self.node, limit)
        for rel in rels:
            path = self.path_of(rel)
            if path.exists():
                self.blobs.upload_sync(path, rel)
                if self.cache is not None:
                    self.cache.added(path.stat().st_size)
            # (a file gone meanwhile was deleted or replaced: nothing to upload)
            self.bookkeep_sync(blob_sql.uploaded, rel, self.node)
            self.uploads_pending = max(0, self.uploads_pending - 1)
        return len(rels) == limit

    # ------------------------------------------------------------------ ingest (reactor side)

    def _count(self, d: defer.Deferred) -> defer.Deferred:
        def ok(stored):
            self.counters["stored"] += 1
            return stored

        def refused(f):
            self._count_refusal(f)
            return f

        return d.addCallbacks(ok, refused)

    def _count_refusal(self, f: Failure) -> None:
        reason = ("full" if f.check(StorageFull) else "invalid" if f.check(InvalidInstance) else "failed")
        self.counters[f"refused_{reason}"] += 1

    def _ingest(self, place, *args, placed_hook=None, held: bool = False) -> defer.Deferred:
        """Place an instance on a storage thread (``place(*args)``) and commit it
        from there with whatever else is waiting (group commit, thread leaders:
        the lone writer commits at once, on the thread that placed it); fires on
        the reactor with its stored :class:`DicomInstance`.  *placed_hook(placed)*
        runs on that thread once it is placed.  One thread hop to the storage
        thread and one ``callFromThread`` per committed batch back: no Deferred
        for the placing itself (deferToThreadPool's reactor wake-up per job).

        *held*: an instance held in memory, placed on :attr:`held_threads`.  That one
        thread places the instances of every association in turn, and holds each
        placement for the next one queued (:meth:`GroupCommit.hold`), which commits
        them together: four associations' instances in one commit instead of four,
        and one thread taking the GIL for them instead of four.  Against four
        ingest threads: C-STORE CPU per instance -10 to -20 %, four associations
        +5 to +23 % inst/s in the same rounds (bench/ingest, "C-STORE, session 9")."""
        d: defer.Deferred = defer.Deferred()
        tell = self.reactor.callFromThread
        threads = self.held_threads if held else self.ingest_threads

        def work():
            try:
                placed = place(*args)
                if placed_hook is not None:
                    placed_hook(placed)
            except Exception:  # noqa: BLE001 - the caller's refusal, reported on the reactor
                tell(d.errback, Failure())
                return
            if held and threads.pending():
                self.committer.hold(placed, d)   # the next placement commits it (or _tend_held)
            else:
                self.committer.offer(placed, d)

        try:
            self._spawn(threads, work)
        except StorageFailure:
            return self._count(defer.fail())
        return self._count(d)

    def put_file(self, source, *, move=False, enqueue=(), now=None, parsed=None) -> defer.Deferred:
        return self._ingest(self._place_file_sync, source, move, enqueue, now, parsed)

    def put_instance(self, instance: DicomInstance, *, enqueue=(), now=None) -> defer.Deferred:
        """File a :class:`DicomInstance`; an owned (staged) one is moved, not copied."""
        def placed(placed: Placed):
            if placed.moved:
                instance.owned = False  # its file is the store's now: nothing left to release

        expect = (instance.sop_class_uid, instance.sop_instance_uid) if instance.unchecked else None
        if instance.data is not None:   # held in memory (a small C-STORE data set): no file of its own yet
            return self._ingest(self._place_bytes_sync, instance.data, enqueue, now, expect, held=True)
        d = self._ingest(self._place_file_sync, instance.path, instance.owned, enqueue, now, instance.parsed, expect,
                         placed_hook=placed)

        def done(stored):
            if instance.owned and Path(instance.path) != stored.path:
                instance.release()
            return stored

        return d.addCallback(done)

    def put_instances(self, instances: list[DicomInstance], *, enqueue=(), now=None) -> defer.Deferred:
        """File several instances as one group (the parts of a STOW-RS request).

        They are placed on the storage threads in shares of about
        :data:`SHARE_BYTES` (one job for a request of small instances, at most
        one job per thread), then committed in one group-commit
        batch: one round of folder fsyncs and one index commit for the lot,
        where :meth:`put_instance` each would wait for its own.  Fires once,
        with each instance's outcome in order: its stored
        :class:`DicomInstance`, or a Failure (that instance was refused, or the
        batch's commit failed - then none of them is stored).  Owned (staged)
        instances are moved into place, as with :meth:`put_instance`.
        """
        # Placing is CPU under the GIL (parse, index header) plus syscalls that do not
        # wait for the disk: more threads on one small request only fight for the GIL
        # (a STOW-RS request of 10 small instances split over four threads cost twice
        # the system time, in futex calls, of one thread placing all ten).
        size = sum(i.size for i in instances)
        shares = max(1, min(len(instances), self.pool.max, size // SHARE_BYTES + 1))
        if shares == 1:
            return self._place_and_offer(instances, enqueue, now).addCallback(self._counted, instances)
        jobs = [self.run(self._place_share_sync, instances[i::shares], enqueue, now) for i in range(shares)]

        def placed(results):
            outcomes: list = [None] * len(instances)
            for i, (ok, share) in enumerate(results):
                if not ok:  # the job itself failed (a closed store): every instance in its share
                    share = [share] * len(outcomes[i::shares])
                outcomes[i::shares] = share
            good = _placed_ones(outcomes, instances)
            if not good:
                return outcomes
            return self.committer.submit_many([outcomes[i] for i in good]).addBoth(_committed_into, outcomes, good)

        return defer.DeferredList(jobs, consumeErrors=True).addCallback(placed).addCallback(self._counted, instances)

    def _counted(self, outcomes: list, instances: list[DicomInstance]) -> list:
        for instance, outcome in zip(instances, outcomes, strict=True):
            if isinstance(outcome, Failure):
                self._count_refusal(outcome)
            else:
                self.counters["stored"] += 1
            if instance.owned:
                instance.release()  # copied (or refused): the staged file is not needed any more
        return outcomes

    def _place_and_offer(self, instances: list[DicomInstance], enqueue, now) -> defer.Deferred:
        """:meth:`put_instances` in one share: placed on one storage thread, which offers
        them to the group commit together (and leads it when none is running), the
        reactor told once - one thread hand-off a request, where a placing job's answer
        through the reactor, then a commit submitted from there, were two."""
        d: defer.Deferred = defer.Deferred()
        tell = self.reactor.callFromThread

        def work():
            try:
                outcomes = self._place_share_sync(instances, enqueue, now)
            except Exception:  # noqa: BLE001 - a closed store: every instance's refusal, on the reactor
                tell(d.callback, [Failure()] * len(instances))
                return
            good = _placed_ones(outcomes, instances)
            if not good:
                tell(d.callback, outcomes)
                return
            done: defer.Deferred = defer.Deferred()
            done.addBoth(_committed_into, outcomes, good).addCallback(d.callback)  # on the reactor (GroupCommit._told)
            self.committer.offer_many([outcomes[i] for i in good], done)

        try:
            self._spawn(self.ingest_threads, work)
        except StorageFailure:
            return defer.succeed([Failure()] * len(instances))
        return d

    def _place_share_sync(self, instances: list[DicomInstance], enqueue, now) -> list:
        """Place each of *instances* (storage thread): a :class:`Placed` or the Failure refusing it."""
        out: list = []
        for instance in instances:
            try:
                if instance.data is not None:
                    out.append(self._place_bytes_sync(instance.data, enqueue, now, parsed=instance.parsed))
                    continue
                out.append(self._place_file_sync(instance.path, instance.owned, enqueue, now, instance.parsed))
            except Exception:  # noqa: BLE001 - one instance's refusal is its own, not the group's
                out.append(Failure())
        return out

    def put_bytes(self, data: bytes, *, enqueue=(), now=None) -> defer.Deferred:
        return self._ingest(self._place_bytes_sync, bytes(data), enqueue, now)

    def put_producer(self, producer, *, enqueue=(), now=None) -> defer.Deferred:
        """Stream an ``IBodyProducer`` (a Part-10 body) into the store.

        Chunks are written on the storage threads, one batch at a time; the
        producer is paused while a batch is being written, so memory holds at
        most one batch however big the body.
        """
        from harmony.storage.streaming import ThreadedFileConsumer
        length = getattr(producer, "length", None)
        if isinstance(length, int):
            try:
                self.guard.check(length)
            except StorageFull:
                return self._count(defer.fail())
        consumer = ThreadedFileConsumer(self)
        d = consumer.consume(producer)

        def not_consumed(failure):
            self._count_refusal(failure)
            return failure
        return d.addCallbacks(lambda tmp: self._ingest(self._place_temp_sync, tmp, enqueue, now), not_consumed)

    # ------------------------------------------------------------------ queries

    def query_sync(self, identifier, level: str, model: str = STUDY_ROOT, should_stop=lambda: False):
        """Yield C-FIND response identifiers (DICOM JSON dicts) for *identifier*."""
        keys = query_keys(identifier, level, model)
        self.open_sync()
        for record, _row in self.db.rows(lambda conn: idx.candidates(conn, keys, level)):
            if should_stop():
                return
            if record_matches(keys, record):
                yield response_json(keys, record, level)

    def instances_sync(self, identifier, level: str, model: str = STUDY_ROOT, should_stop=lambda: False,
                       metadata: bool = False):
        """Yield the stored :class:`DicomInstance` files under the entities *identifier* matches;
        with *metadata*, each carries its WADO-RS metadata (``metadata_json``)."""
        levels_for(level, model)  # validates the level for the model
        keys = query_keys(identifier, IMAGE, model)
        keys = [k for k in keys if k[2]]  # retrieval: only matching keys matter
        self.open_sync()
        made = []

        def extra(conn):
            return ("i.metadata", idx.instance_number_sql(conn)) if metadata else ()
        if idx.sql_decides(keys):
            # UIDs only (every retrieve the bridge makes): SQL decides, nothing to parse.
            found = ((None, row) for row in self.db.rows(lambda conn: idx.instance_rows(conn, keys, extra(conn))))
        else:
            found = self.db.rows(lambda conn: idx.candidates(conn, keys, IMAGE, extra(conn)))
        for record, row in found:
            if should_stop():
                break
            if record is None or record_matches(keys, record):
                relpath, sop_class, ts, size, sop, series, study = row[:7]
                inst = DicomInstance(path=self.local_copy_sync(relpath), sop_class_uid=sop_class,
                                     sop_instance_uid=sop, transfer_syntax_uid=ts, study_instance_uid=study,
                                     series_instance_uid=series, size=size or 0, owned=False)
                if metadata:
                    inst.metadata_json, inst.instance_number = row[7], idx.as_instance_number(row[8])
                    if inst.metadata_json is None:  # a row older than the column: made once, then kept
                        inst.metadata_json = self._make_metadata(inst)
                        if inst.metadata_json is not None:
                            made.append((sop, relpath, inst.metadata_json))
                yield inst
        if made:
            # Derived data: losing it (a power cut, a write refused) only means making it again.
            try:
                self.bookkeep_sync(idx.fill_metadata, made)
            except (sqlite3.Error, StorageFailure, DatabaseUnavailable) as e:
                log.warn("storage: could not keep the metadata made for {n} older instance(s): {error}",
                         n=len(made), error=str(e))

    @staticmethod
    def _make_metadata(inst: DicomInstance) -> str | None:
        from pydicom import dcmread
        try:
            return metadata_of(dcmread(inst.path, defer_size=1024), inst.study_instance_uid,
                               inst.series_instance_uid, inst.sop_instance_uid)
        except Exception:  # noqa: BLE001 - unreadable now: the consumer reads the file itself
            return None

    def stream(self, generator_fn, *args, transform=None) -> ResultStream:
        """Run a ``*_sync`` generator on a storage thread, feeding a ResultStream
        batch by batch as results are found; C-CANCEL stops the generator."""
        stop = threading.Event()
        stream = ResultStream(on_cancel=stop.set)
        call = self.reactor.callFromThread

        def put_batch(batch):
            for item in batch:
                stream.put(transform(item) if transform else item)

        def work():
            batch = []
            for item in generator_fn(*args, should_stop=stop.is_set):
                batch.append(item)
                if len(batch) >= BATCH:
                    call(put_batch, batch)
                    batch = []
            return batch  # the last one rides with the result: one reactor wake-up, not two

        def finished(last):
            put_batch(last)
            stream.finish(dimse.CANCEL if stop.is_set() else dimse.SUCCESS, "cancelled" if stop.is_set() else None)

        def failed(f):
            log.failure("storage query failed", f)
            stream.fail(f)

        def job():
            try:
                last = work()
            except Exception:  # noqa: BLE001 - any failure ends the stream, on the reactor
                call(failed, Failure())
                return
            call(finished, last)

        try:
            self._start_pools()
        except StorageFailure:
            failed(Failure())
            return stream
        # On a query thread woken without the GIL held (harmony.storage.threads), not the pool.
        self.query_threads.call(job)
        return stream

    def counts_sync(self) -> dict:
        return self.read_sync(lambda conn: {table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                                            for table in ("patients", "studies", "series", "instances")})


def _placed_ones(outcomes: list, instances: list[DicomInstance]) -> list[int]:
    """Where *outcomes* (of placing *instances*) are :class:`Placed`; an owned instance
    moved into place is the store's from now on (nothing left to release)."""
    good = [i for i, o in enumerate(outcomes) if isinstance(o, Placed)]
    for i in good:
        if outcomes[i].moved:
            instances[i].owned = False
    return good


def _committed_into(result, outcomes: list, good: list[int]) -> list:
    """The commit's *result* for the placed outcomes at *good*: each one's stored
    instance, or the batch's Failure for every one of them (none is stored)."""
    if isinstance(result, Failure):
        for i in good:
            outcomes[i] = result
    else:
        for i, one in zip(good, result, strict=True):
            outcomes[i] = one
    return outcomes


def _header_of_dataset(ds) -> dict:
    """:meth:`InstanceStore._read_header` from pydicom's parse of the file."""
    if getattr(ds, "preamble", None) is None and not getattr(ds, "file_meta", None):
        raise InvalidInstance("not a DICOM Part-10 file (no preamble or file meta)")
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    # The index attributes first: the UIDs are read from them (pydicom converting
    # the four elements again cost as much as describing the rest).
    attrs = attrs_from_dataset(ds)
    sop_class = _uid_in(attrs, "00080016", lambda: ds.get("SOPClassUID")) or (
        meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    return _header(attrs, sop_class, ts, lambda tag, keyword: ds.get(keyword),
                   lambda study, series, sop: metadata_of(ds, study, series, sop))


def _header_of_bytes(data: bytes, scan: ScannedFile | None = None) -> dict:
    """:meth:`InstanceStore._read_header` of a Part-10 file's bytes held in memory
    (*scan*: a scan of them already made)."""
    try:
        try:
            if scan is None:
                scan = scan_bytes(data)
            return _header_of_scan(scan)
        except ScanDeclined:
            ds = scan.dataset() if scan is not None else check_complete(data)
    except CorruptDataset as e:
        raise InvalidInstance(f"not a complete DICOM Part-10 file: {e}") from None
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for bytes that are not DICOM
        raise InvalidInstance(f"not a DICOM Part-10 file: {e}") from None
    header = _header_of_dataset(ds)
    header["bytes"] = data
    return header


def _wal_backstop(conn) -> None:
    conn.execute(f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}").fetchall()


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _header_of_scan(scan: ScannedFile) -> dict:
    """:meth:`InstanceStore._read_header` from the file's bytes (:mod:`harmony.dicom.rawscan`);
    :class:`ScanDeclined` when pydicom must read it, as :func:`_header_of_dataset` would."""
    attrs = attrs_from_scan(scan)
    sop_class = _uid_in(attrs, "00080016", lambda: scan.uid(0x00080016)) or scan.meta.get(0x00020002)

    def metadata(study, series, sop):
        try:
            return metadata_of(scan, study, series, sop)
        except ScanDeclined:
            return metadata_of(scan.dataset(), study, series, sop)

    header = _header(attrs, sop_class, scan.transfer_syntax_uid or None,
                     lambda tag, keyword: scan.uid(int(tag, 16)), metadata)
    if isinstance(scan.data, bytes):
        header["bytes"] = scan.data
    return header


def _header(attrs: dict, sop_class, ts, uid_of, metadata) -> dict:
    """The header :meth:`InstanceStore._read_header` gives, from the index attributes;
    *uid_of(tag, keyword)* reads a UID they do not hold, *metadata(study, series, sop)*
    makes the stored metadata."""
    study = clean_uid(_uid_in(attrs, "0020000D", lambda: uid_of("0020000D", "StudyInstanceUID")),
                      "StudyInstanceUID")
    series = clean_uid(_uid_in(attrs, "0020000E", lambda: uid_of("0020000E", "SeriesInstanceUID")),
                       "SeriesInstanceUID")
    sop = clean_uid(_uid_in(attrs, "00080018", lambda: uid_of("00080018", "SOPInstanceUID")), "SOPInstanceUID")
    header: dict = {
        "study": study,
        "series": series,
        "sop": sop,
        "sop_class": clean_uid(sop_class, "SOPClassUID"),
        "ts": clean_uid(ts, "TransferSyntaxUID"),
        "attrs": attrs,
    }
    try:
        header["metadata"] = metadata(study, series, sop)
    except Exception:  # noqa: BLE001 - never a reason to refuse an instance: made from the file when asked
        header["metadata"] = None
    return header


def _uid_in(attrs: dict, tag: str, otherwise):
    """A UID as the index attributes hold it (one value: what pydicom reads), else *otherwise()*."""
    values = attrs.get(tag, {}).get("Value")
    if values is not None and len(values) == 1 and isinstance(values[0], str):
        return values[0]
    return otherwise()


def metadata_of(ds, study: str, series: str, sop: str) -> str:
    """The instance's WADO-RS metadata (JSON text) as the index keeps it: its
    BulkDataURIs under the DICOMweb base placeholder, filled in per answer
    (the same text the DICOMweb bridge makes from the file)."""
    return stored_metadata(ds, BASE_PLACEHOLDER + resource_path(study, series, sop))


def schema_sqlite() -> str:
    """Every table the store keeps (harmony storage migrate checks each one is copied)."""
    return idx.SCHEMA + q.SCHEMA + blob_sql.SCHEMA + nodes.SCHEMA + inflight.SCHEMA


def schema_pg() -> str:
    return idx.PG_SCHEMA + q.PG_SCHEMA + blob_sql.PG_SCHEMA + nodes.PG_SCHEMA + inflight.PG_SCHEMA


def _subdirs(folder: Path):
    try:
        with os.scandir(folder) as it:
            entries = [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
    return sorted(entries)


# ---------------------------------------------------------------------- sharing

_OPEN: dict[Path, InstanceStore] = {}


def open_store(root, **options) -> InstanceStore:
    """The process-wide store for *root*, shared by every component that names
    it (one index writer per folder); pair with :func:`release_store`."""
    key = Path(root).resolve()
    store = _OPEN.get(key)
    if store is None or store.closed:
        store = InstanceStore(key, **options)
        _OPEN[key] = store
    store._refs += 1
    return store


def open_stores() -> list[InstanceStore]:
    """Every store this process has open."""
    return [s for s in _OPEN.values() if not s.closed]


def release_store(store: InstanceStore) -> None:
    store._refs -= 1
    if store._refs <= 0:
        _OPEN.pop(store.root, None)
        store.close()
