"""Traffic history for the console's charts, read from the Prometheus metrics.

The counters and the latency histogram already hold everything the charts
need; this keeps a short history of their totals (a snapshot per call of
``GET {base}/traffic`` and every 5 s from the management listener's sampler,
at most one a second, the last ten minutes) and answers rates, error rates
and latency percentiles per pipeline as differences between snapshots.
A snapshot reads three metric families; nothing else runs.
"""

from __future__ import annotations

import collections
import math
import time

from harmony.management.metrics import LATENCY_BUCKETS

MIN_INTERVAL = 1.0
HISTORY_SECONDS = 600


def _totals(metrics) -> dict:
    """Per pipeline: requests, 5xx errors, DIMSE operations (and failures), latency buckets."""
    out: dict = {}

    def row(p):
        return out.setdefault(p, {"requests": 0.0, "errors": 0.0, "dimse": 0.0, "dimse_failures": 0.0,
                                  "buckets": [0.0] * (len(LATENCY_BUCKETS) + 1), "backends": {}})

    metrics.flush()  # the observers' tallies since the last read (HarmonyMetrics.flush)
    for family in metrics.requests.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                r = row(s.labels["pipeline"])
                r["requests"] += s.value
                if s.labels["status"].startswith("5") or s.labels["status"] == "other":
                    r["errors"] += s.value
    for family in metrics.dimse.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                r = row(s.labels["pipeline"])
                r["dimse"] += s.value
                if s.labels["status"] not in ("0x0000", "0xFF00", "0xFF01"):
                    r["dimse_failures"] += s.value
    for family in metrics.latency.collect():
        for s in family.samples:
            if s.name.endswith("_bucket"):
                r = row(s.labels["pipeline"])
                le = s.labels["le"]
                i = len(LATENCY_BUCKETS) if le == "+Inf" else LATENCY_BUCKETS.index(float(le))
                r["buckets"][i] += s.value
                b = r["backends"].setdefault(s.labels["backend"], [0.0] * (len(LATENCY_BUCKETS) + 1))
                b[i] += s.value
    return out


def percentile(cumulative: list[float], q: float) -> float | None:
    """The *q* quantile (seconds) from cumulative bucket counts, interpolated within a bucket."""
    total = cumulative[-1] if cumulative else 0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for i, count in enumerate(cumulative):
        upper = LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else math.inf
        if count >= rank:
            if upper == math.inf:
                return LATENCY_BUCKETS[-1]
            inside = count - lower_count
            fraction = (rank - lower_count) / inside if inside else 1.0
            return lower_bound + (upper - lower_bound) * fraction
        lower_bound, lower_count = upper, count
    return None


class Traffic:
    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.history: collections.deque = collections.deque(maxlen=int(HISTORY_SECONDS / MIN_INTERVAL) + 1)

    def record(self, metrics) -> None:
        """Take a snapshot now (the management listener's sampler calls this)."""
        self._snapshot(metrics)

    def _snapshot(self, metrics):
        now = self.clock()
        if not self.history or now - self.history[-1][0] >= MIN_INTERVAL:
            self.history.append((now, _totals(metrics)))
            while self.history and now - self.history[0][0] > HISTORY_SECONDS:
                self.history.popleft()

    def sample(self, metrics) -> dict:
        """Points (one per pair of snapshots) per pipeline, plus totals since start."""
        self._snapshot(metrics)
        snaps = list(self.history)
        pipelines: dict = {}
        latest = snaps[-1][1]
        for name, total in latest.items():
            pipelines[name] = {"points": [], "total": {
                "requests": total["requests"], "errors": total["errors"], "dimse": total["dimse"],
                "dimse_failures": total["dimse_failures"],
                "p50": percentile(total["buckets"], 0.5), "p95": percentile(total["buckets"], 0.95),
                "p99": percentile(total["buckets"], 0.99)}}
        t_end = snaps[-1][0]
        for (t0, a), (t1, b) in zip(snaps, snaps[1:], strict=False):
            dt = t1 - t0
            for name, cur in b.items():
                prev = a.get(name)
                if prev is None:
                    continue
                buckets = [y - x for x, y in zip(prev["buckets"], cur["buckets"], strict=True)]
                requests = cur["requests"] - prev["requests"]
                pipelines[name]["points"].append({
                    "ago": round(t_end - t1, 3),
                    "requests_per_s": round(requests / dt, 3),
                    "errors_per_s": round((cur["errors"] - prev["errors"]) / dt, 3),
                    "error_ratio": round((cur["errors"] - prev["errors"]) / requests, 4) if requests else 0.0,
                    "dimse_per_s": round((cur["dimse"] - prev["dimse"]) / dt, 3),
                    "p50": percentile(buckets, 0.5), "p95": percentile(buckets, 0.95), "p99": percentile(buckets, 0.99),
                })
        return {"window_seconds": round(t_end - snaps[0][0], 3), "pipelines": pipelines}

    def backend_latency(self, metrics) -> dict:
        """Per backend: p50/p95 latency (seconds) since start, from the histogram."""
        merged: dict = {}
        for total in _totals(metrics).values():
            for backend, buckets in total["backends"].items():
                m = merged.setdefault(backend, [0.0] * len(buckets))
                for i, v in enumerate(buckets):
                    m[i] += v
        return {b: {"p50": percentile(v, 0.5), "p95": percentile(v, 0.95), "count": v[-1]} for b, v in merged.items()}
