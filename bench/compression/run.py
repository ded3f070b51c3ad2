"""Does gzip toward the client pay for itself on loopback?  (issue 12, defect 2)

Harmony compresses the bodies it makes or rewrites (QIDO results, metadata,
FHIR Bundles) for clients that accept gzip (harmony.web.coding).  On a real
network that saves transfer time; on loopback the transfer is nearly free, so
the only question there is whether the CPU spent compressing costs more than
the bytes it saves.  This measures it next to Orthanc doing the same:

- Orthanc (DICOMweb plugin, HTTP compression on) holds one series of N
  instances; Harmony (twistd) proxies it (``dicomweb`` endpoint -> ``dicomweb``
  backend, every DICOM JSON answer rewritten) and holds the same series in
  its own archive (``dicomweb_bridge`` -> ``local_archive``, metadata cached).
- For series metadata and an instance-level QIDO, each is asked with
  ``Accept-Encoding: identity`` and ``gzip``: bytes on the wire, sequential
  latency (python requests, which inflates) and the server's CPU time per
  request (utime+stime from /proc: robust on a machine shared with other
  work, where wall-clock figures swing), optionally requests/s with wrk.
- Offline, on the very body Harmony sends: zlib levels 1/6/9 (compress and
  inflate MB/s, ratio) and the link speed below which each level saves time
  (saved bytes / (compress + inflate time)).

    .venv/bin/python bench/compression/run.py                 # 200 instances, ~1 min
    .venv/bin/python bench/compression/run.py --instances 50 --rounds 5   # smoke run
    .venv/bin/python bench/compression/run.py --seconds 5      # plus wrk -t1 -c4 req/s
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import WRK, free_port, harmony_config, require, start_harmony, stop, wrk  # noqa: E402
from tests.dicom_data import make_instance, save  # noqa: E402
from tests.dicomweb_helpers import bridge_pipeline, dicomweb_proxy_pipeline, multipart  # noqa: E402
from tests.peers import Orthanc  # noqa: E402

STUDY = "1.2.826.0.1.3680043.10.543.901.1"
#: Sent with every request: Harmony answers a loopback client plain (where gzip
#: only costs, as this bench shows); as relayed by a local proxy for a remote
#: client, it compresses - which is the cost measured here.
RELAYED = {"X-Forwarded-For": "198.51.100.7"}
SERIES = STUDY + ".1"


def make_series(folder: Path, count: int) -> list[Path]:
    """A CT series whose per-slice attributes vary as a scanner's do (position,
    slice location, times, windowing), so metadata compresses like real data
    rather than like copies of one header."""
    rng = random.Random(7)
    paths = []
    for n in range(1, count + 1):
        ds = make_instance(patient_id="BENCHGZ", study_uid=STUDY, series_uid=SERIES,
                           sop_uid=f"{SERIES}.{n}", instance_number=n, seed=n)
        scanner_like(ds, n, rng)
        paths.append(save(ds, folder / f"{n}.dcm"))
    return paths


def scanner_like(ds, n: int, rng: random.Random):
    """Give slice *n* the per-slice attributes a CT scanner varies."""
    z = -250.0 + n * 1.25
    ds.ImagePositionPatient = [f"{-175.0 + rng.random():.6f}", f"{-180.0 + rng.random():.6f}", f"{z:.2f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = f"{z:.2f}"
    ds.SliceThickness = "1.25"
    ds.PixelSpacing = ["0.683594", "0.683594"]
    ds.AcquisitionTime = f"1015{n % 60:02d}.{rng.randrange(10**6):06d}"
    ds.ContentTime = f"1016{n % 60:02d}.{rng.randrange(10**6):06d}"
    ds.WindowCenter = str(rng.choice((40, 50, 60, 400)))
    ds.WindowWidth = str(rng.choice((350, 400, 1500)))
    ds.KVP = "120"
    ds.XRayTubeCurrent = str(rng.randrange(100, 400))
    ds.Exposure = str(rng.randrange(50, 300))
    ds.CTDIvol = round(rng.uniform(5, 15), 4)
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = f"{rng.uniform(340, 360):.3f}"
    ds.ImageComments = f"slice {n} reconstructed {rng.randrange(10**9):09d}"


def config(folder: Path, port: int, orthanc: Orthanc) -> Path:
    """/dicomweb proxies Orthanc; /archive is Harmony's own archive (storage under *folder*)."""
    pipelines = (dicomweb_proxy_pipeline("proxy", "/dicomweb", orthanc.dicomweb_url)
                 + '\n[backends.archive]\nservice = "local_archive"\n'
                 + bridge_pipeline("archive", "archive", prefix="/archive"))
    return harmony_config(folder, port, pipelines, storage=True)


def wire_bytes(url: str, coding: str) -> tuple[int, bytes, str]:
    """(bytes on the wire, the decoded body, Content-Encoding) of one GET."""
    r = requests.get(url, headers={"Accept-Encoding": coding, **RELAYED}, stream=True, timeout=60)
    r.raise_for_status()
    raw = r.raw.read(decode_content=False)
    enc = r.headers.get("content-encoding", "identity")
    return len(raw), (gzip.decompress(raw) if enc == "gzip" else raw), enc


