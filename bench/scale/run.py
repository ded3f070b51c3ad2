#!/usr/bin/env python3
"""Scale-out benchmark: ingest and drain rates of Harmony on sqlite, on PostgreSQL, and three nodes on PostgreSQL.

One run, the same synthetic instances for each set-up, all on 127.0.0.1:

1. one node, ``[storage] index = "sqlite"`` (the embedded default);
2. one node, ``index = "postgresql"`` (a local PostgreSQL 15, fsync on);
3. three nodes (three ``twistd`` processes) sharing that PostgreSQL and one folder.

Each set-up: HTTP Part-10 ingest into ``store_forward`` (``--clients``
keep-alive connections in total, spread over the nodes) with its target down
(ingest measured alone: each row is tried once, then the target is paused
for every node), then the target comes up, every node is told so
(``POST /admin/queues/pacs/wake``) and the queue drains (instances/s from
target up to the last row delivered, every node delivering).  Harmony runs with ``fsync = true``; PostgreSQL with
``fsync = on``.  The target is a small threaded HTTP sink.

Prints instances/s and the ratios: PostgreSQL / sqlite (one node) and
3 nodes / 1 node (both PostgreSQL).  On a 2-core machine three nodes share
the same cores as one: the ratio shows the cost of coordination, not the
gain of more machines.

    .venv/bin/python bench/scale/run.py [--instances 600] [--clients 6]
"""

from __future__ import annotations

import argparse
import http.server
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.ingest.run import post_bodies  # noqa: E402
from tests.peers import free_port  # noqa: E402
from tests.postgres import PostgresServer  # noqa: E402
from tests.sf_helpers import HarmonyProcess, PortHold, make_instances, node_config  # noqa: E402


TOKEN = "bench-scale-token"


class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def undelivered(dsn, sqlite_path) -> int:
    if dsn:
        import psycopg
        with psycopg.connect(dsn, autocommit=True) as conn:
            return conn.execute("SELECT count(*) FROM queue WHERE state != 'delivered'").fetchone()[0]
    with sqlite3.connect(sqlite_path) as conn:
        return conn.execute("SELECT count(*) FROM queue WHERE state != 'delivered'").fetchone()[0]


