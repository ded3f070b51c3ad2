"""harmony.service: the heap settling of a serving process (``settle_heap``) and its
A/B switch.

Each probe runs in a child interpreter: a frozen object is never collected, so
freezing the test process itself would keep every later test's garbage cycles."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
import gc
from harmony.service import GC_YOUNG_THRESHOLD, settle_heap
before = gc.get_freeze_count()
returned = settle_heap()
print(before, returned, gc.get_freeze_count(), gc.get_threshold()[0] == GC_YOUNG_THRESHOLD)
"""


def _probe(**env) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, **env})
    return out.stdout.split()


def test_settle_heap_freezes_start_up_objects_and_widens_the_young_generation():
    before, returned, frozen, widened = _probe(HARMONY_GC_FREEZE="1")
    assert before == "0" and widened == "True"
    assert int(returned) == int(frozen) > 10_000  # harmony, twisted and pydicom's modules and tables


def test_HARMONY_GC_FREEZE_0_leaves_the_collector_as_cpython_sets_it():
    assert _probe(HARMONY_GC_FREEZE="0") == ["0", "0", "0", "False"]


def test_the_service_itself_leaves_the_heap_alone():
    # A test run starts many services in one interpreter: only process entry points settle.
    from harmony import service
    assert "settle_heap" not in service.HarmonyService.startService.__code__.co_names
