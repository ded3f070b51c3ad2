"""``http`` backend: a reverse proxy to ``base_url`` (or to ``targets``) on a persistent pool.

This is the passthrough hot path, so it talks to upstreams through
:class:`harmony.web.upstream_client.UpstreamClient` (llhttp via httptools, a
keep-alive pool per target) rather than treq or ``Agent``: docs/architecture.md,
"The HTTP passthrough hot path", has the numbers.  The client keeps ``Agent``'s
contract, so the request body goes up as a producer and the response body comes
back as one (neither is ever held whole in memory), and failures arrive as
``Agent``'s types, mapped to 502/504 here.
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import count
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers

from harmony.backends.base import Backend
from harmony.backends.streams import DeadlineBody, ResponseBodyProducer, UpstreamBytes
from harmony.backends.target_tls import PerTargetTLSPolicy
from harmony.compat.twisted import header_name_encoder
from harmony.config.errors import OptionError
from harmony.envelope import ResponseEnvelope, as_producer
from harmony.errors import BackendTimeout, BackendUnavailable, HarmonyError
from harmony.log import get_logger
from harmony.targets import Target, TargetPool
from harmony.web.client import DirectEndpointFactory
from harmony.web.headers import end_to_end
from harmony.web.upstream_client import UpstreamClient
from harmony.web.urls import check_base_url

log = get_logger("harmony.backends.http")


def upstream_url(base_url: str, subpath: str, raw_query: bytes) -> bytes:
    url = base_url + subpath
    # base_url is checked and has no trailing "/": only an empty sub-path can leave
    # the URL without a path (spared a urlsplit per request otherwise).
    if not subpath.startswith("/") and not urlsplit(url).path:
        url += "/"
    out = url.encode("utf-8", "surrogateescape")
    if raw_query:
        out += b"?" + raw_query
    return out


def forwarded_headers(request, *, drop=(b"host", b"content-length")) -> Headers:
    """End-to-end request headers plus the X-Forwarded-* and X-Request-ID a
    reverse proxy owes its upstream.  Host and Content-Length are the client's
    agent's to set (from the upstream URL and the body producer).

    The values set here are the client's address, a scheme, a request id (checked
    or made by harmony.web.bridge) and the Host header's value as parsed: written
    into the copy's dict under the names ``Headers`` would give them, sparing four
    name encodings and value checks per proxied request."""
    headers = end_to_end(request.headers, drop=drop)
    raw = headers._rawHeaders
    client = request.client_ip
    if client:
        client_b = client.encode()
        xff = raw.get(_XFF)
        raw[_XFF] = [b", ".join([*xff, client_b]) if xff else client_b]
    if _XFP not in raw:
        raw[_XFP] = [request.scheme.encode()]
    host = request.host
    if host and _XFH not in raw:
        headers.setRawHeaders(_XFH, [host.encode("latin-1")])  # a middleware may have set it: checked
    if request.request_id:
        raw[_XRID] = [request.request_id.encode()]
    return headers


_XFF, _XFP, _XFH, _XRID = (header_name_encoder().encode(n) for n in (
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"))


def response_headers(response) -> Headers:
    """The end-to-end headers of an upstream's *response*: made in one pass over the
    answer's header lines by harmony.web.upstream_client, else copied from ``headers``."""
    own = getattr(response, "end_to_end_headers", None)
    return own() if own is not None else end_to_end(response.headers)


def client_side_cause(failure):
    """The client-side cause inside one of Agent's wrapper failures, or None.

    The upstream client (like ``Agent``) reports a request body that failed (an
    upload cut mid-body, one over the size limit) as RequestGenerationFailed([...]),
    and ``Agent`` reported "we cancelled the request" (our client hung up) as
    ResponseNeverReceived([CancelledError]): neither is the upstream's doing, and
    mapping them to 502 "upstream closed the connection" would count them
    against the target.
    """
    for reason in getattr(failure.value, "reasons", None) or ():
        if reason.check(defer.CancelledError):
            # Still a cancellation: whoever cancelled decides what it means (our
            # client left: the pool counts a client abort; an outer timeout such
            # as store-and-forward's addTimeout: it becomes that TimeoutError).
            return Failure(defer.CancelledError("the request was cancelled before the upstream answered"))
        if reason.check(HarmonyError) and reason.value.status < 500:
            return reason
    return None


