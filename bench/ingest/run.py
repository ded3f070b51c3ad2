#!/usr/bin/env python3
"""Ingest benchmark: durable ingest into Harmony next to Orthanc and DCMTK, in one run.

Same synthetic data for every receiver (small CT-like instances plus a few
large ones), all on 127.0.0.1, TCP_NODELAY=1 for the peers:

The goal rows (issues 13 and 14) ingest durably into ``local_archive`` and run
``--rounds`` times, Orthanc and Harmony alternating (fresh folders each time),
reporting the median rate of each and the median of the per-round ratios:

- ``stow``: STOW-RS, ``--stow-batch`` instances per request, ``--clients``
  keep-alive clients: Harmony ``dicomweb`` -> ``dicomweb_bridge`` ->
  ``local_archive`` (each instance listed in ReferencedSOPSequence only after
  its durable commit) vs Orthanc's DICOMweb plugin STOW-RS.
- ``stow2`` (not in the default set): the same with ``[proxy] workers = --workers`` (2).
- ``dimse1``: DCMTK ``storescu`` (TCP_NODELAY=1), one association: Harmony
  ``dicom_scp`` -> ``local_archive`` vs Orthanc (and DCMTK ``storescp``, which
  writes files without fsync, once, for reference).
- ``dimse4``: the same files split over ``--clients`` concurrent associations; then again
  with ``workers = --workers`` (that row alone: ``dimse4w2``), printing how many of the
  associations each Harmony process served in every round.

Server CPU per instance counts every Harmony process (the main one and its workers).

Once each (``store_forward``, whose ingest is the same store write plus queue rows):

- ``http``: POST application/dicom, ``--clients`` keep-alive connections:
  Harmony ``http`` -> ``store_forward`` vs Orthanc's ``POST /instances``.
- ``drain``: instances queued while the target is down, then Orthanc comes up:
  instances/s delivered by ``store_forward`` through the ``http`` backend.

Durability on both sides: Harmony fsyncs each file, its folder entry and the
index commit (``synchronous=FULL``) before acknowledging (concurrent ingests
share the folder fsyncs and the commit: group commit).  Orthanc 1.10 runs with
its defaults (``SyncStorageArea`` true: it fsyncs each stored file; see
README.md for what its index does).

    .venv/bin/python bench/ingest/run.py [--small 600] [--large 0] [--clients 4] [--stow-batch 10]
        [--rounds 3] [--only stow,dimse1,dimse4,http,drain] [--workers 2] [--ab SRC]
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

from bench.common import children, cpu_seconds  # noqa: E402
from tests.dicomweb_helpers import bridge_pipeline, multipart  # noqa: E402
from tests.peers import DCMTK, Orthanc, free_port, peer_env, port_open, wait_for  # noqa: E402
from tests.sf_helpers import STOW_PIPELINE, HarmonyProcess, PortHold, dimse_toml, ingest_config, make_instances  # noqa: E402

#: Harmony's own archive as backend ``archive``, with STOW-RS in front at /archive-web.
ARCHIVE = """
[backends.archive]
service = "local_archive"
""" + bridge_pipeline("stow_archive", "archive", prefix="/archive-web")



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

    def __init__(self, folder: Path, orthanc_url: str, dimse: bool, backend: str = "sf", workers: int = 1,
                 pythonpath: str | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.workers = workers
        self.pythonpath = pythonpath
        self.http_port = free_port()
        self.dimse_port = free_port() if dimse else None
        super().__init__(folder, [p for p in (self.http_port, self.dimse_port) if p])
        dimse_part = dimse_toml(self.dimse_port, backend, "ORTHANC", 9) if dimse else ""
        extra = dimse_part + STOW_PIPELINE + ARCHIVE + DRAIN_CIRCUIT
        self.config.write_text(ingest_config(orthanc_url, port=self.http_port, min_free_mb=64, log_level="warn",
                                             extra=extra, sf_options=textwrap.dedent("""
                                                 backoff_initial_seconds = 0.2
                                                 backoff_max_seconds = 0.5
                                                 max_attempts = 1000000
                                                 concurrency = 8""")))
        if workers > 1:
            # Info level, to see the workers come up; nothing is logged per instance at info.
            text = self.config.read_text().replace('log_level = "warn"', f'log_level = "info"\nworkers = {workers}')
            self.config.write_text(text)

    def start(self):
        if self.pythonpath:  # --ab: this process runs the other build (read once, at its start)
            saved = os.environ.get("PYTHONPATH")
            os.environ["PYTHONPATH"] = self.pythonpath
            try:
                super().start()
            finally:
                if saved is None:
                    del os.environ["PYTHONPATH"]
                else:
                    os.environ["PYTHONPATH"] = saved
        else:
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

    def indexed(self) -> int:
        import sqlite3
        db = sqlite3.connect(self.folder / "store" / "index.sqlite", timeout=30)
        try:
            return db.execute("SELECT count(*) FROM instances").fetchone()[0]
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


#: ``--ab DIR``: another Harmony build (its ``src``, put first on PYTHONPATH) run in the
#: same rounds as a third contender, so a change is judged against the build before it
#: on the same machine at the same minute (set by main()).
AB_BUILD: str | None = None
#: Server CPU (utime + stime, every process of a contender) per instance, every round (printed by goal_rows).
CPU_MS: dict = {}
#: With workers: how many of the row's associations (HTTP connections) each Harmony process served, every round.
SPREAD: dict = {}


class ConnectionsPerProcess:
    """Which process holds each connection to *port* (``ss -tnp``, polled every 20 ms until the
    set has held still for :data:`SETTLED_POLLS` polls): with ``workers`` the kernel hands a
    connection to whichever process accepts.  The row's clients connect once, at its start.
    Polled all through the row (every 10 ms, as it was until session 10), ``ss -p`` - a walk of
    every process's descriptors, 100 times a second - took CPU from Harmony's workers rounds on
    the two shared cores, and only from theirs (Orthanc's rounds are not watched)."""

    SETTLED_POLLS = 10

    def __init__(self, port: int | None):
        self.port = port
        self.owner: dict[str, int] = {}
        self.counts: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if self.port is not None and shutil.which("ss"):
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        import re
        pattern = re.compile(r"127\.0\.0\.1:(\d+)\s+users:\(\(\"[^\"]*\",pid=(\d+)")
        still = 0
        while still < self.SETTLED_POLLS and not self._stop.wait(0.02):
            out = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{self.port} )"],
                                 capture_output=True, text=True).stdout
            before = dict(self.owner)
            for line in out.splitlines():
                m = pattern.search(line)
                if m:
                    self.owner[m.group(1)] = int(m.group(2))
            still = still + 1 if self.owner and self.owner == before else 0

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            per_pid: dict[int, int] = {}
            for pid in self.owner.values():
                per_pid[pid] = per_pid.get(pid, 0) + 1
            self.counts = sorted(per_pid.values(), reverse=True)
        return False


