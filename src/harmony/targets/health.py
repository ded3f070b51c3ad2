"""Active health checks: every ``interval_secs`` each target of a pool is
checked (HTTP GET of ``path`` expecting ``expect_status``, a DIMSE C-ECHO, or
a TCP connect for MLLP targets),
each check bounded by ``timeout_secs``; thresholds turn results into a health
state so one lost packet does not eject a target, nor one lucky answer
readmit it.

Runs on ``task.LoopingCall`` with the pool's clock, so tests drive it with
``task.Clock``.
"""

from __future__ import annotations

import attr
from twisted.internet import defer, task
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from harmony.config.errors import OptionError
from harmony.log import get_logger

log = get_logger("harmony.targets.health")

CHECK_KINDS = ("http", "dimse", "tcp")
#: The check a target kind gets unless [health] type says otherwise.
DEFAULT_CHECK = {"url": "http", "dimse": "dimse", "mllp": "tcp"}


@attr.s(auto_attribs=True)
class HealthSettings:
    kind: str = "http"
    enabled: bool = True
    path: str = "/"
    expect_status: tuple = (200,)
    interval_secs: float = 10.0
    timeout_secs: float = 2.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    #: DIMSE: our AE title in the C-ECHO association.
    calling_aet: str = "HARMONY"

    @classmethod
    def from_options(cls, o, target_kind: str) -> "HealthSettings":
        kind = o.str("type", DEFAULT_CHECK.get(target_kind, "http"), choices=CHECK_KINDS)
        if kind == "tcp" and target_kind == "url":
            raise OptionError("type", "'tcp' checks need targets with 'host' and 'port'")
        if kind == "dimse" and target_kind != "dimse":
            raise OptionError("type", "'dimse' checks need DIMSE targets (host/port/aet)")
        if kind == "http" and target_kind != "url":
            raise OptionError("type", "'http' checks need targets with a 'url'")
        path = o.str("path", "/")
        if not path.startswith("/"):
            raise OptionError("path", f"must start with '/', got {path!r}")
        expect = o._get("expect_status", 200)
        expect = (expect,) if isinstance(expect, int) and not isinstance(expect, bool) else expect
        if not isinstance(expect, (list, tuple)) or not expect or not all(
                isinstance(s, int) and not isinstance(s, bool) and 100 <= s <= 599 for s in expect):
            raise OptionError("expect_status", "must be an HTTP status or a list of them")
        calling = o.str("calling_aet", "HARMONY")
        if not 1 <= len(calling) <= 16:
            raise OptionError("calling_aet", "must be 1-16 characters")
        return cls(
            kind=kind, enabled=o.bool("enabled", True), path=path, expect_status=tuple(expect),
            interval_secs=o.number("interval_secs", 10.0, minimum=0.01),
            timeout_secs=o.number("timeout_secs", 2.0, minimum=0.001),
            healthy_threshold=o.int("healthy_threshold", 2, minimum=1, maximum=100),
            unhealthy_threshold=o.int("unhealthy_threshold", 3, minimum=1, maximum=100),
            calling_aet=calling,
        )


class HttpGetCheck:
    """GET ``target.url + path`` on fresh connections: a pooled connection the
    upstream already closed would make a healthy target look broken."""

    def __init__(self, reactor, settings: HealthSettings, tls_policy=None):
        self.settings = settings
        self.reactor = reactor
        pool = HTTPConnectionPool(reactor, persistent=False)
        from harmony.backends.http import _DirectEndpointFactory  # noqa: PLC0415 - avoid an import cycle

        endpoints = _DirectEndpointFactory(reactor, settings.timeout_secs, tls_policy or BrowserLikePolicyForHTTPS())
        self.agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)

    @defer.inlineCallbacks
    def __call__(self, target):
        url = (target.url.rstrip("/") + self.settings.path).encode("utf-8")
        response = yield self.agent.request(b"GET", url)
        drained = defer.Deferred()
        response.deliverBody(_Drain(drained))
        yield drained
        if response.code not in self.settings.expect_status:
            raise HealthCheckFailed(f"health check answered {response.code}")
        return True


class HealthCheckFailed(Exception):
    pass


class _Drain(Protocol):
    """Reads a health response body to its end and drops it."""

    def __init__(self, finished):
        self.finished = finished

    def connectionLost(self, reason):
        self.finished.callback(None)


class TcpConnectCheck:
    """A target is up when it accepts a TCP connection (MLLP peers have no
    "ping" message every receiver understands); the connection is closed at once."""

    def __init__(self, reactor, settings: HealthSettings):
        self.reactor = reactor
        self.settings = settings

    def __call__(self, target):
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        endpoint = TCP4ClientEndpoint(self.reactor, target.host, target.port, timeout=self.settings.timeout_secs)
        d = connectProtocol(endpoint, Protocol())

        def connected(protocol):
            protocol.transport.loseConnection()
            return True
        return d.addCallback(connected)


def make_check(reactor, settings: HealthSettings, tls_policy=None):
    if settings.kind == "tcp":
        return TcpConnectCheck(reactor, settings)
    if settings.kind == "dimse":
        from harmony.targets.dimse_health import EchoCheck

        return EchoCheck(settings, reactor)
    return HttpGetCheck(reactor, settings, tls_policy)


class HealthMonitor:
    def __init__(self, pool, settings: HealthSettings, clock, check=None, reactor=None):
        self.pool = pool
        self.settings = settings
        self.clock = clock
        self.check = check or make_check(reactor or clock, settings, getattr(pool, "tls_policy", None))
        self.loop = task.LoopingCall(self.run_once)
        self.loop.clock = clock
        self.done = None
        #: The latest round of checks (fires when it finished): lets tests and
        #: callers wait for a round without sleeping.
        self.last_run = defer.succeed(None)

    def start(self):
        self.done = self.loop.start(self.settings.interval_secs, now=True)
        self.done.addErrback(lambda f: log.failure("health checks of backend {backend} stopped", f,
                                                   backend=self.pool.backend))

    def stop(self):
        if self.loop.running:
            self.loop.stop()
        return defer.succeed(None)

    def run_once(self):
        """Check every target once; fires when all checks finished or timed out."""
        self.last_run = defer.DeferredList([self.check_one(t) for t in self.pool.targets], consumeErrors=True)
        return self.last_run

    def check_one(self, target):
        d = defer.maybeDeferred(self.check, target)
        expired = []

        def expire():
            expired.append(True)
            d.cancel()

        # Not addTimeout: a cancelled HTTP request fails with ResponseNeverReceived,
        # and the log should still say "timed out".
        timer = self.clock.callLater(self.settings.timeout_secs, expire)

        def result(outcome):
            if timer.active():
                timer.cancel()
            ok = outcome is True
            error = None
            if not ok:
                if expired:
                    error = f"health check timed out after {self.settings.timeout_secs:g}s"
                else:
                    error = f"health check failed: {outcome.getErrorMessage() or type(outcome.value).__name__}"[:200]
            s = self.settings
            if target.check_result(ok, error, self.clock.seconds(), s.healthy_threshold, s.unhealthy_threshold):
                if ok:
                    log.info("backend {backend}: target {target} is healthy again",
                             backend=self.pool.backend, target=target.name)
                else:
                    log.warn("backend {backend}: target {target} is unhealthy: {error}",
                             backend=self.pool.backend, target=target.name, error=error)
            return None

        return d.addBoth(result)
