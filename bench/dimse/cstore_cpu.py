#!/usr/bin/env python3
"""CPU per received C-STORE instance: Harmony (``dicom_scp`` -> ``local_archive``) next to Orthanc.

Why: the C-STORE goal rows (bench/ingest ``dimse1``/``dimse4``) are ratios of
instances per second, which on this shared 2-core machine move with the load and
with fsync latency.  Once the flushes overlap, what is left is how much CPU a
received instance costs; this bench isolates it.  It counts the CPU time (user +
system, every thread, from ``/proc/PID/stat``) each server spends ingesting the
same ``storescu`` run and divides by the number of instances, in interleaved
rounds (medians).  ``--fsync off`` (the default) runs Harmony with
``[storage.options] fsync = false`` and Orthanc with ``SyncStorageArea: false`` so
that waiting on the disk does not hide the CPU (the goal rows stay durable:
bench/ingest).

    .venv/bin/python bench/dimse/cstore_cpu.py [--instances 600] [--rounds 3] [--clients 1]
        [--fsync on|off] [--profile out.txt --format raw|flamegraph]   # profile: py-spy --gil, Harmony
        [--baseline DIR [--profile-baseline]]   # A/B: a build of another commit (pip install --target DIR)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parents[0] / "ingest"))

import run as ingest  # noqa: E402  (bench/ingest/run.py)
from tests.peers import Orthanc  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
PY_SPY = Path(sys.executable).with_name("py-spy")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process *pid* (all its threads) so far."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process *pid* so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def send(port: int, aet: str, data: Path, folders: list[Path] | None) -> float:
    if folders:
        return ingest.storescu_parallel(port, aet, folders)
    return ingest.storescu(port, aet, data)


def run_orthanc(tmp: Path, name: str, data: Path, folders, n: int, fsync: bool) -> tuple[float, float]:
    orthanc = Orthanc(tmp / name, extra_config={} if fsync else {"SyncStorageArea": False}).start()
    try:
        before = cpu_seconds(orthanc.proc.pid)
        seconds = send(orthanc.dicom_port, orthanc.aet, data, folders)
        cpu = cpu_seconds(orthanc.proc.pid) - before
        assert ingest.orthanc_count(orthanc) == n, "Orthanc stored every instance"
    finally:
        orthanc.stop()
    return seconds, cpu


def run_harmony(tmp: Path, name: str, data: Path, folders, n: int, fsync: bool, profile=None,
                pythonpath: str | None = None) -> tuple[float, float]:
    """*pythonpath*: run another build of Harmony (``pip install --target DIR``), for an A/B."""
    harmony = ingest.Harmony(tmp / name, "http://127.0.0.1:9", dimse=True, backend="archive")
    if not fsync:
        harmony.config.write_text(harmony.config.read_text().replace("[storage.options]",
                                                                     "[storage.options]\nfsync = false"))
    saved = os.environ.get("PYTHONPATH")
    if pythonpath:
        os.environ["PYTHONPATH"] = pythonpath   # the twistd process's environment (tests.peers.peer_env)
    try:
        harmony.start()
    finally:
        if pythonpath:
            os.environ.pop("PYTHONPATH") if saved is None else os.environ.__setitem__("PYTHONPATH", saved)
    spy = None
    try:
        if profile is not None:
            out, fmt = profile
            spy = subprocess.Popen([str(PY_SPY), "record", "-p", str(harmony.proc.pid), "-o", out, "-f", fmt,
                                    "-r", "250", "--gil"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # py-spy attached (a profile, not a measurement: no synchronisation relies on it)
        before = cpu_split(harmony.proc.pid)
        seconds = send(harmony.dimse_port, "HARMONY", data, folders)
        after = cpu_split(harmony.proc.pid)
        cpu = sum(after) - sum(before)
        print(f"    Harmony user {(after[0] - before[0]) / n * 1e3:.3f} + system {(after[1] - before[1]) / n * 1e3:.3f}"
              " ms/instance")
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
    finally:
        harmony.stop()
    assert harmony.indexed() == n, "Harmony indexed every instance"
    return seconds, cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=1, help="concurrent storescu associations")
    ap.add_argument("--fsync", choices=["on", "off"], default="off")
    ap.add_argument("--profile", help="py-spy --gil output of one extra Harmony round")
    ap.add_argument("--format", default="raw", choices=["raw", "flamegraph", "speedscope"])
    ap.add_argument("--harmony-only", action="store_true")
    ap.add_argument("--baseline", help="also run the Harmony build installed in this folder (pip install "
                                       "--target), interleaved: an A/B of a change")
    ap.add_argument("--profile-baseline", action="store_true", help="profile the --baseline build instead")
    args = ap.parse_args()
    fsync = args.fsync == "on"
    tmp = Path(tempfile.mkdtemp(prefix="bench-cstore-cpu-"))
    try:
        files = ingest.make_data(tmp / "data", args.instances, 0)
        n = len(files)
        folders = ingest.split_folder(files, tmp / "split", args.clients) if args.clients > 1 else None
        print(f"{n} instances, {args.clients} association(s), fsync {args.fsync}, "
              f"load {os.getloadavg()[0]:.1f}")
        rows: dict[str, list] = {"orthanc": [], "harmony": []}
        if args.baseline:
            rows["baseline"] = []
        for r in range(args.rounds):
            order = ["orthanc", "harmony"] + (["baseline"] if args.baseline else [])
            order = order[r % len(order):] + order[:r % len(order)]
            for who in order:
                if who == "orthanc" and args.harmony_only:
                    continue
                if who == "orthanc":
                    seconds, cpu = run_orthanc(tmp, f"{who}-{r}", tmp / "data", folders, n, fsync)
                else:
                    seconds, cpu = run_harmony(tmp, f"{who}-{r}", tmp / "data", folders, n, fsync,
                                               pythonpath=args.baseline if who == "baseline" else None)
                rows[who].append((seconds, cpu))
                print(f"  round {r} {who:<8} {n / seconds:7.1f} inst/s  CPU {cpu / n * 1e3:6.3f} ms/instance")
        for who, got in rows.items():
            if got:
                rate = statistics.median(n / s for s, _ in got)
                cpu = statistics.median(c / n * 1e3 for _, c in got)
                print(f"{who:<8} median {rate:7.1f} inst/s  CPU {cpu:6.3f} ms/instance")
        if rows["orthanc"] and rows["harmony"]:
            ratios = [o[0] / h[0] for o, h in zip(rows["orthanc"], rows["harmony"], strict=True)]
            print(f"rate ratio Harmony/Orthanc, median of rounds: {statistics.median(ratios):.2f}x "
                  f"({', '.join(f'{x:.2f}' for x in ratios)})")
        if args.profile:
            if not PY_SPY.exists():
                sys.exit(f"{PY_SPY} is missing: pip install py-spy into this venv")
            seconds, cpu = run_harmony(tmp, "harmony-profiled", tmp / "data", folders, n, fsync,
                                       profile=(args.profile, args.format),
                                       pythonpath=args.baseline if args.profile_baseline else None)
            print(f"profiled round: {n / seconds:.1f} inst/s, CPU {cpu / n * 1e3:.3f} ms/instance -> {args.profile}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
