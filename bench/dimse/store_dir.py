#!/usr/bin/env python3
"""C-STORE into ``dicom_scp`` with ``storage_dir`` next to DCMTK ``storescp``:
one association (DCMTK ``storescu``), rounds interleaved, medians compared.

The row of issue 13 with the goal Harmony >= 0.5x storescp.  Harmony runs
under twistd with a store-only ``dicom_scp`` (``forward_store = false``): each
instance is validated, fdatasync'ed, renamed into ``storage_dir`` and its
folder fsync'ed before Success; storescp writes its files without syncing.
``--profile FILE`` records the Harmony process with py-spy (raw collapsed
stacks, ``--idle``) during the first Harmony round (py-spy is not a
dependency: ``pip install py-spy`` into the venv).

    python bench/dimse/store_dir.py [--instances 1000] [--rounds 3] [--profile out.txt]
"""

from __future__ import annotations

import argparse
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

from run import make_small, start_harmony, storescu  # noqa: E402

from tests.peers import Storescp, free_port, port_open, wait_for  # noqa: E402


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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", help="py-spy raw output file for the first Harmony round")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="harmony-bench-store-dir-"))
    storescp = harmony = None
    try:
        make_small(work / "small", args.instances)
        storescp = Storescp(work / "storescp-in").start()
        port = free_port()
        harmony = start_harmony(config(work / "harmony", port), port)
        wait_for(lambda: port_open(port), 30, "harmony", harmony)
        t_scp, t_harmony = [], []
        for r in range(args.rounds):
            t_scp.append(storescu(storescp.port, storescp.aet, work / "small"))
            spy = None
            if args.profile and r == 0:
                spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--idle",
                                        "--format", "raw", "-r", "200", "-o", args.profile, "-p", str(harmony.pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            t_harmony.append(storescu(port, "INGEST", work / "small"))
            if spy is not None:
                spy.send_signal(2)
                spy.wait(60)
        stored = sum(1 for _ in (work / "harmony" / "ingest").rglob("*.dcm"))
        assert stored == args.instances, stored
        n = args.instances
        scp, har = statistics.median(t_scp), statistics.median(t_harmony)
        print(f"C-STORE, {n} small instances, one association, median of {args.rounds} interleaved rounds")
        print(f"  DCMTK storescp (no sync)        {n / scp:8.1f} inst/s   rounds {[round(n / t) for t in t_scp]}")
        print(f"  Harmony dicom_scp storage_dir   {n / har:8.1f} inst/s   rounds {[round(n / t) for t in t_harmony]}")
        print(f"  ratio {scp / har:.2f}x (goal >= 0.5x)")
    finally:
        if harmony is not None:
            harmony.terminate()
            harmony.wait(60)
        if storescp is not None:
            storescp.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
