"""Prometheus metrics for one HarmonyService, on its own CollectorRegistry.

A registry per service (never prometheus_client's global one) keeps tests,
reloads and two services in one process from colliding.  Request metrics come
from :attr:`harmony.pipeline.Pipeline.observers`; target, association and
reload state is read at scrape time by a custom collector, so it is always the
live state and needs no bookkeeping when a reload swaps pools.

Label values only ever come from configuration names (pipelines, endpoints,
backends, targets) or small fixed sets (HTTP status codes, DIMSE operations
and statuses); anything else becomes ``"other"``, so a client cannot mint
label values (and series) by sending odd requests.
"""

from __future__ import annotations

import re
import time
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

import harmony
from harmony.dicom import status as dimse
from harmony.envelope import body_length
from harmony.storage.metrics import LiveRuntimeCollector
from harmony.targets.target import CIRCUIT_STATES

DIMSE_OPS = frozenset({"C-ECHO", "C-FIND", "C-GET", "C-MOVE", "C-STORE"})
_DIMSE_STATUS = re.compile(r"^0x[0-9A-Fa-f]{4}$")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def status_label(status) -> str:
    return str(status) if isinstance(status, int) and 100 <= status <= 599 else "other"


class _LiveCollector:
    """Target, association and reload state, read from the service at scrape time."""

    def __init__(self, service):
        self.service = service

    def describe(self):
        return []

    def collect(self):
        healthy = GaugeMetricFamily("harmony_target_healthy",
                                    "1 when active health checks pass (or none are configured)",
                                    labels=["backend", "target"])
        circuit = GaugeMetricFamily("harmony_target_circuit_state", "1 for the circuit breaker's current state",
                                    labels=["backend", "target", "state"])
        in_flight = GaugeMetricFamily("harmony_target_in_flight", "Requests in flight to the target",
                                      labels=["backend", "target"])
        requests = CounterMetricFamily("harmony_target_requests", "Attempts sent to the target",
                                       labels=["backend", "target"])
        failures = CounterMetricFamily("harmony_target_failures", "Failed attempts (connection, timeout, 502/503/504)",
                                       labels=["backend", "target"])
        retries = CounterMetricFamily("harmony_target_retries", "Retries sent to the target after another failed",
                                      labels=["backend", "target"])
        aborts = CounterMetricFamily("harmony_target_client_aborts",
                                     "Attempts cut short because the client went away (nginx's 499); never failures",
                                     labels=["backend", "target"])
        for pool in self.service.target_pools():
            for t in pool.targets:
                labels = [pool.backend, t.name]
                healthy.add_metric(labels, 1 if t.healthy else 0)
                for state in CIRCUIT_STATES:
                    circuit.add_metric(labels + [state], 1 if t.circuit == state else 0)
                in_flight.add_metric(labels, t.in_flight)
                requests.add_metric(labels, t.requests_total)
                failures.add_metric(labels, t.failures_total)
                retries.add_metric(labels, t.retries_total)
                aborts.add_metric(labels, t.client_aborts_total)
        yield from (healthy, circuit, in_flight, requests, failures, retries, aborts)
        assoc = GaugeMetricFamily("harmony_associations_open", "DIMSE associations open on a listening endpoint",
                                  labels=["endpoint"])
        for endpoint, _pipeline in self.service.runtime.listeners():
            value = getattr(endpoint, "open_associations", None)
            if callable(value):
                value = value()
            if isinstance(value, int):
                assoc.add_metric([endpoint.name], value)
        yield assoc
        yield from _mllp_families(self.service.runtime.listeners())


