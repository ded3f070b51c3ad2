"""Build the running service from a config path: what ``twistd harmony`` calls.

Why apart from :mod:`harmony.service`: like Twisted's ``web/tap.py`` beside its
service classes, this is the one module that knows about every way of running
Harmony (the main service, worker processes, exiting when a port cannot be bound),
so the service classes import none of them and nothing imports back in a circle.
"""

from __future__ import annotations

import atexit
import os
import sys

from harmony import log as hlog
from harmony.compat.twisted import lean_io, lean_poll
from harmony.runtime import load_runtime
from harmony.service import HarmonyService, settle_heap
from harmony.storage.nodes import NodeIdInUse, new_process_group
from harmony.storage.store import open_stores
from harmony.workers import WorkerPool

log = hlog.get_logger("harmony.service")


def _exit_failed():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _claim_node_ids(reactor):
    """Open every shared store now, so that a node id another live process
    holds stops this one at start, with the reason, instead of failing each
    request later."""
    def refused(failure):
        if failure.check(NodeIdInUse):
            log.critical("stopping: {error}", error=failure.getErrorMessage())
            atexit.register(_exit_failed)
            reactor.stop()
        # anything else (the database down at start) is retried by the store's users
    for store in open_stores():
        if store.shared:
            store.run(store.open_sync).addErrback(refused)


def make_service(config_path, reactor=None) -> HarmonyService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor
        reactor = default_reactor
    # Worker processes inherit this token: they are the same cluster node.
    new_process_group()
    runtime = load_runtime(config_path, reactor)
    service = HarmonyService(runtime, reactor)

    def not_listening(failure):
        # A proxy that cannot bind its port must not linger looking healthy:
        # stop, and exit non-zero once twistd has cleaned up, so the
        # supervisor (systemd) sees a failure.
        log.critical("stopping: not every network could listen")
        atexit.register(_exit_failed)
        reactor.stop()

    reactor.callWhenRunning(lambda: service.when_listening().addCallbacks(
        lambda _: (lean_poll(reactor, runtime.config.proxy.poll_spin_us / 1e6), lean_io()), not_listening))
    reactor.callWhenRunning(_claim_node_ids, reactor)
    if runtime.config.proxy.workers > 1:
        WorkerPool(runtime.config.path, runtime.config.proxy.workers - 1, service, reactor).setServiceParent(service)
    # Before any listener opens (twistd starts the service next): settling the heap is a
    # full collection of ~95,000 objects, 40-65 ms here.  Done once the ports listened, as
    # it was, it held the reactor while the first clients' connections waited in the
    # backlog: a fresh process's first C-STOREs were answered that much later
    # (bench/ingest starts Harmony afresh every round, as a restart would).
    settle_heap()
    return service
