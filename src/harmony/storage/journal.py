"""A small ingest journal for a plain folder of files (``dicom_scp``'s ``storage_dir``).

Why it exists: a file in a folder is durable after three things - its data
synced, its name in the folder, the folder synced - and done in that order
they are two flushes in a row (fdatasync, then the folder's fsync after the
rename): 75 % of ``dicom_scp``'s worker-thread time with ``storage_dir``
(bench/dimse).  The fastest flush on this disk is a write over blocks
already written, which needs no file-system journal commit: what a sqlite
WAL is once it has reached its size.

So each process keeps a journal (a sqlite file in ``<folder>/.journal/``,
named by its pid).  Placing a small file:

1. its bytes are committed as a row of the journal (``synchronous=FULL``: the
   WAL append and one fdatasync) - from here on the file survives a crash;
2. it is given its name in the folder - a new name with a hard link before its
   data is synced (atomic, fails if the name exists), an existing name only
   replaced by synced data (:func:`harmony.storage.files.claim_name`) - so a
   reader finds it at once;
3. the caller may answer; the file's data sync and its folder's fsync run on a
   flush thread, and then the row is deleted (in a later transaction).

A process that starts replays the journals of processes that are gone (the
pid-named files, as :class:`harmony.dicom.files.Staging` does): every row's
file is written again, durably, whatever the crash left of it, then the
journal is removed.  Files larger than ``max_bytes`` skip the journal and are
moved the classic way (sync, rename, folder sync).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from harmony.dicom.files import durable_move, process_alive
from harmony.log import get_logger
from harmony.storage.files import claim_name, fdatasync_file, fsync_dir, make_dirs

log = get_logger("harmony.storage.journal")

#: Files up to this size are journaled; larger ones are moved the classic way.
JOURNAL_MAX_BYTES = 256 * 1024
SCHEMA = "CREATE TABLE IF NOT EXISTS pending (relpath TEXT PRIMARY KEY, data BLOB NOT NULL)"


class FolderJournal:
    """The journal of one process for *folder* (see the module docstring)."""

    def __init__(self, folder: Path, max_bytes: int = JOURNAL_MAX_BYTES, flush_threads: int = 4):
        self.folder = Path(folder)
        self.dir = self.folder / ".journal"
        self.max_bytes = max_bytes
        self.path = self.dir / f"{os.getpid()}.sqlite"
        self._flush_threads = flush_threads
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._flusher: ThreadPoolExecutor | None = None
        #: Rows whose files are durable: deleted in the next journal transaction.
        self._done: list[str] = []
        #: A flush failed: the journal must survive for the next start to replay.
        self.broken = False
        self.closed = False

    # ------------------------------------------------------------------ start and stop

    def open(self) -> int:
        """Replay the journals of processes that are gone; returns the files written again."""
        self.path = self.dir / f"{os.getpid()}.sqlite"  # this process's (a worker made from a fork has its own)
        make_dirs(self.dir, self.folder)
        replayed = 0
        for other in sorted(self.dir.glob("*.sqlite")):
            if other == self.path or not other.stem.isdigit() or process_alive(int(other.stem)):
                continue
            replayed += self._replay(other)
        if replayed:
            log.info("storage journal {folder}: {n} file(s) a stopped process had journaled written again",
                     folder=str(self.folder), n=replayed)
        return replayed

    def _replay(self, journal: Path) -> int:
        conn = sqlite3.connect(journal, isolation_level=None)
        try:
            rows = conn.execute("SELECT relpath, data FROM pending").fetchall()
        except sqlite3.OperationalError:
            rows = []  # made but never written to
        finally:
            conn.close()
        for relpath, data in rows:
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
        _remove(journal)
        return len(rows)

    def close(self) -> None:
        """Wait for the flushes; remove the journal if every row is settled."""
        if self.closed:
            return
        self.closed = True
        if self._flusher is not None:
            self._flusher.shutdown(wait=True)
        with self._lock:
            conns, self._conns = self._conns, []
        left = 1
        if conns and not self.broken:
            try:
                left = conns[0].execute("SELECT count(*) FROM pending").fetchone()[0] - len(self._done)
            except sqlite3.Error:
                left = 1
        for c in conns:
            c.close()
        if left == 0 or not conns:
            _remove(self.path)

    # ------------------------------------------------------------------ placing (any thread)

    def place(self, src: Path, dest: Path) -> None:
        """Move the file *src* (ours) to *dest* inside the folder, durably: on
        return it survives a crash (see the module docstring)."""
        if self.closed:
            raise OSError(5, "the storage journal is closed")
        if src.stat().st_size > self.max_bytes:
            durable_move(src, dest)
            return
        relpath = dest.relative_to(self.folder).as_posix()
        try:
            self._record(relpath, src.read_bytes())
        except sqlite3.Error as e:
            raise OSError(5, f"the storage journal refused a write: {e}") from None
        try:
            fresh = claim_name(src, dest, self.folder, journaled=True)
        except OSError:
            durable_move(src, dest)  # another file system (EXDEV): copied, synced, renamed
            with self._lock:
                self._done.append(relpath)
            return
        flushes = [self._flush(fsync_dir, dest.parent)]
        if fresh:
            flushes.append(self._flush(fdatasync_file, dest))
        left = [len(flushes)]

        def finished(flush: Future) -> None:
            with self._lock:
                left[0] -= 1
                if flush.exception() is not None:
                    self.broken = True
                    log.error("storage journal {folder}: a file or folder sync failed; the next start writes "
                              "it again from the journal", folder=str(self.folder))
                elif left[0] == 0 and not self.broken:
                    self._done.append(relpath)
        for flush in flushes:
            flush.add_done_callback(finished)

    def _record(self, relpath: str, data: bytes) -> None:
        conn = self._conn()
        with self._lock:
            done, self._done = self._done, []
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("DELETE FROM pending WHERE relpath=?", [(r,) for r in done if r != relpath])
                conn.execute("INSERT OR REPLACE INTO pending(relpath, data) VALUES(?,?)", (relpath, data))
            except BaseException:
                conn.execute("ROLLBACK")
                with self._lock:
                    self._done[:0] = done
                raise
            conn.execute("COMMIT")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(SCHEMA)
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _flush(self, fn, *args) -> Future:
        with self._lock:
            if self._flusher is None:
                self._flusher = ThreadPoolExecutor(self._flush_threads, thread_name_prefix="harmony-journal-flush")
            return self._flusher.submit(fn, *args)


def _inside(folder: Path, path: Path) -> bool:
    return folder.resolve() in path.resolve().parents


def _remove(journal: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(f"{journal}{suffix}")
        except FileNotFoundError:
            pass
