"""Prometheus metrics for the store and the store-and-forward queues.

Collected from in-memory snapshots (refreshed by the services every few
seconds), never by querying sqlite on a scrape.  Label values are config names
(backend/target names), never data from requests.

    from prometheus_client import CollectorRegistry
    registry = CollectorRegistry()
    register_metrics(registry, [backend.forward for backend in store_forward_backends])
"""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from harmony.storage import queue as q


class StoreForwardCollector:
    def __init__(self, services, stores=()):
        self.services = list(services)
        #: Stores with no store_forward service on them (a local_archive's).
        self.stores = list(stores)

    def collect(self):
        depth = GaugeMetricFamily("harmony_store_forward_queue_entries",
                                  "Queue entries per target and state (pending, delivering, delivered, dead)",
                                  labels=["target", "state"])
        oldest = GaugeMetricFamily("harmony_store_forward_oldest_age_seconds",
                                   "Age of the oldest undelivered entry per target", labels=["target"])
        attempts = CounterMetricFamily("harmony_store_forward_attempts",
                                       "Delivery attempts per target by outcome (delivered, retry, dead)",
                                       labels=["target", "outcome"])
        paused = GaugeMetricFamily("harmony_store_forward_paused",
                                   "1 while a target's queue is paused because the target is unreachable",
                                   labels=["target"])
        leases = GaugeMetricFamily("harmony_store_forward_leases",
                                   "Entries in delivery per target and lease-holding node (the cluster's, "
                                   "on a shared queue)", labels=["target", "node"])
        lost = CounterMetricFamily("harmony_store_forward_leases_lost",
                                   "Deliveries whose lease expired and passed to another node before they "
                                   "were recorded (each means one redelivery)", labels=["store"])
        dead_rows = GaugeMetricFamily("harmony_store_forward_queue_dead_rows",
                                      "Dead row versions in the PostgreSQL queue table (vacuum lag: a SKIP "
                                      "LOCKED queue slows down as they pile up)", labels=["store"])
        db_up = GaugeMetricFamily("harmony_storage_database_up",
                                  "0 while the store's database (the shared PostgreSQL) is unreachable",
                                  labels=["store", "database"])
        uploads = GaugeMetricFamily("harmony_storage_uploads_pending",
                                    "Instance files durable locally and still to be uploaded to S3 (cluster-wide)",
                                    labels=["store"])
        blobs_up = GaugeMetricFamily("harmony_storage_object_store_up",
                                     "0 while the S3-compatible object storage does not answer",
                                     labels=["store", "object_store"])
        cache_bytes = GaugeMetricFamily("harmony_storage_cache_bytes",
                                        "Bytes in the local folder in front of S3 at its last size check",
                                        labels=["store"])
        cache_max = GaugeMetricFamily("harmony_storage_cache_max_bytes",
                                      "Size bound of the local folder in front of S3 (s3_cache_max_mb)",
                                      labels=["store"])
        evicted = CounterMetricFamily("harmony_storage_cache_evicted_files",
                                      "Files evicted from the local folder (already in S3; fetched again on use)",
                                      labels=["store"])
        node_info = GaugeMetricFamily("harmony_storage_node_info",
                                      "1 for this process's node id on a shared store (which node a scrape is)",
                                      labels=["store", "node"])
        free = GaugeMetricFamily("harmony_storage_free_bytes", "Free bytes on the store's filesystem",
                                 labels=["store"])
        floor = GaugeMetricFamily("harmony_storage_min_free_bytes",
                                  "Free-space floor below which new instances are refused", labels=["store"])
        stored = CounterMetricFamily("harmony_storage_instances_stored", "Instances durably stored",
                                     labels=["store"])
        refused = CounterMetricFamily("harmony_storage_instances_refused",
                                      "Instances refused by the store, by reason", labels=["store", "reason"])
        seen_stores = set()
        stores = [svc.store for svc in self.services] + self.stores
        for svc in self.services:
            for target in svc.targets:
                snap = svc.snapshot.get(target, {})
                for state in q.STATES:
                    depth.add_metric([target, state], snap.get(state, 0))
                oldest.add_metric([target], snap.get("oldest_age_seconds", 0.0))
                drainer = svc.drainers.get(target)
                shared_pause = snap.get("paused_until") is not None
                paused.add_metric([target], 1.0 if shared_pause or (drainer is not None and
                                                                    drainer.paused_until is not None) else 0.0)
                for node, n in sorted((snap.get("leases") or {}).items()):
                    leases.add_metric([target, node], n)
                for outcome in ("delivered", "retry", "dead"):
                    attempts.add_metric([target, outcome], svc.attempts.get((target, outcome), 0))
        for store in stores:
            if store is None or id(store) in seen_stores:
                continue
            seen_stores.add(id(store))
            label = store.root.name
            db = getattr(store, "db", None)
            if db is not None:
                db_up.add_metric([label, db.describe()], 0.0 if getattr(db, "last_error", None) else 1.0)
            blobs = getattr(store, "blobs", None)
            if blobs is not None:
                blobs_up.add_metric([label, blobs.describe()], 0.0 if blobs.last_error else 1.0)
                uploads.add_metric([label], store.uploads_pending)
            cache = getattr(store, "cache", None)
            if cache is not None:
                if cache.bytes is not None:
                    cache_bytes.add_metric([label], cache.bytes)
                cache_max.add_metric([label], cache.max_bytes)
                evicted.add_metric([label], cache.evicted_files)
            if getattr(store, "shared", False):
                node_info.add_metric([label, store.node], 1.0)
            try:
                free.add_metric([label], store.guard.free_bytes())
            except OSError:
                pass
            floor.add_metric([label], store.guard.min_free_bytes)
            stored.add_metric([label], store.counters.get("stored", 0))
            for reason in ("full", "invalid", "failed"):
                refused.add_metric([label, reason], store.counters.get(f"refused_{reason}", 0))
        for svc in self.services:
            label = svc.store.root.name
            lost.add_metric([label], getattr(svc, "leases_lost", 0))
            if "dead_tuples" in getattr(svc, "table_health", {}):
                dead_rows.add_metric([label], svc.table_health["dead_tuples"])
        yield from (depth, oldest, attempts, paused, leases, lost, dead_rows, db_up, uploads, blobs_up, cache_bytes,
                    cache_max, evicted, node_info, free, floor, stored, refused)


def register_metrics(registry, services, stores=()) -> StoreForwardCollector:
    collector = StoreForwardCollector(services, stores)
    registry.register(collector)
    return collector


def runtime_collector(runtime) -> StoreForwardCollector:
    """A collector for every store_forward and local_archive backend of a runtime."""
    backends = list(runtime.backends.values())
    services = [b.forward for b in backends if hasattr(b, "forward")]
    stores = [b.store for b in backends if hasattr(b, "store") and not hasattr(b, "forward")]
    return StoreForwardCollector(services, stores)


def register_runtime_metrics(registry, runtime) -> StoreForwardCollector:
    """Metrics for every store_forward and local_archive backend of a runtime."""
    collector = runtime_collector(runtime)
    registry.register(collector)
    return collector


class LiveRuntimeCollector:
    """The same metrics for whatever runtime *current* returns at scrape time,
    so a hot reload that replaces backends needs no re-registration."""

    def __init__(self, current):
        self.current = current

    def describe(self):
        return []

    def collect(self):
        yield from runtime_collector(self.current()).collect()
