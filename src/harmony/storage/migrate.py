"""``harmony storage migrate``: move a node's sqlite index and queues into PostgreSQL.

The way from one node to a cluster: stop Harmony, point ``[storage]`` at
PostgreSQL, run this, start the nodes.  It copies every table the store keeps
in sqlite (the index, the store-and-forward queue, anything else known below)
in ONE PostgreSQL transaction, keeping row ids (so fifo order and the index's
links survive), then compares the counts and ids table by table: either all of
it arrives and is checked, or nothing is committed.  It refuses a target that
already holds rows (never merges two archives by accident).  Deliveries a
crash left in flight go back to pending (the node that held them is stopped);
"unreachable" pauses are not copied (they are a moment's state).  The
instance files stay where they are: the index keeps paths relative to
``[storage.options] path``, which the nodes keep using.

    harmony storage migrate -c harmony.toml            # sqlite at the configured path -> the configured dsn
    harmony storage migrate --from var/harmony --dsn "host=db dbname=harmony user=harmony"
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

from harmony.storage import index as idx
from harmony.storage import queue as q
from harmony.storage.database import PostgresDatabase, read_password_file

#: Tables copied, parents first; any not present in the sqlite file is skipped.
TABLES = ("patients", "studies", "series", "instances", "messages", "queue")
#: Identity columns whose sequences must continue after the copied ids.
ID_COLUMNS = {"patients": "pk", "studies": "pk", "series": "pk", "instances": "pk", "messages": "id", "queue": "id"}
BATCH = 1000


class MigrationError(Exception):
    pass


def add_storage(sub):
    p = sub.add_parser("storage", help="storage tools (migrate a sqlite index and queues to PostgreSQL)")
    cmds = p.add_subparsers(dest="storage_command", required=True)
    m = cmds.add_parser("migrate", help="copy a stopped node's sqlite index and queues into PostgreSQL")
    m.add_argument("-c", "--config", help="the configuration naming [storage.options] path and dsn")
    m.add_argument("--from", dest="source", help="the store folder (or its index.sqlite); default: the config's")
    m.add_argument("--dsn", help="PostgreSQL connection string; default: the config's [storage.options] dsn")
    m.add_argument("--password-file", help="a file holding the PostgreSQL password")
    m.set_defaults(func=cmd_migrate)


def cmd_migrate(args) -> int:
    try:
        source, dsn, password = _resolve(args)
        report = migrate(source, PostgresDatabase(dsn, password=password, max_connections=1))
    except MigrationError as e:
        print(f"harmony storage migrate: {e}", file=sys.stderr)
        return 1
    for table, n in report.items():
        print(f"{table}: {n} row(s) copied and checked")
    return 0


def _resolve(args):
    source, dsn, password = args.source, args.dsn, None
    if args.config:
        from harmony.config import ConfigErrors, load_config
        from harmony.config.options import Options
        try:
            config = load_config(args.config)
        except ConfigErrors as e:
            raise MigrationError(str(e)) from None
        opts = Options(config.storage.get("options", {}), base_dir=Path(args.config).resolve().parent)
        source = source or str(config.storage_path)
        dsn = dsn or opts.raw.get("dsn")
        if opts.raw.get("password_file") and not args.password_file:
            password = read_password_file(opts.path("password_file"))
    if args.password_file:
        password = read_password_file(args.password_file)
    if not source:
        raise MigrationError("name the sqlite store with --from or -c")
    if not dsn:
        raise MigrationError("name the PostgreSQL database with --dsn or a config whose [storage.options] has dsn")
    return source, dsn, password


def migrate(source, database: PostgresDatabase) -> dict:
    """Copy the sqlite store at *source* into *database*; ``{table: rows}``."""
    path = Path(source)
    if path.is_dir():
        path = path / "index.sqlite"
    if not path.is_file():
        raise MigrationError(f"no sqlite index at {path}")
    # Read-only, one snapshot: what is copied is one consistent moment.
    lite = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        lite.execute("BEGIN")
        database.create_schema(idx.SCHEMA + q.SCHEMA, idx.PG_SCHEMA + q.PG_SCHEMA)
        database.transaction(True, idx.upgrade)  # a database an older Harmony made: its columns first
        return database.transaction(True, _copy_all, (lite,))
    except sqlite3.Error as e:
        raise MigrationError(f"cannot read {path}: {e}") from None
    finally:
        lite.close()
        database.close()


def _columns_sqlite(lite, table) -> list[str]:
    return [r[1] for r in lite.execute(f"PRAGMA table_info({table})")]


def _columns_pg(conn, table) -> list[str]:
    return [r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns WHERE "
                                       "table_schema=current_schema() AND table_name=?", (table,))]


def _copy_all(conn, lite) -> dict:
    report = {}
    tables = [t for t in TABLES if _columns_sqlite(lite, t)]
    for table in tables:
        if not _columns_pg(conn, table):
            raise MigrationError(f"PostgreSQL has no table {table!r}: a newer sqlite store than this Harmony knows")
        if conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None:
            raise MigrationError(f"PostgreSQL already holds rows in {table!r}: migrate into an empty database")
    for table in tables:
        report[table] = _copy(conn, lite, table)
    if "queue" in tables:
        # The node that held these deliveries is stopped: they are pending again.
        conn.execute("UPDATE queue SET state='pending', lease_owner=NULL, lease_until=NULL "
                     "WHERE state='delivering'")
    return report


def _copy(conn, lite, table) -> int:
    pg_cols = set(_columns_pg(conn, table))
    cols = [c for c in _columns_sqlite(lite, table) if c in pg_cols]
    missing = [c for c in _columns_sqlite(lite, table) if c not in pg_cols]
    if missing:
        raise MigrationError(f"PostgreSQL's {table} lacks column(s) {', '.join(missing)}")
    key = ID_COLUMNS[table]
    names = ", ".join(cols)
    insert = f"INSERT INTO {table}({names}) VALUES({', '.join('?' * len(cols))})"
    rows = lite.execute(f"SELECT {names} FROM {table} ORDER BY {key}")
    copied = 0
    while True:
        batch = rows.fetchmany(BATCH)
        if not batch:
            break
        conn.raw.cursor().executemany(insert.replace("?", "%s"), batch)
        copied += len(batch)
    # Check before the commit: same count, same ids.
    n_pg, sum_pg = conn.execute(f"SELECT count(*), coalesce(sum({key}), 0) FROM {table}").fetchone()
    n_lite, sum_lite = lite.execute(f"SELECT count(*), coalesce(sum({key}), 0) FROM {table}").fetchone()
    if (n_pg, int(sum_pg)) != (n_lite, int(sum_lite)) or copied != n_lite:
        raise MigrationError(f"{table}: {n_lite} row(s) in sqlite, {n_pg} in PostgreSQL after the copy; "
                             "nothing was committed")
    conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{key}'), "
                 f"greatest((SELECT max({key}) FROM {table}), 1))")
    return copied
