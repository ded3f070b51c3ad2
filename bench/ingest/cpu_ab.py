#!/usr/bin/env python3
"""A/B of Harmony alone on an ingest row: CPU per instance (user and system, the whole
process, from /proc) and instances per second, this build against another ``src`` put first on
PYTHONPATH, a fresh process a round, the order alternating.

Why: with other people's suites on the two cores, ratios to Orthanc swing 2x per round; the CPU a
build spends per instance, next to another build in the same minutes, moves least.  No Orthanc.

    .venv/bin/python bench/ingest/cpu_ab.py /tmp/main/src [rounds=8] [instances=1100] [workload=stow]

*workload*: ``stow`` (STOW-RS, 4 connections, batches of 10), ``dimse1`` / ``dimse4`` (DCMTK
``storescu``, one association / four at once) or ``dimse4w2`` (four, ``[proxy] workers = 2``: CPU
of both processes).  The first 100 instances warm the process up and are not counted.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import run as ingest  # noqa: E402

other = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 8
n = int(sys.argv[3]) if len(sys.argv) > 3 else 1100
workload = sys.argv[4] if len(sys.argv) > 4 else "stow"
if workload not in ("stow", "dimse1", "dimse4", "dimse4w2"):
    sys.exit(f"unknown workload {workload!r}")
tmp = Path(tempfile.mkdtemp(prefix="ingest-abcpu-"))
files = ingest.make_data(tmp / "data", n, 0)
warm_folder, rest_folder = tmp / "warm", tmp / "rest"
ingest.split_folder(files[:100], warm_folder, 1)
parts = ingest.split_folder(files[100:], rest_folder, 1 if workload == "dimse1" else 4)


def send(h, first):
    """Seconds to send the warm-up (*first*) or the counted instances to Harmony *h*."""
    if workload == "stow":
        chosen = files[:100] if first else files[100:]
        return ingest.stow_all("127.0.0.1", h.http_port, "/archive-web/studies", chosen, 4, 10)
    if first:
        return ingest.storescu(h.dimse_port, "HARMONY", warm_folder / "0")
    return ingest.storescu_parallel(h.dimse_port, "HARMONY", parts)


def cpu(pids):
    """(user, system) seconds of the processes *pids* so far."""
    user = system = 0.0
    for pid in pids:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        user += int(f[11]) / os.sysconf("SC_CLK_TCK")
        system += int(f[12]) / os.sysconf("SC_CLK_TCK")
    return user, system


#: "main": the build on PYTHONPATH (usually main's src)
res: dict = {"this": [], "main": []}
rate: dict = {"this": [], "main": []}
try:
    for r in range(rounds):
        for who in (("this", "main") if r % 2 == 0 else ("main", "this")):
            h = ingest.Harmony(tmp / f"h-{who}-{r}", "http://127.0.0.1:9", dimse=True, backend="archive",
                               pythonpath=other if who == "main" else None,
                               workers=2 if workload == "dimse4w2" else 1)
            h.start()
            try:
                send(h, True)
                pids = [h.proc.pid] + ingest.children(h.proc.pid)
                a = cpu(pids)
                secs = send(h, False)
                b = cpu(pids)
            finally:
                h.stop()
            res[who].append(((b[0] - a[0]) * 1000 / (n - 100), (b[1] - a[1]) * 1000 / (n - 100)))
            rate[who].append((n - 100) / secs)
    for who in res:
        tot = [u + s for u, s in res[who]]
        user, system = statistics.median([u for u, _ in res[who]]), statistics.median([s for _, s in res[who]])
        print(f"{who}: CPU ms/inst median {statistics.median(tot):.3f} ({', '.join(f'{x:.2f}' for x in tot)}); "
              f"user {user:.3f}, sys {system:.3f}; inst/s median {statistics.median(rate[who]):.0f}")
finally:
    shutil.rmtree(tmp, ignore_errors=True)
