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
idempotent requests is 0 failed.

Harmony runs as its own twistd process, as in production:

    python bench/resilience/run.py [--duration 60] [--connections 20]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NGINX = "/usr/sbin/nginx"
WRK = "/usr/bin/wrk"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                r.read()
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def nginx_conf(folder: Path, port: int, body: str | None = None, upstreams=()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if upstreams:
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;" for p in upstreams)
        site = f"""
    upstream two {{
{servers}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://two;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout http_502 http_503;
            proxy_next_upstream_tries 2;
            proxy_connect_timeout 1s;
        }}
    }}"""
    else:
        site = f"""
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type application/json; return 200 '{body}'; }}
    }}"""
    conf = folder / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""
        worker_processes 1;
        pid {folder}/nginx.pid;
        error_log {folder}/error.log warn;
        events {{ worker_connections 1024; }}
        http {{
            access_log off;
            client_body_temp_path {folder}/body;
            proxy_temp_path {folder}/proxy;
            fastcgi_temp_path {folder}/fastcgi;
            uwsgi_temp_path {folder}/uwsgi;
            scgi_temp_path {folder}/scgi;
            {site}
        }}
    """))
    return conf


class Nginx:
    def __init__(self, folder: Path, port: int, **kw):
        self.folder, self.port, self.kw = folder, port, kw
        self.proc = None

    def start(self):
        conf = nginx_conf(self.folder, self.port, **self.kw)
        self.proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(self.folder), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"http://127.0.0.1:{self.port}/", proc=self.proc)
        return self

    def kill(self):
        """SIGKILL the whole nginx (master and worker), as a crash would."""
        if self.proc is None:
            return
        pid_file = self.folder / "nginx.pid"
        workers = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        self.proc.kill()
        for w in workers:
            try:
                os.kill(int(w), signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.proc = None
        pid_file.unlink(missing_ok=True)

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)
            self.proc = None


class Harmony:
    def __init__(self, folder: Path, port: int, upstreams):
        self.folder, self.port, self.upstreams = folder, port, upstreams
        self.proc = None

    def start(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        targets = "\n".join(f'[targets.t{i}]\nurl = "http://127.0.0.1:{p}"\n' for i, p in enumerate(self.upstreams))
        (self.folder / "harmony.toml").write_text(textwrap.dedent(f"""
            [proxy]
            id = "bench"
            log_level = "warn"

            [network.default.http]
            bind_address = "127.0.0.1"
            bind_port = {self.port}

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
        twistd = Path(sys.executable).parent / "twistd"
        self.log = open(self.folder / "harmony.log", "wb")
        self.proc = subprocess.Popen([str(twistd), "-n", "--pidfile=", "harmony", "-c",
                                      str(self.folder / "harmony.toml")],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=self.folder)
        wait_http(f"http://127.0.0.1:{self.port}/", proc=self.proc)
        return self

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None
            self.log.close()


def parse_wrk(out: str) -> dict:
    def num(pattern, default=0.0):
        m = re.search(pattern, out)
        return float(m.group(1)) if m else default

    def latency(label):
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    total = int(num(r"(\d+) requests in"))
    non2xx = int(num(r"Non-2xx or 3xx responses: (\d+)"))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    socket_errors = sum(int(x) for x in m.groups()) if m else 0
    return {"total": total, "served": total - non2xx, "failed": non2xx + socket_errors,
            "rps": num(r"Requests/sec:\s+([\d.]+)"), "p50": latency("50"), "p99": latency("99")}


def load(url: str, duration: int, connections: int, chaos=None) -> dict:
    """Run wrk against *url*; *chaos* (a callable taking a stop Event) runs alongside."""
    stop = threading.Event()
    thread = None
    if chaos is not None:
        thread = threading.Thread(target=chaos, args=(stop,), daemon=True)
        thread.start()
    out = subprocess.run([WRK, "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "10s", url],
                         capture_output=True, text=True, check=True).stdout
    stop.set()
    if thread is not None:
        thread.join()
    result = parse_wrk(out)
    result["raw"] = out
    return result


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
    args = ap.parse_args(argv)
    for tool in (NGINX, WRK):
        if not os.path.exists(tool):
            raise SystemExit(f"{tool} is missing: apt-get install nginx-light wrk")
    work = Path(tempfile.mkdtemp(prefix="harmony-resilience-"))
    ports = [free_port(), free_port()]
    ups = [Nginx(work / f"up{i}", p, body=f'{{"served_by":"up{i}"}}').start() for i, p in enumerate(ports)]
    harmony = Harmony(work / "harmony", free_port(), ports).start()
    lb = Nginx(work / "lb", free_port(), upstreams=ports).start()
    results = {}
    try:
        for name, url in (("harmony", f"http://127.0.0.1:{harmony.port}/"),
                          ("nginx", f"http://127.0.0.1:{lb.port}/")):
            print(f"{name}: baseline, {args.duration}s ...", flush=True)
            results[(name, "baseline")] = load(url, args.duration, args.connections)
            print(f"{name}: upstream A killed/restarted every 10s, {args.duration}s ...", flush=True)
            results[(name, "failover")] = load(url, args.duration, args.connections, kill_cycle(ups[0]))
    finally:
        harmony.stop()
        lb.stop()
        for u in ups:
            u.stop()
    print()
    print(f"{args.duration}s of GETs, wrk -t2 -c{args.connections}; upstream A down 5s of every 10s in 'failover'")
    print(f"{'proxy':8} {'run':9} {'served':>9} {'failed':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for (name, run), r in results.items():
        print(f"{name:8} {run:9} {r['served']:9d} {r['failed']:7d} {r['rps']:9.0f} {r['p50']:8.2f} {r['p99']:8.2f}")
    h, hb = results[("harmony", "failover")], results[("harmony", "baseline")]
    n, nb = results[("nginx", "failover")], results[("nginx", "baseline")]
    print()
    print(f"harmony failover / harmony baseline: req/s x{h['rps'] / hb['rps']:.2f}, p99 x{h['p99'] / hb['p99']:.2f}")
    print(f"harmony / nginx (failover): req/s x{h['rps'] / n['rps']:.2f}, p99 x{h['p99'] / n['p99']:.2f}, "
          f"failed {h['failed']} vs {n['failed']}")
    print(f"harmony / nginx (baseline): req/s x{hb['rps'] / nb['rps']:.2f}, p99 x{hb['p99'] / nb['p99']:.2f}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if h["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
