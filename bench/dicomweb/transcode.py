#!/usr/bin/env python3
"""WADO-RS decompression benchmark: Harmony's archive (dicomweb endpoint ->
dicomweb_bridge -> local_archive) next to Orthanc's DICOMweb plugin, same
compressed instances, same run (issue 12 defect 5).

    python bench/dicomweb/transcode.py [--instances 20] [--rows 512]

For each stored transfer syntax (JPEG-LS lossless, JPEG lossless SV1, RLE,
made by DCMTK from synthetic 16-bit CTs) it times sequential single-instance
retrieves with ``Accept: multipart/related; type="application/dicom"`` (no
transfer-syntax: the server decompresses to Explicit VR Little Endian) and,
for scale, ``transfer-syntax=*`` (as stored).  Figures: p50 per instance on
each side and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import free_port, harmony_config, start_harmony, stop  # noqa: E402
from tests.dicom_data import make_instance, save  # noqa: E402
from tests.dicomweb_helpers import ARCHIVE_BACKEND, bridge_pipeline  # noqa: E402
from tests.peers import Orthanc, peer_env  # noqa: E402

SYNTAXES = {"JPEG-LS lossless": ("dcmcjpls", []), "JPEG lossless SV1": ("dcmcjpeg", []), "RLE": ("dcmcrle", [])}
NO_SYNTAX = 'multipart/related; type="application/dicom"'
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def make(folder: Path, label: str, tool: str, options, count: int, rows: int, n0: int) -> list[tuple]:
    study = f"1.2.826.0.1.3680043.10.543.901.{n0}"
    out = []
    for n in range(count):
        ds = make_instance(patient_id="TRANSCODE", study_uid=study, series_uid=f"{study}.1",
                           sop_uid=f"{study}.1.{n + 1}", rows=rows, cols=rows, seed=n)
        raw = save(ds, folder / f"{n0}-{n}-raw.dcm")
        path = folder / f"{n0}-{n}.dcm"
        subprocess.run([f"/usr/bin/{tool}", *options, str(raw), str(path)], check=True, env=peer_env())
        out.append((path, study, f"{study}.1", f"{study}.1.{n + 1}"))
    return out


def stow(base: str, paths) -> None:
    boundary = "bench-transcode"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + Path(p).read_bytes()
                    + b"\r\n" for p in paths) + f"--{boundary}--\r\n".encode()
    r = requests.post(f"{base}/studies", data=body, timeout=120, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    r.raise_for_status()


def p50_ms(base: str, instances, accept: str, rounds: int) -> float:
    times = []
    with requests.Session() as s:
        for _ in range(rounds):
            for _path, study, series, sop in instances:
                started = time.perf_counter()
                r = s.get(f"{base}/studies/{study}/series/{series}/instances/{sop}", headers={"Accept": accept},
                          timeout=60)
                r.raise_for_status()
                times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=20)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-transcode-") as tmp:
        tmp = Path(tmp)
        made = {label: make(tmp, label, tool, opts, args.instances, args.rows, n0)
                for n0, (label, (tool, opts)) in enumerate(SYNTAXES.items())}
        orthanc = Orthanc(tmp / "orthanc").start()
        port = free_port()
        cfg = harmony_config(tmp / "harmony", port, ARCHIVE_BACKEND + bridge_pipeline("web", "archive", "/dicomweb"))
        proc = start_harmony(cfg, port)
        try:
            ours, theirs = f"http://127.0.0.1:{port}/dicomweb", orthanc.dicomweb_url
            for instances in made.values():
                stow(ours, [p for p, *_ in instances])
                orthanc.upload(p for p, *_ in instances)
            print(f"{args.instances} instances per syntax, {args.rows}x{args.rows} 16-bit CT, "
                  f"p50 of {args.rounds} sequential rounds")
            print(f"{'figure':48} {'harmony':>10} {'orthanc':>10} {'ratio':>8}")
            for label, instances in made.items():
                for what, accept in (("decompressed", NO_SYNTAX), ("as stored", AS_STORED)):
                    h = p50_ms(ours, instances, accept, args.rounds)
                    o = p50_ms(theirs, instances, accept, args.rounds)
                    print(f"{label + ', ' + what + ' (ms)':48} {h:10.2f} {o:10.2f} {h / o:7.2f}x")
        finally:
            stop(proc)
            orthanc.stop()


if __name__ == "__main__":
    main()