def cpu_seconds(pid: int) -> float:
    """utime + stime of *pid*: what a request cost the server, whatever else the machine runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latency(url: str, coding: str, rounds: int, pid: int) -> tuple[float, float]:
    """(p50 ms of GET + read + inflate (requests inflates), server CPU ms per request)."""
    s = requests.Session()
    times = []
    cpu = cpu_seconds(pid)
    for _ in range(rounds):
        t = time.perf_counter()
        r = s.get(url, headers={"Accept-Encoding": coding, **RELAYED}, timeout=60)
        r.raise_for_status()
        _ = r.content
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), (cpu_seconds(pid) - cpu) * 1000 / rounds


def rate(url: str, coding: str, seconds: int) -> float:
    if not seconds:
        return float("nan")
    return wrk(url, seconds, threads=1, connections=4,
               headers=[f"Accept-Encoding: {coding}", *(f"{k}: {v}" for k, v in RELAYED.items())])["rps"]


def stow(url: str, paths: list[Path]):
    body, ctype = multipart([p.read_bytes() for p in paths])
    requests.post(url, data=body, headers={"Content-Type": ctype}, timeout=300).raise_for_status()


def levels(body: bytes, rounds: int = 15) -> list[tuple]:
    """(level, ratio, compress MB/s, inflate MB/s, break-even link MB/s) per zlib
    level; best of *rounds* (on a shared machine the minimum is the cost, the
    rest is waiting for a core)."""
    out = []
    mb = len(body) / 1e6
    for level in (1, 6, 9):
        ct = dt = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            c = zlib.compressobj(level, zlib.DEFLATED, 31)
            packed = c.compress(body) + c.flush()
            ct = min(ct, time.perf_counter() - t)
            t = time.perf_counter()
            gzip.decompress(packed)
            dt = min(dt, time.perf_counter() - t)
        saved_mb = (len(body) - len(packed)) / 1e6
        out.append((level, len(body) / len(packed), mb / ct, mb / dt, saved_mb / (ct + dt)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=30, help="sequential requests per latency figure")
    ap.add_argument("--seconds", type=int, default=0,
                    help="wrk duration per throughput figure (0: none; Orthanc bounds them anyway)")
    args = ap.parse_args()
    if args.seconds:
        require(WRK, hint="apt-get install wrk")
    with tempfile.TemporaryDirectory(prefix="harmony-bench-gz-") as tmp:
        tmp = Path(tmp)
        print(f"making a series of {args.instances} instances...", flush=True)
        paths = make_series(tmp / "series", args.instances)
        orthanc = Orthanc(tmp / "orthanc", extra_config={"HttpCompressionEnabled": True}).start()
        harmony = None
        try:
            orthanc.upload(paths)
            port = free_port()
            harmony = start_harmony(config(tmp, port, orthanc), port, env={**os.environ, "TCP_NODELAY": "1"})
            ours, theirs = f"http://127.0.0.1:{port}/dicomweb", orthanc.dicomweb_url
            archive = f"http://127.0.0.1:{port}/archive"
            stow(archive + "/studies", paths)
            rows = []
            for label, path in (("series metadata", f"/studies/{STUDY}/series/{SERIES}/metadata"),
                                ("QIDO instances of the series", f"/studies/{STUDY}/series/{SERIES}/instances")):
                for side, base, pid in (("proxy", ours, harmony.pid), ("archive", archive, harmony.pid),
                                        ("orthanc", theirs, orthanc.proc.pid)):
                    url = base + path
                    latency(url, "gzip", 3, pid)  # warm up
                    fig = {}
                    for coding in ("identity", "gzip"):
                        size, body, enc = wire_bytes(url, coding)
                        fig[coding] = (size, enc, *latency(url, coding, args.rounds, pid),
                                       rate(url, coding, args.seconds))
                    rows.append((label, side, fig, body))
            print()
            print(f"{'answer':<30} {'side':<8} {'bytes id/gz':>19} {'ratio':>6} {'p50 ms id/gz':>15} "
                  f"{'server CPU ms id/gz':>20}" + (f" {'req/s id/gz':>13} {'gz/id':>6}" if args.seconds else ""))
            for label, side, fig, _ in rows:
                (si, _, li, ci, ri), (sg, eg, lg, cg, rg) = fig["identity"], fig["gzip"]
                print(f"{label:<30} {side:<8} {si:>9}/{sg:<9} {si / sg:>6.1f} {li:>7.2f}/{lg:<7.2f} "
                      f"{ci:>10.2f}/{cg:<9.2f}"
                      + (f" {ri:>6.0f}/{rg:<6.0f} {rg / ri:>5.2f}x" if args.seconds else "")
                      + ("" if eg == "gzip" else f"  ({eg})"))
            body = rows[0][3]
            print(f"\nzlib on Harmony's series metadata ({len(body) / 1e6:.2f} MB decoded), single core:")
            print(f"{'level':>5} {'ratio':>6} {'compress MB/s':>14} {'inflate MB/s':>13} {'pays below link MB/s':>21}")
            for level, ratio, cmbs, dmbs, even in levels(body):
                print(f"{level:>5} {ratio:>6.1f} {cmbs:>14.0f} {dmbs:>13.0f} {even:>21.0f}")
        finally:
            stop(harmony)
            orthanc.stop()


if __name__ == "__main__":
    main()
