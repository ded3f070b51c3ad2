"""The database under the store: one interface, two implementations.

The instance index and the store-and-forward queue are SQL kept in
:mod:`harmony.storage.index` and :mod:`harmony.storage.queue`, written once
with ``?`` placeholders.  A *database* gives the store's threads a connection
on which that SQL runs, and transactions with the store's two durability
levels:

- :class:`SqliteDatabase` - the embedded default: a WAL file next to the
  instances, one connection per storage thread, writes serialised.
- :class:`PostgresDatabase` - the shared index and queue of a cluster of
  nodes: psycopg 3, one connection per storage thread (so the pool is bounded
  by ``[storage.options] threads``), Read Committed, retried on deadlock and
  on a lost connection (PostgreSQL restarted or failed over).

Where the dialects differ (a few functions, the schema's key columns), the
SQL asks :func:`dialect` for the fragment.  Errors of either database surface
as :class:`~harmony.storage.errors.StorageFailure`, so callers (C-STORE, STOW)
answer "not stored" the same way whichever database refused.
"""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import threading
import time
from functools import lru_cache

from zope.interface import Attribute, Interface, implementer

from harmony.log import get_logger
from harmony.storage.errors import DatabaseUnavailable, StorageFailure

log = get_logger("harmony.storage.database")

SQLITE, POSTGRESQL = "sqlite", "postgresql"
#: How often a PostgreSQL transaction is retried after a deadlock or a lost connection.
PG_RETRIES = 4
#: Pause before a retry after a lost connection (doubled each time).
PG_RETRY_DELAY = 0.25
#: Connections a node may hold beyond one per storage thread: a thread that
#: is not a storage thread (start-up, a command-line tool) must not wait for
#: a storage thread's slot.
SPARE_CONNECTIONS = 2
#: pg_advisory_xact_lock key for schema creation (any constant unlikely to clash).
SCHEMA_LOCK = 0x4861726D6F6E79  # "Harmony"


class IDatabase(Interface):
    """Connections and transactions for the store's threads (see the module docstring)."""

    dialect = Attribute("SQLITE or POSTGRESQL")

    def create_schema(script: str, pg_script: str) -> None:
        """Create the tables (idempotent)."""

    def transaction(durable: bool, fn, args: tuple, kwargs: dict):
        """``fn(conn, *args, **kwargs)`` in one transaction; committed on return."""

    def read(fn, args: tuple, kwargs: dict):
        """``fn(conn, *args, **kwargs)`` outside any write transaction."""

    def rows(make_rows):
        """Iterate ``make_rows(conn)`` (a query's rows, streamed)."""

    def close() -> None:  # type: ignore[misc]  # a zope.interface method has no self; mypy has no zope plug-in here
        """Close every connection."""


class SqliteConnection(sqlite3.Connection):
    """A sqlite connection that says which dialect it speaks."""

    dialect = SQLITE


def dialect(conn) -> str:
    return getattr(conn, "dialect", SQLITE)


class _ProcessWriteLock:
    """Serialises the writers of several processes on one sqlite file.

    sqlite does that itself, but a writer that finds the database locked
    sleeps and polls (1, 2, 5, 10 ... ms): with worker processes committing
    an instance each every few milliseconds, most of a commit's time went to
    those sleeps.  A POSIX record lock on a file beside the database queues
    the writers instead and wakes the next one the moment the lock is
    released; sqlite's own locking still guards everything else.
    """

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None  # opened on first use: building a config creates nothing on disk

    def __enter__(self):
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.lockf(self.fd, fcntl.LOCK_UN)
        return False


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NO_LOCK = _NoLock()


#: Seconds a sqlite connection waits for another's write lock before "database is locked".
BUSY_TIMEOUT = 60
#: Between tries of the switch to WAL (:func:`wal_mode`); a test replaces it to act in the pause.
_pause = time.sleep
#: Between a checkpoint's two passes (:meth:`SqliteDatabase.checkpoint`); a test commits there.
_between_passes = None


