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
from harmony.storage.database import PostgresDatabase, read_password_file
from harmony.storage.store import schema_pg, schema_sqlite

#: Tables copied, parents first; any not present in the sqlite file is skipped.
TABLES = ("patients", "studies", "series", "instances", "messages", "queue", "blob_uploads", "in_flight")
#: Tables deliberately not copied, and why.  A sqlite table in neither list
#: stops the migration (tests/storage/test_migrate.py checks the store's schema
#: against both): a new table must be copied or explained here.
NOT_COPIED = {
    "target_state": "an 'unreachable' pause is a moment's state; the nodes find out again",
    "nodes": "which process holds a node id right now; each node registers itself when it starts",
}
#: Identity columns whose sequences must continue after the copied ids; tables
#: keyed by text (blob_uploads: relpath) are checked by count.
ID_COLUMNS = {"patients": "pk", "studies": "pk", "series": "pk", "instances": "pk", "messages": "id", "queue": "id"}
BATCH = 1000
#: The report's entry for files queued for upload (``--upload-as``), not a table.
UPLOADS_QUEUED = "uploads queued"


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
    m.add_argument("--upload-as", metavar="NODE",
                   help='queue every instance file for upload to S3 by NODE, the node that will run on this '
                        'folder (default with -c and backend = "s3": that config\'s node id)')
    m.set_defaults(func=cmd_migrate)


def cmd_migrate(args) -> int:
    try:
        source, dsn, password, upload_as = _resolve(args)
        report = migrate(source, PostgresDatabase(dsn, password=password, max_connections=1), upload_as=upload_as)
    except MigrationError as e:
        print(f"harmony storage migrate: {e}", file=sys.stderr)
        return 1
    for table, n in report.items():
        if table == UPLOADS_QUEUED:
            print(f"{n} instance file(s) queued for upload to S3 by node {upload_as!r}")
        else:
            print(f"{table}: {n} row(s) copied and checked")
    return 0


def _resolve(args):
    source, dsn, password, upload_as = args.source, args.dsn, None, args.upload_as
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
        if config.storage.get("backend") == "s3" and not upload_as:
            from harmony.storage.nodes import default_node
            upload_as = opts.raw.get("node") or default_node(Path(source).resolve())
    if args.password_file:
        password = read_password_file(args.password_file)
    if not source:
        raise MigrationError("name the sqlite store with --from or -c")
    if not dsn:
        raise MigrationError("name the PostgreSQL database with --dsn or a config whose [storage.options] has dsn")
    return source, dsn, password, upload_as


def migrate(source, database: PostgresDatabase, upload_as: str | None = None) -> dict:
    """Copy the sqlite store at *source* into *database*; ``{table: rows}``.  With
    *upload_as*, every instance file is also queued for upload to S3 by that node
    (a node moving from local files to ``backend = "s3"``)."""
    path = Path(source)
    if path.is_dir():
        path = path / "index.sqlite"
    if not path.is_file():
        raise MigrationError(f"no sqlite index at {path}")
    # Read-only, one snapshot: what is copied is one consistent moment.
    lite = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        lite.execute("BEGIN")
        database.create_schema(schema_sqlite(), schema_pg())
        database.transaction(True, idx.upgrade)  # a database an older Harmony made: its columns first
        return database.transaction(True, _copy_all, (lite, upload_as))
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


def sqlite_tables(lite) -> set[str]:
    return {r[0] for r in lite.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                       "AND name NOT LIKE 'sqlite_%'")}


def _copy_all(conn, lite, upload_as=None) -> dict:
    report = {}
    unknown = sorted(sqlite_tables(lite) - set(TABLES) - set(NOT_COPIED))
    if unknown:
        raise MigrationError(f"the sqlite store has table(s) this migration does not know: {', '.join(unknown)}; "
                             "nothing was copied")
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
    if upload_as:
        report[UPLOADS_QUEUED] = conn.execute(
            "INSERT INTO blob_uploads(relpath, node, queued_at) SELECT relpath, ?, 0 FROM instances "
            "ON CONFLICT(relpath) DO NOTHING", (upload_as,)).rowcount
    return report


def _copy(conn, lite, table) -> int:
    pg_cols = set(_columns_pg(conn, table))
    cols = [c for c in _columns_sqlite(lite, table) if c in pg_cols]
    missing = [c for c in _columns_sqlite(lite, table) if c not in pg_cols]
    if missing:
        raise MigrationError(f"PostgreSQL's {table} lacks column(s) {', '.join(missing)}")
    key = ID_COLUMNS.get(table)
    names = ", ".join(cols)
    insert = f"INSERT INTO {table}({names}) VALUES({', '.join('?' * len(cols))})"
    rows = lite.execute(f"SELECT {names} FROM {table} ORDER BY {key or cols[0]}")
    copied = 0
    while True:
        batch = rows.fetchmany(BATCH)
        if not batch:
            break
        conn.raw.cursor().executemany(insert.replace("?", "%s"), batch)
        copied += len(batch)
    # Check before the commit: same count, same ids.
    checksum = f"coalesce(sum({key}), 0)" if key else "0"
    n_pg, sum_pg = conn.execute(f"SELECT count(*), {checksum} FROM {table}").fetchone()
    n_lite, sum_lite = lite.execute(f"SELECT count(*), {checksum} FROM {table}").fetchone()
    if (n_pg, int(sum_pg)) != (n_lite, int(sum_lite)) or copied != n_lite:
        raise MigrationError(f"{table}: {n_lite} row(s) in sqlite, {n_pg} in PostgreSQL after the copy; "
                             "nothing was committed")
    if key is None:
        return copied
    conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{key}'), "
                 f"greatest((SELECT max({key}) FROM {table}), 1))")
    return copied
