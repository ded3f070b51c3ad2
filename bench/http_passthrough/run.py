#!/usr/bin/env python3
"""HTTP passthrough benchmark: Harmony next to nginx, in one run, on loopback.

1. Throughput: one static upstream (nginx serving a small file) measured with
   wrk directly, through nginx ``proxy_pass`` and through Harmony's ``http``
   endpoint + ``http`` backend, for each worker count (nginx gets the same
   number of worker processes as Harmony gets ``[proxy] workers``).  Prints
   req/s, p50/p99 latency and the ratio Harmony/nginx.
2. Streaming: a 1 GiB body up and a 1 GiB body down through Harmony (one
   worker) and through nginx (one worker, request and response buffering off),
   to a sink/source upstream (bigserver.py) that holds nothing in memory.
   Prints each proxy's peak RSS (VmHWM) and throughput.

Run with the interpreter of the venv Harmony is installed in:

    .venv/bin/python bench/http_passthrough/run.py [--duration 5] [--workers 1 2]

Everything listens on 127.0.0.1 and every load run is bounded in time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from bench.common import (NGINX, TWISTD, WRK, Nginx, children, cpu_seconds, free_port, harmony_config, proxy_block, require,  # noqa: E402
                          start_harmony, status_kib, stop, wait_port, wrk)

GIB = 1024 ** 3
STATIC_BODY = b"x" * 1024
#: nginx's proxy settings for the streaming runs: nothing buffered either way.
STREAMING = ("proxy_request_buffering off; proxy_buffering off; client_max_body_size 0; "
             "proxy_read_timeout 600s; proxy_send_timeout 600s;")


# ------------------------------------------------------------------- servers


class Harmony:
    def __init__(self, folder: Path, name: str, workers: int, port: int, upstream_port: int):
        self.folder = folder / name
        self.folder.mkdir(parents=True)
        self.port = port
        self.workers = workers
        self.config = harmony_config(self.folder, port, f"""
            [pipelines.pass]
            networks = ["default"]
            endpoints = ["all"]
            backends = ["up"]

            [endpoints.all]
            service = "http"
            [endpoints.all.options]
            path_prefix = "/"

            [backends.up]
            service = "http"
            [backends.up.options]
            base_url = "http://127.0.0.1:{upstream_port}"
            # A 1 GiB upload is spooled, then sent, before the upstream answers.
            timeout_secs = 600
            """, workers=workers)
        self.log = self.folder / "harmony.log"
        self.proc = None

    def start(self):
        self.proc = start_harmony(self.config, self.port, log=self.log)
        deadline = time.monotonic() + 30
        # Twisted logs this (whatever log_level says) as each process's site starts.
        while self.log.read_text().count("HarmonySite starting on") < self.workers:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("harmony workers did not start:\n" + self.log.read_text())
            time.sleep(0.05)
        return self

    def stop(self):
        stop(self.proc)


# ----------------------------------------------------------------- streaming


def upload(port: int, size: int) -> float:
    chunk = b"\0" * (1024 * 1024)
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.putrequest("POST", "/upload")
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Content-Length", str(size))
    conn.endheaders()
    sent = 0
    while sent < size:
        n = min(len(chunk), size - sent)
        conn.send(chunk[:n])
        sent += n
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    if resp.status != 200 or json.loads(body)["received"] != size:
        raise RuntimeError(f"upload through :{port} failed: {resp.status} {body[:200]!r}")
    return time.monotonic() - started


def download(port: int, size: int) -> float:
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("GET", f"/download?bytes={size}")
    resp = conn.getresponse()
    got = 0
    while True:
        data = resp.read(1024 * 1024)
        if not data:
            break
        got += len(data)
    conn.close()
    if resp.status != 200 or got != size:
        raise RuntimeError(f"download through :{port} failed: {resp.status}, {got} of {size} bytes")
    return time.monotonic() - started


def streaming(folder: Path, size: int) -> dict:
    big_port = free_port()
    big = subprocess.Popen([sys.executable, str(HERE / "bigserver.py"), str(big_port)])
    results = {}
    try:
        wait_port(big_port, big, "bigserver")
        for direction, run in (("upload", upload), ("download", download)):
            port = free_port()
            h = Harmony(folder, f"harmony-stream-{direction}", 1, port, big_port).start()
            try:
                base = status_kib(h.proc.pid, "VmRSS")
                secs = run(port, size)
                peak = status_kib(h.proc.pid, "VmHWM")
            finally:
                h.stop()
            results[("harmony", direction)] = {"baseline_mib": base / 1024, "peak_mib": peak / 1024,
                                               "mib_s": size / 2 ** 20 / secs}
            port = free_port()
            n = Nginx(folder / f"nginx-stream-{direction}", proxy_block(port, [big_port], extra=STREAMING), port).start()
            try:
                [worker] = n.workers()
                base = status_kib(worker, "VmRSS")
                secs = run(port, size)
                peak = status_kib(worker, "VmHWM")
            finally:
                n.stop()
            results[("nginx", direction)] = {"baseline_mib": base / 1024, "peak_mib": peak / 1024,
                                             "mib_s": size / 2 ** 20 / secs}
    finally:
        stop(big)
    return results


# ---------------------------------------------------------------------- main


def median_run(runs: list[dict]) -> dict:
    """The run with the median req/s (its latencies belong to the same run)."""
    ordered = sorted(runs, key=lambda r: r["rps"])
    return {**ordered[len(ordered) // 2], "all_rps": [round(r["rps"]) for r in runs]}


#: The decision builds of lean_proxy.py (``--lean``): front, back.
LEAN_BUILDS = (("web+agent", "twisted", "agent"), ("web+lean", "twisted", "lean"), ("lean+lean", "lean", "lean"))


def start_lean(port: int, upstream_port: int, front: str, back: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(HERE / "lean_proxy.py"), str(port), str(upstream_port),
                             "--front", front, "--back", back], stderr=subprocess.DEVNULL)
    wait_port(port, proc, f"lean_proxy {front}/{back}")
    return proc


def throughput(folder: Path, workers: int, duration: int, warmup: int, rounds: int, lean: bool = False) -> dict:
    www = folder / "www"
    www.mkdir(exist_ok=True)
    (www / "hello.txt").write_bytes(STATIC_BODY)
    os.chmod(folder, 0o755)
    up_port = free_port()
    upstream = Nginx(folder / f"upstream-{workers}", f"""
        server {{ listen 127.0.0.1:{up_port}; location / {{ root {www}; }} }}""", up_port).start()
    extra = []
    try:
        nginx_port, harmony_port = free_port(), free_port()
        proxy = Nginx(folder / f"nginx-{workers}", proxy_block(nginx_port, [up_port]), nginx_port,
                      workers=workers).start()
        harmony = Harmony(folder, f"harmony-{workers}", workers, harmony_port, up_port).start()
        try:
            # (name, port, the processes whose CPU the figure is charged with)
            targets = [("direct", up_port, lambda: upstream.workers()),
                       ("nginx", nginx_port, lambda: proxy.workers()),
                       ("harmony", harmony_port, lambda: [harmony.proc.pid, *children(harmony.proc.pid)])]
            if lean and workers == 1:
                for name, front, back in LEAN_BUILDS:
                    port = free_port()
                    proc = start_lean(port, up_port, front, back)
                    extra.append(proc)
                    targets.append((name, port, lambda proc=proc: [proc.pid]))
            runs = {name: [] for name, _, _ in targets}
            # Interleaved rounds, so a burst of load from elsewhere on the machine
            # hits every target rather than one.
            for _ in range(rounds):
                for name, port, pids in targets:
                    url = f"http://127.0.0.1:{port}/hello.txt"
                    if warmup:
                        wrk(url, warmup)
                    watched = pids()
                    before = cpu_seconds(*watched)
                    r = wrk(url, duration)
                    r["cpu_us"] = (cpu_seconds(*watched) - before) / max(1, r["total"]) * 1e6
                    runs[name].append(r)
            results = {name: median_run(r) for name, r in runs.items()}
            for name, r in runs.items():
                # CPU per request from every round, median: it moves little with outside load.
                results[name]["cpu_us"] = sorted(x["cpu_us"] for x in r)[len(r) // 2]
        finally:
            for proc in extra:
                stop(proc)
            harmony.stop()
            proxy.stop()
    finally:
        upstream.stop()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of wrk before each measured run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per target; the median is shown")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--stream-bytes", type=int, default=GIB, help="body size for the RSS runs (default 1 GiB)")
    parser.add_argument("--no-stream", action="store_true", help="skip the streaming/RSS runs")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--lean", action="store_true",
                        help="also measure lean_proxy.py's builds (one worker): the C-parser decision")
    args = parser.parse_args(argv)
    require(NGINX, WRK, str(TWISTD))

    folder = Path(tempfile.mkdtemp(prefix="harmony-bench-"))
    report = {"throughput": {}, "streaming": {}}
    try:
        print(f"wrk -t2 -c50 -d{args.duration}s, static {len(STATIC_BODY)} B file, loopback, {os.cpu_count()} cores, "
              f"median of {args.rounds} interleaved rounds; load average before: {os.getloadavg()[0]:.2f}")
        print(f"{'workers':>7}  {'target':<9} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'CPU us/req':>10}"
              f"  all rounds req/s")
        for workers in args.workers:
            res = throughput(folder, workers, args.duration, args.warmup, args.rounds, lean=args.lean)
            report["throughput"][workers] = res
            for name, r in res.items():
                print(f"{workers:>7}  {name:<9} {r['rps']:>8.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['errors']:>6}"
                      f" {r['cpu_us']:>10.0f}  {r['all_rps']}")
            ratio = res["harmony"]["rps"] / res["nginx"]["rps"]
            cpu_ratio = res["nginx"]["cpu_us"] / res["harmony"]["cpu_us"]
            res["harmony_over_nginx"] = ratio
            res["harmony_over_nginx_per_cpu"] = cpu_ratio
            print(f"{workers:>7}  Harmony/nginx req/s = {ratio:.1%} (goal >= 20%)   per CPU second = {cpu_ratio:.1%}   "
                  f"p99 Harmony/nginx = {res['harmony']['p99_ms'] / res['nginx']['p99_ms']:.1f}x")
            for name, _, _ in LEAN_BUILDS:
                if name in res:
                    print(f"{workers:>7}  {name}/nginx req/s = {res[name]['rps'] / res['nginx']['rps']:.1%}   "
                          f"per CPU second = {res['nginx']['cpu_us'] / res[name]['cpu_us']:.1%}")
        if not args.no_stream:
            size = args.stream_bytes
            print(f"\nstreaming {size / GIB:g} GiB each way, one worker (peak RSS = VmHWM of the proxy process)")
            print(f"{'proxy':<8} {'direction':<9} {'baseline MiB':>12} {'peak MiB':>9} {'MiB/s':>7}")
            res = streaming(folder, size)
            for (proxy, direction), r in res.items():
                print(f"{proxy:<8} {direction:<9} {r['baseline_mib']:>12.1f} {r['peak_mib']:>9.1f} {r['mib_s']:>7.0f}")
                report["streaming"][f"{proxy}/{direction}"] = r
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