def interleaved(tmp: Path, name: str, rounds: int, orthanc_run, harmony_run, n: int, workers: int = 1,
                dimse_row: bool = False) -> tuple:
    """Run Orthanc and Harmony (``local_archive``) *rounds* times each, alternating which
    goes first, fresh folders every time; returns (orthanc seconds, harmony seconds, ratios).
    With ``--ab`` the other build runs in each round too (its times in ``CPU_MS["ab-seconds"]``)."""
    t_o, t_h, ratios = [], [], []
    CPU_MS.clear()
    SPREAD.clear()
    contenders = ("orthanc", "harmony") + (("ab",) if AB_BUILD else ())
    for r in range(rounds):
        pair = {}
        for who in (contenders if r % 2 == 0 else contenders[::-1]):
            if who == "orthanc":
                orthanc = Orthanc(tmp / f"orthanc-{name}-{r}").start()
                try:
                    cpu = cpu_seconds(orthanc.proc.pid)
                    pair[who] = orthanc_run(orthanc)
                    CPU_MS.setdefault(who, []).append((cpu_seconds(orthanc.proc.pid) - cpu) * 1000 / n)
                    assert orthanc_count(orthanc) == n, "Orthanc stored every instance"
                finally:
                    orthanc.stop()
            else:
                harmony = Harmony(tmp / f"harmony-{name}-{r}-{who}", "http://127.0.0.1:9", dimse=True,
                                  backend="archive", workers=workers, pythonpath=AB_BUILD if who == "ab" else None)
                harmony.start()
                try:
                    pids = [harmony.proc.pid] + children(harmony.proc.pid)  # the workers are up (start waits)
                    cpu = cpu_seconds(*pids)
                    watched = (harmony.dimse_port if dimse_row else harmony.http_port) if workers > 1 else None
                    with ConnectionsPerProcess(watched) as spread:
                        pair[who] = harmony_run(harmony)
                    CPU_MS.setdefault(who, []).append((cpu_seconds(*pids) - cpu) * 1000 / n)
                    if spread.counts:
                        SPREAD.setdefault(who, []).append(spread.counts)
                finally:
                    harmony.stop()
                assert harmony.indexed() == n, "Harmony indexed every instance"
        t_o.append(pair["orthanc"])
        t_h.append(pair["harmony"])
        ratios.append(pair["orthanc"] / pair["harmony"])
        if "ab" in pair:
            CPU_MS.setdefault("ab-seconds", []).append(pair["ab"])
            CPU_MS.setdefault("ab-ratios", []).append(pair["orthanc"] / pair["ab"])
    return t_o, t_h, ratios


