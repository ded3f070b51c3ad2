#!/usr/bin/env python3
"""DIMSE benchmark: Harmony's SCP -> pipeline -> SCU against the peers it stands for.

In one run, with TCP_NODELAY on every peer:

1. C-ECHO and C-FIND latency (pynetdicom client, one association) through
   Harmony vs directly against Orthanc.
2. C-STORE ingest, 1,000 small instances over one association (DCMTK storescu),
   into Harmony's SCP vs DCMTK storescp vs Orthanc.
3. C-GET of a 200-instance study (DCMTK getscu) through Harmony vs directly,
   and Harmony's peak RSS after a 50-instance and after the 200-instance
   retrieve (memory must stay flat in study size).

Harmony runs as its own twistd process, as in production.  Usage:

    python bench/dimse/run.py [--quick] [--only latency] [--rounds N] [--profile FILE.svg] [--ab DIR]

``--only latency`` stops after the C-ECHO/C-FIND rows (and Harmony's CPU per
proxied C-FIND); ``--profile`` records Harmony with py-spy (installed in the
venv, not a dependency) during 3,000 extra proxied C-FINDs; ``--ab DIR`` runs a
second Harmony, the build installed in DIR (another commit's, ``pip install
--no-deps --target DIR .``), in the same interleaved rounds (latency rows only).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))


from tests.dicom_data import make_corpus, make_instance, save, uid  # noqa: E402
from bench.common import cpu_seconds, dicom_scp_endpoint, dicom_scu_backend, toml_table  # noqa: E402
from tests.peers import DCMTK, Orthanc, Storescp, free_port, peer_env, port_open, wait_for  # noqa: E402

BIN = Path(sys.executable).parent


def harmony_config(folder: Path, orthanc: Orthanc, scp_port: int, ingest_port: int) -> Path:
    (folder / "ingest").mkdir(parents=True, exist_ok=True)
    cfg = folder / "harmony.toml"
    cfg.write_text(textwrap.dedent(f"""
        [proxy]
        id = "bench"
        log_level = "warn"

        [storage.options]
        path = "{folder / 'var'}"

        """) + toml_table("pipelines.router", endpoints=["scp"], backends=["pacs"])
        + toml_table("pipelines.ingest", endpoints=["ingest"], backends=["pacs"])
        + dicom_scp_endpoint("scp", scp_port, enable_find=True, enable_get=True)
        + dicom_scp_endpoint("ingest", ingest_port, aet="INGEST", enable_store=True,
                             storage_dir=str(folder / "ingest"), forward_store=False)
        + dicom_scu_backend("pacs", orthanc.aet, orthanc.dicom_port))
    return cfg


def start_harmony(cfg: Path, *ports, pythonpath: str | None = None) -> subprocess.Popen:
    """Harmony under twistd on *cfg*; *pythonpath*: the Harmony build installed in that
    folder (``pip install --no-deps --target DIR``) instead of the venv's, for an A/B."""
    log = open(cfg.parent / "harmony.log", "wb")
    env = peer_env()
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.Popen([str(BIN / "twistd"), "-n", "--pidfile=", "harmony", "-c", str(cfg)],
                            cwd=cfg.parent, stdout=log, stderr=subprocess.STDOUT, env=env)
    for port in ports:
        wait_for(lambda: port_open(port), 30, "harmony", proc)
    return proc


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------- latency


def latencies(port: int, aet: str, n_echo: int, n_find: int) -> dict:
    """C-ECHO and C-FIND round trips on one association (bench/dimse/client.py)."""
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("client.py")), str(port), aet,
                          str(n_echo), str(n_find)], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"latency client against {aet} failed: {out.stderr[-1000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- store / get


def storescu(port: int, aet: str, folder: Path) -> float:
    t = time.perf_counter()
    r = subprocess.run([DCMTK["storescu"], "-aec", aet, "+sd", "-pdu", "131072", "127.0.0.1", str(port), str(folder)],
                       capture_output=True, env=peer_env())
    elapsed = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"storescu to {aet} failed: {r.stderr.decode(errors='replace')[-500:]}")
    return elapsed


