"""Bench-only (``run.py --gc-stats``): counts the cyclic garbage collections of
the Harmony process under measurement and the time each generation took,
written as JSON to ``$HARMONY_GC_STATS_OUT`` at each SIGUSR2, which then
starts the count again (the bench signals when loading is done and when the
rounds are). It sits
on PYTHONPATH only for that run; Harmony itself knows nothing of it."""

import gc
import json
import os
import signal
import time

_out = os.environ.get("HARMONY_GC_STATS_OUT")
if _out:
    _stats = {str(g): {"collections": 0, "ms": 0.0, "max_ms": 0.0} for g in range(3)}
    _started = [0.0]

    def _timed(phase, info):
        if phase == "start":
            _started[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - _started[0]) * 1000
        s = _stats[str(info["generation"])]
        s["collections"] += 1
        s["ms"] += ms
        s["max_ms"] = max(s["max_ms"], ms)

    def _write_and_reset(_signo, _frame):
        with open(_out + ".part", "w") as f:
            json.dump({"frozen": gc.get_freeze_count(), "generations": _stats}, f)
        os.replace(_out + ".part", _out)
        for s in _stats.values():
            s.update(collections=0, ms=0.0, max_ms=0.0)

    gc.callbacks.append(_timed)
    signal.signal(signal.SIGUSR2, _write_and_reset)
