"""One network: a Site on one listen description, as a Twisted service.

Why here, in the web toolkit: the main service, the management API's own listener
and worker processes (which adopt an inherited socket instead of listening) all
build on it, and none of those may import another in a circle (docs/architecture.md,
"Layers").
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from harmony import log as hlog
from harmony.web.router import HarmonySite

log = hlog.get_logger("harmony.service")


def network_http_table(runtime, name: str) -> dict | None:
    """A network's ``[network.X.http]`` table (slow-client timeouts), if any."""
    net = runtime.config.networks.get(name)
    http = net.raw.get("http") if net is not None and isinstance(net.raw, dict) else None
    return http if isinstance(http, dict) else None


class NetworkService(Service):
    """Listens on one network's endpoint description and serves its routes."""

    def __init__(self, name: str, description: str, router: Resource, reactor):
        self.setName(f"network:{name}")
        self.network = name
        self.description = description
        self.router = router
        self.site = HarmonySite(router)
        self.reactor = reactor
        self.port = None
        self.listening: defer.Deferred | None = None
        self._outcome = None  # the port, or the Failure, once listen() settled
        self._waiters: list[defer.Deferred] = []

    def listen(self) -> defer.Deferred:
        """Start listening; fires with the ``IListeningPort``.  Worker processes
        override this to adopt the main process's socket instead."""
        return serverFromString(self.reactor, self.description).listen(self.site)

    def startService(self):
        super().startService()
        # maybeDeferred: a description that fails to resolve now (a systemd:
        # socket that was not passed in) is a failure to listen, not a crash.
        self.listening = defer.maybeDeferred(self.listen)

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
        self.listening.addBoth(self._settled)

    def _settled(self, outcome):
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            self._relay(d)
        return None if isinstance(outcome, Failure) else outcome  # logged above, relayed to waiters

    def _relay(self, d):
        if isinstance(self._outcome, Failure):
            d.errback(self._outcome)
        else:
            d.callback(self._outcome)

    def wait_listening(self) -> defer.Deferred:
        """A new Deferred for the listen outcome: each caller gets its own, so
        one consuming a failure cannot hide it from another."""
        d: defer.Deferred = defer.Deferred()
        if self._outcome is None:
            self._waiters.append(d)
        else:
            self._relay(d)
        return d

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return None
