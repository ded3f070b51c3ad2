#!/usr/bin/env python3
"""Harmony serving from its own archive next to Orthanc's native DICOMweb, same files, same run.

    python bench/archive/run.py [--instances 200] [--rows 256] [--rounds 15]
    python bench/archive/run.py --profile wado     # py-spy record a loop of one workload (see README)

Harmony runs under twistd with the default ``etc/`` archive pipeline (``dicomweb``
endpoint -> ``dicomweb_bridge`` -> ``local_archive``, sqlite index); Orthanc 1.10
with its DICOMweb plugin (``StudiesMetadata``/``SeriesMetadata`` = Full, HTTP
compression on, as shipped).  Both hold the same synthetic study (pydicom, CT
slices whose per-slice attributes vary as a scanner's do).

Each round asks every workload of both servers once (the study search five
times, alternating: ``REPEATS``), alternating who goes first, so both see the
same machine load; the figures are medians over the samples and the ratio is
Harmony / Orthanc (for MB/s: Harmony's share of Orthanc's).  ``--gc-stats``
also counts Harmony's garbage collections while the rounds run (gcstats/).
Metadata is measured uncached on both sides: Harmony's bridge runs with
``metadata_cache_secs = 0`` here (its default caches for 5 minutes), Orthanc
1.10's plugin has no cache.

Accept-Encoding variants: ``identity``; ``gzip`` from loopback (what a browser
or python requests on the same host sends: Harmony answers plain there, see
harmony.web.coding); ``gzip`` relayed (``X-Forwarded-For``, as a local reverse
proxy for a remote client: Harmony compresses).  Orthanc compresses whenever
asked.  Time is GET + read + inflate (requests inflates), as a client sees it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import cpu_seconds, free_port, harmony_config, start_harmony, stop  # noqa: E402
from bench.compression.run import scanner_like  # noqa: E402
from tests.dicom_data import make_instance, save  # noqa: E402
from tests.dicomweb_helpers import multipart  # noqa: E402
from tests.peers import Orthanc  # noqa: E402

STUDY = "1.2.826.0.1.3680043.10.543.902.1"
PATIENT = "BENCHAR"
SERIES = (STUDY + ".1", STUDY + ".2")
DICOM_ALL = 'multipart/related; type="application/dicom"; transfer-syntax=*'
JSON = "application/dicom+json"
RELAYED = {"X-Forwarded-For": "198.51.100.7"}
#: (label, request headers added): the Accept-Encoding variants.
CODINGS = {
    "identity": {"Accept-Encoding": "identity"},
    "gzip": {"Accept-Encoding": "gzip"},
    "gzip relayed": {"Accept-Encoding": "gzip", **RELAYED},
}


def make_study(folder: Path, count: int, rows: int) -> list[Path]:
    """Two CT series of *rows* x *rows* 16-bit slices with per-slice varying
    position, times and windowing (bench/compression's shape), so metadata and
    QIDO answers are as varied as a scanner's."""
    rng = random.Random(7)
    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(1, count + 1):
        series = SERIES[n % 2]
        ds = make_instance(patient_id=PATIENT, study_uid=STUDY, series_uid=series, sop_uid=f"{series}.{n}",
                           series_number=n % 2 + 1, instance_number=n, rows=rows, cols=rows, seed=n)
        scanner_like(ds, n, rng)
        paths.append(save(ds, folder / f"{n}.dcm"))
    return paths


def config(folder: Path, port: int) -> Path:
    """etc/pipelines/archive.toml's ``archive_web`` pipeline (the DIMSE SCP left
    out: its fixed port is not needed here), storage under *folder*."""
    return harmony_config(folder, port, """
[pipelines.archive_web]
networks = ["default"]
endpoints = ["archive_web"]
middleware = ["archive_bridge"]
backends = ["archive"]

[endpoints.archive_web]
service = "dicomweb"
[endpoints.archive_web.options]
path_prefix = "/dicomweb"

[middleware.archive_bridge]
type = "dicomweb_bridge"
[middleware.archive_bridge.options]
metadata_cache_secs = 0

[backends.archive]
service = "local_archive"
""", storage=True)


# ------------------------------------------------------------------ workloads
# Each takes (session, base URL, extra headers) and returns (seconds, decoded bytes, wire coding).


def _get(s, url, headers, accept, params=None):
    t = time.perf_counter()
    r = s.get(url, headers={"Accept": accept, **headers}, params=params, timeout=120)
    body = r.content
    elapsed = time.perf_counter() - t
    if r.status_code != 200:
        raise RuntimeError(f"{url} answered {r.status_code}: {body[:300]!r}")
    return elapsed, body, r.headers.get("Content-Encoding", "identity")


def _workload(path: str, accept: str, params=None):
    def run(s, base, headers):
        t, body, enc = _get(s, base + path, headers, accept, params)
        return t, len(body), enc
    return run


wado = _workload(f"/studies/{STUDY}", DICOM_ALL)
qido_instances = _workload(f"/studies/{STUDY}/instances", JSON)
qido_studies = _workload("/studies", JSON, {"PatientID": PATIENT})
series_metadata = _workload(f"/studies/{STUDY}/series/{SERIES[0]}/metadata", JSON)
study_metadata = _workload(f"/studies/{STUDY}/metadata", JSON)


def wado_curl(_s, base, headers):
    """The same retrieve by curl into /dev/null, timed by curl itself: a
    client that costs next to nothing, so the figure is the server's (python
    requests parsing 26 MB bounds both servers alike and pulls ratios to 1)."""
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", "--compressed"
            if headers.get("Accept-Encoding") == "gzip" else "--no-compressed", "-H", f"Accept: {DICOM_ALL}"]
    for k, v in headers.items():
        argv += ["-H", f"{k}: {v}"]
    out = subprocess.run([*argv, f"{base}/studies/{STUDY}"], capture_output=True, text=True, check=True).stdout
    size, seconds = out.split()
    return float(seconds), int(size), "n/a"


