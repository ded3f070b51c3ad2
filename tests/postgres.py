"""A throwaway PostgreSQL 15 cluster on 127.0.0.1 for the tests of the shared index and queue.

Real PostgreSQL from Debian (scripts/test installs it), never a mock: the
queue's claims depend on its row locks, ``SKIP LOCKED`` and advisory locks.
``initdb`` refuses to run as root, so as root the data folder is handed to the
``postgres`` user and the server runs as that user (``runuser``).  The socket
lives in the data folder, the port is free, and the cluster is deleted at the
end.  A missing PostgreSQL fails the test loudly: never a skip.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from tests.peers import free_port

PG_BIN = Path(os.environ.get("HARMONY_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


class PostgresServer:
    def __init__(self, fsync: bool = False):
        self.fsync = fsync
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(f"PostgreSQL is missing ({PG_BIN}/initdb): run scripts/test as root to install "
                               "the 'postgresql' package")
        # Not under pytest's tmp_path: the postgres user must be able to reach it.
        self.dir = Path(tempfile.mkdtemp(prefix="harmony-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        self.user = "postgres" if self.as_root else pwd.getpwuid(os.geteuid()).pw_name

    def _run(self, *cmd, check=True, timeout=60):
        if self.as_root:
            cmd = ("runuser", "-u", "postgres", "--", *cmd)
        return subprocess.run(cmd, check=check, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def start(self) -> "PostgresServer":
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
            os.chmod(self.dir, 0o700)
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--no-sync")
        self._start_server()
        return self

    def _start_server(self):
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-t", "30", "-l", str(self.dir / "log"),
                  "-o", f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c fsync={'on' if self.fsync else 'off'} "
                        "-c max_connections=200",
                  "start")

    def restart(self, down_for: float = 0.0):
        """Stop fast (connections cut, as a failover does) and start again."""
        self.stop_server()
        if down_for:
            time.sleep(down_for)  # the outage itself, not synchronisation
        self._start_server()

    def stop_server(self):
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname} connect_timeout=5"

    def new_database(self) -> str:
        """A fresh, empty schema of its own (much quicker than CREATE DATABASE);
        the DSN whose search_path points at it."""
        import psycopg
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        return f"{self.dsn()} options='-c search_path={name}'"

    def stop(self):
        self.stop_server()
        shutil.rmtree(self.dir, ignore_errors=True)


def database_for(request, index_kind: str):
    """The ``new_store`` factory of tests/conftest.py."""
    from harmony.storage.database import PostgresDatabase
    from harmony.storage.store import InstanceStore
    if index_kind == "sqlite":
        return InstanceStore
    dsn = request.getfixturevalue("postgres").new_database()

    def make(root, **options):
        options.setdefault("database", PostgresDatabase(dsn))
        return InstanceStore(root, **options)
    make.dsn = dsn
    return make


class _BareConnection:
    def __init__(self, conn, close):
        self.conn, self.close = conn, close

    def __getattr__(self, name):
        return getattr(self.conn, name)


def bare_connection(request, index_kind: str):
    """A connection with the index and queue schema (autocommit), for the SQL-level tests."""
    import sqlite3

    from harmony.storage import index as idx
    from harmony.storage import queue as q
    from harmony.storage.database import PgConnection, SqliteConnection
    if index_kind == "sqlite":
        conn = sqlite3.connect(":memory:", factory=SqliteConnection, isolation_level=None)
        conn.executescript(idx.SCHEMA + q.SCHEMA)
        q.upgrade(conn)
        return conn
    import psycopg
    raw = psycopg.connect(request.getfixturevalue("postgres").new_database(), autocommit=True)
    conn = PgConnection(raw)
    conn.executescript(idx.PG_SCHEMA + q.PG_SCHEMA)
    return _BareConnection(conn, raw.close)
