#!/usr/bin/env python3
"""Ingest benchmark: durable ingest into Harmony next to Orthanc and DCMTK, in one run.

Same synthetic data for every receiver (small CT-like instances plus a few
large ones), all on 127.0.0.1, TCP_NODELAY=1 for the peers:

1. HTTP Part-10 ingest (POST application/dicom, ``--clients`` keep-alive
   connections): Harmony ``http`` endpoint -> ``store_forward`` (fsync on,
   acknowledged after the durable write + queue row) vs Orthanc's
   ``POST /instances``.
   STOW-RS ingest (``--stow-batch`` instances per request, same clients):
   Harmony ``dicomweb`` endpoint -> ``dicomweb_bridge`` -> ``store_forward``
   (each instance listed in ReferencedSOPSequence after its durable write) vs
   Orthanc's DICOMweb plugin STOW-RS.
2. DIMSE C-STORE ingest (DCMTK ``storescu``, one association): Harmony's
   ``dicom_scp`` -> ``store_forward`` (when this build has ``dicom_scp``) vs
   DCMTK ``storescp`` (writes files, no fsync) vs Orthanc.
3. Queue drain: instances queued while the target is down, then Orthanc comes
   up: instances/s delivered by ``store_forward`` through the ``http`` backend.

Prints instances/s, MB/s, and Harmony's ratio to each peer.

    .venv/bin/python bench/ingest/run.py [--small 1000] [--large 20] [--clients 4] [--stow-batch 10]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.peers import DCMTK, Orthanc, free_port, peer_env, port_open, wait_for  # noqa: E402
from tests.dicomweb_helpers import multipart  # noqa: E402
from tests.sf_helpers import (STOW_PIPELINE, HarmonyProcess, PortHold, dimse_toml, ingest_config,  # noqa: E402
                              make_instances)



def make_data(folder: Path, small: int, large: int) -> list[Path]:
    return (make_instances(folder, small, 77, patient_id="BENCH", size=64)
            + make_instances(folder, large, 78, patient_id="BENCH", size=512))


def post_all(host: str, port: int, path: str, files: list[Path], clients: int) -> float:
    """POST every file (keep-alive, *clients* connections); returns seconds."""
    return post_bodies(host, port, path, [f.read_bytes() for f in files], "application/dicom", clients)


def stow_all(host: str, port: int, path: str, files: list[Path], clients: int, batch: int) -> float:
    """STOW-RS every file, *batch* instances per request; returns seconds."""
    body_of = []
    for i in range(0, len(files), batch):
        body, ctype = multipart([f.read_bytes() for f in files[i:i + batch]])
        body_of.append(body)
    return post_bodies(host, port, path, body_of, ctype, clients, accept="application/dicom+json")


def post_bodies(host, port, path, bodies, content_type, clients, accept="*/*") -> float:
    shares = [bodies[i::clients] for i in range(clients)]
    errors = []

    def worker(share):
        conn = http.client.HTTPConnection(host, port, timeout=120)
        for body in share:
            conn.request("POST", path, body, {"Content-Type": content_type, "Accept": accept})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                errors.append(r.status)
        conn.close()

    threads = [threading.Thread(target=worker, args=(s,)) for s in shares]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} failed POSTs, e.g. HTTP {errors[0]}")
    return elapsed


def storescu(port: int, aet: str, folder: Path) -> float:
    started = time.perf_counter()
    subprocess.run([DCMTK["storescu"], "-aec", aet, "+sd", "-nh", "127.0.0.1", str(port), str(folder)],
                   check=True, capture_output=True, env=peer_env())
    return time.perf_counter() - started


def storescu_parallel(port: int, aet: str, folders: list[Path]) -> float:
    """One storescu per folder, all at once (one association each); wall time of the slowest."""
    started = time.perf_counter()
    procs = [subprocess.Popen([DCMTK["storescu"], "-aec", aet, "+sd", "-nh", "127.0.0.1", str(port), str(f)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=peer_env()) for f in folders]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"storescu to {aet} failed: {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - started


def split_folder(files: list[Path], into: Path, parts: int) -> list[Path]:
    """*files* hard-linked into *parts* folders, round robin (for one association per folder)."""
    folders = [into / str(i) for i in range(parts)]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        os.link(f, folders[i % parts] / f.name)
    return folders


#: The forward target's circuit breaker (docs/targets.md) opens during the outage and would
#: hold deliveries for its default 30 s after Orthanc is back; the drain measures delivery.
DRAIN_CIRCUIT = """
[backends.orthanc.circuit]
open_secs = 0.5
"""


class Harmony(HarmonyProcess):
    """Harmony under twistd: HTTP ingest (and C-STORE when this build has dicom_scp) -> store_forward."""

    def __init__(self, folder: Path, orthanc_url: str, dimse: bool, workers: int = 1):
        folder.mkdir(parents=True, exist_ok=True)
        self.workers = workers
        self.http_port = free_port()
        self.dimse_port = free_port() if dimse else None
        super().__init__(folder, [p for p in (self.http_port, self.dimse_port) if p])
        dimse_part = dimse_toml(self.dimse_port, "sf", "ORTHANC", 9) if dimse else ""
        self.config.write_text(ingest_config(orthanc_url, port=self.http_port, min_free_mb=64, log_level="warn",
                                             extra=dimse_part + STOW_PIPELINE + DRAIN_CIRCUIT, sf_options=textwrap.dedent("""
                                                 backoff_initial_seconds = 0.2
                                                 backoff_max_seconds = 0.5
                                                 max_attempts = 1000000
                                                 concurrency = 8""")))
        if workers > 1:
            # Info level, to see the workers come up; nothing is logged per instance at info.
            text = self.config.read_text().replace('log_level = "warn"', f'log_level = "info"\nworkers = {workers}')
            self.config.write_text(text)

    def start(self):
        super().start()
        if self.workers > 1:
            log = self.folder / f"twistd-{self.starts}.log"
            wait_for(lambda: log.read_text(errors="replace").count(") serving ") >= self.workers - 1, 60,
                     "every worker serving", self.proc)
        return self

    def count(self, state: str) -> int:
        import sqlite3
        db = sqlite3.connect(self.folder / "store" / "index.sqlite", timeout=30)
        try:
            return db.execute("SELECT count(*) FROM queue WHERE state=?", (state,)).fetchone()[0]
        finally:
            db.close()

    def delivered(self) -> int:
        return self.count("delivered")

    def dead(self) -> int:
        return self.count("dead")


def orthanc_count(orthanc: Orthanc) -> int:
    with urllib.request.urlopen(f"{orthanc.url}/statistics", timeout=30) as r:
        return json.loads(r.read())["CountInstances"]


def row(name, seconds, n, nbytes, ref=None):
    rate = n / seconds
    mbs = nbytes / seconds / 1e6
    ratio = f"{rate / ref:6.2f}x" if ref else "      -"
    print(f"  {name:<52} {rate:9.1f} inst/s {mbs:8.1f} MB/s  {ratio}")
    return rate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=20)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--stow-batch", type=int, default=10, help="instances per STOW-RS request")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the 4-association C-STORE rows")
    ap.add_argument("--only", default="http,stow,dimse,dimse4,drain",
                    help="comma-separated sections to run (default: all)")
    args = ap.parse_args()
    sections = set(args.only.split(","))
    from harmony.registry import BUILTIN
    have_scp = "dicom_scp" in BUILTIN["endpoint"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        data = tmp / "data"
        files = make_data(data, args.small, args.large)
        n = len(files)
        nbytes = sum(f.stat().st_size for f in files)
        print(f"data: {n} instances ({args.small} x 64x64, {args.large} x 512x512), {nbytes / 1e6:.1f} MB; "
              f"{os.cpu_count()} cores")

        if "http" in sections:
            # --- HTTP Part-10 ingest
            print(f"\nHTTP POST application/dicom, {args.clients} keep-alive clients (ratio = Harmony / peer)")
            orthanc = Orthanc(tmp / "orthanc-http").start()
            down = PortHold(free_port())  # the forward target is down: this measures ingest only
            harmony = Harmony(tmp / "harmony-http", f"http://127.0.0.1:{down.port}", dimse=False)
            harmony.start()
            try:
                t_orthanc = post_all("127.0.0.1", orthanc.http_port, "/instances", files, args.clients)
                t_harmony = post_all("127.0.0.1", harmony.http_port, "/ingest", files, args.clients)
            finally:
                harmony.stop()
                down.release()
                orthanc.stop()
            r_orthanc = row("Orthanc POST /instances", t_orthanc, n, nbytes)
            row("Harmony http -> store_forward (fsync)", t_harmony, n, nbytes, r_orthanc)

        if "stow" in sections:
            # --- STOW-RS ingest
            print(f"\nSTOW-RS, {args.stow_batch} instances per request, {args.clients} keep-alive clients "
                  f"(ratio = Harmony / peer)")
            orthanc = Orthanc(tmp / "orthanc-stow").start()
            down = PortHold(free_port())
            harmony = Harmony(tmp / "harmony-stow", f"http://127.0.0.1:{down.port}", dimse=False)
            harmony.start()
            try:
                t_orthanc_stow = stow_all("127.0.0.1", orthanc.http_port, "/dicom-web/studies", files, args.clients,
                                          args.stow_batch)
                t_harmony_stow = stow_all("127.0.0.1", harmony.http_port, "/dicomweb/studies", files, args.clients,
                                          args.stow_batch)
                assert harmony.count("pending") == n, "every STOW instance is queued"
            finally:
                harmony.stop()
                down.release()
                orthanc.stop()
            r_orthanc_stow = row("Orthanc DICOMweb STOW-RS", t_orthanc_stow, n, nbytes)
            row("Harmony dicomweb -> bridge -> store_forward (fsync)", t_harmony_stow, n, nbytes, r_orthanc_stow)

        if "dimse" in sections:
            # --- DIMSE C-STORE ingest
            print("\nDIMSE C-STORE, DCMTK storescu, one association (ratio = Harmony / peer)")
            scp_port = free_port()
            (tmp / "storescp").mkdir()
            # tests.peers.Storescp passes --uid-filenames, which DCMTK 3.6.7 does not have.
            scp = subprocess.Popen([DCMTK["storescp"], "--aetitle", "STORESCP", "-od", str(tmp / "storescp"),
                                    str(scp_port)], env=peer_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            try:
                wait_for(lambda: port_open(scp_port), 30, "storescp", scp)
                t_storescp = storescu(scp_port, "STORESCP", data)
            finally:
                scp.terminate()
                scp.wait(30)
            orthanc = Orthanc(tmp / "orthanc-dimse").start()
            try:
                t_orthanc_dimse = storescu(orthanc.dicom_port, orthanc.aet, data)
            finally:
                orthanc.stop()
            r_scp = row("DCMTK storescp (files, no fsync)", t_storescp, n, nbytes)
            r_odimse = row("Orthanc C-STORE", t_orthanc_dimse, n, nbytes)
            if have_scp:
                harmony = Harmony(tmp / "harmony-dimse", "http://127.0.0.1:9", dimse=True)
                harmony.start()
                try:
                    t_h = storescu(harmony.dimse_port, "HARMONY", data)
                finally:
                    harmony.stop()
                rate = row("Harmony dicom_scp -> store_forward (fsync)", t_h, n, nbytes, r_scp)
                print(f"  {'':<52} vs Orthanc: {rate / r_odimse:.2f}x")

        if "dimse4" in sections:
            print(f"\nDIMSE C-STORE, DCMTK storescu, {args.clients} associations at once, median of {args.rounds} "
                  f"interleaved round(s) (ratio = Harmony / peer)")
            folders = split_folder(files, tmp / "split", args.clients)
            times: dict[str, list[float]] = {"orthanc": [], "w1": [], "w2": []}
            for r in range(args.rounds):
                orthanc = Orthanc(tmp / f"orthanc-dimse4-{r}").start()
                try:
                    times["orthanc"].append(storescu_parallel(orthanc.dicom_port, orthanc.aet, folders))
                finally:
                    orthanc.stop()
                if not have_scp:
                    continue
                for key, workers in (("w1", 1), ("w2", 2)):
                    harmony = Harmony(tmp / f"harmony-dimse4-{key}-{r}", "http://127.0.0.1:9", dimse=True,
                                      workers=workers)
                    harmony.start()
                    try:
                        times[key].append(storescu_parallel(harmony.dimse_port, "HARMONY", folders))
                        queued = sum(harmony.count(state) for state in ("pending", "delivering", "delivered", "dead"))
                        assert queued == n, f"{queued} queue rows for {n} instances"
                    finally:
                        harmony.stop()
            r_o4 = row("Orthanc C-STORE", statistics.median(times["orthanc"]), n, nbytes)
            if have_scp:
                row("Harmony dicom_scp -> store_forward (fsync)", statistics.median(times["w1"]), n, nbytes, r_o4)
                row("Harmony dicom_scp, workers = 2 (fsync)", statistics.median(times["w2"]), n, nbytes, r_o4)
            else:
                print("  Harmony dicom_scp: not in this build (issue 4); HTTP ingest above covers the store path")

        if "drain" in sections:
            # --- queue drain
            print("\nQueue drain: instances queued while Orthanc is down, then delivered by store_forward")
            orthanc = Orthanc(tmp / "orthanc-drain")
            hold = PortHold(orthanc.http_port)
            harmony = Harmony(tmp / "harmony-drain", orthanc.url, dimse=False)
            harmony.start()
            try:
                post_all("127.0.0.1", harmony.http_port, "/ingest", files, args.clients)
                hold.release()
                orthanc.start()
                started = time.perf_counter()
                wait_for(lambda: harmony.delivered() >= n or harmony.dead(), 600, "queue drained")
                assert not harmony.dead(), "dead letters: see the twistd log"
                t_drain = time.perf_counter() - started
                assert orthanc_count(orthanc) == n
            finally:
                harmony.stop()
                orthanc.stop()
            r_drain = row("store_forward -> http backend -> Orthanc", t_drain, n, nbytes)
            if "http" in sections:
                print(f"  {'':<52} vs Orthanc's own HTTP ingest: {r_drain / r_orthanc:.2f}x")

    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
