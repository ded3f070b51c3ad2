#!/usr/bin/env python3
"""py-spy flame graph of Harmony while it ingests one of bench/ingest's goal workloads.

Why: the ingest goals are ratios to Orthanc; when one is missed, the README keeps a
profile saying where Harmony's time goes.  ``--gil`` samples only the thread holding
the GIL (Python CPU); ``--wall`` samples every thread, idle ones too (waiting on
fsync, on the database, on each other), per thread.

    pip install py-spy        # into the venv; not a dependency
    .venv/bin/python bench/ingest/profile.py cstore1 --gil out.svg
    .venv/bin/python bench/ingest/profile.py cstore4 --wall out.svg
    .venv/bin/python bench/ingest/profile.py stow --gil out.svg [--format raw]

Harmony runs as in bench/ingest/run.py (twistd, ``dicom_scp`` / ``dicomweb`` ->
``local_archive``, fsync on); its log level is raised to info so the store's
closing line (instances, commits, largest batch) is printed (``--log-level warn``
keeps the bench's level: no access log in the profile, and no closing line).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import run as ingest  # noqa: E402

PY_SPY = Path(sys.executable).with_name("py-spy")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", choices=["cstore1", "cstore4", "stow"])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--gil", action="store_true")
    mode.add_argument("--wall", action="store_true")
    ap.add_argument("out")
    ap.add_argument("--format", default="flamegraph", choices=["flamegraph", "raw", "speedscope"])
    ap.add_argument("--instances", type=int, default=400)
    ap.add_argument("--log-level", default="info", choices=["info", "warn"],
                    help="info prints the store's closing line; warn is the bench's level (no access log)")
    args = ap.parse_args()
    if not PY_SPY.exists():
        sys.exit(f"{PY_SPY} is missing: pip install py-spy into this venv")
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-profile-"))
    try:
        files = ingest.make_data(tmp / "data", args.instances, 0)
        harmony = ingest.Harmony(tmp / "h", "http://127.0.0.1:9", dimse=True, backend="archive")
        harmony.config.write_text(harmony.config.read_text().replace('log_level = "warn"',
                                                                         f'log_level = "{args.log_level}"'))
        harmony.start()
        try:
            spy = subprocess.Popen([str(PY_SPY), "record", "-p", str(harmony.proc.pid), "-o", args.out, "-f",
                                    args.format, "-r", "250"] + (["--gil"] if args.gil else ["--idle", "--threads"]),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # py-spy attached
            if args.workload == "cstore1":
                seconds = ingest.storescu(harmony.dimse_port, "HARMONY", tmp / "data")
            elif args.workload == "cstore4":
                seconds = ingest.storescu_parallel(harmony.dimse_port, "HARMONY",
                                                   ingest.split_folder(files, tmp / "split", 4))
            else:
                seconds = ingest.stow_all("127.0.0.1", harmony.http_port, "/archive-web/studies", files, 4, 10)
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        finally:
            harmony.stop()
        print(f"{args.workload}: {len(files) / seconds:.1f} inst/s while profiled")
        for log in sorted((tmp / "h").glob("twistd-*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if "committed in" in line:
                    print(line.split("] ", 1)[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