class HeadDeadlines:
    """The response-head deadlines of one backend's bodyless requests, kept with
    one ``DelayedCall`` armed lazily instead of a ``callLater`` (and a cancel)
    a request: a visible share of the passthrough's CPU per request.

    Every deadline is the same *seconds* long, so they fall due in the order
    they were set: an insertion-ordered map whose first entry is the next to
    expire.  An answered request's entry leaves at once (``OrderedDict.pop``,
    wherever it is), so one request stuck until its deadline holds only its own
    entry, never the ones set after it; the timer, when it fires, expires what
    is due and re-arms for the new first entry, so under steady traffic it
    fires about once every *seconds*.
    """

    def __init__(self, clock, seconds: float):
        self._clock = clock
        self._seconds = seconds
        self._pending: OrderedDict = OrderedDict()  # key -> (due, expire)
        self._keys = count()
        self._timer = None

    def start(self, expire) -> int:
        key = next(self._keys)
        self._pending[key] = (self._clock.seconds() + self._seconds, expire)
        if self._timer is None:
            self._timer = self._clock.callLater(self._seconds, self._fire)
        return key

    def stop(self, key: int) -> None:
        self._pending.pop(key, None)

    def __len__(self) -> int:
        """Deadlines still running (requests not answered yet)."""
        return len(self._pending)

    def _fire(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        pending = self._pending
        while pending:
            key = next(iter(pending))
            due, expire = pending[key]
            if due > now:
                if self._timer is not None:  # armed by a start() inside an expire() (a retry): too late
                    self._timer.cancel()
                self._timer = self._clock.callLater(due - now, self._fire)
                return
            del pending[key]
            expire()

    def close(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

class _Attempt:
    """One upstream exchange's deadline and the mapping of its outcome
    (:meth:`HttpBackend.request`): one small object a request, its bound
    methods the Deferred's callbacks, where closures cost a cell each.  With
    *judge* (a pool of one's ``(pool, target, request)``), the pool's verdict on
    the target is taken in the same callback (``TargetPool.judge_answer`` /
    ``judge_failure``), as its own callback after this one would."""

    __slots__ = ("backend", "answered", "deferred", "deadline", "timer", "timed_out", "judge")

    def __init__(self, backend, answered, judge=None):
        self.backend = backend
        self.answered = answered
        self.deferred = None
        self.deadline = None
        self.timer = None
        self.timed_out = False
        self.judge = judge

    def expire(self):
        self.timed_out = True
        self.deferred.cancel()

    def stop(self):
        if self.timer is None:
            self.backend.head_deadlines.stop(self.deadline)
        elif self.timer.active():
            self.timer.cancel()

    def done(self, response):
        self.stop()
        judge = self.judge
        if judge is None:
            return response if self.answered is None else self.answered(response)
        pool, target, request = judge
        if self.answered is not None:
            try:
                response = self.answered(response)
            except Exception:
                return pool.judge_failure(Failure(), target, request)
        return pool.judge_answer(response, target, request)

    def failed(self, failure):
        judge = self.judge
        if judge is None:
            return self._mapped(failure)
        try:
            failure = self._mapped(failure)
        except Exception:
            failure = Failure()
        pool, target, request = judge
        return pool.judge_failure(failure, target, request)

    def _mapped(self, failure):
        """The failure a request fails with (returned or raised), from the exchange's."""
        self.stop()
        if self.timed_out:
            raise BackendTimeout(f"upstream did not answer within {self.backend.timeout:g}s")
        if failure.check(defer.CancelledError):
            return failure
        client_side = client_side_cause(failure)
        if client_side is not None:
            return client_side
        if failure.check(ResponseNeverReceived, ResponseFailed):
            raise BackendUnavailable("upstream closed the connection before answering")
        from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
        if failure.check(TimeoutError):
            raise BackendTimeout("timed out connecting to upstream")
        if failure.check(ConnectError, DNSLookupError):
            raise BackendUnavailable(f"upstream unreachable: {failure.value.__class__.__name__}")
        return failure


class HttpBackend(Backend):
    def __init__(self, name, base_urls, reactor, *, timeout=30.0, connect_timeout=None,
                 max_connections=64, target_pool: TargetPool | None = None):
        super().__init__(name)
        if target_pool is None:
            names = [name] if len(base_urls) == 1 else [f"{name}-{i}" for i in range(len(base_urls))]
            target_pool = TargetPool(name, [Target(n, url=u) for n, u in zip(names, base_urls, strict=True)], reactor)
        #: Chooses the upstream per request, with health, circuit and retries (harmony.targets).
        self.target_pool = target_pool
        self.base_urls = [t.url for t in target_pool.targets]
        self.reactor = reactor
        self.timeout = timeout
        self.head_deadlines = HeadDeadlines(reactor, timeout)
        # Health checks use the same per-target TLS settings.
        target_pool.tls_policy = PerTargetTLSPolicy(target_pool.targets)
        endpoints = DirectEndpointFactory(reactor, connect_timeout or timeout, target_pool.tls_policy)
        # A pooled keep-alive connection the upstream already closed fails before
        # any answer: the client then sends an idempotent request without a body
        # once more on a fresh connection (harmony.web.upstream_client).  That is transport hygiene, not a
        # retry policy (those live in the target pool), and without it a stale
        # connection shows up as a 502 that opens the circuit.
        self.client = UpstreamClient(reactor, endpoints, max_idle_per_target=max_connections, log=log)

    @classmethod
    def from_config(cls, name, options, ctx):
        implicit = {"url": options.str("base_url")} if "base_url" in options else None
        if implicit is None and not (ctx.component and ctx.component.targets):
            raise OptionError("base_url", "is required (or name targets whose tables have a 'url')")
        pool = TargetPool.from_options(name, options, ctx, kind="url", implicit=implicit, check_url=check_base_url)
        timeout = options.number("timeout_secs", 30.0, minimum=0.001)
        connect = options.number("connect_timeout_secs", None, minimum=0.001)
        maxconn = options.int("max_connections_per_host", 64, minimum=1, maximum=10000)
        return cls(name, [t.url for t in pool.targets], ctx.reactor, timeout=timeout, connect_timeout=connect,
                   max_connections=maxconn, target_pool=pool)

    def pick_base_url(self, request) -> str:
        """The base URL the pool would choose now (no retries: prefer :meth:`send_to` via the pool)."""
        target = self.target_pool.choose(request)
        if target is None:
            raise self.target_pool.all_down(request)
        return target.url

    def prepare_headers(self, request) -> Headers:
        return forwarded_headers(request)

    def build_response(self, request, response) -> ResponseEnvelope:
        return ResponseEnvelope(
            status=response.code, reason=response.phrase,
            headers=response_headers(response), body=self.passthrough_body(response),
            metadata={"upstream_status": str(response.code)},
        )

    def passthrough_body(self, response):
        """The upstream body as bytes when it all came with the head (most small
        answers: no producer, timer or Deferreds to write it), else as a stream."""
        whole = getattr(response, "whole_body", None)
        if whole is not None:
            data = whole()
            if data is not None:
                return UpstreamBytes(data)
        return self.body_producer(response)

    def body_producer(self, response) -> ResponseBodyProducer:
        """The upstream body as a stream, failed if the upstream stalls for timeout_secs."""
        return ResponseBodyProducer(response, idle_timeout=self.timeout, clock=self.reactor)

    def send(self, request):
        pool = self.target_pool
        if len(pool.targets) != 1:
            return pool.call(request, lambda target: self.send_to(target, request))
        # A pool of one (the plain passthrough): its verdict on the target is taken in
        # the attempt's own callback (_Attempt), not in a Deferred step of its own.
        target = pool.enter_one(request)
        if target is None:
            return defer.fail(pool.all_down(request))
        try:
            return self.send_to(target, request, judge=(pool, target, request))
        except Exception:
            try:
                return defer.fail(pool.judge_failure(Failure(), target, request))
            except Exception:
                return defer.fail()

    def send_to(self, target, request, judge=None):
        """One attempt at one target (the pool calls this again for a retry); *judge*:
        see :class:`_Attempt`."""
        url = upstream_url(target.url, request.subpath, request.raw_query)
        headers = self.prepare_headers(request)
        for hname, value in target.headers.items():
            headers.setRawHeaders(hname, [value])
        return self.request(request.method.encode("ascii"), url, headers, as_producer(request.body),
                            answered=lambda response: self.build_response(request, response), judge=judge)

    def request(self, method: bytes, url: bytes, headers: Headers, body_producer, answered=None, judge=None):
        """One upstream exchange with a deadline on the response head.

        Fails with BackendTimeout past ``timeout_secs`` and BackendUnavailable
        when the upstream cannot be reached or breaks off.  *answered*, when
        given, turns the upstream's response into the result in the same
        callback that stops the deadline (one Deferred callback a request on
        the passthrough's hot path rather than three).
        """
        attempt = _Attempt(self, answered, judge)
        if body_producer is None:
            attempt.deadline = self.head_deadlines.start(attempt.expire)
        else:
            # A timer of its own, pushed back by every chunk of the body (no 504 mid-upload).
            attempt.timer = self.reactor.callLater(self.timeout, attempt.expire)
            body_producer = DeadlineBody(body_producer, attempt.timer, self.timeout)
        try:
            d = attempt.deferred = self.client.request(method, url, headers, body_producer)
        except Exception:
            attempt.stop()  # no exchange to expire: its deadline goes too
            raise
        return d.addCallbacks(attempt.done, attempt.failed)

    def close(self):
        self.head_deadlines.close()
        self.target_pool.stop()
        return self.client.closeCachedConnections()
