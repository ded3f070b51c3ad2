"""TargetPool: choose a target per request, skip the broken ones, retry the
idempotent.

The pool is protocol-neutral.  A backend builds one from its options and its
``[targets.*]`` tables, then sends through it::

    self.target_pool = TargetPool.from_options(name, options, ctx, kind="url")
    def send(self, request):
        return self.target_pool.call(request, lambda target: self.send_to(target, request))

``call`` picks a target (routing rules, then the strategy, among targets that
are healthy and whose circuit lets them), runs the backend's function, feeds
the outcome to the circuit breaker and, for idempotent requests with a
replayable body, tries the next target on connection failures, timeouts and
502/503 answers - bounded by ``retries`` and ``deadline_secs``.  When no
target can take the request it fails fast with 503 and says why.

Two rules keep the circuit honest:

* A request cancelled because *our client* went away (a hang-up, an upload
  cut mid-body) says nothing about the target: it is counted apart
  (``client_aborts``, nginx's 499) and never in failures, circuit or retries.
  An answer that streams on after its first result (a DICOM backend's C-FIND
  matches, C-GET/C-MOVE instances) is judged at its first result; a client
  that leaves mid-stream is counted as a client abort once both the consumer
  has given up and the upstream has ended (:meth:`TargetPool._watch_stream`).
* A pool of ONE target never opens its circuit (nginx's rule for an upstream
  group of one): failing every request fast for ``open_secs`` helps nobody
  when there is no other target to send them to.  Failures are still counted,
  and active health checks, when configured, still take it out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer
from twisted.python.failure import Failure

from harmony.config.errors import ConfigErrors, OptionError, Problem, did_you_mean
from harmony.config.options import Options
from harmony.errors import ClientClosedRequest, HarmonyError, ServiceUnavailable, client_gone
from harmony.log import get_logger
from harmony.routing import KeySource, Rule, first_match, parse_rules
from harmony.targets.strategies import STRATEGIES, ConsistentHash
from harmony.targets.target import Target

if TYPE_CHECKING:  # health imports this module
    from harmony.targets.health import HealthMonitor

log = get_logger("harmony.targets")


class TLSPolicy(Protocol):
    """What the health checks need of twisted.web's IPolicyForHTTPS (a duck type:
    the zope declaration is invisible to mypy)."""

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any: ...

#: HTTP methods and DIMSE operations safe to send twice.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "C-ECHO", "C-FIND", "C-GET"})
#: Statuses that count against a target (its circuit) when an upstream answers them.
FAILURE_STATUSES = (502, 503, 504)


def sub_options(options: Options, key: str) -> tuple[Options | None, str]:
    """A nested options table (``[backends.X.health]``) as its own Options."""
    raw = options.table(key, None)
    return (None if raw is None else Options(raw, options.base_dir)), key


def finish_sub(sub: Options, key: str) -> None:
    unknown = sorted(set(sub.raw) - sub.used)
    if unknown:
        raise OptionError(f"{key}.{unknown[0]}", "unknown option" + did_you_mean(unknown[0], sub.used))


def _prefixed(key, fn):
    try:
        return fn()
    except OptionError as e:
        raise OptionError(f"{key}.{e.key}", e.message) from None


def discard_body(body) -> None:
    """Read and drop a response body we will not forward (so its connection can be reused)."""
    if hasattr(body, "startProducing"):
        class _Null:
            def write(self, data):
                pass

            def registerProducer(self, producer, streaming):
                pass

            def unregisterProducer(self):
                pass

        body.startProducing(_Null()).addErrback(lambda _: None)


def request_operation(request) -> str:
    return request.metadata.get("dimse_op") or request.method


def _describe_failure(failure: Failure) -> str:
    err = failure.value
    if isinstance(err, HarmonyError):
        return f"{err.status} {err.detail}"
    return f"{type(err).__name__}: {failure.getErrorMessage()}"[:200]


class TargetPool:
    def __init__(self, backend: str, targets: list[Target], clock, *, strategy: str = "round_robin",
                 hash_key: KeySource | None = None, retries: int = 1, deadline_secs: float = 60.0,
                 retry_non_idempotent: bool = False, retry_statuses=(502, 503),
                 circuit_failures: int = 5, circuit_open_secs: float = 30.0, rules=(),
                 health=None, reactor=None):
        if not targets:
            raise ValueError("a target pool needs at least one target")
        self.backend = backend
        self.targets = list(targets)
        self.by_name = {t.name: t for t in self.targets}
        #: Time for circuits, deadlines and the health-check loop (``task.Clock`` in tests).
        self.clock = clock
        #: Network I/O for health checks.
        self.reactor = reactor or clock
        self.strategy_name = strategy
        self.hash_key = hash_key
        self.strategy = (ConsistentHash(self.targets, hash_key) if strategy == "hash"
                         else STRATEGIES[strategy](self.targets))
        self.retries = retries
        self.deadline_secs = deadline_secs
        self.retry_non_idempotent = retry_non_idempotent
        self.retry_statuses = frozenset(retry_statuses)
        self.circuit_failures = circuit_failures
        self.circuit_open_secs = circuit_open_secs
        self.rules = list(rules)
        #: :class:`harmony.targets.health.HealthSettings` or None (no active checks).
        self.health = health
        self.monitor: HealthMonitor | None = None
        #: An IPolicyForHTTPS for HTTP health checks (set by HTTP-family backends).
        self.tls_policy: TLSPolicy | None = None

    # ------------------------------------------------------------------ config

    @classmethod
    def from_options(cls, backend: str, options: Options, ctx, *, kind: str = "url",
                     implicit: dict | None = None, check_url=None) -> "TargetPool":
        """Build from a backend's options and ``ctx.targets()``.

        *kind* is ``"url"`` (HTTP-family: each target needs ``url``),
        ``"dimse"`` (``host``, ``port``, ``aet``) or ``"mllp"`` (``host``, ``port``).  *implicit* is a target
        table for a backend's single-URL shorthand (``base_url``); it is named
        after the backend.  *check_url* validates a URL (and may normalise it).
        """
        targets = []
        if implicit is not None:
            targets.append(build_target(backend, implicit, kind, "", check_url, implicit=True))
        for table in ctx.targets():
            name = table["name"]
            source = ctx.config.targets.get(name, {}).get("_source", "")
            targets.append(build_target(name, table, kind, source, check_url))
        if not targets:
            what = {"url": "'url'", "mllp": "'host' and 'port'"}.get(kind, "'host', 'port' and 'aet'")
            raise OptionError("targets", f"names no targets (give it targets = [...] whose tables have {what})")
        strategy = options.str("strategy", "round_robin", choices=tuple(STRATEGIES))
        hash_key = None
        if "hash_key" in options or strategy == "hash":
            hash_key = KeySource.parse(options.str("hash_key"), "hash_key")
        rules = parse_rules(options.list("rules", [], of=dict), "rules", "targets")
        names = {t.name for t in targets}
        for rule in rules:
            chosen = rule.choice
            if not isinstance(chosen, list) or not chosen or not all(isinstance(n, str) for n in chosen):
                raise OptionError(f"rules[{rule.index}].targets", "must be a non-empty list of target names")
            for n in chosen:
                if n not in names:
                    known = ", ".join(sorted(names))
                    raise OptionError(f"rules[{rule.index}].targets",
                                      f"names {n!r}, which is not one of this backend's targets ({known})")
        retries = options.int("retries", 1, minimum=0, maximum=100)
        deadline = options.number("deadline_secs", 60.0, minimum=0.001)
        retry_any = options.bool("retry_non_idempotent", False)
        retry_statuses = options.list("retry_on_status", [502, 503], of=int)
        circuit, key = sub_options(options, "circuit")
        failures, open_secs = 5, 30.0
        if circuit is not None:
            failures = _prefixed(key, lambda: circuit.int("failures", 5, minimum=1, maximum=10000))
            open_secs = _prefixed(key, lambda: circuit.number("open_secs", 30.0, minimum=0.001))
            finish_sub(circuit, key)
        from harmony.targets.health import HealthSettings

        health, key = sub_options(options, "health")
        settings = None
        if health is not None:
            settings = _prefixed(key, lambda: HealthSettings.from_options(health, kind))
            finish_sub(health, key)
            if not settings.enabled:
                settings = None
        return cls(backend, targets, ctx.reactor, strategy=strategy, hash_key=hash_key, retries=retries,
                   deadline_secs=deadline, retry_non_idempotent=retry_any, retry_statuses=retry_statuses,
                   circuit_failures=failures, circuit_open_secs=open_secs, rules=rules, health=settings,
                   reactor=ctx.reactor)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start active health checks (if configured)."""
        if self.health is not None and self.monitor is None:
            from harmony.targets.health import HealthMonitor

            self.monitor = HealthMonitor(self, self.health, self.clock, reactor=self.reactor)
            self.monitor.start()

    def stop(self):
        if self.monitor is not None:
            monitor, self.monitor = self.monitor, None
            return monitor.stop()
        return defer.succeed(None)

    def adopt_state(self, old: "TargetPool") -> None:
        """Carry health/circuit state over from the pool this one replaces (hot reload)."""
        before = {t.config_key(): t for t in old.targets}
        for t in self.targets:
            prev = before.get(t.config_key())
            if prev is not None:
                t.adopt_state(prev)

    # ------------------------------------------------------------------ choosing

    def now(self) -> float:
        return self.clock.seconds()

    def allowed(self, request) -> tuple[list[Target], Rule | None]:
        """Targets this request may go to (routing rules), and the rule that said so."""
        rule = first_match(self.rules, request) if self.rules else None
        if rule is None:
            return self.targets, None
        return [self.by_name[n] for n in rule.choice], rule

    def choose(self, request, exclude=()) -> Target | None:
        allowed, _ = self.allowed(request)
        now = self.now()
        if len(self.targets) == 1:
            # A pool of one: its circuit never holds requests back (see the module docstring).
            return None if exclude or not self.targets[0].healthy else self.targets[0]
        candidates = [t for t in allowed if t not in exclude and t.available(now, self.circuit_open_secs)]
        if not candidates:
            return None
        return self.strategy.pick(candidates, request)

    def all_down(self, request) -> ServiceUnavailable:
        allowed, rule = self.allowed(request)
        now = self.now()
        reasons = []
        wait = None
        for t in allowed:
            if not t.healthy:
                why = "unhealthy"
            elif t.circuit == "open":
                why = "circuit open"
                left = t.opened_at + self.circuit_open_secs - now
                wait = left if wait is None else min(wait, left)
            elif t.circuit == "half_open":
                why = "circuit half-open, probe in flight"
            else:
                why = "available"
            if t.last_error and why != "available":
                why += f", last error: {t.last_error}"
            reasons.append(f"{t.name} ({why})")
        scope = f" chosen by rule {rule.index}" if rule is not None else ""
        headers = [(b"Retry-After", str(max(1, int(wait + 0.999))).encode())] if wait is not None else []
        return ServiceUnavailable(f"all {len(allowed)} target(s){scope} of backend {self.backend!r} are "
                                  f"unavailable: {'; '.join(reasons)}", headers=headers)

    def may_retry(self, request) -> bool:
        if self.retries <= 0:
            return False
        if not (self.retry_non_idempotent or request_operation(request) in IDEMPOTENT):
            return False
        # A streamed body can be sent once only.
        return request.body is None or isinstance(request.body, (bytes, bytearray))

    # ------------------------------------------------------------------ sending

    def call(self, request, attempt) -> defer.Deferred:
        """Send *request* via ``attempt(target) -> Deferred[ResponseEnvelope]``."""
        if len(self.targets) == 1:
            return self._call_one(request, attempt)
        return self._call(request, attempt)

    def _call_one(self, request, attempt) -> defer.Deferred:
        """:meth:`_call` for a pool of one, without its generator: there is never
        another target to retry on, so one attempt (and its verdict) is all of it."""
        target = self.enter_one(request)
        if target is None:
            return defer.fail(self.all_down(request))
        try:
            d = attempt(target)
        except Exception:
            d = defer.fail()
        return d.addCallbacks(self.judge_answer, self.judge_failure,
                              callbackArgs=(target, request), errbackArgs=(target, request))

    # A pool of one's attempt in three calls, for a backend that takes the verdict in
    # its own callback (harmony.backends.http: the plain passthrough's hot path, one
    # Deferred step a request fewer): enter_one, then judge_answer or judge_failure.

    def enter_one(self, request) -> Target | None:
        """The target of a pool of one, counted as attempted, or None when it is down
        (then ``all_down(request)`` says why)."""
        target = self.choose(request)
        if target is not None:
            target.begin()
            request.metadata["target"] = target.name
        return target

    def judge_answer(self, response, target: Target, request):
        """The verdict on *target* for an answer; the answer passes through as it is."""
        if response.status not in FAILURE_STATUSES:
            target.succeeded()
            _watch_stream(target, request, response)
        else:
            self._failed(target, f"answered {response.status}")
        return response  # an upstream's own answer passes through

    def judge_failure(self, failure: Failure, target: Target, request):
        """The verdict on *target* for an attempt that failed; returns (or raises) what
        the request fails with."""
        self._attempt_failed(target, request, failure)
        return failure

    def _attempt_failed(self, target, request, failure: Failure) -> None:
        """The verdict on *target* for an attempt that failed; raises when the
        failure ends the request whatever the retry policy (client gone, cancelled,
        the request's own fault)."""
        err = failure.value
        if client_gone(request) or isinstance(err, (defer.CancelledError, ClientClosedRequest)):
            # Our client left (or we were cancelled): no verdict on the target, no retry.
            target.released(client_left=client_gone(request) or isinstance(err, ClientClosedRequest))
            if client_gone(request) and not isinstance(err, ClientClosedRequest):
                raise ClientClosedRequest("the client went away before the answer") from None
            failure.raiseException()
        if isinstance(err, HarmonyError) and err.status not in FAILURE_STATUSES:
            target.released()  # the request's fault, not the target's
            failure.raiseException()
        self._failed(target, _describe_failure(failure))

    @defer.inlineCallbacks
    def _call(self, request, attempt):
        deadline = self.now() + self.deadline_secs
        retry = self.may_retry(request)
        tried: list[Target] = []
        last_failure: Failure | None = None
        while True:
            target = self.choose(request, exclude=tried)
            if target is None:
                if last_failure is not None:
                    raise last_failure.value
                raise self.all_down(request)
            if tried:
                target.retries_total += 1
                # debug: during a failover this is one line per request; the metric counts them
                log.debug("backend {backend}: retrying {method} on target {target} after {error}",
                         backend=self.backend, method=request_operation(request), target=target.name,
                         error=tried[-1].last_error)
            tried.append(target)
            target.begin()
            request.metadata["target"] = target.name
            try:
                response = yield attempt(target)
            except Exception:
                failure = Failure()
                self._attempt_failed(target, request, failure)
                last_failure = failure
            else:
                if response.status not in FAILURE_STATUSES:
                    target.succeeded()
                    _watch_stream(target, request, response)
                    return response
                self._failed(target, f"answered {response.status}")
                if not (retry and response.status in self.retry_statuses and self._budget(tried, deadline)
                        and self._another(request, tried)):
                    return response  # an upstream's own answer passes through
                discard_body(response.body)
                last_failure = None
                continue
            if not (retry and self._budget(tried, deadline)):
                raise last_failure.value

    def _budget(self, tried, deadline) -> bool:
        return len(tried) <= self.retries and self.now() < deadline

    def _another(self, request, tried) -> bool:
        allowed, _ = self.allowed(request)
        now = self.now()
        return any(t not in tried and t.available(now, self.circuit_open_secs) for t in allowed)

    def _failed(self, target: Target, error: str) -> None:
        threshold = self.circuit_failures if len(self.targets) > 1 else None
        if target.failed(error, self.now(), threshold):
            log.warn("backend {backend}: circuit of target {target} opened after {n} consecutive failure(s): {error}",
                     backend=self.backend, target=target.name, n=target.consecutive_failures, error=error)

    # ------------------------------------------------------------------ reporting

    def snapshot(self) -> dict:
        now = self.now()
        return {
            "backend": self.backend, "strategy": self.strategy_name, "retries": self.retries,
            "health_checks": self.health.kind if self.health else None,
            "targets": [t.state(now) for t in self.targets],
        }


