#!/usr/bin/env python3
"""De-identification benchmark: Harmony's engine next to dicognito on the same files, in one run,
and the latency the ``deidentify`` middleware adds to a C-STORE forward.

1. Engine throughput, one thread, each tool reading the Part-10 file, de-identifying it and writing
   the result to memory: dicognito 0.19 (``Anonymizer.anonymize``) vs Harmony's
   ``deidentify_file`` (basic profile; and with Retain Longitudinal Modified Dates + Clean
   Descriptors, which adds the date shift and free-text cleaning).  Rounds alternate between the
   tools; the best round of each is reported (the machine is shared).
2. C-STORE forward: DCMTK ``storescu`` (one association) -> Harmony ``dicom_scp`` -> ``dicom_scu`` ->
   DCMTK ``storescp``, with and without ``deidentify`` in the pipeline; milliseconds per instance
   (each C-STORE is answered only after the forward), and the difference.

    .venv/bin/python bench/deidentify/run.py [--small 300] [--large 20] [--rounds 3] [--forward 200]
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pydicom import dcmread  # noqa: E402

from harmony.deid import Deidentifier, Keyring, Profile, ProfileOptions, generate_secret_file  # noqa: E402
from harmony.deid.files import deidentify_file  # noqa: E402
from harmony.deid.pixels import PixelPolicy  # noqa: E402
from tests.deid.synthetic import full_instance  # noqa: E402
from tests.peers import DCMTK, Storescp, free_port, peer_env  # noqa: E402
from tests.sf_helpers import HarmonyProcess, dimse_toml, make_instances  # noqa: E402


def make_data(folder: Path, small: int, large: int) -> list[Path]:
    files = make_instances(folder, small, 91, patient_id="BENCH", size=128) + \
        make_instances(folder, large, 92, patient_id="BENCH", size=512)
    for i in range(max(1, small // 50)):  # a few heavily annotated headers (every table attribute)
        ds = full_instance(uid_seed=f".{i}")
        path = folder / f"full-{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def time_dicognito(files) -> float:
    from dicognito.anonymizer import Anonymizer
    anonymizer = Anonymizer(seed="bench")
    start = time.perf_counter()
    for f in files:
        ds = dcmread(f)
        anonymizer.anonymize(ds)
        ds.save_as(io.BytesIO(), enforce_file_format=True)
    return time.perf_counter() - start


def time_harmony(files, options: ProfileOptions) -> float:
    deid = Deidentifier(Profile(options), Keyring(b"bench-secret-0123456789abcdef"))
    policy = PixelPolicy()
    start = time.perf_counter()
    for f in files:
        deidentify_file(deid, policy, f, io.BytesIO())
    return time.perf_counter() - start


def throughput(files, rounds: int):
    runs = {"dicognito": [], "harmony basic": [], "harmony +dates +descriptors": []}
    for _ in range(rounds):
        runs["dicognito"].append(time_dicognito(files))
        runs["harmony basic"].append(time_harmony(files, ProfileOptions()))
        runs["harmony +dates +descriptors"].append(
            time_harmony(files, ProfileOptions(retain_long_modified_dates=True, clean_descriptors=True)))
    n = len(files)
    base = n / min(runs["dicognito"])
    print(f"\nEngine throughput, {n} files, one thread, best of {rounds} (ratio = Harmony / dicognito)")
    for name, secs in runs.items():
        rate = n / min(secs)
        print(f"  {name:40s} {rate:8.1f} inst/s   {'-' if name == 'dicognito' else f'{rate / base:.2f}x'}")


DEID = """
[proxy]
id = "bench-deid"
log_level = "warn"

[middleware.deid]
service = "deidentify"
[middleware.deid.options]
secret_file = "deid.key"
"""


def forward_config(scp_port: int, sink_port: int, deidentify: bool) -> str:
    """storescu -> dicom_scp (HARMONY) -> [deidentify] -> dicom_scu ``pacs`` -> the sink."""
    pipeline = dimse_toml(scp_port, "pacs", "STORESCP", sink_port)
    if deidentify:
        pipeline = pipeline.replace('backends = ["pacs"]', 'middleware = ["deid"]\nbackends = ["pacs"]', 1)
    return DEID + pipeline


def forward_latency(work: Path, files, rounds: int):
    sink = Storescp(work / "sink").start()
    results = {}
    try:
        for label, deidentify in (("forward", False), ("forward + deidentify", True)):
            folder = work / label.replace(" ", "").replace("+", "_")
            folder.mkdir()
            generate_secret_file(folder / "deid.key")
            scp_port = free_port()
            (folder / "harmony.toml").write_text(forward_config(scp_port, sink.port, deidentify))
            harmony = HarmonyProcess(folder, ports=[scp_port]).start()
            try:
                best = None
                for _ in range(rounds):
                    start = time.perf_counter()
                    r = subprocess.run([DCMTK["storescu"], "-aec", "HARMONY", "127.0.0.1", str(scp_port),
                                        *map(str, files)], capture_output=True, env=peer_env())
                    secs = time.perf_counter() - start
                    if r.returncode != 0:
                        sys.exit(f"storescu failed: {r.stderr.decode()[-500:]}")
                    best = secs if best is None else min(best, secs)
                results[label] = best * 1000 / len(files)
            finally:
                harmony.stop()
    finally:
        sink.stop()
    print(f"\nC-STORE forward, storescu -> Harmony dicom_scp -> dicom_scu -> storescp, {len(files)} instances "
          f"on one association, best of {rounds}")
    for label, ms in results.items():
        print(f"  {label:40s} {ms:8.2f} ms/instance")
    print(f"  {'added by deidentify':40s} {results['forward + deidentify'] - results['forward']:8.2f} ms/instance")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=300)
    ap.add_argument("--large", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--forward", type=int, default=200, help="instances for the forward-latency run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-deid-") as tmp:
        work = Path(tmp)
        files = make_data(work / "data", args.small, args.large)
        throughput(files, args.rounds)
        forward_latency(work, [f for f in files if "full-" not in f.name][:args.forward], max(1, args.rounds - 1))


if __name__ == "__main__":
    main()
