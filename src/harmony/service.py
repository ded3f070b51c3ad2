"""Lifecycle: the ``MultiService`` that twistd (or a test) runs.

    HarmonyService
      +- LoggingService         (file / JSON-lines observers from [logging])
      +- NetworkService x N     (one twisted.web Site per [network.*])
      +- endpoint services      (endpoints that listen on their own, e.g. DIMSE)
"""

from __future__ import annotations

import time
from pathlib import Path

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import globalLogPublisher

from harmony import log as hlog
from harmony.config import load_config
from harmony.runtime import Runtime, build_runtime
from harmony.web.router import HarmonySite, PrefixRouter

log = hlog.get_logger("harmony.service")


class NetworkService(Service):
    """Listens on one network's endpoint description and serves its routes."""

    def __init__(self, name: str, description: str, router: PrefixRouter, reactor):
        self.setName(f"network:{name}")
        self.network = name
        self.description = description
        self.router = router
        self.site = HarmonySite(router)
        self.reactor = reactor
        self.port = None
        self.listening: defer.Deferred | None = None

    def startService(self):
        super().startService()
        endpoint = serverFromString(self.reactor, self.description)
        self.listening = endpoint.listen(self.site)

        def up(port):
            self.port = port
            addr = port.getHost()
            log.info("network {network} listening on {host}:{port}", network=self.network,
                     host=getattr(addr, "host", "?"), port=getattr(addr, "port", "?"))
            return port

        def down(failure):
            log.critical("network {network} cannot listen on {description}: {error}",
                         network=self.network, description=self.description, error=failure.getErrorMessage())
            return failure

        self.listening.addCallbacks(up, down)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return None


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
        if s.get("log_to_file") or s.get("format") == "json":
            path = s.get("log_file_path", "-") if s.get("log_to_file") else "-"
            if path != "-" and not Path(path).is_absolute():
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


class HarmonyService(MultiService):
    def __init__(self, runtime: Runtime, reactor):
        super().__init__()
        self.runtime = runtime
        self.reactor = reactor
        self.started_at = time.time()
        self.networks: dict[str, NetworkService] = {}
        hlog.set_level(runtime.config.proxy.log_level)
        LoggingService(runtime.config.logging, runtime.config.base_dir).setServiceParent(self)
        for name, net in runtime.config.networks.items():
            if not net.listen:
                continue
            router = PrefixRouter(name, runtime.routes.get(name, []))
            svc = NetworkService(name, net.listen, router, reactor)
            svc.setServiceParent(self)
            self.networks[name] = svc
        for backend in runtime.backends.values():
            # Backends with background work (store_forward's delivery) run it
            # as a service that starts and stops with Harmony.
            svc = getattr(backend, "service", None)
            if IService.providedBy(svc):
                svc.setServiceParent(self)
        for endpoint, pipeline in runtime.listeners():
            endpoint.pipeline = pipeline
            if isinstance(endpoint, Service):
                endpoint.setServiceParent(self)

    def startService(self):
        super().startService()
        log.info("harmony {id} started: {pipelines} pipeline(s), {networks} network(s)",
                 id=self.runtime.config.proxy.id, pipelines=len(self.runtime.pipelines),
                 networks=len(self.networks))

    def stopService(self):
        d = defer.maybeDeferred(super().stopService)

        def close_backends(_):
            closing = [defer.maybeDeferred(b.close) for b in self.runtime.backends.values() if hasattr(b, "close")]
            return defer.DeferredList(closing)

        return d.addBoth(close_backends)

    def when_listening(self) -> defer.Deferred:
        """Fires once every network listens (for tests and readiness)."""
        return defer.gatherResults([n.listening for n in self.networks.values() if n.listening],
                                   consumeErrors=True)


def make_service(config_path, reactor=None) -> HarmonyService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor
        reactor = default_reactor
    config = load_config(config_path)
    runtime = build_runtime(config, reactor)
    return HarmonyService(runtime, reactor)
