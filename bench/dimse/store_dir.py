#!/usr/bin/env python3
"""C-STORE into ``dicom_scp`` with ``storage_dir`` next to DCMTK ``storescp``:
one association (DCMTK ``storescu``), rounds interleaved, medians compared.

The row of issue 13 with the goal Harmony >= 0.5x storescp.  Harmony runs
under twistd with a store-only ``dicom_scp`` (``forward_store = false``): each
instance is validated and durable (journaled, harmony.storage.journal) before
Success; storescp writes its files without syncing.  Every round sends each
receiver instances it has not seen (new UIDs), as a modality would: a re-sent
instance replaces an existing file, which is a different (slower) path.

``--ab SRC`` runs a second Harmony importing harmony from *SRC* (e.g. main's
``src/``, exported with ``git archive``) in the same rounds.  ``--profile FILE``
records the Harmony process with py-spy (raw collapsed stacks, ``--idle``, or
``--gil`` with ``--gil``) during the first Harmony round (py-spy is not a dependency: ``pip install
py-spy`` into the venv).  ``--strace`` counts and times the flushes of one
Harmony round (``strace -f -T``): syscalls per instance and their p50.

    python bench/dimse/store_dir.py [--instances 1000] [--rounds 3] [--ab SRC] [--profile out.txt [--gil]] [--strace]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.common import cpu_seconds  # noqa: E402
from run import BIN, storescu  # noqa: E402
from tests.dicom_data import make_instance, save, uid  # noqa: E402
from tests.peers import Storescp, free_port, peer_env, port_open, wait_for  # noqa: E402

TRACED = ("fdatasync", "fsync", "syncfs", "pwritev2", "pwrite64", "write", "link", "rename", "openat", "read", "close",
          "unlink", "newfstatat", "statx", "futex", "sendto", "recvfrom", "epoll_wait", "epoll_ctl", "getpid", "mkdir")


def config(folder: Path, port: int) -> Path:
    folder.mkdir(parents=True)
    cfg = folder / "harmony.toml"
    cfg.write_text(textwrap.dedent(f"""
        [proxy]
        id = "bench-store-dir"
        log_level = "warn"
        [network.default.http]
        bind_address = "127.0.0.1"
        bind_port = {free_port()}
        [pipelines.ingest]
        endpoints = ["ingest"]
        backends = ["unused"]
        [backends.unused]
        service = "echo"
        [endpoints.ingest]
        service = "dicom_scp"
        [endpoints.ingest.options]
        local_aet = "INGEST"
        bind_addr = "127.0.0.1"
        port = {port}
        enable_store = true
        storage_dir = "{folder / 'ingest'}"
        forward_store = false
        max_pdu_size = 0
        """))
    return cfg


def make_round(folder: Path, n: int, tag: int) -> Path:
    """*n* small instances (8x8 pixels, ~0.9 KB) of a study nobody has received yet."""
    for i in range(n):
        ds = make_instance(patient_id="BENCH02", study_uid=uid(9, 3, tag), series_uid=uid(9, 3, tag, 1),
                           sop_uid=uid(9, 3, tag, 1, i + 1), instance_number=i + 1, rows=8, cols=8, seed=i)
        save(ds, folder / f"{i:05d}.dcm")
    return folder


def start_harmony(cfg: Path, port: int, src: Path | None = None) -> subprocess.Popen:
    env = peer_env() if src is None else {**peer_env(), "PYTHONPATH": str(src.resolve())}
    log = open(cfg.parent / "harmony.log", "wb")
    proc = subprocess.Popen([str(BIN / "twistd"), "-n", "--pidfile=", "harmony", "-c", str(cfg)],
                            cwd=cfg.parent, stdout=log, stderr=subprocess.STDOUT, env=env)
    wait_for(lambda: port_open(port), 30, "harmony", proc)
    return proc


def user_seconds(pid: int) -> float:
    """The user-mode part of :func:`bench.common.cpu_seconds` (the rest is the kernel's: syncs, writes)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK")


def strace_summary(trace: Path, n: int) -> str:
    """Calls per instance and their p50 (strace -f -T -y), from a trace of *n*
    instances; syncs of the journal (its log, or the sqlite WAL of earlier
    builds: waited for before Success) apart from the others (behind it)."""
    calls = collections.defaultdict(list)
    pending: dict[str, str] = {}
    for line in trace.read_text(errors="replace").splitlines():
        pid = line.split(" ", 1)[0]
        m = re.match(r"\d+\s+(\w+)\((\d+<([^>]*)>)?", line)
        if "<unfinished ...>" in line:
            if m:
                pending[pid] = _call_name(m.group(1), m.group(3))
            continue
        resumed = re.match(r"\d+\s+<\.\.\. (\w+) resumed>.*<([\d.]+)>$", line)
        if resumed:
            calls[pending.pop(pid, resumed.group(1))].append(float(resumed.group(2)))
            continue
        took = re.search(r"<([\d.]+)>$", line)
        if m and took:
            calls[_call_name(m.group(1), m.group(3))].append(float(took.group(1)))
    out = []
    for name in sorted(calls, key=lambda c: (c.split()[0] not in SYNCS, c)):
        v = sorted(calls[name])
        out.append(f"    {name:28s} {len(v) / n:5.2f} per instance, p50 {statistics.median(v) * 1000:6.3f} ms, "
                   f"p90 {v[int(len(v) * 0.9)] * 1000:6.3f} ms")
    return "\n".join(out)


#: Calls that flush: the log's ``pwritev2`` carries ``RWF_DSYNC`` (its write and data sync in one call).
SYNCS = ("fdatasync", "fsync", "syncfs", "pwritev2")


def _call_name(call: str, path: str | None) -> str:
    if call in SYNCS and path:
        waited = call != "syncfs" and path.endswith((".log", "-wal"))   # a syncfs is through the log's fd, behind
        return f"{call} (journal, waited)" if waited else f"{call} (behind)"
    return call


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ab", type=Path, metavar="SRC", help="also a Harmony importing harmony from SRC, same rounds")
    ap.add_argument("--profile", help="py-spy raw output file for the first Harmony round")
    ap.add_argument("--gil", action="store_true", help="--profile samples only the thread holding the GIL")
    ap.add_argument("--strace", action="store_true", help="strace -f -T the flushes of Harmony's last round")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="harmony-bench-store-dir-"))
    storescp = None
    harmonies: dict[str, subprocess.Popen] = {}
    try:
        storescp = Storescp(work / "storescp-in").start()
        ports = {}
        for name, src in (("A", None), ("B", args.ab)):
            if name == "B" and src is None:
                continue
            ports[name] = free_port()
            harmonies[name] = start_harmony(config(work / f"harmony-{name}", ports[name]), ports[name], src)
        times: dict[str, list[float]] = {"storescp": [], **{name: [] for name in harmonies}}
        cpu: dict[str, list[float]] = {name: [] for name in harmonies}  # Harmony's CPU seconds a round
        user: dict[str, list[float]] = {name: [] for name in harmonies}  # ... of it in user mode
        tag = 0
        for r in range(args.rounds):
            order = ["storescp", *harmonies] if r % 2 == 0 else [*reversed(harmonies), "storescp"]
            for side in order:
                tag += 1
                files = make_round(work / f"send-{tag}", args.instances, tag)
                if side == "storescp":
                    times[side].append(storescu(storescp.port, storescp.aet, files))
                    continue
                spy = trace = None
                if args.profile and r == 0 and side == "A":
                    mode = "--gil" if args.gil else "--idle"
                    spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", mode,
                                            "--format", "raw", "-r", "200", "-o", args.profile, "-p",
                                            str(harmonies[side].pid)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if args.strace and r == args.rounds - 1:
                    trace = work / f"strace-{side}.txt"
                    spy = subprocess.Popen(["strace", "-f", "-T", "-y", "-e", "trace=" + ",".join(TRACED), "-o",
                                            str(trace), "-p", str(harmonies[side].pid)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                    spy.stderr.readline()  # "Process N attached" (strace says so once it is attached)
                before, user_before = cpu_seconds(harmonies[side].pid), user_seconds(harmonies[side].pid)
                times[side].append(storescu(ports[side], "INGEST", files))
                cpu[side].append(cpu_seconds(harmonies[side].pid) - before)
                user[side].append(user_seconds(harmonies[side].pid) - user_before)
                if spy is not None:
                    spy.send_signal(2)
                    spy.wait(60)
                if trace is not None:
                    print(f"  strace of Harmony {side}, round {r + 1} ({args.instances / times[side][-1]:.0f} inst/s "
                          f"under strace):\n{strace_summary(trace, args.instances)}")
                shutil.rmtree(files)
        for name in harmonies:
            stored = sum(1 for _ in (work / f"harmony-{name}" / "ingest").rglob("*.dcm"))
            assert stored == args.instances * args.rounds, stored
        n = args.instances
        scp = statistics.median(times["storescp"])
        print(f"C-STORE, {n} new small instances a round, one association, median of {args.rounds} "
              f"interleaved rounds (load {os.getloadavg()[0]:.1f})")
        print(f"  DCMTK storescp (no sync)        {n / scp:8.1f} inst/s   "
              f"rounds {[round(n / t) for t in times['storescp']]}")
        for name in harmonies:
            har = statistics.median(times[name])
            label = "Harmony dicom_scp storage_dir" if name == "A" else f"  B ({args.ab})"
            print(f"  {label:30s}  {n / har:8.1f} inst/s   rounds {[round(n / t) for t in times[name]]}   "
                  f"ratio {scp / har:.2f}x (goal >= 0.5x); CPU {statistics.median(cpu[name]) / n * 1000:.2f} ms "
                  f"an instance (rounds {[round(c / n * 1000, 2) for c in cpu[name]]}; user "
                  f"{statistics.median(user[name]) / n * 1000:.2f} ms)")
    finally:
        for proc in harmonies.values():
            proc.terminate()
            proc.wait(60)
        if storescp is not None:
            storescp.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
