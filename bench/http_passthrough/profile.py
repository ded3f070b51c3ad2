#!/usr/bin/env python3
"""Where one Harmony passthrough process spends its CPU, under wrk.

The machine this runs on is shared, so wall-clock profiles mostly measure
preemption.  This one runs Harmony (one process, the bench's passthrough
config) under cProfile with ``time.process_time`` as its clock, so a function
is charged only for CPU it used, drives it with wrk against the same static
upstream as run.py, and prints the top functions by own time and by
cumulative time, plus the process's CPU microseconds per request (a figure
that, unlike req/s, hardly moves with the load from elsewhere).

    .venv/bin/python bench/http_passthrough/profile.py [--duration 10] [--top 40] [--out FILE]
    .venv/bin/python bench/http_passthrough/profile.py --py-spy flame.svg   # sampling flame graph instead
    .venv/bin/python bench/http_passthrough/profile.py --ab /tmp/old       # before/after: CPU per request

``--ab DIR`` compares the installed Harmony with another build of it
(``pip install --no-deps --target DIR <old checkout>``; it runs with
``PYTHONPATH=DIR``) in alternating rounds against the same upstream, and
prints each one's median CPU microseconds per request: the way to tell
whether a change to the hot path helped on a machine whose req/s swing
with other people's load.

cProfile's own overhead inflates functions called very often (it roughly
doubles CPU per request); the split between layers is what to read, the
absolute CPU figure comes from the un-profiled run printed first.
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from bench.common import (NGINX, TWISTD, WRK, Nginx, cpu_seconds, free_port, require, start_harmony,  # noqa: E402
                          wait_port, wrk)
from bench.http_passthrough.run import STATIC_BODY, Harmony  # noqa: E402

#: Runs twistd in this interpreter under cProfile(process_time) and dumps the stats on exit.
_PROFILED = """
import cProfile, sys, time
from twisted.application import app
from twisted.scripts.twistd import run
app._exitWithSignal = lambda sig: None  # twistd re-raises SIGTERM on itself at the end; we want the finally
profiler = cProfile.Profile(time.process_time)
sys.argv = ["twistd"] + sys.argv[2:]
profiler.enable()
try:
    run()
finally:
    profiler.disable()
    profiler.dump_stats(OUT)
"""


def user_system(pid: int) -> tuple[float, float]:
    """*pid*'s CPU seconds so far, in user space and in the kernel (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def measure(url: str, pid: int, duration: int) -> tuple[dict, float]:
    """wrk for *duration* s; returns its figures and *pid*'s CPU µs per request
    (and prints how much of it was the kernel's: system calls, TCP on loopback)."""
    before = cpu_seconds(pid)
    user0, sys0 = user_system(pid)
    r = wrk(url, duration)
    used = cpu_seconds(pid) - before
    user1, sys1 = user_system(pid)
    n = max(1, r["total"])
    print(f"  of which user {(user1 - user0) / n * 1e6:.0f} µs, kernel {(sys1 - sys0) / n * 1e6:.0f} µs per request")
    return r, used / n * 1e6


def count_syscalls(url: str, pid: int, duration: int) -> int:
    """System calls of *pid* per request under wrk, by name (strace -c; strace slows the
    process, so req/s mean nothing here, but calls per request do not change)."""
    strace = shutil.which("strace")
    if strace is None:
        print("strace is not installed")
        return 1
    out = Path(tempfile.mkdtemp(prefix="harmony-strace-")) / "counts.txt"
    rec = subprocess.Popen([strace, "-c", "-f", "-p", str(pid), "-o", str(out)], stderr=subprocess.DEVNULL)
    time.sleep(1)  # let strace attach before the load starts
    r = wrk(url, duration)
    rec.send_signal(signal.SIGINT)
    rec.wait(timeout=60)
    total = max(1, r["total"])
    print(f"{r['total']} requests under strace; system calls per request:")
    for line in out.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[3].isdigit():
            print(f"  {fields[-1]:<16} {int(fields[3]) / total:6.2f}")
    shutil.rmtree(out.parent, ignore_errors=True)
    return 0


