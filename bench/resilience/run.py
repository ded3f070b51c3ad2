#!/usr/bin/env python3
"""Resilience benchmark: steady load through two targets while one of them is
killed and restarted, Harmony next to nginx with the same two upstreams.

Each upstream is a real nginx process serving a small body on 127.0.0.1.  For
``--duration`` seconds (default 60) ``wrk`` sends GETs through the proxy while
upstream A is SIGKILLed 5 s into every 10 s period and started again at the
period's end (down half of the time, killed with requests in flight).  Four runs:

    harmony, no failures (baseline) | harmony, A killed/restarted
    nginx,   no failures            | nginx,   A killed/restarted

and for each: requests served (2xx), failed (non-2xx + socket errors), req/s
and latency p50/p99, plus ratios to the baseline and to nginx.  The goal for
idempotent requests is 0 failed.  With ``--rounds N`` the four runs are
interleaved N times (the shared machine's load moves between runs: a failover
run measured minutes after its baseline compares two loads, not two behaviours)
and each figure is the median over the rounds, failures summed.

Harmony runs as its own twistd process, as in production:

    python bench/resilience/run.py [--duration 60] [--connections 20] [--rounds 1]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import (NGINX, TWISTD, WRK, Nginx, free_port, harmony_config, proxy_block,  # noqa: E402
                          require, start_harmony, stop, wrk)


def upstream(folder: Path, port: int, body: str) -> Nginx:
    """A small fixed JSON answer: an upstream that is never the bottleneck."""
    return Nginx(folder, f"""
        server {{
            listen 127.0.0.1:{port};
            location / {{ default_type application/json; return 200 '{body}'; }}
        }}""", port, worker_connections=1024)


def balancer(folder: Path, port: int, upstreams) -> Nginx:
    """nginx's nearest equivalent of Harmony's targets + retries + circuit."""
    return Nginx(folder, proxy_block(port, upstreams, upstream_extra=" max_fails=1 fail_timeout=2s", extra="""
                proxy_next_upstream error timeout http_502 http_503;
                proxy_next_upstream_tries 2;
                proxy_connect_timeout 1s;"""), port, worker_connections=1024)


class Harmony:
    def __init__(self, folder: Path, port: int, upstreams):
        self.folder, self.port, self.upstreams = folder, port, upstreams
        self.proc = None

    def start(self):
        targets = "\n".join(f'[targets.t{i}]\nurl = "http://127.0.0.1:{p}"\n' for i, p in enumerate(self.upstreams))
        config = harmony_config(self.folder, self.port, textwrap.dedent(f"""
            [pipelines.lb]
            networks = ["default"]
            endpoints = ["api"]
            backends = ["up"]

            [endpoints.api]
            service = "http"
            path_prefix = "/"

            [backends.up]
            service = "http"
            targets = [{", ".join(f'"t{i}"' for i in range(len(self.upstreams)))}]
            timeout_secs = 5
            connect_timeout_secs = 1
            retries = 1

            [backends.up.circuit]
            failures = 1
            open_secs = 2

            [backends.up.health]
            path = "/"
            interval_secs = 1
            timeout_secs = 1
            unhealthy_threshold = 1
            healthy_threshold = 1
        """) + "\n" + targets)
        self.proc = start_harmony(config, self.port)
        return self

    def stop(self):
        stop(self.proc)
        self.proc = None


def load(url: str, duration: int, connections: int, chaos=None) -> dict:
    """Run wrk against *url*; *chaos* (a callable taking a stop Event) runs alongside."""
    stop = threading.Event()
    thread = None
    if chaos is not None:
        thread = threading.Thread(target=chaos, args=(stop,), daemon=True)
        thread.start()
    try:
        return wrk(url, duration, connections=connections, extra=["--timeout", "10s"])
    finally:
        stop.set()
        if thread is not None:
            thread.join()


def kill_cycle(victim: Nginx, period: float = 10.0):
    def run(stop: threading.Event):
        start = time.monotonic()
        k = 0
        while not stop.is_set():
            kill_at = start + k * period + period / 2
            revive_at = start + (k + 1) * period
            if stop.wait(max(0.0, kill_at - time.monotonic())):
                break
            victim.kill()
            stop.wait(max(0.0, revive_at - time.monotonic()))
            victim.start()
            k += 1
        if victim.proc is None:
            victim.start()
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=60)
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians are reported")
    args = ap.parse_args(argv)
    require(NGINX, WRK, str(TWISTD))
    work = Path(tempfile.mkdtemp(prefix="harmony-resilience-"))
    ports = [free_port(), free_port()]
    ups = [upstream(work / f"up{i}", p, f'{{"served_by":"up{i}"}}').start() for i, p in enumerate(ports)]
    harmony = Harmony(work / "harmony", free_port(), ports).start()
    lb = balancer(work / "lb", free_port(), ports).start()
    rounds: dict = {}
    try:
        for n in range(args.rounds):
            for name, url in (("harmony", f"http://127.0.0.1:{harmony.port}/"),
                              ("nginx", f"http://127.0.0.1:{lb.port}/")):
                for run, chaos in (("baseline", None), ("failover", kill_cycle(ups[0]))):
                    print(f"round {n + 1}: {name} {run}, {args.duration}s ...", flush=True)
                    r = load(url, args.duration, args.connections, chaos)
                    print(f"  served {r['served']} failed {r['errors']} req/s {r['rps']:.0f} "
                          f"p99 {r['p99_ms']:.2f} ms", flush=True)
                    rounds.setdefault((name, run), []).append(r)
    finally:
        harmony.stop()
        lb.stop()
        for u in ups:
            u.stop()
    results = {key: {"served": sum(r["served"] for r in rs), "errors": sum(r["errors"] for r in rs),
                     **{k: statistics.median(r[k] for r in rs) for k in ("rps", "p50_ms", "p99_ms")}}
               for key, rs in rounds.items()}
    print()
    print(f"{args.duration}s of GETs a run, {args.rounds} interleaved round(s) (served and failed summed, "
          f"the rest medians), wrk -t2 -c{args.connections}; upstream A down 5s of every 10s in 'failover'")
    print(f"{'proxy':8} {'run':9} {'served':>9} {'failed':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for (name, run), r in results.items():
        print(f"{name:8} {run:9} {r['served']:9d} {r['errors']:7d} {r['rps']:9.0f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f}")
    h, hb = results[("harmony", "failover")], results[("harmony", "baseline")]
    n, nb = results[("nginx", "failover")], results[("nginx", "baseline")]
    print()
    print(f"harmony failover / harmony baseline: req/s x{h['rps'] / hb['rps']:.2f}, p99 x{h['p99_ms'] / hb['p99_ms']:.2f}")
    print(f"harmony / nginx (failover): req/s x{h['rps'] / n['rps']:.2f}, p99 x{h['p99_ms'] / n['p99_ms']:.2f}, "
          f"failed {h['errors']} vs {n['errors']}")
    print(f"harmony / nginx (baseline): req/s x{hb['rps'] / nb['rps']:.2f}, p99 x{hb['p99_ms'] / nb['p99_ms']:.2f}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if h["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