def goal_rows(label: str, t_o, t_h, ratios, n, nbytes, goal: float):
    r_o = row("Orthanc " + label[0], statistics.median(t_o), n, nbytes)
    row("Harmony " + label[1], statistics.median(t_h), n, nbytes, r_o)
    ratio = statistics.median(ratios)
    print(f"  {'':<52} median of {len(ratios)} interleaved rounds: {ratio:.2f}x Orthanc "
          f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)}; goal >= {goal:.1f}x: "
          f"{'met' if ratio >= goal else 'MISSED'})")
    if "ab-seconds" in CPU_MS:
        ab = CPU_MS["ab-ratios"]
        row(f"Harmony, --ab build ({AB_BUILD})", statistics.median(CPU_MS["ab-seconds"]), n, nbytes, r_o)
        print(f"  {'':<52} --ab build: median {statistics.median(ab):.2f}x Orthanc "
              f"(rounds: {', '.join(f'{x:.2f}' for x in ab)})")
    for who, spreads in SPREAD.items():
        print(f"  {'':<52} {who}: connections per process, each round: "
              + ", ".join("+".join(str(c) for c in counts) for counts in spreads))
    # CPU per instance hardly moves with the machine's load, where inst/s does (2 shared cores).
    print(f"  {'':<52} server CPU ms/instance (median; rounds): " + "; ".join(
        f"{who} {statistics.median(v):.2f} ({', '.join(f'{x:.2f}' for x in v)})"
        for who, v in CPU_MS.items() if who in ("orthanc", "harmony", "ab")))


