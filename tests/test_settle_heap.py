"""harmony.service.settle_heap: start-up objects frozen out of the collector's sight and a
larger young generation, in a serving process only (a subprocess here: freezing the test
interpreter's heap would keep every later test's garbage)."""

import subprocess
import sys

PROBE = """
import gc
from harmony.service import GC_YOUNG_THRESHOLD, settle_heap
before = gc.get_freeze_count()
settle_heap()
print(before, gc.get_freeze_count() > 10000, gc.get_threshold()[0] == GC_YOUNG_THRESHOLD)
"""


def test_settle_heap_freezes_start_up_objects_and_widens_the_young_generation():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["0", "True", "True"], out.stdout + out.stderr


def test_the_service_itself_leaves_the_heap_alone():
    from harmony import service
    assert "settle_heap" not in service.HarmonyService.startService.__code__.co_names