def _mllp_families(listeners):
    """HL7 v2 listeners (``mllp`` endpoints): open connections, ACKs sent by code,
    messages and connections refused by reason."""
    conns = GaugeMetricFamily("harmony_mllp_connections_open", "MLLP connections open on a listening endpoint",
                              labels=["endpoint"])
    acks = CounterMetricFamily("harmony_hl7_acks", "HL7 acknowledgements sent, by ACK code",
                               labels=["endpoint", "code"])
    refused = CounterMetricFamily("harmony_mllp_refused", "Messages or connections refused, by reason",
                                  labels=["endpoint", "reason"])
    for endpoint, _pipeline in listeners:
        if getattr(endpoint, "transport", None) != "mllp":
            continue
        conns.add_metric([endpoint.name], len(endpoint.connections))
        for code, n in sorted(endpoint.acks_sent.items()):
            acks.add_metric([endpoint.name, code], n)
        for reason, n in sorted(endpoint.refused.items()):
            refused.add_metric([endpoint.name, reason], n)
    yield from (conns, acks, refused)


#: The latency histogram's upper bounds with Prometheus' last, +Inf: bisect_left finds
#: the bucket an observation counts in (the first bound >= it, as ``observe`` does).
_BOUNDS = (*LATENCY_BUCKETS, float("inf"))


class _Tally:
    """The requests of one label set since the metrics were last read, kept as plain
    numbers: a passthrough request cost four locked prometheus_client increments and
    a Python walk of the histogram's buckets; it now costs a few additions, and
    :meth:`HarmonyMetrics.flush` adds the totals at scrape time."""

    __slots__ = ("labels", "count", "seconds", "buckets", "bytes_in", "bytes_out")

    def __init__(self, labels: tuple):
        self.labels = labels  # (pipeline, endpoint, backend, status) as labelled
        self.count = 0
        self.seconds = 0.0
        self.buckets = [0] * len(_BOUNDS)
        self.bytes_in = 0
        self.bytes_out = 0


