"""harmony.tap: the service twistd runs is built with the heap already settled.

The probe runs in a child interpreter: settling freezes the heap, and a frozen
object is never collected (tests/test_service.py says why that matters here)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.harness import MINIMAL_MAIN, echo_pipeline

PROBE = """
import gc, sys
from twisted.internet.testing import MemoryReactorClock
from harmony import tap
reactor = MemoryReactorClock()
service = tap.make_service(sys.argv[1], reactor=reactor)
# Nothing listens yet (twistd starts the service after make_service returns) ...
print(bool(service.running), len(reactor.tcpServers), gc.get_freeze_count() > 10_000)
"""

CONFIG = MINIMAL_MAIN + echo_pipeline()


def test_make_service_settles_the_heap_before_anything_listens(tmp_path):
    # A full collection of start-up objects takes tens of milliseconds: run after the
    # ports opened, it kept a new process's first clients waiting in the backlog.
    config = tmp_path / "harmony.toml"
    config.write_text(CONFIG)
    out = subprocess.run([sys.executable, "-c", PROBE, str(config)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={**os.environ, "HARMONY_GC_FREEZE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "0", "True"]
