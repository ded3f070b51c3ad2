"""harmony.management.metrics: a runtime's pipelines observed into Prometheus families, read back
the way Prometheus reads them (exposition text, parsed)."""

from __future__ import annotations

import types

from prometheus_client.parser import text_string_to_metric_families

from harmony.dicom.status import record
from harmony.management.metrics import HarmonyMetrics, status_label
from tests.memory import built_runtime, request, response


def _samples(metrics) -> dict:
    out = {}
    for family in text_string_to_metric_families(metrics.text().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _metrics(tmp_path):
    runtime = built_runtime(tmp_path)
    service = types.SimpleNamespace(runtime=runtime, target_pools=lambda: [])
    metrics = HarmonyMetrics(service)
    metrics.instrument(runtime)
    return runtime, metrics


def test_requests_latency_and_bytes_per_pipeline(tmp_path):
    runtime, metrics = _metrics(tmp_path)
    (observe,) = runtime.pipelines["main"].observers
    observe(request(body=b"12345", metadata={"endpoint": "api", "backend": "be"}), response(201, body=b"ok"), 0.02)
    observe(request(metadata={"endpoint": "intruder", "backend": "??"}), response(502), 0.5)
    samples = _samples(metrics)
    key = (("backend", "be"), ("endpoint", "api"), ("pipeline", "main"), ("status", "201"))
    assert samples[("harmony_requests_total", key)] == 1
    other = (("backend", "none"), ("endpoint", "other"), ("pipeline", "main"), ("status", "502"))
    assert samples[("harmony_requests_total", other)] == 1  # unknown labels cannot grow the series
    assert samples[("harmony_request_bytes_total", (("endpoint", "api"), ("pipeline", "main")))] == 5
    assert samples[("harmony_response_bytes_total", (("endpoint", "api"), ("pipeline", "main")))] == 2
    bucket = (("backend", "be"), ("endpoint", "api"), ("le", "0.025"), ("pipeline", "main"))
    assert samples[("harmony_request_duration_seconds_bucket", bucket)] == 1


def test_dimse_operations_and_reloads(tmp_path):
    runtime, metrics = _metrics(tmp_path)
    (observe,) = runtime.pipelines["main"].observers
    observe(request(metadata={"endpoint": "api", "dimse_op": "C-FIND"}), record(response(), 0xA700), 0.1)
    observe(request(metadata={"endpoint": "api", "dimse_op": "C-NONSENSE"}),
            response(metadata={"dimse_status": "<script>"}), 0.1)  # a forged metadata view is not the status
    metrics.reloaded(False)
    samples = _samples(metrics)
    find = (("endpoint", "api"), ("operation", "C-FIND"), ("pipeline", "main"), ("status", "0xA700"))
    assert samples[("harmony_dimse_operations_total", find)] == 1
    other = (("endpoint", "api"), ("operation", "other"), ("pipeline", "main"), ("status", "other"))
    assert samples[("harmony_dimse_operations_total", other)] == 1
    assert samples[("harmony_reloads_total", (("result", "failure"),))] == 1
    assert samples[("harmony_last_reload_success", ())] == 0
    assert samples[("harmony_info", (("proxy_id", "test"), ("version", __import__("harmony").__version__)))] == 1


def test_status_label():
    assert [status_label(s) for s in (200, 599, 99, 600, "200", None)] == ["200", "599", "other", "other",
                                                                           "other", "other"]


def test_tallied_requests_read_as_prometheus_observed_them(tmp_path):
    """The observers tally plain numbers and every read adds them to the metrics: the
    exposition is the one prometheus_client's own observe()/inc() would give, bucket
    edges included, and a second read does not count anything twice."""
    from prometheus_client import CollectorRegistry, Histogram

    from harmony.management.metrics import LATENCY_BUCKETS

    runtime, metrics = _metrics(tmp_path)
    (observe,) = runtime.pipelines["main"].observers
    reference = Histogram("ref", "", ["pipeline", "endpoint", "backend"], buckets=LATENCY_BUCKETS,
                          registry=CollectorRegistry()).labels("main", "api", "be")
    latencies = [0.0, 0.001, 0.0010001, 0.02, 0.025, 0.5, 60, 119.9, 500.0]  # on, just over, past every edge
    for seconds in latencies:
        observe(request(metadata={"endpoint": "api", "backend": "be"}), response(200, body=b"abc"), seconds)
        reference.observe(seconds)
    expected = {(s.labels.get("le"), s.name): s.value for family in reference.collect() for s in family.samples
                if not s.name.endswith("_created")}
    for _ in range(2):  # read twice: flushed once
        samples = _samples(metrics)
        got = {(dict(labels).get("le"), name.replace("harmony_request_duration_seconds", "ref")): value
               for (name, labels), value in samples.items()
               if name.startswith("harmony_request_duration_seconds") and not name.endswith("_created")}
        assert got == expected
        key = (("backend", "be"), ("endpoint", "api"), ("pipeline", "main"), ("status", "200"))
        assert samples[("harmony_requests_total", key)] == len(latencies)
        assert samples[("harmony_response_bytes_total", (("endpoint", "api"), ("pipeline", "main")))] == 3 * len(
            latencies)
    observe(request(metadata={"endpoint": "api", "backend": "be"}), response(200), 0.3)
    assert _samples(metrics)[("harmony_requests_total", key)] == len(latencies) + 1


def test_traffic_reads_the_tallies(tmp_path):
    from harmony.management.traffic import Traffic

    runtime, metrics = _metrics(tmp_path)
    (observe,) = runtime.pipelines["main"].observers
    observe(request(metadata={"endpoint": "api", "backend": "be"}), response(502), 0.02)
    total = Traffic(lambda: 1000.0).sample(metrics)["pipelines"]["main"]["total"]
    assert (total["requests"], total["errors"]) == (1, 1)
