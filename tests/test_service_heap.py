"""The heap freeze of a serving process (harmony.service.settle_heap) and its A/B switch.

Run in a child interpreter: a frozen object is never collected, so freezing
the test process itself would leak every later test's garbage cycles."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = ("import gc\nfrom harmony.service import settle_heap\n"
         "print(settle_heap(), gc.get_freeze_count())")


def _probe(**env) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, **env}).stdout
    returned, frozen = out.split()
    return int(returned), int(frozen)


def test_the_start_up_heap_leaves_the_collectors_reach():
    returned, frozen = _probe(HARMONY_GC_FREEZE="1")
    assert returned == frozen > 10_000  # harmony, twisted and pydicom's modules and tables


def test_HARMONY_GC_FREEZE_0_keeps_it_in_reach():
    assert _probe(HARMONY_GC_FREEZE="0") == (0, 0)