def run(name, work: Path, bodies, clients, n_nodes, dsn=None, twistd=None, profile=None):
    shared = work / name / "store"
    shared.mkdir(parents=True)
    before = committed(dsn, 0) if dsn else 0  # the database's count so far (earlier runs share it)
    hold = PortHold(free_port())
    nodes = []
    for i in range(n_nodes):
        port = free_port()
        node = HarmonyProcess(work / name / f"node{i}", ports=[port])
        if twistd is not None:
            node.twistd = twistd
        node.folder.mkdir()
        admin = free_port()
        # While the target is down each row is tried once and the target paused for
        # everyone: a quick retry loop on three nodes would measure the retries, not ingest.
        node.config.write_text(node_config(port, node=f"n{i}", path=shared, dsn=dsn, targets={"pacs": hold.port},
                                           sf_options="concurrency = 8", log_level="warn", backoff=(600, 600))
                               + f'\n[management]\nenabled = true\nbind_port = {admin}\ntoken = "{TOKEN}"\n')
        node.port, node.admin = port, admin
        node.ports.append(admin)
        nodes.append(node.start())
    try:
        per_node = [bodies[i::n_nodes] for i in range(n_nodes)]
        times = [0.0] * n_nodes

        def ingest(i):
            times[i] = post_bodies("127.0.0.1", nodes[i].port, "/ingest", per_node[i], "application/dicom",
                                   max(1, clients // n_nodes))
        started = time.perf_counter()
        threads = [threading.Thread(target=ingest, args=(i,)) for i in range(n_nodes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ingest_s = time.perf_counter() - started
        hold.release()
        sink = http.server.ThreadingHTTPServer(("127.0.0.1", hold.port), Sink)
        threading.Thread(target=sink.serve_forever, daemon=True).start()
        spy = None
        if profile:  # py-spy (pip install py-spy: not a dependency) on the first node, the drain only
            import subprocess
            spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--idle", "-r", "250",
                                    "--format", "raw", "-o", f"{profile}-{name}.txt", "-p", str(nodes[0].proc.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.perf_counter()
        for node in nodes:  # the target is back (the operator's "wake"): every node stops waiting
            wake = urllib.request.Request(f"http://127.0.0.1:{node.admin}/admin/queues/pacs/wake", method="POST",
                                          headers={"Authorization": f"Bearer {TOKEN}"})
            urllib.request.urlopen(wake, timeout=30).read()
        polls = 0
        while undelivered(dsn, shared / "index.sqlite"):
            polls += 1
            if time.perf_counter() - started > 600:
                raise RuntimeError("the queue did not drain in 10 minutes")
            time.sleep(0.05)  # polling a measurement, not synchronising a test
        drain_s = time.perf_counter() - started
        if spy is not None:
            import signal
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        sink.shutdown()
        sink.server_close()
    finally:
        for node in nodes:
            node.stop()
        hold.release()
    return len(bodies) / ingest_s, len(bodies) / drain_s, (committed(dsn, polls + 1) - before) / len(bodies) if dsn else 0.0


def committed(dsn, ours: int) -> int:
    """Transactions the nodes committed in their database (a figure the machine's load does
    not move), once they have stopped: PostgreSQL counts a backend's when it ends.  *ours*:
    this script's own polls, taken off."""
    import psycopg
    seen = -1
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(100):
            now = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
                               ).fetchone()[0]
            if now == seen:
                break
            seen = now
            time.sleep(0.5)  # the statistics of ended backends arrive shortly after they end
    return seen - ours


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=600)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the medians are reported")
    ap.add_argument("--only", default="sqlite,pg1,pg3",
                    help="set-ups to run, of sqlite, pg1 (one node on PostgreSQL), pg3 (three nodes)")
    ap.add_argument("--ab", metavar="TREE", help="also run every set-up with the build installed in TREE/.venv "
                    "(e.g. main's), interleaved round by round, and print this build / that build")
    ap.add_argument("--profile", metavar="PREFIX", help="py-spy (raw, idle included) of the first node's drain, "
                    "one file per run: PREFIX-<set-up>.txt")
    args = ap.parse_args()
    only = set(args.only.split(","))
    builds = [("", None)]
    if args.ab:
        builds = [(" [A]", str(Path(args.ab).resolve() / ".venv" / "bin" / "twistd")), (" [B]", None)]
    with tempfile.TemporaryDirectory(prefix="harmony-bench-scale-") as tmp:
        work = Path(tmp)
        files = make_instances(work / "data", args.instances, 91, patient_id="SCALE", size=64)
        bodies = [f.read_bytes() for f in files]
        pg = PostgresServer(fsync=True).start()
        rounds: dict[str, list] = {}
        try:
            # Interleaved: a load spike from the other engineers' tests hits every set-up alike.
            for r in range(args.rounds):
                for name, key, n_nodes, shared in (("1 node, sqlite", "sqlite", 1, False),
                                                   ("1 node, PostgreSQL", "pg1", 1, True),
                                                   ("3 nodes, PostgreSQL", "pg3", 3, True)):
                    if key not in only:
                        continue
                    for label, twistd in builds:
                        got = run(f"{key}{label.strip(' []')}-{r}", work, bodies, args.clients, n_nodes,
                                  pg.new_database() if shared else None, twistd, args.profile)
                        rounds.setdefault(name + label, []).append(got)
                        print(f"  round {r + 1}: {name + label:<26} ingest {got[0]:7.1f}  drain {got[1]:7.1f}"
                              + (f"  PostgreSQL transactions per instance {got[2]:5.2f}" if got[2] else ""),
                              flush=True)
        finally:
            pg.stop()
    results = {name: (statistics.median(g[0] for g in got), statistics.median(g[1] for g in got))
               for name, got in rounds.items()}
    print()
    print(f"{args.instances} instances (64x64), {args.clients} HTTP clients in total, fsync on, "
          f"medians of {args.rounds} interleaved rounds\n")
    print(f"  {'set-up':<28}{'ingest inst/s':>16}{'drain inst/s':>16}")
    for name, (ingest, drain) in results.items():
        print(f"  {name:<28}{ingest:>16.1f}{drain:>16.1f}")
    if args.ab:
        print("\n  this build [B] / the other [A], per round then medians:")
        for name in (n for n in results if n.endswith(" [B]")):
            a, b = rounds[name[:-4] + " [A]"], rounds[name]
            drains = [nb[1] / na[1] for na, nb in zip(a, b, strict=True)]
            print(f"  {name[:-4]:<24} drain {statistics.median(drains):.2f}x "
                  f"({', '.join(f'{x:.2f}' for x in drains)})   ingest "
                  f"{statistics.median(nb[0] / na[0] for na, nb in zip(a, b, strict=True)):.2f}x")
            if a[0][2]:
                print(f"  {'':<24} PostgreSQL transactions per instance (ingest and drain): "
                      f"A {statistics.median(g[2] for g in a):.2f}, B {statistics.median(g[2] for g in b):.2f}")
        return
    if {"sqlite", "pg1"} <= only:
        s, p1 = results["1 node, sqlite"], results["1 node, PostgreSQL"]
        print(f"\n  PostgreSQL / sqlite, one node:   ingest {p1[0] / s[0]:.2f}x   drain {p1[1] / s[1]:.2f}x")
    if {"pg1", "pg3"} <= only:
        p1, p3 = results["1 node, PostgreSQL"], results["3 nodes, PostgreSQL"]
        print(f"  3 nodes / 1 node, PostgreSQL:    ingest {p3[0] / p1[0]:.2f}x   drain {p3[1] / p1[1]:.2f}x")


if __name__ == "__main__":
    main()