def wal_mode(conn: sqlite3.Connection) -> None:
    """Put *conn*'s database in WAL mode, waiting for another connection's write lock.

    Switching a file still in rollback-journal mode (a new one) needs an exclusive
    lock, and sqlite answers "database is locked" at once, without the busy timeout,
    while another connection holds the write lock: two first users of a new file
    (two threads, or two processes) meet exactly that.  So the switch is tried
    again, for as long as the busy timeout would have waited.  A file already in
    WAL mode answers at once."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    delay = 0.001
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
        _pause(delay)
        delay = min(delay * 2, 0.05)


@implementer(IDatabase)
class SqliteDatabase:
    dialect = SQLITE

    def __init__(self, path, fsync: bool = True, processes_share: bool = False):
        self.path = path
        self.fsync = fsync
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        #: The connection every write transaction runs on (see transaction), and its synchronous mode.
        self._writer: sqlite3.Connection | None = None
        self._writer_sync_mode: str | None = None
        #: Several processes of this node write here ([proxy] workers > 1): see _process_lock.
        self._process_lock = _ProcessWriteLock(f"{path}.write-lock") if processes_share else None
        #: The WAL file, flushed by each durable commit after the locks (processes_share only).
        self._wal_fd: int | None = None

    def create_schema(self, script: str, pg_script: str) -> None:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
        try:
            with self._write_lock:   # this object's threads make it one at a time
                wal_mode(conn)
                conn.executescript(script)
        finally:
            conn.close()

    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False,
                               factory=SqliteConnection)
        wal_mode(conn)
        conn.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            self._connections.append(conn)
        return conn

    def transaction(self, durable: bool, fn, args=(), kwargs=None):
        # Processes sharing the file take turns under the process lock: a durable commit's
        # flush (the WAL's fdatasync, several ms while other work syncs) is made after the
        # locks are given back, so one process's flush overlaps the next writer's commit and
        # concurrent flushes of the one WAL file merge in the kernel, where inside the lock
        # every process waited for every other's flush in turn (bench/ingest: two processes
        # ingested slower than one).  The commit is acknowledged only after that flush.
        flush_after = durable and self.fsync and self._process_lock is not None
        with self._write_lock, self._process_lock or _NO_LOCK:
            # Every write transaction of this process on one connection (they are
            # serialised anyway): a commit from another connection makes sqlite drop
            # a connection's page cache, so with one writer per storage thread each
            # ingest read its pages again (~17 pread64 per C-STORE, bench/ingest strace).
            conn = self._writer
            if conn is None:
                conn = self._writer = self._connect()
            # NORMAL (not OFF) under a flush of our own: WAL mode then still syncs the WAL
            # before each checkpoint and the database after it, so the WAL can be restarted.
            mode = "FULL" if durable and self.fsync and not flush_after else "NORMAL" if self.fsync else "OFF"
            if self._writer_sync_mode != mode:
                conn.execute(f"PRAGMA synchronous={mode}")
                self._writer_sync_mode = mode
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn, *args, **(kwargs or {}))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            # Our own descriptor of the WAL, taken under the lock: another thread's flush or a
            # close() can never leave us syncing a closed or reused descriptor.
            wal = self._wal_descriptor() if flush_after else None
        if wal is not None:
            try:
                os.fdatasync(wal)
            except OSError as e:
                # As a failed sync inside COMMIT would be: the caller does not acknowledge.
                raise sqlite3.OperationalError(f"disk I/O error: flushing {self.path}-wal: {e.strerror}") from e
            finally:
                os.close(wal)
        return result

    def checkpoint(self) -> tuple[int, int]:
        """Checkpoint the WAL (PASSIVE) so that the next commit starts it again from its
        top; returns (frames in the WAL, frames in the database) as the last pass saw them.

        Why two passes: sqlite restarts its WAL only at a write transaction that *begins*
        with every frame already copied into the database.  One PASSIVE checkpoint beside
        a steady ingest never got there - commits kept landing while it copied - so the
        WAL only grew, to the backstop (~33 MB), and every commit appended to it: new
        blocks and a new size, metadata the sync must make durable too (ext4 without a
        journal, as here, writes the inode block synchronously; with one, a journal commit).
        An `fdatasync` of 42 KB appended took 0.42 ms at the median here, of the same
        bytes over blocks already written 0.20 ms (docs/architecture.md, "The index's WAL
        started again").  So the bulk is copied with commits running, then what committed
        meanwhile (a few frames) with this process's writers held, and in a process group
        the other processes' too: the next commit finds the WAL all copied and starts it
        again over the blocks it already has.  A reader's snapshot can still keep frames
        in use; the WAL then grows until it has gone, as before."""
        conn = self.connection()
        _busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if _between_passes is not None:
            _between_passes()
        if copied < frames:
            # A reader's snapshot (or another process's checkpoint) kept frames back: the
            # WAL cannot start again while it holds, and the second pass, copying all of
            # them with the writers held, could hold them for a long time.
            return frames, copied
        with self._write_lock, self._process_lock or _NO_LOCK:
            _busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return frames, copied

    def _wal_descriptor(self) -> int:
        """A new descriptor of the WAL file (under the write lock)."""
        try:
            fd = self._wal_fd
            if fd is None or os.fstat(fd).st_nlink == 0:  # first use, or a WAL made anew since
                if fd is not None:
                    os.close(fd)
                self._wal_fd = None
                fd = self._wal_fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
            return os.dup(fd)
        except OSError as e:
            raise sqlite3.OperationalError(f"disk I/O error: opening {self.path}-wal: {e.strerror}") from e

    def read(self, fn, args=(), kwargs=None):
        return fn(self.connection(), *args, **(kwargs or {}))

    def rows(self, make_rows):
        return make_rows(self.connection())

    def close(self) -> None:
        with self._lock:
            for c in self._connections:
                c.close()
            self._connections.clear()
            self._writer, self._writer_sync_mode = None, None
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None

    def describe(self) -> str:
        return f"sqlite {self.path}"


# ---------------------------------------------------------------------- PostgreSQL

@lru_cache(maxsize=1024)
def pg_sql(sql: str) -> str:
    """Our ``?``-placeholder SQL in psycopg's format style.  The store's SQL
    never has ``?`` or ``%`` inside a literal, so this is a plain rewrite."""
    return _PG_FUNCTIONS.sub(lambda m: _PG_FUNCTION_NAMES[m.group(1).lower()] + "(",
                             sql.replace("%", "%%").replace("?", "%s"))


_PG_FUNCTION_NAMES = {"group_concat": "string_agg", "instr": "strpos"}
_PG_FUNCTIONS = re.compile(r"\b(group_concat|instr)\(", re.IGNORECASE)


class PgConnection:
    """A psycopg connection that runs the store's ``?`` SQL (the same calls as a
    sqlite connection: ``execute(sql, args)`` returning a cursor).

    Inside a write transaction the connection is in psycopg's pipeline mode:
    a statement whose result nobody reads (an INSERT, the enqueue, BEGIN and
    COMMIT themselves) is sent without waiting for its answer, and the
    round trip is paid once, when a result is read or at the commit.  An
    ingest's transaction thus costs one round trip per query whose answer it
    needs, not one per statement.  Reading ``rowcount`` syncs first (in
    pipeline mode it is only known once the answer is in).
    """

    dialect = POSTGRESQL

    def __init__(self, raw):
        self.raw = raw
        self.thread = None
        #: The psycopg Pipeline while a write transaction runs, else None.
        self.pipeline = None

    def execute(self, sql: str, args=()):
        cur = self.raw.execute(pg_sql(sql), tuple(args) if args else None)
        return cur if self.pipeline is None else _PipelinedCursor(cur, self.pipeline)

    def executescript(self, script: str):
        # One statement at a time: pipeline mode (a write transaction) takes no
        # multi-statement strings.  The schema scripts hold no ';' in a literal.
        for statement in script.split(";"):
            if statement.strip():
                self.raw.execute(statement)


class _PipelinedCursor:
    """A cursor in pipeline mode whose ``rowcount`` waits for the answer (fetches already do)."""

    def __init__(self, cursor, pipeline):
        self._cursor, self._pipeline = cursor, pipeline

    @property
    def rowcount(self) -> int:
        self._pipeline.sync()
        return self._cursor.rowcount

    def __iter__(self):
        return iter(self._cursor.fetchall())

    def __getattr__(self, name):
        return getattr(self._cursor, name)


def _healthy(conn: PgConnection) -> bool:
    return not conn.raw.closed and not conn.raw.broken


def _pg_errors():
    import psycopg
    return psycopg


@implementer(IDatabase)
class PostgresDatabase:
    """The shared index and queue (see the module docstring).

    ``synchronous_commit`` is on for what an acknowledgement depends on and off
    for queue bookkeeping (:meth:`transaction` with ``durable=False``): losing
    the last bookkeeping before a PostgreSQL crash only means an idempotent
    re-delivery, the same promise as sqlite's ``synchronous=NORMAL``.
    """

    dialect = POSTGRESQL

    def __init__(self, dsn: str, *, password: str | None = None, max_connections: int = 4 + SPARE_CONNECTIONS,
                 application_name: str = "harmony"):
        self.dsn = dsn
        self.password = password
        self.max_connections = max_connections
        self.application_name = application_name
        self._local = threading.local()
        self._connections: list = []
        #: Connections not pinned to a thread and not lent out (see :meth:`connection`).
        self._idle: list = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self.closed = False
        #: Last connection error text, None while connected (management and metrics say which part is down).
        self.last_error: str | None = None

    def describe(self) -> str:
        from psycopg.conninfo import conninfo_to_dict
        try:
            info = conninfo_to_dict(self.dsn)
        except Exception:  # noqa: BLE001 - a malformed DSN is reported when connecting
            return "postgresql"
        return f"postgresql {info.get('host', '')}:{info.get('port', 5432)}/{info.get('dbname', '')}"

    def _connect(self):
        psycopg = _pg_errors()
        extra = {"password": self.password} if self.password is not None else {}
        raw = psycopg.connect(self.dsn, autocommit=True, application_name=self.application_name, **extra)
        # Read Committed, stated rather than assumed: the claims rely on its row
        # re-check (Orthanc left Serializable for it: parallel ingest aborted).
        raw.execute("SET default_transaction_isolation = 'read committed'")
        return PgConnection(raw)

    def connection(self) -> PgConnection:
        """A connection pinned to the calling thread until the thread ends (for
        code that keeps a connection across calls, e.g. the start-up scan).
        :meth:`transaction`, :meth:`read` and :meth:`rows` borrow one from the
        pool for the call instead, so any thread may use the database without
        holding a connection between calls."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and _healthy(conn):
            return conn
        if conn is not None:
            self._forget(conn)
        conn = self._new_connection()
        self._local.conn = conn
        conn.thread = threading.current_thread()
        return conn

    def _new_connection(self) -> PgConnection:
        self._reap()
        if not self._slots.acquire(timeout=60):
            raise DatabaseUnavailable("no PostgreSQL connection free (pool exhausted)")
        try:
            conn = self._connect()
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._connections.append(conn)
        return conn

    def _borrow(self) -> PgConnection:
        """The thread's pinned connection, else an idle one, else a new one (bounded)."""
        pinned = getattr(self._local, "conn", None)
        if pinned is not None:
            if _healthy(pinned):
                return pinned
            self._forget(pinned)
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._new_connection()
            if _healthy(conn):
                return conn
            self._forget(conn)

    def _give_back(self, conn: PgConnection) -> None:
        if conn.thread is not None:
            return  # pinned: stays with its thread
        if self.closed or not _healthy(conn):
            self._forget(conn)
            return
        with self._lock:
            if conn in self._connections:
                self._idle.append(conn)

    def _drop_idle(self) -> None:
        """After a lost connection the idle ones went with it (the server restarted
        or failed over): close them rather than find out one retry at a time."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            self._forget(conn)

    def _reap(self) -> None:
        """Close the pinned connections of threads that have ended (their slots come back)."""
        with self._lock:
            gone = [c for c in self._connections if c.thread is not None and not c.thread.is_alive()]
        for c in gone:
            self._forget(c)

    def _forget(self, conn) -> None:
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with self._lock:
            if conn in self._idle:
                self._idle.remove(conn)
            if conn in self._connections:
                self._connections.remove(conn)
                self._slots.release()
        try:
            conn.raw.close()
        except Exception:  # noqa: BLE001 - already broken
            pass

    def create_schema(self, script: str, pg_script: str) -> None:
        def create(conn):
            # Nodes starting together must not race each other's CREATE TABLE.
            conn.execute("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK,))
            conn.executescript(pg_script)
        self.transaction(True, create)

    def transaction(self, durable: bool, fn, args=(), kwargs=None):
        return self._with_retries(fn, args, kwargs or {}, durable)

    def read(self, fn, args=(), kwargs=None):
        return self._with_retries(fn, args, kwargs or {}, None)

    def rows(self, make_rows):
        """Stream ``make_rows(conn)``; a connection found dead at the first row
        (PostgreSQL restarted since it was last used) is replaced once."""
        psycopg = _pg_errors()
        for attempt in (0, 1):
            conn = self._borrow()
            try:
                it = iter(make_rows(conn))
                first = next(it)
            except StopIteration:
                self._give_back(conn)
                return
            except psycopg.OperationalError as e:
                self._forget(conn)
                self._drop_idle()
                self.last_error = str(e).strip()[:300] or type(e).__name__
                if attempt:
                    raise DatabaseUnavailable(f"the database is unreachable: {self.last_error}") from None
                continue
            except BaseException:
                self._give_back(conn)
                raise
            self.last_error = None
            try:
                yield first
                yield from it
            finally:
                self._give_back(conn)
            return

    def _with_retries(self, fn, args, kwargs, durable):
        psycopg = _pg_errors()
        from psycopg import errors as pg_errors
        delay = PG_RETRY_DELAY
        for attempt in range(PG_RETRIES + 1):
            conn = None
            try:
                conn = self._borrow()
                if durable is None:
                    result = fn(conn, *args, **kwargs)
                    if hasattr(result, "__next__"):
                        result = list(result)
                else:
                    with conn.raw.pipeline() as conn.pipeline, conn.raw.transaction():
                        try:
                            if not durable:
                                conn.raw.execute("SET LOCAL synchronous_commit = off")
                            result = fn(conn, *args, **kwargs)
                        finally:
                            conn.pipeline = None
                if self.last_error is not None:
                    log.info("storage: PostgreSQL is reachable again ({db})", db=self.describe())
                self.last_error = None
                return result
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
                if attempt == PG_RETRIES:
                    raise StorageFailure("the database kept aborting the transaction (deadlock)") from None
            except psycopg.OperationalError as e:
                # The server went away (restart, failover, partition): drop the
                # connection and retry on a new one; a transaction cut before its
                # commit is rolled back by the server, and every write here is an
                # idempotent upsert, so running it again is safe.
                broken, conn = conn, None
                if broken is not None:
                    self._forget(broken)
                self._drop_idle()
                if self.last_error is None:
                    log.warn("storage: PostgreSQL unreachable ({db}): {error}", db=self.describe(),
                             error=str(e).strip()[:300])
                self.last_error = str(e).strip()[:300] or type(e).__name__
                if attempt == PG_RETRIES or self.closed:
                    raise DatabaseUnavailable(f"the database is unreachable: {self.last_error}") from None
                time.sleep(delay)  # a retry pause on a storage thread, never the reactor
                delay *= 2
            except psycopg.Error as e:
                raise StorageFailure(f"database error: {type(e).__name__}: {str(e).strip()[:300]}") from None
            finally:
                if conn is not None:
                    self._give_back(conn)  # (a broken one is closed there)

    def close(self) -> None:
        self.closed = True
        with self._lock:
            conns, self._connections, self._idle = list(self._connections), [], []
        for c in conns:
            try:
                c.raw.close()
            except Exception:  # noqa: BLE001
                pass
            self._slots.release()


def read_password_file(path) -> str:
    from pathlib import Path
    return Path(path).read_text(encoding="utf-8").strip("\r\n")
