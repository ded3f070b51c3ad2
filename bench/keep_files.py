#!/usr/bin/env python3
"""Run a benchmark script with its folder removals turned into renames into a trash folder.

Why: this machine kind's file system is ext4 without a journal, which hands out a new
inode only after checking every inode of its group freed in the last minute (six while
the inode table block is still dirty: ``recently_deleted`` in fs/ext4/ialloc.c).  A
benchmark that removes its thousands of files at its end makes every file created in
the next minutes cost 0.2-2 ms of kernel time - in the next benchmark, for Harmony and
its peer alike but not equally: ``perf`` of a four-association C-STORE round right after
such a removal put 40 % of Harmony's CPU samples in ``find_inode_bit`` /
``recently_deleted`` (DCMTK ``storescp`` went from 2,200 to 700 inst/s).  Figures meant
to be compared across benchmarks are taken with this wrapper, and the trash is removed
at least six minutes before the next measurement (docs/architecture.md, "C-STORE,
session 13").

    python bench/keep_files.py bench/ingest/run.py --only dimse4 ...
    rm -rf "${BENCH_TRASH:-/tmp/harmony-bench-trash}"      # afterwards, then wait

The trash is ``$BENCH_TRASH`` (default ``/tmp/harmony-bench-trash``), on the file system
the benchmarks write to (a rename cannot cross file systems: such a folder is removed).
"""

from __future__ import annotations

import os
import runpy
import shutil
import sys
import uuid

TRASH = os.environ.get("BENCH_TRASH", "/tmp/harmony-bench-trash")
_remove = shutil.rmtree


def keep(path, ignore_errors=False, onerror=None, **_kw):
    """``shutil.rmtree`` that renames *path* into the trash instead."""
    try:
        os.makedirs(TRASH, exist_ok=True)
        os.rename(path, os.path.join(TRASH, uuid.uuid4().hex))
    except OSError:
        _remove(path, ignore_errors=ignore_errors)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    shutil.rmtree = keep
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
