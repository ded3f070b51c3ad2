"""One upstream a backend can send to, with its health and circuit state.

Two independent signals decide whether a target may take requests:

* **health** comes from active checks (``healthy_threshold`` successes in a
  row make it healthy, ``unhealthy_threshold`` failures make it unhealthy);
* the **circuit** comes from real traffic: ``failures`` consecutive failed
  requests open it, so the target is skipped; after ``open_secs`` one request
  is let through (half-open) and its outcome closes or re-opens it.

All times come from the pool's clock (the reactor, or ``task.Clock`` in tests).
"""

from __future__ import annotations

import attr

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
CIRCUIT_STATES = (CLOSED, OPEN, HALF_OPEN)


@attr.s(auto_attribs=True, eq=False)
class Target:
    name: str
    weight: int = 1
    #: HTTP-family targets.
    url: str | None = None
    #: DIMSE targets.
    host: str | None = None
    port: int | None = None
    aet: str | None = None
    #: Extra request headers for this target (per-target auth, e.g. Authorization).
    headers: dict = attr.Factory(dict)
    #: The whole ``[targets.NAME]`` table, for backend-specific keys.
    options: dict = attr.Factory(dict)
    #: The file that defines it (for messages and relative paths).
    source: str = ""

    # -- state (not configuration)
    healthy: bool = True
    circuit: str = CLOSED
    opened_at: float = 0.0
    probing: bool = False
    in_flight: int = 0
    consecutive_failures: int = 0
    check_successes: int = 0
    check_failures: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    requests_total: int = 0
    failures_total: int = 0
    retries_total: int = 0
    #: Attempts cut short because our client went away (nginx's 499): never failures.
    client_aborts_total: int = 0

    def describe(self) -> str:
        if self.url:
            return self.url
        if self.host:
            return f"{self.aet or ''}@{self.host}:{self.port}"
        return self.name

    def config_key(self) -> tuple:
        """What makes two targets 'the same' across a reload (state carries over)."""
        return (self.name, self.weight, self.url, self.host, self.port, self.aet,
                tuple(sorted(self.headers.items())))

    def adopt_state(self, other: "Target") -> None:
        for field in ("healthy", "circuit", "opened_at", "consecutive_failures", "check_successes",
                      "check_failures", "last_error", "last_error_at", "requests_total",
                      "failures_total", "retries_total", "client_aborts_total"):
            setattr(self, field, getattr(other, field))

    # -- circuit breaker

    def available(self, now: float, open_secs: float) -> bool:
        """May this target take a request now?  Moves open -> half-open when due."""
        if not self.healthy:
            return False
        if self.circuit == OPEN and now >= self.opened_at + open_secs:
            self.circuit = HALF_OPEN
            self.probing = False
        if self.circuit == OPEN:
            return False
        if self.circuit == HALF_OPEN:
            return not self.probing  # exactly one probe at a time
        return True

    def begin(self) -> None:
        self.in_flight += 1
        self.requests_total += 1
        if self.circuit == HALF_OPEN:
            self.probing = True

    def succeeded(self) -> None:
        self.in_flight -= 1
        self.consecutive_failures = 0
        if self.circuit != CLOSED:
            self.circuit = CLOSED
            self.probing = False

    def failed(self, error: str, now: float, threshold: int | None) -> bool:
        """Record a failed request; returns True when this failure opened the circuit.
        A *threshold* of None never opens it (a pool of one target)."""
        self.in_flight -= 1
        self.failures_total += 1
        self.consecutive_failures += 1
        self.last_error, self.last_error_at = error, now
        if threshold is None:
            return False
        if self.circuit == HALF_OPEN or (self.circuit == CLOSED and self.consecutive_failures >= threshold):
            self.circuit = OPEN
            self.opened_at = now
            self.probing = False
            return True
        return False

    def released(self, client_left: bool = False) -> None:
        """The attempt ended without a verdict on the target (e.g. the client left)."""
        self.in_flight -= 1
        self.probing = False
        if client_left:
            self.client_aborts_total += 1

    def client_aborted(self) -> None:
        """An attempt already answered (and counted a success: the first result of a
        stream) was left by our client before the stream's end: a client abort, no
        verdict on the target."""
        self.client_aborts_total += 1

    # -- active health checks

    def check_result(self, ok: bool, error: str | None, now: float, healthy_threshold: int,
                     unhealthy_threshold: int) -> bool:
        """Record one active check; returns True when the health state changed."""
        if ok:
            self.check_successes += 1
            self.check_failures = 0
            if not self.healthy and self.check_successes >= healthy_threshold:
                self.healthy = True
                # The check says it is back: do not also wait out the circuit.
                self.circuit, self.consecutive_failures, self.probing = CLOSED, 0, False
                return True
            return False
        self.check_failures += 1
        self.check_successes = 0
        self.last_error, self.last_error_at = error, now
        if self.healthy and self.check_failures >= unhealthy_threshold:
            self.healthy = False
            return True
        return False

    def state(self, now: float) -> dict:
        return {
            "name": self.name, "address": self.describe(), "weight": self.weight,
            "healthy": self.healthy, "circuit": self.circuit, "in_flight": self.in_flight,
            "consecutive_failures": self.consecutive_failures, "last_error": self.last_error,
            "last_error_age_secs": None if self.last_error_at is None else round(now - self.last_error_at, 3),
            "requests_total": self.requests_total, "failures_total": self.failures_total,
            "retries_total": self.retries_total, "client_aborts_total": self.client_aborts_total,
        }
