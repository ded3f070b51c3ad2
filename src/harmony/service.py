"""Lifecycle: the ``MultiService`` that twistd (or a test) runs.

    HarmonyService
      +- LoggingService         (file / JSON-lines observers from [logging])
      +- NetworkService x N     (one twisted.web Site per [network.*])
      +- endpoint services      (endpoints that listen on their own, e.g. DIMSE)
      +- ManagementService      ([management] on its own listener, when enabled)

It also owns the metrics registry and hot reload (harmony.management).  These are the
service classes only; :mod:`harmony.tap` builds one from a config path (Twisted's own
``web/tap.py`` split), so nothing here imports the worker processes that run one.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from pathlib import Path

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.logger import globalLogPublisher

from harmony import log as hlog
from harmony.management.api import AdminApi
from harmony.management.metrics import HarmonyMetrics
from harmony.management.reload import reload as reload_config
from harmony.management.service import ManagementService
from harmony.management.settings import ManagementSettings, check_routes
from harmony.runtime import Route, Runtime
from harmony.web.network import NetworkService, network_http_table
from harmony.web.router import PrefixRouter

log = hlog.get_logger("harmony.service")

#: ``HARMONY_GC_FREEZE=0`` keeps the start-up heap in the collector's reach (the A/B switch bench/archive uses).
GC_FREEZE_ENV = "HARMONY_GC_FREEZE"


class LoggingService(Service):
    """Adds the observers ``[logging]`` asks for and removes them on stop."""

    def __init__(self, settings: dict, base_dir: Path):
        self.setName("logging")
        self.settings = settings
        self.base_dir = base_dir
        self._observer = None
        self._stream = None

    def startService(self):
        super().startService()
        s = self.settings
        # twistd's own observer keeps writing to stdout/--logfile; this adds the
        # file [logging] names (the loader resolved and checked its path).
        if s.get("log_to_file"):
            path = s["log_file_path"]
            if not Path(path).is_absolute():
                path = str(self.base_dir / path)
            self._observer, self._stream = hlog.file_observer(path, s.get("format", "text"))
            globalLogPublisher.addObserver(self._observer)

    def stopService(self):
        super().stopService()
        if self._observer is not None:
            globalLogPublisher.removeObserver(self._observer)
            if self._stream is not None and self._stream.name not in ("<stdout>",):
                self._stream.close()
            self._observer = None


#: The garbage collector's young-generation threshold once a Harmony process serves
#: (CPython's default is 700 allocations): see :func:`settle_heap`.
GC_YOUNG_THRESHOLD = 20_000


def settle_heap() -> int:
    """Hide everything built at start-up from the cyclic garbage collector, and let the
    short-lived objects of requests in flight die young.  Called once per serving
    process (harmony.tap, harmony.workers), never by the service itself: a test run
    starts many services in one interpreter.

    Why (bench/http_passthrough, docs/architecture.md "The HTTP passthrough hot path"):
    with CPython's defaults the collector took ~60 CPU µs of a ~300 µs proxied request.
    The ~100,000 objects of start-up (Twisted, pydicom's dictionaries, the config) were
    traversed by every full collection, and the objects of the ~50 requests in flight
    outlived the 700-allocation young generation, were promoted, and so set off those
    full collections every few hundred requests.  ``gc.freeze()`` moves the start-up
    objects to the permanent generation; a larger young generation lets a request's
    objects be freed by reference counting before a collection sees them.  Cycles are
    still collected, except among frozen objects dropped later (a reloaded config's
    cycles, at most: reference counting still frees the rest); the young generation
    costs a few MB more at most.  The archive read path measured the same freeze from the
    other side: one full collection cost the reactor 190 ms unfrozen, 1-4 ms frozen
    (bench/archive ``--gc-stats``, docs/architecture.md "The archive read path").

    ``HARMONY_GC_FREEZE=0`` leaves the collector as CPython sets it, for A/B runs.
    Returns how many objects were frozen.
    """
    if os.environ.get(GC_FREEZE_ENV, "1") == "0":
        return 0
    gc.collect()  # start-up garbage is freed, not frozen
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    return gc.get_freeze_count()


class HarmonyService(MultiService):
    def __init__(self, runtime: Runtime, reactor):
        super().__init__()
        self.runtime = runtime
        self.reactor = reactor
        self.config_path = runtime.config.path
        self.started_at = time.time()
        self.networks: dict[str, NetworkService] = {}
        #: Outcome of the last reload (None before any), for /admin/info.
        self.last_reload = None
        #: Backends replaced by a reload -> the delayed call that closes them (harmony.management.reload).
        self.retired_backends: dict = {}
        self.management_settings = ManagementSettings.from_config(runtime.config)
        check_routes(self.management_settings, runtime)
        self.management: ManagementService | None = None
        self.metrics = HarmonyMetrics(self)
        self.metrics.instrument(runtime)
        self._previous_sighup = None
        hlog.set_level(runtime.config.proxy.log_level)
        LoggingService(runtime.config.logging, runtime.config.base_dir).setServiceParent(self)
        for name, net in runtime.config.networks.items():
            if net.listen:
                self.add_network(name, net.listen, runtime)
        for backend in runtime.backends.values():
            self.adopt_backend_service(backend)
        for endpoint, pipeline in runtime.listeners():
            endpoint.pipeline = pipeline
            if isinstance(endpoint, Service):
                endpoint.setServiceParent(self)
        self.set_management(self.management_settings)

    def adopt_backend_service(self, backend) -> None:
        """Backends with background work (store_forward's delivery) run it as a
        service that starts and stops with Harmony (and with hot reload)."""
        svc = getattr(backend, "service", None)
        if IService.providedBy(svc) and svc.parent is None:
            svc.setServiceParent(self)

    def release_backend_service(self, backend):
        svc = getattr(backend, "service", None)
        if IService.providedBy(svc) and svc.parent is self:
            return svc.disownServiceParent()
        return None

    def routes_for(self, name: str, runtime: Runtime) -> list:
        """A network's routes: the runtime's, plus the management API when mounted there."""
        routes = list(runtime.routes.get(name, []))
        settings = self.management_settings
        if settings.enabled and settings.network == name:
            routes.append(Route(name, settings.base_path, AdminApi(self), None))
            routes.sort(key=lambda r: len(r.segments), reverse=True)
        return routes

    def add_network(self, name: str, listen: str, runtime: Runtime) -> NetworkService:
        svc = NetworkService(name, listen, PrefixRouter(name, self.routes_for(name, runtime)), self.reactor)
        svc.site.apply_settings(network_http_table(runtime, name))
        svc.setServiceParent(self)
        self.networks[name] = svc
        return svc

    def set_management(self, settings) -> bool:
        """Start, keep or restart the management API's own listener for *settings*;
        True when a listener was (re)started."""
        self.management_settings = settings
        wanted = settings.listen if settings.enabled and settings.network is None else None
        current = self.management.description if self.management is not None else None
        if wanted == current:
            return False
        if self.management is not None:
            self.management.disownServiceParent()
            self.management = None
        if wanted is not None:
            self.management = ManagementService(self, wanted, self.reactor)
            self.management.setServiceParent(self)
            return True
        return False

    def management_description(self) -> dict:
        s = self.management_settings
        port = self.management.port if self.management is not None else None
        return {"enabled": s.enabled, "listen": s.listen, "network": s.network, "base_path": s.base_path,
                "authenticated": s.token is not None,
                "port": port.getHost().port if port is not None else None}

    def reload(self) -> defer.Deferred:
        """Re-read and apply the configuration (SIGHUP, POST /admin/reload); see harmony.management.reload."""
        return reload_config(self)

    def target_pools(self):
        """The TargetPool of every backend that has one (see harmony.targets)."""
        return [b.target_pool for b in self.runtime.backends.values() if getattr(b, "target_pool", None) is not None]

    def startService(self):
        super().startService()
        for pool in self.target_pools():
            pool.start()
        self._install_sighup()
        for warning in self.runtime.warnings:
            log.warn("configuration: {warning}", warning=str(warning))
        log.info("harmony {id} started: {pipelines} pipeline(s), {networks} network(s)",
                 id=self.runtime.config.proxy.id, pipelines=len(self.runtime.pipelines),
                 networks=len(self.networks))

    def _install_sighup(self):
        if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
            return

        def on_sighup(signum, frame):
            log.info("SIGHUP: reloading configuration")
            self.reactor.callFromThread(self.reload)

        previous = signal.signal(signal.SIGHUP, on_sighup)
        self._previous_sighup = previous if previous is not None else signal.SIG_DFL

    def stopService(self):
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        for pool in self.target_pools():
            pool.stop()
        d = defer.maybeDeferred(super().stopService)

        def close_backends(_):
            retired, self.retired_backends = self.retired_backends, {}
            for call in retired.values():
                if call.active():
                    call.cancel()
            closing = [defer.maybeDeferred(b.close) for b in list(self.runtime.backends.values()) + list(retired)
                       if hasattr(b, "close")]
            return defer.DeferredList(closing)

        return d.addBoth(close_backends)

    def when_listening(self) -> defer.Deferred:
        """Fires once every network listens (for tests and readiness)."""
        # wait_listening() gives each caller its own Deferred, so a caller here can
        # never swallow a listen failure that the exit-on-failure guard waits for.
        waits = [n.wait_listening() for n in self.networks.values() if n.listening]
        if self.management is not None and self.management.listening:
            waits.append(self.management.wait_listening())
        return defer.gatherResults(waits, consumeErrors=True)