WORKLOADS = {"wado": wado, "wado-curl": wado_curl, "qido-instances": qido_instances, "qido-studies": qido_studies,
             "series-metadata": series_metadata, "study-metadata": study_metadata}

#: (row label, workload, goal (ratio), higher is better, codings measured)
ROWS = [
    ("WADO-RS study retrieve (MB/s)", wado, 1.0, True, ("identity", "gzip")),
    ("  the same, curl as the client (MB/s)", wado_curl, 1.0, True, ("identity",)),
    ("QIDO-RS instances of the study, p50 (ms)", qido_instances, 1.0, False, tuple(CODINGS)),
    ("QIDO-RS study search, p50 (ms)", qido_studies, 0.8, False, ("identity", "gzip")),
    ("series metadata, uncached, p50 (ms)", series_metadata, 1.0, False, tuple(CODINGS)),
    ("study metadata, uncached, p50 (ms)", study_metadata, 1.0, False, tuple(CODINGS)),
]


#: Samples per round and side: a 3-8 ms answer's median over one sample a round
#: was mostly this machine's scheduling noise (0.46-1.12x over runs).
REPEATS = {qido_studies: 5}


def check_same_data(harmony: str, orthanc: str, count: int):
    """Both sides hold the whole study (else the ratios compare different work)."""
    s = requests.Session()
    for base in (harmony, orthanc):
        got = s.get(f"{base}/studies/{STUDY}/instances", headers={"Accept": JSON}, timeout=60).json()
        if len(got) != count:
            raise RuntimeError(f"{base} holds {len(got)} instances of the study, not {count}")


def measure(bases: dict, rounds: int, pids: dict, only=None) -> dict:
    """{(row, coding, side): [(seconds, bytes, wire coding, cpu seconds)]}, interleaved.
    *bases*: side -> base URL ("harmony", "orthanc", and "copy" with ``--ab-copy``)."""
    sessions = {side: requests.Session() for side in bases}
    out: dict = {}
    for n in range(rounds + 1):  # round 0 warms up (connections, page cache, Orthanc's cache)
        order = tuple(bases) if n % 2 else tuple(reversed(bases))
        for label, fn, _goal, _higher, codings in ROWS:
            if only and fn not in only:
                continue
            for coding in codings:
                for _ in range(REPEATS.get(fn, 1)):
                    for side in order:
                        cpu = cpu_seconds(pids[side])
                        t, size, enc = fn(sessions[side], bases[side], CODINGS[coding])
                        cpu = cpu_seconds(pids[side]) - cpu
                        if n:
                            out.setdefault((label, coding, side), []).append((t, size, enc, cpu))
    return out