def _watch_stream(target: Target, request, response) -> None:
    """The one place a streamed answer's client abort is counted (C-FIND, C-GET and
    C-MOVE alike, whoever consumes the stream).  It is decided when the stream is
    abandoned -- the consumer gave up AND the upstream ended, whichever came last --
    not when it is cancelled: the client's leaving and the relay's cancel come in
    either order, and only the consumer knows which it was (it marks the request
    client-gone before it gives up).  Never a failure: the verdict on the target was
    its first result."""
    results = response.state.dicom_results
    if results is None:
        return

    def abandoned(_):
        if client_gone(request):
            target.client_aborted()

    results.when_abandoned().addCallback(abandoned)


def build_target(name: str, table: dict, kind: str, source: str, check_url=None, implicit=False) -> Target:
    """A :class:`Target` from a ``[targets.NAME]`` table; problems name that table's keys."""

    def bad(key, msg):
        if implicit:  # the backend's own shorthand, e.g. base_url
            raise OptionError("base_url" if key == "url" else key, msg)
        raise ConfigErrors([Problem(source, f"targets.{name}.{key}", msg)])

    weight = table.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 1000:
        bad("weight", f"must be an integer 1-1000, got {weight!r}")
    headers = table.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        bad("headers", "must be a table of header name = string value")
    common = dict(name=name, weight=weight, headers=dict(headers), source=source,
                  options={k: v for k, v in table.items() if k != "name"})
    if kind == "url":
        url = table.get("url")
        if not isinstance(url, str):
            bad("url", "is required (an absolute http(s) URL)")
        if check_url is not None:
            try:
                url = check_url(url)
            except OptionError as e:
                bad("url", e.message)
        return Target(url=url, **common)
    host, port, aet = table.get("host"), table.get("port"), table.get("aet")
    if not isinstance(host, str) or not host:
        bad("host", "is required (a host name or IP address)")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        bad("port", f"must be a port number 1-65535, got {port!r}")
    if kind == "mllp":
        return Target(host=host, port=port, **common)
    if not isinstance(aet, str) or not 1 <= len(aet.strip()) <= 16:
        bad("aet", f"must be an AE title of 1-16 characters, got {aet!r}")
    return Target(host=host, port=port, aet=aet.strip(), **common)
