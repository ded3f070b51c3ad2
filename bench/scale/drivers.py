#!/usr/bin/env python3
"""psycopg 3 on the store's thread pool vs ``twisted.enterprise.adbapi``: queue claims per second.

Both run the same transaction - one ``FOR UPDATE SKIP LOCKED`` rotate claim of
one row plus its ``delivered`` update, ``synchronous_commit = off`` as queue
bookkeeping is, from the reactor, ``--concurrency``
claims in flight - against a local PostgreSQL 15 (fsync on).  The store's
pool is :class:`harmony.storage.database.PostgresDatabase` behind
``InstanceStore.bookkeep``; adbapi is ``ConnectionPool("psycopg", ...)`` with
``runInteraction`` (the same driver, its own pool and transaction wrapper).

    .venv/bin/python bench/scale/drivers.py [--rows 3000] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from twisted.internet import defer, reactor, task  # noqa: E402

from harmony.storage import index as idx  # noqa: E402
from harmony.storage import queue as q  # noqa: E402
from harmony.storage.database import PgConnection, PostgresDatabase  # noqa: E402
from harmony.storage.store import InstanceStore  # noqa: E402
from tests.postgres import PostgresServer  # noqa: E402


def fill(dsn, rows):
    import psycopg
    with psycopg.connect(dsn, autocommit=True) as raw:
        conn = PgConnection(raw)
        conn.executescript(idx.PG_SCHEMA + q.PG_SCHEMA)
        conn.execute("TRUNCATE queue")
        with raw.cursor() as cur:
            cur.executemany("INSERT INTO queue(target, sop_uid, state, enqueued_at, next_attempt_at) "
                            "VALUES('t', %s, 'pending', 0, 0)", [(str(i),) for i in range(rows)])


def claim_and_settle(conn):
    rows, _ = q.claim(conn, "t", q.ROTATE, 1, time.time(), node="bench", lease=60)
    for row_id, _sop, _n in rows:
        q.delivered(conn, row_id, time.time(), "bench")
    return len(rows)


async def drive(run_one, rows, concurrency) -> float:
    done = 0

    async def worker():
        nonlocal done
        while done < rows:
            got = await run_one()
            if not got:
                return
            done += got
    started = time.perf_counter()
    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(concurrency)])
    return done / (time.perf_counter() - started)


async def main(reactor_, args):
    with tempfile.TemporaryDirectory(prefix="harmony-bench-drivers-") as tmp:
        pg = PostgresServer(fsync=True).start()
        try:
            dsn = pg.new_database()
            results = {}
            for round_ in range(2):
                fill(dsn, args.rows)
                store = InstanceStore(Path(tmp) / f"s{round_}", min_free_bytes=0, threads=args.concurrency,
                                      database=PostgresDatabase(dsn), node="bench")
                store.open_sync()
                results.setdefault("psycopg 3 on the store's thread pool", []).append(
                    await drive(lambda: store.bookkeep(claim_and_settle), args.rows, args.concurrency))
                store.close()
                from twisted.enterprise import adbapi
                fill(dsn, args.rows)
                pool = adbapi.ConnectionPool("psycopg", dsn, cp_min=args.concurrency, cp_max=args.concurrency,
                                             cp_noisy=False)
                results.setdefault("twisted.enterprise.adbapi (psycopg)", []).append(
                    await drive(lambda: pool.runInteraction(lambda cur: claim_and_settle(_CursorConn(cur, True))),
                                args.rows, args.concurrency))
                pool.close()
        finally:
            pg.stop()
    print(f"{args.rows} rows, one claim + settle per transaction, {args.concurrency} in flight, fsync on")
    for name, rates in results.items():
        print(f"  {name:<40} {' / '.join(f'{r:.0f}' for r in rates)} claims/s")


class _CursorConn:
    """adbapi hands a DB-API cursor: run the store's ``?`` SQL on it."""

    dialect = "postgresql"

    def __init__(self, transaction, bookkeeping=False):
        self.cursor = getattr(transaction, "_cursor", transaction)  # adbapi's Transaction wraps the cursor
        if bookkeeping:  # as the store's bookkeep() does: the same commit cost on both sides
            self.cursor.execute("SET LOCAL synchronous_commit = off")

    def execute(self, sql, args=()):
        from harmony.storage.database import pg_sql
        self.cursor.execute(pg_sql(sql), tuple(args) if args else None)
        return self.cursor


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=4)
    task.react(main, [ap.parse_args()])