def compare(folder: Path, up_port: int, other: str, rounds: int, duration: int) -> int:
    builds = {"installed": None, other: dict(os.environ, PYTHONPATH=other)}
    figures = {name: [] for name in builds}
    for i in range(rounds):
        for name, env in builds.items():
            port = free_port()
            h = Harmony(folder, f"ab-{i}-{len(figures[name])}-{abs(hash(name))}", 1, port, up_port)
            h.proc = start_harmony(h.config, port, log=h.log, env=env)
            url = f"http://127.0.0.1:{port}/hello.txt"
            try:
                wrk(url, 1)
                r, us = measure(url, h.proc.pid, duration)
            finally:
                h.stop()
            figures[name].append((us, r["rps"]))
            print(f"round {i + 1} {name}: {us:.0f} CPU µs per request, {r['rps']:.0f} req/s", flush=True)
    for name, runs in figures.items():
        cpu = sorted(us for us, _ in runs)[len(runs) // 2]
        rps = sorted(rps for _, rps in runs)[len(runs) // 2]
        print(f"median {name}: {cpu:.0f} CPU µs per request, {rps:.0f} req/s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", help="also write the text profile to this file")
    parser.add_argument("--save", help="keep the raw cProfile stats (for pstats/snakeviz) in this file")
    parser.add_argument("--ab", metavar="DIR", help="compare with the Harmony installed in DIR (PYTHONPATH)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds for --ab")
    parser.add_argument("--py-spy", metavar="SVG", help="record a py-spy flame graph instead (.txt: collapsed stacks)")
    parser.add_argument("--syscalls", action="store_true",
                        help="count system calls per request instead (strace -c on the Harmony process)")
    args = parser.parse_args(argv)
    require(NGINX, WRK, str(TWISTD))
    folder = Path(tempfile.mkdtemp(prefix="harmony-profile-"))
    try:
        www = folder / "www"
        www.mkdir()
        (www / "hello.txt").write_bytes(STATIC_BODY)
        os.chmod(folder, 0o755)
        up_port = free_port()
        upstream = Nginx(folder / "upstream", f"""
            server {{ listen 127.0.0.1:{up_port}; location / {{ root {www}; }} }}""", up_port).start()
        try:
            if args.ab:
                return compare(folder, up_port, args.ab, args.rounds, args.duration)
            port = free_port()
            plain = Harmony(folder, "plain", 1, port, up_port).start()
            url = f"http://127.0.0.1:{port}/hello.txt"
            try:
                wrk(url, 1)
                r, us = measure(url, plain.proc.pid, args.duration)
                print(f"un-profiled: {r['rps']:.0f} req/s, {us:.0f} CPU µs per request "
                      f"(load average {os.getloadavg()[0]:.2f})")
                if args.syscalls:
                    return count_syscalls(url, plain.proc.pid, args.duration)
                if args.py_spy:
                    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                    # PYSPY_NATIVE=1: C frames too (the collector, send, llhttp); py-spy then pauses
                    # the process for each sample (--native cannot be --nonblocking).
                    native = ["--native"] if os.environ.get("PYSPY_NATIVE") else ["--nonblocking"]
                    rec = subprocess.Popen([spy, "record", "--pid", str(plain.proc.pid), "--rate", "500", *native,
                                            "--duration", str(args.duration),
                                            "--format", "raw" if args.py_spy.endswith(".txt") else "flamegraph",
                                            "--output", args.py_spy])
                    time.sleep(1)  # let py-spy attach before the load starts
                    wrk(url, args.duration)
                    rec.wait(timeout=120)
                    print(f"flame graph: {args.py_spy}")
                    return 0
            finally:
                plain.stop()
            stats_file = folder / "harmony.prof"
            port = free_port()
            prof = Harmony(folder, "profiled", 1, port, up_port)
            script = folder / "profiled.py"
            script.write_text(_PROFILED.replace("OUT", repr(str(stats_file))))
            prof.proc = subprocess.Popen([sys.executable, str(script), "--", "-n", "--pidfile=", "harmony",
                                          "-c", str(prof.config)], cwd=prof.folder,
                                         stdout=open(prof.log, "wb"), stderr=subprocess.STDOUT)
            wait_port(port, prof.proc, "profiled harmony")
            url = f"http://127.0.0.1:{port}/hello.txt"
            wrk(url, 1)
            r, us = measure(url, prof.proc.pid, args.duration)
            prof.proc.send_signal(signal.SIGTERM)
            prof.proc.wait(timeout=60)
            if not stats_file.exists():
                raise RuntimeError("no profile written:\n" + prof.log.read_text()[-3000:])
            print(f"profiled: {r['total']} requests, {us:.0f} CPU µs per request under cProfile")
        finally:
            upstream.stop()
        if args.save:
            shutil.copy(stats_file, args.save)
        out = open(args.out, "w") if args.out else None
        for stream in filter(None, (sys.stdout, out)):
            stats = pstats.Stats(str(stats_file), stream=stream)
            stats.strip_dirs().sort_stats("tottime").print_stats(args.top)
            stats.sort_stats("cumulative").print_stats(args.top)
        if out:
            out.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