def report(results: dict, count: int, mb: float):
    print(f"\n{count} instances, {mb:.1f} MB; medians of interleaved rounds; CPU = server utime+stime per "
          "request, mean over the rounds\n")
    ab = any(side == "copy" for _l, _c, side in results)
    print(f"{'workload':42} {'Accept-Encoding':14} {'harmony':>9} {'orthanc':>9} {'ratio':>7} {'goal':>7}"
          f"  {'CPU ms h/o':>13}  wire h/o" + ("     B (--ab build, or the copy path): ratio, CPU ms" if ab else ""))
    for label, _fn, goal, higher, codings in ROWS:
        for coding in codings:
            if (label, coding, "harmony") not in results:
                continue
            h, o = results[(label, coding, "harmony")], results[(label, coding, "orthanc")]
            if higher:
                hv = statistics.median(size / t / 1e6 for t, size, *_ in h)
                ov = statistics.median(size / t / 1e6 for t, size, *_ in o)
                ratio, ok = hv / ov, hv / ov >= goal
                want = f">={goal:.1f}x"
            else:
                hv = statistics.median(t for t, *_ in h) * 1000
                ov = statistics.median(t for t, *_ in o) * 1000
                ratio, ok = hv / ov, hv / ov <= goal
                want = f"<={goal:.1f}x"
            # CPU is read in clock ticks (10 ms): the mean over rounds resolves finer than any one request.
            cpu = (statistics.fmean(c for *_, c in h) * 1000, statistics.fmean(c for *_, c in o) * 1000)
            extra = ""
            c = results.get((label, coding, "copy"))
            if c:  # --ab's build, or this one with HARMONY_SENDFILE=0, measured in the same rounds
                cv = (statistics.median(size / t / 1e6 for t, size, *_ in c) if higher
                      else statistics.median(t for t, *_ in c) * 1000)
                extra = f"     {cv / ov:6.2f}x {statistics.fmean(x for *_, x in c) * 1000:6.1f}"
            print(f"{label:42} {coding:14} {hv:9.2f} {ov:9.2f} {ratio:6.2f}x {want:>7}{'' if ok else '!'}"
                  f"  {cpu[0]:6.1f}/{cpu[1]:<6.1f}  {h[0][2]}/{o[0][2]}{extra}")


def load(harmony: str, paths: list[Path], batch: int = 20):
    s = requests.Session()
    for i in range(0, len(paths), batch):
        body, ctype = multipart([p.read_bytes() for p in paths[i:i + batch]])
        s.post(f"{harmony}/studies", data=body, headers={"Content-Type": ctype}, timeout=300).raise_for_status()