def getscu(port: int, aet: str, out: Path, keys: list[str]) -> float:
    out.mkdir(parents=True, exist_ok=True)
    args = []
    for k in keys:
        args += ["-k", k]
    t = time.perf_counter()
    r = subprocess.run([DCMTK["getscu"], "-S", "-aet", "BENCH", "-aec", aet, "-od", str(out), "-pdu", "131072",
                        *args, "127.0.0.1", str(port)], capture_output=True, env=peer_env())
    elapsed = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"getscu from {aet} failed: {r.stderr.decode(errors='replace')[-500:]}")
    return elapsed


def make_big_study(folder: Path, n: int, side: int) -> list[Path]:
    paths = []
    per_series = max(1, n // 4)
    for i in range(n):
        s = i // per_series + 1
        ds = make_instance(patient_id="BENCH01", patient_name="BENCH^BIG", study_uid=uid(9, 1),
                           series_uid=uid(9, 1, s), sop_uid=uid(9, 1, s, i + 1), series_number=s,
                           instance_number=i + 1, rows=side, cols=side, seed=i)
        paths.append(save(ds, folder / f"{i:04d}.dcm"))
    return paths


def make_small(folder: Path, n: int) -> None:
    for i in range(n):
        ds = make_instance(patient_id="BENCH02", study_uid=uid(9, 2), series_uid=uid(9, 2, 1),
                           sop_uid=uid(9, 2, 1, i + 1), instance_number=i + 1, rows=8, cols=8, seed=i)
        save(ds, folder / f"{i:05d}.dcm")


ROUNDS = 3


def rounds_ms(values) -> str:
    return " ".join(f"{v * 1000:.2f}" for v in values)


def rounds_s(values) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def ratio(a: float, b: float) -> str:
    return f"{a / b:5.2f}x" if b else "  n/a"


def main() -> int:
    logging.basicConfig(level=logging.WARNING)  # pynetdicom reports association trouble through logging
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    ap.add_argument("--only", choices=("all", "latency"), default="all", help="latency: the C-ECHO/C-FIND rows only")
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved rounds (medians are reported)")
    ap.add_argument("--profile", metavar="FILE", help="py-spy flame graph of Harmony during 3,000 proxied C-FINDs")
    ap.add_argument("--ab", metavar="DIR", help="latency rows only: also run the Harmony build installed in DIR "
                                                "(pip install --no-deps --target DIR, e.g. main's), interleaved "
                                                "in the same rounds")
    args = ap.parse_args()
    if args.ab:
        args.only = "latency"
    n_echo, n_find, n_store, n_get, side = (300, 300, 1000, 200, 256) if not args.quick else (50, 20, 100, 40, 64)

    work = Path(tempfile.mkdtemp(prefix="harmony-bench-dimse-"))
    procs = []
    try:
        print(f"preparing data in {work} ...", flush=True)
        corpus = make_corpus(work / "corpus")
        big = make_big_study(work / "big", n_get, side) if args.only == "all" else []
        if args.only == "all":
            make_small(work / "small", n_store)

        orthanc = Orthanc(work / "orthanc").start()
        procs.append(orthanc)
        orthanc.upload([i.path for i in corpus] + big)
        for aet in ("BENCH", "HARMONY_SCU"):
            orthanc.add_modality(aet.lower(), aet, free_port())
        storescp = Storescp(work / "storescp-in").start()
        procs.append(storescp)

        scp_port, ingest_port = free_port(), free_port()
        harmony = start_harmony(harmony_config(work / "harmony", orthanc, scp_port, ingest_port),
                                scp_port, ingest_port)
        rss_start = rss_mb(harmony.pid)

        others = {}
        if args.ab:
            ab_port, ab_ingest = free_port(), free_port()
            others["A (--ab)"] = (start_harmony(harmony_config(work / "harmony-ab", orthanc, ab_port, ab_ingest),
                                                ab_port, ab_ingest, pythonpath=args.ab), ab_port)
            procs_ab = [others["A (--ab)"][0]]
        else:
            procs_ab = []
        runs = {"Harmony": (harmony, scp_port), **others}

        print(f"\n== latency (bench/dimse/client.py, one association, TCP_NODELAY; {args.rounds} interleaved rounds;"
              f" load {os.getloadavg()[0]:.1f}) ==")
        for _proc, port in runs.values():
            latencies(port, "HARMONY", 10, 20)  # warm Harmony's association pool
        direct = {"echo": [], "find": []}
        proxied = {who: {"echo": [], "find": []} for who in runs}
        cpu = {who: [] for who in runs}
        n_cpu = 1000 if not args.quick else 200
        for r in range(args.rounds):
            order = list(runs)
            order = order[r % len(order):] + order[:r % len(order)]
            d = latencies(orthanc.dicom_port, orthanc.aet, n_echo, n_find)
            for op in ("echo", "find"):
                direct[op].append(statistics.median(d[op]))
            for who in order:
                proc, port = runs[who]
                p = latencies(port, "HARMONY", n_echo, 0)
                before = cpu_seconds(proc.pid)
                p["find"] = (found := latencies(port, "HARMONY", 0, n_find))["find"]
                cpu[who].append((cpu_seconds(proc.pid) - before) / n_find)
                p["matches"] = found["matches"]
                assert p["matches"] == d["matches"], (p["matches"], d["matches"])
                matches = p["matches"]
                for op in ("echo", "find"):
                    proxied[who][op].append(statistics.median(p[op]))
        for op, goal in (("echo", "<= 1.5x"), ("find", "<= 1.3x")):
            d = statistics.median(direct[op])
            print(f"C-{op.upper():4s} direct Orthanc : p50 {d * 1000:6.2f} ms  (per round {rounds_ms(direct[op])})")
            for who in runs:
                p = statistics.median(proxied[who][op])
                ratios = [a / b for a, b in zip(proxied[who][op], direct[op], strict=True)]
                print(f"C-{op.upper():4s} via {who:11s}: p50 {p * 1000:6.2f} ms  (per round {rounds_ms(proxied[who][op])})"
                      f"   ratio {ratio(p, d)} (median of rounds {statistics.median(ratios):.2f}x; goal {goal})")
        print(f"(C-FIND at STUDY level, {matches} matches; C-ECHO is answered by Harmony itself)")
        for who in runs:
            print(f"{who} CPU per proxied C-FIND (user + system, its association's set-up included): median "
                  f"{statistics.median(cpu[who]) * 1000:.3f} ms (rounds {rounds_ms(cpu[who])})")
        for proc in procs_ab:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        before = cpu_seconds(harmony.pid)
        latencies(scp_port, "HARMONY", 0, n_cpu)
        print(f"Harmony CPU per proxied C-FIND: {(cpu_seconds(harmony.pid) - before) / n_cpu * 1000:.3f} ms "
              f"(user + system over {n_cpu} C-FINDs)")
        if args.profile:
            spy = subprocess.Popen([str(BIN / "py-spy"), "record", "--pid", str(harmony.pid), "-o", args.profile,
                                    "--rate", "1000", "--gil", "--nonblocking"] +
                                   (["--format", "raw"] if args.profile.endswith(".txt") else []),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
            latencies(scp_port, "HARMONY", 0, 3000)
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
            print(f"py-spy profile of 3,000 proxied C-FINDs: {args.profile}")
        if args.only == "latency":
            return 0

        print(f"\n== C-STORE ingest: {n_store} small instances, one association (DCMTK storescu) ==")
        small = work / "small"
        t_storescp = storescu(storescp.port, storescp.aet, small)
        t_harmony = storescu(ingest_port, "INGEST", small)
        t_orthanc = storescu(orthanc.dicom_port, orthanc.aet, small)
        stored = sum(1 for _ in (work / "harmony" / "ingest").rglob("*.dcm"))
        assert stored == n_store, stored
        for name, t in (("DCMTK storescp", t_storescp), ("Harmony SCP (durable)", t_harmony),
                        ("Orthanc", t_orthanc)):
            print(f"{name:22s}: {n_store / t:8.1f} inst/s  ({t:6.2f} s)")
        print(f"Harmony / storescp: {t_storescp / t_harmony * 100:5.1f}% (goal >= 50%);"
              f"  Harmony / Orthanc: {t_orthanc / t_harmony * 100:5.1f}%")

        print(f"\n== C-GET: study of {n_get} instances ({side}x{side} 16-bit) (DCMTK getscu) ==")
        per_series = max(1, n_get // 4)
        series_keys = ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={uid(9, 1)}",
                       f"SeriesInstanceUID={uid(9, 1, 1)}"]
        study_keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid(9, 1)}"]
        getscu(scp_port, "HARMONY", work / "warm", series_keys)  # warm the association pool
        rss_warm = peak_rss_mb(harmony.pid)
        t_series = getscu(scp_port, "HARMONY", work / "get-series", series_keys)
        rss_series = peak_rss_mb(harmony.pid)
        directs, proxieds = [], []
        for _ in range(ROUNDS):
            for folder in ("get-direct", "get-proxied"):
                shutil.rmtree(work / folder, ignore_errors=True)
            directs.append(getscu(orthanc.dicom_port, orthanc.aet, work / "get-direct", study_keys))
            proxieds.append(getscu(scp_port, "HARMONY", work / "get-proxied", study_keys))
        t_direct, t_proxied = statistics.median(directs), statistics.median(proxieds)
        rss_study = peak_rss_mb(harmony.pid)
        got_direct = sorted(p.name for p in (work / "get-direct").iterdir())
        got_proxied = sorted(p.name for p in (work / "get-proxied").iterdir())
        assert got_direct == got_proxied and len(got_direct) == n_get, (len(got_direct), len(got_proxied))
        same = all((work / "get-direct" / n).read_bytes() == (work / "get-proxied" / n).read_bytes()
                   for n in got_direct)
        size_mb = sum(p.stat().st_size for p in (work / "get-direct").iterdir()) / 1e6
        print(f"direct Orthanc : {t_direct:6.2f} s  ({n_get / t_direct:7.1f} inst/s, {size_mb / t_direct:6.1f} MB/s)")
        print(f"via Harmony    : {t_proxied:6.2f} s  ({n_get / t_proxied:7.1f} inst/s, {size_mb / t_proxied:6.1f} MB/s)"
              f"   ratio {ratio(t_proxied, t_direct)} (goal <= 2x)")
        print(f"(median of {ROUNDS} interleaved rounds: direct {rounds_s(directs)}; via Harmony {rounds_s(proxieds)})")
        print(f"files byte-identical to direct: {same}")
        print(f"Harmony RSS: start {rss_start:.0f} MB; peak after warm-up {rss_warm:.0f} MB, "
              f"after {per_series}-instance series {rss_series:.0f} MB ({t_series:.2f} s), "
              f"after {n_get}-instance study ({size_mb:.0f} MB) {rss_study:.0f} MB")
        print(f"memory growth from {per_series} to {n_get} instances: {rss_study - rss_series:+.1f} MB "
              f"(flat means independent of study size)")
        return 0
    finally:
        for p in locals().get("procs", []):
            p.stop()
        h = locals().get("harmony")
        if h is not None and h.poll() is None:
            h.send_signal(signal.SIGTERM)
            try:
                h.wait(30)
            except subprocess.TimeoutExpired:
                h.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
