"""harmony.management.traffic: rates, error ratios and latency percentiles from metric snapshots,
on a clock the test moves."""

from __future__ import annotations

import types

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from harmony.management.metrics import LATENCY_BUCKETS
from harmony.management.traffic import MIN_INTERVAL, Traffic, percentile


class Clock:
    now = 1000.0

    def __call__(self):
        return self.now


def _metrics():
    r = CollectorRegistry()
    return types.SimpleNamespace(
        flush=lambda: None,   # HarmonyMetrics adds its observers' tallies here; these are observed directly
        requests=Counter("req", "", ["pipeline", "endpoint", "backend", "status"], registry=r),
        dimse=Counter("dimse", "", ["pipeline", "endpoint", "operation", "status"], registry=r),
        latency=Histogram("lat", "", ["pipeline", "endpoint", "backend"], buckets=LATENCY_BUCKETS, registry=r))


def test_percentile_interpolates_within_a_bucket():
    cumulative = [0.0 if bound < 0.1 else 10.0 for bound in LATENCY_BUCKETS] + [10.0]  # all ten in (0.05, 0.1]
    assert percentile(cumulative, 0.5) == pytest.approx(0.075)  # halfway between 0.05 and 0.1
    assert percentile([0.0] * len(cumulative), 0.5) is None


def test_rates_and_errors_between_snapshots():
    clock, metrics = Clock(), _metrics()
    traffic = Traffic(clock)
    metrics.requests.labels("main", "api", "be", "200")  # the pipeline's series exist from its first request
    traffic.record(metrics)
    for _ in range(8):
        metrics.requests.labels("main", "api", "be", "200").inc()
        metrics.latency.labels("main", "api", "be").observe(0.02)
    for _ in range(2):
        metrics.requests.labels("main", "api", "be", "502").inc()
    metrics.dimse.labels("main", "scp", "C-FIND", "0xA700").inc()
    clock.now += 2.0
    sample = traffic.sample(metrics)
    point = sample["pipelines"]["main"]["points"][-1]
    assert point["requests_per_s"] == 5.0 and point["errors_per_s"] == 1.0 and point["error_ratio"] == 0.2
    assert 0.01 <= point["p50"] <= 0.025
    total = sample["pipelines"]["main"]["total"]
    assert (total["requests"], total["errors"], total["dimse"], total["dimse_failures"]) == (10, 2, 1, 1)
    assert sample["window_seconds"] == 2.0
    assert traffic.backend_latency(metrics)["be"]["count"] == 8


def test_snapshots_are_at_most_one_a_second_and_ten_minutes_long():
    clock, metrics = Clock(), _metrics()
    traffic = Traffic(clock)
    traffic.record(metrics)
    clock.now += MIN_INTERVAL / 2
    traffic.record(metrics)
    assert len(traffic.history) == 1
    for _ in range(700):
        clock.now += 1.0
        traffic.record(metrics)
    assert clock.now - traffic.history[0][0] <= 600