def cstore_goal(tmp: Path, name: str, rounds: int, send, n: int, nbytes: int, workers: int = 1):
    """A C-STORE goal row: ``send(port, called_aet)`` to Orthanc and to Harmony, interleaved."""
    t_o, t_h, ratios = interleaved(tmp, name, rounds, lambda o: send(o.dicom_port, o.aet),
                                   lambda h: send(h.dimse_port, "HARMONY"), n, workers, dimse_row=True)
    label = "dicom_scp -> local_archive" + (f", workers = {workers}" if workers > 1 else "")
    goal_rows(("C-STORE", label), t_o, t_h, ratios, n, nbytes, 1.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=600)
    ap.add_argument("--large", type=int, default=0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--stow-batch", type=int, default=10, help="instances per STOW-RS request")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each goal row")
    ap.add_argument("--only", default="stow,dimse1,dimse4,http,drain", help="sections to run (also: stow2 and "
                    "dimse4w2, the STOW-RS and 4-association rows alone with --workers; dimse4 runs both of its rows)")
    ap.add_argument("--workers", type=int, default=2, help="[proxy] workers of the stow2 and dimse4w2 rows")
    ap.add_argument("--ab", metavar="SRC", help="also run the Harmony whose package is in SRC (PYTHONPATH) "
                    "in every round of the goal rows, e.g. main's: git archive main src | tar -x -C /tmp/main")
    args = ap.parse_args()
    global AB_BUILD
    AB_BUILD = str(Path(args.ab).resolve()) if args.ab else None
    if AB_BUILD and not (Path(AB_BUILD) / "harmony" / "__init__.py").is_file():
        sys.exit(f"--ab {args.ab}: no harmony package there (PYTHONPATH would silently run this build)")
    only = set(args.only.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        data = tmp / "data"
        files = make_data(data, args.small, args.large)
        n = len(files)
        nbytes = sum(f.stat().st_size for f in files)
        print(f"data: {n} instances ({args.small} x 64x64, {args.large} x 512x512), {nbytes / 1e6:.1f} MB; "
              f"{os.cpu_count()} cores; load {os.getloadavg()[0]:.1f}")

        # stow2: the same row with two Harmony processes sharing the HTTP port (not the goal
        # row): Orthanc's own threads use both cores, one Harmony process's Python about one.
        for section, workers in (("stow", 1), ("stow2", args.workers)):
            if section not in only:
                continue
            label = "dicomweb -> bridge -> local_archive" + (f", workers = {workers}" if workers > 1 else "")
            print(f"\nSTOW-RS, {args.stow_batch} instances per request, {args.clients} keep-alive clients, "
                  f"durable, into local_archive" + (f", workers = {workers}" if workers > 1 else ""))
            t_o, t_h, ratios = interleaved(
                tmp, section, args.rounds,
                lambda o: stow_all("127.0.0.1", o.http_port, "/dicom-web/studies", files, args.clients,
                                   args.stow_batch),
                lambda h: stow_all("127.0.0.1", h.http_port, "/archive-web/studies", files, args.clients,
                                   args.stow_batch), n, workers=workers)
            goal_rows(("DICOMweb STOW-RS", label), t_o, t_h, ratios, n, nbytes, 1.0)

        if "dimse1" in only:
            print("\nDIMSE C-STORE, DCMTK storescu (TCP_NODELAY=1), one association, durable, into local_archive")
            scp_port = free_port()
            (tmp / "storescp").mkdir()
            # tests.peers.Storescp passes --uid-filenames, which DCMTK 3.6.7 does not have.
            scp = subprocess.Popen([DCMTK["storescp"], "--aetitle", "STORESCP", "-od", str(tmp / "storescp"),
                                    str(scp_port)], env=peer_env(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.STDOUT)
            try:
                wait_for(lambda: port_open(scp_port), 30, "storescp", scp)
                t_storescp = storescu(scp_port, "STORESCP", data)
            finally:
                scp.terminate()
                scp.wait(30)
            row("DCMTK storescp (files, no fsync; reference)", t_storescp, n, nbytes)
            cstore_goal(tmp, "dimse1", args.rounds, lambda port, aet: storescu(port, aet, data), n, nbytes)

        if "dimse4" in only:
            print(f"\nDIMSE C-STORE, DCMTK storescu, {args.clients} associations at once, durable, into local_archive")
            folders = split_folder(files, tmp / "split", args.clients)
            cstore_goal(tmp, "dimse4", args.rounds, lambda port, aet: storescu_parallel(port, aet, folders), n,
                        nbytes)
        if only & {"dimse4", "dimse4w2"}:
            print(f"\nDIMSE C-STORE, DCMTK storescu, {args.clients} associations at once, durable, into local_archive, "
                  f"workers = {args.workers}")
            folders = split_folder(files, tmp / "split-w", args.clients)
            cstore_goal(tmp, "dimse4w2", args.rounds, lambda port, aet: storescu_parallel(port, aet, folders), n,
                        nbytes, workers=args.workers)

        if "http" in only:
            print(f"\nHTTP POST application/dicom, {args.clients} keep-alive clients, into store_forward (one round)")
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

        if "drain" in only:
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
            row("store_forward -> http backend -> Orthanc", t_drain, n, nbytes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
