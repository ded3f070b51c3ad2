#!/usr/bin/env python3
"""Routing benchmark: Klein vs bare twisted.web, same echo, same run, on loopback.

Two servers (echo_server.py) answer ``GET /echo/hello`` - one routes with a
twisted.web ``Resource``, the other with a Klein app - each in its own
process on one core's worth of reactor.  wrk (``-t2 -c50``, ``--latency``)
measures them in interleaved rounds after a warm-up; the median round and the
ratio Klein/bare are printed.  This is the measurement behind "Klein for the
management API, bare twisted.web for the proxy's hot path" (docs/architecture.md).

    .venv/bin/python bench/routing/run.py [--duration 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from bench.common import WRK, free_port, require, stop, wait_port, wrk  # noqa: E402


def median_run(runs):
    ordered = sorted(runs, key=lambda r: r["rps"])
    return {**ordered[len(ordered) // 2], "all_rps": [round(r["rps"]) for r in runs]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    require(WRK)
    servers = {}
    try:
        for kind in ("bare", "klein"):
            port = free_port()
            proc = subprocess.Popen([sys.executable, str(HERE / "echo_server.py"), kind, str(port)])
            wait_port(port, proc, f"{kind} echo server")
            servers[kind] = (proc, port)
        runs = {kind: [] for kind in servers}
        for _ in range(args.rounds):
            for kind, (_, port) in servers.items():
                url = f"http://127.0.0.1:{port}/echo/hello"
                if args.warmup:
                    wrk(url, args.warmup)
                runs[kind].append(wrk(url, args.duration))
    finally:
        for proc, _ in servers.values():
            stop(proc)
    results = {kind: median_run(r) for kind, r in runs.items()}
    print(f"wrk -t2 -c50 -d{args.duration}s GET /echo/hello, loopback, {os.cpu_count()} cores, median of "
          f"{args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.2f}")
    print(f"{'router':<6} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}  all rounds req/s")
    for kind, r in results.items():
        print(f"{kind:<6} {r['rps']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['errors']:>6}  {r['all_rps']}")
    ratio = results["klein"]["rps"] / results["bare"]["rps"]
    results["klein_over_bare"] = ratio
    print(f"Klein/bare req/s = {ratio:.1%}; p99 Klein/bare = {results['klein']['p99_ms'] / results['bare']['p99_ms']:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