class HarmonyMetrics:
    def __init__(self, service, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self._tallies: dict[tuple, _Tally] = {}
        #: DIMSE operations since the last flush, by the dimse counter's label set.
        self._dimse_counts: dict[tuple, int] = {}
        r = self.registry
        self.requests = Counter("harmony_requests", "Requests finished, by pipeline, endpoint, backend and status",
                                ["pipeline", "endpoint", "backend", "status"], registry=r)
        self.latency = Histogram("harmony_request_duration_seconds", "Time from envelope to response head",
                                 ["pipeline", "endpoint", "backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.bytes_in = Counter("harmony_request_bytes", "Request body bytes (when their length is known)",
                                ["pipeline", "endpoint"], registry=r)
        self.bytes_out = Counter("harmony_response_bytes", "Response body bytes (when their length is known)",
                                 ["pipeline", "endpoint"], registry=r)
        self.dimse = Counter("harmony_dimse_operations", "DIMSE operations by operation and final status",
                             ["pipeline", "endpoint", "operation", "status"], registry=r)
        self.reloads = Counter("harmony_reloads", "Configuration reloads by result", ["result"], registry=r)
        self.last_reload_ok = Gauge("harmony_last_reload_success", "1 if the last reload succeeded (1 before any)",
                                    registry=r)
        self.last_reload_time = Gauge("harmony_last_reload_timestamp_seconds", "When the last reload was attempted",
                                      registry=r)
        self.info = Gauge("harmony_info", "Constant 1, labelled with version and proxy id",
                          ["version", "proxy_id"], registry=r)
        self.started = Gauge("harmony_start_time_seconds", "When this Harmony started (Unix time)", registry=r)
        self.last_reload_ok.set(1)
        self.started.set(time.time())
        self.info.labels(harmony.__version__, service.runtime.config.proxy.id).set(1)
        for result in ("success", "failure"):
            self.reloads.labels(result)
        r.register(_LiveCollector(service))
        # Store and queue state (harmony_store_forward_*, harmony_storage_*), read from the live runtime.
        r.register(LiveRuntimeCollector(lambda: service.runtime))
        from harmony.middleware.deidentify import DeidentifyCollector
        r.register(DeidentifyCollector(lambda: service.runtime))

    def instrument(self, runtime) -> None:
        """Attach a request observer to every pipeline of *runtime*."""
        endpoints = frozenset(runtime.endpoints)
        for pipeline in runtime.pipelines.values():
            pipeline.observers.append(self._observer(pipeline, endpoints))

    def _observer(self, pipeline, endpoints):
        backends = frozenset(b.name for b in pipeline.backends)
        name = pipeline.name
        #: (endpoint, backend, status) as the request says them -> its _Tally: one lookup
        #: a request (bounded like the label sets themselves).
        pairs: dict = {}
        #: (endpoint label, operation, status) as said -> the DIMSE counter's label set.
        dimse_keys: dict = {}
        dimse_counts = self._dimse_counts

        def observe(request, response, seconds):
            md = request.metadata
            said = (md.get("endpoint"), md.get("backend"), response.status)
            tally = pairs.get(said)
            if tally is None:
                endpoint = said[0] if said[0] in endpoints else "other"
                backend = said[1] if said[1] in backends else "none"
                tally = self._tally((name, endpoint, backend, status_label(said[2])))
                if len(pairs) < 4096:  # statuses are ints an upstream chooses: never unbounded
                    pairs[said] = tally
            tally.count += 1
            tally.seconds += seconds
            tally.buckets[bisect_left(_BOUNDS, seconds)] += 1
            n = body_length(request.body)
            if n:
                tally.bytes_in += n
            n = body_length(response.body)
            if n:
                tally.bytes_out += n
            op = md.get("dimse_op")
            if op:
                # Counted here, added to the Prometheus counter by flush(), like the tallies:
                # its labels() and locked inc() were ~3 % of a stored instance's reactor time.
                said_op = (tally.labels[1], op, dimse.of_response(response))
                key = dimse_keys.get(said_op)
                if key is None:
                    status = dimse.label(said_op[2])
                    key = (name, said_op[0], op if op in DIMSE_OPS else "other",
                           status if _DIMSE_STATUS.match(status) else "other")
                    if len(dimse_keys) < 4096:  # statuses are ints a peer chooses: never unbounded
                        dimse_keys[said_op] = key
                dimse_counts[key] = dimse_counts.get(key, 0) + 1

        return observe

    def _tally(self, labels: tuple) -> _Tally:
        """The tally of one (pipeline, endpoint, backend, status) label set, shared by
        every observer that says it (a reload's pipelines find their predecessors')."""
        tally = self._tallies.get(labels)
        if tally is None:
            tally = self._tallies[labels] = _Tally(labels)
        return tally

    def flush(self) -> None:
        """Add what the observers tallied since the last flush to the Prometheus metrics;
        every reader of the request metrics calls it first (:meth:`text`,
        harmony.management.traffic)."""
        for tally in self._tallies.values():
            if tally.count:
                pipeline, endpoint, backend, status = tally.labels
                self.requests.labels(pipeline, endpoint, backend, status).inc(tally.count)
                histogram = self.latency.labels(pipeline, endpoint, backend)
                # prometheus_client has no "observe many": its histogram child's sum and
                # bucket values (tests/management/test_metrics.py checks the exposition
                # against observe()'s).
                histogram._sum.inc(tally.seconds)
                for i, n in enumerate(tally.buckets):
                    if n:
                        histogram._buckets[i].inc(n)
                tally.count, tally.seconds, tally.buckets = 0, 0.0, [0] * len(tally.buckets)
            if tally.bytes_in:  # byte counters are made on first use only
                self.bytes_in.labels(tally.labels[0], tally.labels[1]).inc(tally.bytes_in)
                tally.bytes_in = 0
            if tally.bytes_out:
                self.bytes_out.labels(tally.labels[0], tally.labels[1]).inc(tally.bytes_out)
                tally.bytes_out = 0
        counts = self._dimse_counts
        for key, n in counts.items():
            if n:
                self.dimse.labels(*key).inc(n)
                counts[key] = 0

    def reloaded(self, ok: bool) -> None:
        self.reloads.labels("success" if ok else "failure").inc()
        self.last_reload_ok.set(1 if ok else 0)
        self.last_reload_time.set(time.time())

    def text(self) -> bytes:
        self.flush()
        return generate_latest(self.registry)