def profile(harmony_pid: int, harmony: str, workload: str, seconds: int, out: Path):
    """py-spy (not a dependency: ``pip install py-spy`` into the venv) samples
    Harmony while one workload runs in a loop; writes *out* (flame graph SVG)."""
    fn = WORKLOADS[workload]
    spy = Path(sys.executable).parent / "py-spy"
    gil = os.environ.get("PYSPY_GIL") == "1"
    rec = subprocess.Popen([str(spy), "record", "-p", str(harmony_pid), "-o", str(out), "-d", str(seconds),
                            "-r", "200", "--nonblocking", *(["--gil"] if gil else []),
                            # .txt: collapsed stacks (grep-able), else a flame graph
                            "--format", "raw" if out.suffix == ".txt" else "flamegraph"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    s = requests.Session()
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline and rec.poll() is None:
        fn(s, harmony, CODINGS[os.environ.get("PROFILE_CODING", "identity")])
        n += 1
    rec.wait()
    print(f"{n} requests of {workload} profiled -> {out}")


def gc_stats(pid: int, out: Path, timeout: float = 30.0) -> dict:
    """Harmony's collections since the last call (gcstats/sitecustomize.py
    writes them to *out* on SIGUSR2 and starts counting again)."""
    out.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while not out.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("Harmony wrote no gc counts (run with --gc-stats from the start?)")
        time.sleep(0.05)
    return json.loads(out.read_text())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--rows", type=int, default=256, help="image size (rows = cols, 16-bit)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--profile", choices=tuple(WORKLOADS))
    ap.add_argument("--only", action="append", choices=tuple(WORKLOADS), help="measure only these workloads")
    ap.add_argument("--raw", action="store_true", help="also print every round's ms/CPU ms")
    ap.add_argument("--gc-stats", action="store_true",
                    help="count Harmony's garbage collections while measuring (bench/archive/gcstats)")
    ap.add_argument("--profile-seconds", type=int, default=15)
    ap.add_argument("--profile-out", type=Path, default=None)
    ap.add_argument("--ab-copy", action="store_true",
                    help="also run a second Harmony with HARMONY_SENDFILE=0 (the copying path) in the same rounds")
    ap.add_argument("--ab", type=Path, metavar="SRC",
                    help="also run a second Harmony importing harmony from SRC (e.g. main's src/, exported with "
                         "git archive) in the same rounds, shown in the B column")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="harmony-bench-archive-") as tmp:
        tmp = Path(tmp)
        print(f"making {args.instances} instances ({args.rows}x{args.rows}, 16-bit)...", flush=True)
        paths = make_study(tmp / "study", args.instances, args.rows)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        orthanc = Orthanc(tmp / "orthanc", extra_config={"HttpCompressionEnabled": True}).start()
        proc = copy = None
        try:
            port = free_port()
            env = None
            if args.gc_stats:
                env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent / "gcstats"),
                       "HARMONY_GC_STATS_OUT": str(tmp / "gc.json")}
            proc = start_harmony(config(tmp, port), port, env=env)
            harmony = f"http://127.0.0.1:{port}/dicomweb"
            print("loading both...", flush=True)
            orthanc.upload(paths)
            load(harmony, paths)
            check_same_data(harmony, orthanc.dicomweb_url, args.instances)
            bases = {"harmony": harmony, "orthanc": orthanc.dicomweb_url}
            pids = {"harmony": proc.pid, "orthanc": orthanc.proc.pid}
            if args.ab_copy or args.ab:
                (tmp / "copy").mkdir()
                copy_port = free_port()
                b_env = ({"PYTHONPATH": str(args.ab.resolve())} if args.ab else {"HARMONY_SENDFILE": "0"})
                copy = start_harmony(config(tmp / "copy", copy_port), copy_port, env={**(env or os.environ), **b_env})
                bases["copy"] = f"http://127.0.0.1:{copy_port}/dicomweb"
                pids["copy"] = copy.pid
                load(bases["copy"], paths)
            if args.profile:
                out = args.profile_out or ROOT / "bench" / "archive" / f"flame-{args.profile}.svg"
                profile(proc.pid, harmony, args.profile, args.profile_seconds, out)
                return
            if args.gc_stats:
                gc_stats(proc.pid, tmp / "gc.json")  # count from here: loading is not what is measured
            results = measure(bases, args.rounds, pids, [WORKLOADS[w] for w in args.only or ()])
            report(results, args.instances, mb)
            if args.raw:
                for (label, coding, side), got in sorted(results.items()):
                    print(f"{label:42} {coding:14} {side:8}", " ".join(f"{t * 1000:.1f}/{c * 1000:.0f}"
                                                                         for t, _s, _e, c in got))
            if args.gc_stats:
                stats = gc_stats(proc.pid, tmp / "gc.json")
                freeze = os.environ.get("HARMONY_GC_FREEZE", "1")
                print(f"\nHarmony's garbage collections while measuring (HARMONY_GC_FREEZE={freeze}, "
                      f"{stats['frozen']} objects frozen):")
                for gen, g in stats["generations"].items():
                    print(f"  generation {gen}: {g['collections']:6d} collections, {g['ms']:8.1f} ms in all, "
                          f"longest {g['max_ms']:.1f} ms")
        finally:
            stop(copy)
            stop(proc)
            orthanc.stop()


if __name__ == "__main__":
    main()
