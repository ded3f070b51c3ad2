"""Targets: strategies, failover, health checks, circuit breaker, retries and
routing rules, through Harmony's http backend to real upstreams on 127.0.0.1.

Time-dependent parts (circuit open period, health-check interval, deadline)
run on ``task.Clock`` given to the pool; traffic runs on the real reactor.
"""

import json

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, task
from twisted.internet.error import ConnectionRefusedError

from harmony.config import ConfigErrors, load_config
from harmony.envelope import RequestEnvelope, ResponseEnvelope
from harmony.errors import ServiceUnavailable
from harmony.runtime import build_runtime
from harmony.targets import CLOSED, HALF_OPEN, OPEN, Target, TargetPool
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.upstreams import KillableUpstream, lb_pipeline as pipeline_config, served_by


@pytest.fixture
def servers():
    started = [KillableUpstream(n).start() for n in ("a", "b", "c")]
    yield started
    for s in started:
        s.resource.release()
        pytest_twisted.blockon(s.kill())


async def run(tmp_path, servers, **kw):
    path = write_config(tmp_path, MINIMAL_MAIN, {"lb": pipeline_config(servers, **kw)})
    return await start_harmony(path)


async def get_many(running, n, path="/api/x", headers=None):
    bodies, codes = [], []
    for _ in range(n):
        r = await treq.get(running.url(path), headers=headers)
        codes.append(r.code)
        bodies.append(await r.content())
    return codes, bodies


def pool_of(running, backend="up") -> TargetPool:
    return running.service.runtime.backends[backend].target_pool


# ---------------------------------------------------------------- strategies


@pytest_twisted.ensureDeferred
async def test_round_robin_is_the_default_and_even(tmp_path, servers):
    running = await run(tmp_path, servers)
    try:
        codes, bodies = await get_many(running, 30)
        assert codes == [200] * 30
        assert served_by(bodies) == {"a": 10, "b": 10, "c": 10}
        assert [json.loads(b)["served_by"] for b in bodies[:6]] == ["a", "b", "c", "a", "b", "c"]
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_weighted_follows_weights_smoothly(tmp_path, servers):
    running = await run(tmp_path, servers[:2], backend='strategy = "weighted"',
                        extra_targets={"a": "weight = 3\n"})
    try:
        codes, bodies = await get_many(running, 12)
        assert served_by(bodies) == {"a": 9, "b": 3}
        order = [json.loads(b)["served_by"] for b in bodies[:4]]
        assert order.count("b") == 1  # smooth: b's turn comes inside every 4, not after 9 a's
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_failover_uses_first_until_it_dies(tmp_path, servers):
    running = await run(tmp_path, servers, backend='strategy = "failover"')
    try:
        _, bodies = await get_many(running, 5)
        assert served_by(bodies) == {"a": 5}
        await servers[0].kill()
        codes, bodies = await get_many(running, 5)
        assert codes == [200] * 5
        assert served_by(bodies) == {"b": 5}
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_hash_gives_affinity_per_key(tmp_path, servers):
    running = await run(tmp_path, servers, backend='strategy = "hash"\nhash_key = "query:StudyInstanceUID"')
    try:
        seen = {}
        for i in range(12):
            uid = f"1.2.826.0.1.3680043.8.498.{i}"
            _, bodies = await get_many(running, 3, path=f"/api/studies?StudyInstanceUID={uid}")
            owners = served_by(bodies)
            assert len(owners) == 1, owners  # the same key always lands on the same target
            seen[uid] = next(iter(owners))
        assert len(set(seen.values())) > 1  # and keys spread over targets
        # Losing a target moves only its keys.
        victim = seen["1.2.826.0.1.3680043.8.498.0"]
        await next(s for s in servers if s.name == victim).kill()
        for uid, owner in seen.items():
            codes, bodies = await get_many(running, 1, path=f"/api/studies?StudyInstanceUID={uid}")
            assert codes == [200]
            now = json.loads(bodies[0])["served_by"]
            if owner != victim:
                assert now == owner
            else:
                assert now != victim
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_hash_on_path_regex_and_dicom_tag_key_sources():
    from harmony.routing import KeySource
    req = RequestEnvelope(path="/dicomweb/studies/1.2.3/series/4", metadata={"auth.sub": "alice"},
                          normalized={"0020000D": {"vr": "UI", "Value": ["1.2.3\0"]},
                                      "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^J"}]}})
    assert KeySource.parse("path:/studies/([^/]+)", "k").value(req) == "1.2.3"
    assert KeySource.parse("tag:StudyInstanceUID", "k").value(req) == "1.2.3"
    assert KeySource.parse("tag:00100010", "k").value(req) == "Doe^J"
    assert KeySource.parse("metadata:auth.sub", "k").value(req) == "alice"
    assert KeySource.parse("header:X-None", "k").value(req) is None


@pytest_twisted.ensureDeferred
async def test_least_connections_avoids_the_busy_target(tmp_path, servers):
    servers[0].resource.hang.add("/slow")
    running = await run(tmp_path, servers[:2], backend='strategy = "least_connections"')
    try:
        slow = treq.get(running.url("/api/slow"))  # parks one request on a
        while servers[0].hits != ["/slow"]:
            await task.deferLater(__import__("twisted.internet.reactor").internet.reactor, 0.01, lambda: None)
        codes, bodies = await get_many(running, 6)
        assert served_by(bodies) == {"b": 6}
        assert pool_of(running).by_name["a"].in_flight == 1
        servers[0].resource.release()
        r = await slow
        await r.content()
        assert pool_of(running).by_name["a"].in_flight == 0
    finally:
        await running.stop()


# ---------------------------------------------------------------- failover, circuit, recovery


@pytest_twisted.ensureDeferred
async def test_killed_target_fails_no_idempotent_request_and_recovers(tmp_path, servers):
    running = await run(tmp_path, servers[:2], backend="[backends.up.circuit]\nfailures = 2\nopen_secs = 30")
    pool = pool_of(running)
    clock = pool.clock = task.Clock()
    try:
        await get_many(running, 4)
        await servers[0].kill()
        codes, bodies = await get_many(running, 20)
        assert codes == [200] * 20  # every GET that hit the dead target was retried on b
        assert served_by(bodies) == {"b": 20}
        a = pool.by_name["a"]
        assert a.circuit == OPEN and "unreachable" in a.last_error
        assert a.failures_total == 2  # ejected after 2: later requests did not even try it
        servers[0].start()  # back, same port
        clock.advance(29)
        _, bodies = await get_many(running, 4)
        assert served_by(bodies) == {"b": 4}  # still within open_secs
        clock.advance(1)
        assert a.available(clock.seconds(), pool.circuit_open_secs) and a.circuit == HALF_OPEN
        codes, bodies = await get_many(running, 4)
        assert codes == [200] * 4 and served_by(bodies) == {"a": 2, "b": 2}
        assert a.circuit == CLOSED
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_single_target_that_dies_is_tried_every_time_and_serves_as_soon_as_it_is_back(tmp_path, servers):
    """nginx's rule for a group of one (issue 12, defect 1): no 503 fast-fail for open_secs."""
    running = await run(tmp_path, servers[:1], backend="[backends.up.circuit]\nfailures = 2\nopen_secs = 30")
    try:
        await servers[0].kill()
        codes, _ = await get_many(running, 6)
        assert codes == [502] * 6  # each request tried, each its own answer; never 503 "circuit open"
        t = pool_of(running).targets[0]
        assert t.circuit == CLOSED and t.failures_total == 6
        servers[0].start()  # back on the same port: served at once, not 30 s later
        codes, bodies = await get_many(running, 2)
        assert codes == [200, 200] and served_by(bodies) == {"a": 2}
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_upstream_503_is_retried_on_next_target_but_post_is_not(tmp_path, servers):
    servers[0].resource.status["/x"] = 503
    running = await run(tmp_path, servers[:2])
    try:
        codes, bodies = await get_many(running, 4)
        assert codes == [200] * 4 and served_by(bodies) == {"b": 4}
        assert pool_of(running).by_name["b"].retries_total >= 1
        a_hits = len(servers[0].hits)
        posts = [await treq.post(running.url("/api/x"), b"{}") for _ in range(2)]
        codes = sorted(r.code for r in posts)
        for r in posts:
            await r.content()
        assert codes == [200, 503]  # the one sent to a passes a's answer through, not retried
        assert len(servers[0].hits) == a_hits + 1
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_post_to_dead_target_is_not_retried_unless_configured(tmp_path, servers):
    running = await run(tmp_path, servers[:2], backend="retries = 0")
    try:
        await servers[0].kill()
        r = await treq.post(running.url("/api/x"), b"data")
        assert r.code == 502
        await r.content()
    finally:
        await running.stop()
    running = await run(tmp_path, servers[:2], backend="retry_non_idempotent = true")
    try:
        codes = []
        for _ in range(4):
            r = await treq.post(running.url("/api/x"), b"data")
            codes.append(r.code)
            await r.content()
        assert codes == [200] * 4
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_all_down_fails_fast_with_503_saying_so(tmp_path, servers):
    running = await run(tmp_path, servers[:2], backend="[backends.up.circuit]\nfailures = 1\nopen_secs = 60")
    pool_of(running).clock = task.Clock()
    try:
        for s in servers[:2]:
            await s.kill()
        r = await treq.get(running.url("/api/x"))
        assert r.code == 502  # both tried, both refused: the last failure is the answer
        await r.content()
        r = await treq.get(running.url("/api/x"))
        assert r.code == 503
        assert r.headers.getRawHeaders("retry-after") == ["60"]
        doc = json.loads(await r.content())
        assert doc["title"] == "Service Unavailable"
        assert "all 2 target(s) of backend 'up' are unavailable" in doc["detail"]
        assert "a (circuit open" in doc["detail"] and "b (circuit open" in doc["detail"]
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_active_http_health_checks_eject_and_readmit(tmp_path, servers):
    health = """[backends.up.health]
path = "/healthz"
expect_status = [200, 204]
interval_secs = 5
timeout_secs = 1
healthy_threshold = 2
unhealthy_threshold = 2"""
    running = await run(tmp_path, servers[:2], health=health)
    pool = pool_of(running)
    assert pool.monitor is not None and pool.monitor.loop.running  # the service started it
    pool.stop()  # restart it on a clock
    clock = pool.clock = task.Clock()
    try:
        pool.start()
        monitor = pool.monitor
        assert [c.getTime() for c in clock.getDelayedCalls()] == [1.0, 1.0]  # first round: a check timeout per target
        await monitor.last_run
        assert [c.getTime() for c in clock.getDelayedCalls()] == [5.0]  # the next round
        assert "/healthz" in servers[0].hits
        servers[0].resource.status["/healthz"] = 500
        for _ in range(2):
            clock.advance(5)
            await monitor.last_run
        a = pool.by_name["a"]
        assert not a.healthy and a.last_error == "health check failed: health check answered 500"
        hits = len(servers[0].hits)
        codes, bodies = await get_many(running, 6)
        assert codes == [200] * 6 and served_by(bodies) == {"b": 6}
        assert len(servers[0].hits) == hits  # not even tried
        del servers[0].resource.status["/healthz"]
        clock.advance(5)
        await monitor.last_run
        assert not a.healthy  # one success is not enough
        clock.advance(5)
        await monitor.last_run
        assert a.healthy
        _, bodies = await get_many(running, 4)
        assert served_by(bodies) == {"a": 2, "b": 2}
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_health_check_timeout_counts_as_failure(tmp_path, servers):
    servers[0].resource.hang.add("/healthz")
    health = '[backends.up.health]\npath = "/healthz"\ninterval_secs = 5\ntimeout_secs = 2\nunhealthy_threshold = 1'
    running = await run(tmp_path, servers[:1], health=health)
    pool = pool_of(running)
    pool.stop()
    clock = pool.clock = task.Clock()
    try:
        pool.start()
        while "/healthz" not in servers[0].hits:
            await task.deferLater(__import__("twisted.internet.reactor").internet.reactor, 0.01, lambda: None)
        clock.advance(2)
        await pool.monitor.last_run
        t = pool.by_name["a"]
        assert not t.healthy and t.last_error == "health check timed out after 2s"
        r = await treq.get(running.url("/api/x"))
        assert r.code == 503 and "a (unhealthy" in json.loads(await r.content())["detail"]
    finally:
        await running.stop()


# ---------------------------------------------------------------- routing rules


@pytest_twisted.ensureDeferred
async def test_routing_rules_choose_targets(tmp_path, servers):
    rules = """
[[backends.up.rules]]
header = { X-Tenant = "blue" }
targets = ["c"]

[[backends.up.rules]]
path = "^/api/urgent/"
targets = ["b"]

[[backends.up.rules]]
query = { site = "north|east" }
targets = ["a", "b"]
"""
    running = await run(tmp_path, servers, rules=rules)
    try:
        _, bodies = await get_many(running, 3, headers={"X-Tenant": "blue"})
        assert served_by(bodies) == {"c": 3}
        _, bodies = await get_many(running, 3, headers={"X-Tenant": "blue-ish"})  # full match only
        assert len(served_by(bodies)) == 3
        _, bodies = await get_many(running, 3, path="/api/urgent/1")
        assert served_by(bodies) == {"b": 3}
        _, bodies = await get_many(running, 4, path="/api/q?site=east")
        assert served_by(bodies) == {"a": 2, "b": 2}
        await servers[2].kill()
        r = await treq.get(running.url("/api/x"), headers={"X-Tenant": "blue"})
        assert r.code == 502  # the rule pins c; it is not silently sent elsewhere
        await r.content()
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_route_middleware_chooses_backend(tmp_path, servers):
    text = f"""
[pipelines.p]
networks = ["default"]
endpoints = ["api"]
middleware = ["pick"]
backends = ["first", "second"]

[endpoints.api]
service = "http"
path_prefix = "/api"

[middleware.pick]
type = "route"
default = "first"
[[middleware.pick.rules]]
metadata = {{ endpoint = "api" }}
query = {{ to = "second" }}
backend = "second"

[backends.first]
service = "http"
base_url = "{servers[0].url}"
[backends.second]
service = "http"
base_url = "{servers[1].url}"
"""
    running = await start_harmony(write_config(tmp_path, MINIMAL_MAIN, {"p": text}))
    try:
        _, bodies = await get_many(running, 2, path="/api/x?to=second")
        assert served_by(bodies) == {"b": 2}
        _, bodies = await get_many(running, 2, path="/api/x?to=third")
        assert served_by(bodies) == {"a": 2}
    finally:
        await running.stop()


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize("backend,where,message", [
    ('strategy = "random"', "[pipelines/lb.toml: [backends.up.options.strategy]", "must be one of"),
    ('strategy = "hash"', "[backends.up.options.hash_key]", "is required"),
    ('hash_key = "cookie:x"', "[backends.up.options.hash_key]", "unknown key source 'cookie'"),
    ("[[backends.up.rules]]\ntargets = ['zz']\nheader = { A = 'b' }", "[backends.up.options.rules[0].targets]",
     "names 'zz'"),
    ("[[backends.up.rules]]\ntargets = ['a']", "[backends.up.options.rules[0]]", "has no conditions"),
    ("[[backends.up.rules]]\ntargets = ['a']\npath = '('", "[backends.up.options.rules[0].path]", "invalid regex"),
    ("[backends.up.health]\nintervl_secs = 3", "[backends.up.options.health.intervl_secs]", "unknown option"),
    ("[backends.up.health]\ntype = 'dimse'", "[backends.up.options.health.type]", "need DIMSE targets"),
    ("[backends.up.circuit]\nfailures = 0", "[backends.up.options.circuit.failures]", "between 1"),
])
def test_config_errors_name_file_and_key(tmp_path, backend, where, message):
    servers = [KillableUpstream("a"), KillableUpstream("b")]
    for s in servers:
        s.port_number = 9
    path = write_config(tmp_path, MINIMAL_MAIN, {"lb": pipeline_config(servers, backend=backend)})
    with pytest.raises(ConfigErrors) as e:
        build_runtime(load_config(path))
    text = e.value.render()
    assert where.split("[", 1)[1].rstrip("]") in text and message in text, text


def test_target_table_errors_name_the_target_table(tmp_path):
    servers = [KillableUpstream("a")]
    servers[0].port_number = 9
    path = write_config(tmp_path, MINIMAL_MAIN,
                        {"lb": pipeline_config(servers, extra_targets={"a": "weight = 0\n"})})
    with pytest.raises(ConfigErrors) as e:
        build_runtime(load_config(path))
    assert "lb.toml: [targets.a.weight]: must be an integer 1-1000" in e.value.render()


# ---------------------------------------------------------------- state machine on task.Clock


def _pool(clock, n=2, **kw):
    return TargetPool("be", [Target(f"t{i}", url=f"http://t{i}") for i in range(n)], clock, **kw)


def _refused(target):
    return defer.fail(ConnectionRefusedError())


def _ok(target):
    return defer.succeed(ResponseEnvelope(200, body=target.name.encode()))


def _result(d):
    out = []
    d.addBoth(out.append)
    return out[0]


def test_circuit_closed_open_half_open_closed_on_clock():
    clock = task.Clock()
    pool = _pool(clock, 2, circuit_failures=3, circuit_open_secs=10, retries=0)
    pool.targets[1].healthy = False  # out of the game: every request goes to t0
    t = pool.targets[0]
    for i in range(3):
        assert t.circuit == CLOSED
        _result(pool.call(RequestEnvelope(), _refused))
    assert t.circuit == OPEN and t.consecutive_failures == 3
    failure = _result(pool.call(RequestEnvelope(), _ok))
    assert isinstance(failure.value, ServiceUnavailable)  # fast: _ok never ran
    clock.advance(9.9)
    assert not t.available(clock.seconds(), 10)
    clock.advance(0.1)
    assert t.available(clock.seconds(), 10) and t.circuit == HALF_OPEN
    # A failed probe re-opens it for a full period.
    _result(pool.call(RequestEnvelope(), _refused))
    assert t.circuit == OPEN and t.opened_at == 10
    clock.advance(10)
    # While the probe is in flight, nobody else gets through.
    probe = defer.Deferred()
    pending = pool.call(RequestEnvelope(), lambda target: probe)
    assert t.circuit == HALF_OPEN and t.probing
    assert isinstance(_result(pool.call(RequestEnvelope(), _ok)).value, ServiceUnavailable)
    probe.callback(ResponseEnvelope(200))
    assert _result(pending).status == 200
    assert t.circuit == CLOSED and t.consecutive_failures == 0 and t.in_flight == 0


def test_retries_bounded_by_count_and_deadline():
    clock = task.Clock()
    pool = _pool(clock, 4, retries=2, deadline_secs=100)
    seen = []

    def slow_refusal(target):
        seen.append(target.name)
        clock.advance(40)
        return defer.fail(ConnectionRefusedError())

    _result(pool.call(RequestEnvelope(), slow_refusal))
    assert seen == ["t0", "t1", "t2"]  # 1 try + 2 retries
    seen.clear()
    pool = _pool(clock, 4, retries=3, deadline_secs=70)
    _result(pool.call(RequestEnvelope(), slow_refusal))
    assert seen == ["t0", "t1"]  # the deadline passed after the second attempt
    seen.clear()
    pool = _pool(clock, 4, retries=2, deadline_secs=1000)
    _result(pool.call(RequestEnvelope(method="POST", body=b"x"), slow_refusal))
    assert len(seen) == 1  # not idempotent
    seen.clear()
    _result(pool.call(RequestEnvelope(metadata={"dimse_op": "C-FIND"}, method="POST"), slow_refusal))
    assert len(seen) == 3  # C-FIND is idempotent whatever the carrier says
    seen.clear()
    from twisted.web.client import FileBodyProducer
    import io
    _result(pool.call(RequestEnvelope(body=FileBodyProducer(io.BytesIO(b"x"))), slow_refusal))
    assert len(seen) == 1  # a streamed body cannot be sent twice


def test_a_pool_of_one_target_never_fast_fails():
    """nginx: "if there is only a single server in a group ... such a server will
    never be considered unavailable"; failures are still counted."""
    clock = task.Clock()
    pool = _pool(clock, 1, circuit_failures=2, circuit_open_secs=30)
    t = pool.targets[0]
    for _ in range(10):
        assert isinstance(_result(pool.call(RequestEnvelope(), _refused)).value, Exception)
    assert t.circuit == CLOSED and t.failures_total == 10 and t.last_error
    assert _result(pool.call(RequestEnvelope(), _ok)).status == 200
    assert t.consecutive_failures == 0
    # Active health checks, when configured, still take it out.
    t.healthy = False
    assert isinstance(_result(pool.call(RequestEnvelope(), _ok)).value, ServiceUnavailable)


@pytest.mark.parametrize("cause", ["cancel", "client_gone_flag", "wrapped_body_failure"])
def test_a_client_going_away_is_no_verdict_on_the_target(cause):
    from twisted.python.failure import Failure
    from twisted.web._newclient import RequestGenerationFailed
    from harmony.backends.http import client_side_cause
    from harmony.errors import ClientClosedRequest, mark_client_gone

    clock = task.Clock()
    pool = _pool(clock, 2, circuit_failures=1, retries=3)
    seen = []
    for _ in range(4):
        request = RequestEnvelope()
        pending = defer.Deferred()
        d = pool.call(request, lambda t: seen.append(t.name) or pending)
        if cause == "cancel":
            d.cancel()
        elif cause == "client_gone_flag":
            mark_client_gone(request)
            pending.errback(ConnectionRefusedError())  # whatever fails next is not the target's doing
        else:  # what Agent reports for an upload our client cut mid-body
            wrapped = Failure(RequestGenerationFailed([Failure(ClientClosedRequest("cut"))]))
            pending.errback(client_side_cause(wrapped))
        failure = _result(d)
        assert failure.check(defer.CancelledError, ClientClosedRequest)
    assert seen == ["t0", "t1", "t0", "t1"]  # never retried
    for t in pool.targets:
        assert (t.circuit, t.failures_total, t.in_flight, t.client_aborts_total) == (CLOSED, 0, 0,
                                                                                    0 if cause == "cancel" else 2)


@pytest.mark.parametrize("upstream_ends", ["before the relay gives up", "after the relay gives up"])
@pytest.mark.parametrize("pool_size", [1, 2])
def test_a_client_leaving_mid_stream_is_a_client_abort_whatever_ends_first(upstream_ends, pool_size):
    """A streamed answer (C-GET instances, C-FIND matches) is judged a success at its
    first result; a client that leaves afterwards is a client abort, decided once the
    relay has given up AND the upstream has ended -- in either order -- never a failure.
    A consumer that gives up for its own reasons (C-CANCEL) or reads the stream to its
    end is no abort."""
    from harmony.dicom.results import ResultStream
    from harmony.errors import mark_client_gone

    pool = _pool(task.Clock(), pool_size, circuit_failures=1)
    outcomes = []
    for how in ("client left", "C-CANCEL", "read to the end"):
        stream = ResultStream()
        request = RequestEnvelope(method="C-GET")
        response = ResponseEnvelope(status=200)
        response.state.dicom_results = stream
        stream.put("first instance")
        aborts = sum(t.client_aborts_total for t in pool.targets)
        assert _result(pool.call(request, lambda t: defer.succeed(response))) is response
        assert sum(t.in_flight for t in pool.targets) == 0   # the attempt ended at the first result
        if how == "read to the end":
            stream.finish()
            assert [_result(stream.next()) for _ in range(2)] == ["first instance", None]
        else:
            if upstream_ends == "before the relay gives up":
                stream.finish()
            if how == "client left":
                mark_client_gone(request)   # what the relay does first, then it cancels
            stream.cancel()
            if upstream_ends == "after the relay gives up":
                # Not yet: only when the upstream has ended is the stream abandoned.
                assert sum(t.client_aborts_total for t in pool.targets) == aborts
                stream.finish()   # the upstream's answer to C-CANCEL
        outcomes.append(sum(t.client_aborts_total for t in pool.targets))
    assert outcomes == [1, 1, 1]
    for t in pool.targets:
        assert (t.circuit, t.failures_total, t.consecutive_failures, t.last_error, t.healthy) == (
            CLOSED, 0, 0, None, True)


def test_an_outer_timeout_cancelling_an_attempt_stays_a_timeout():
    """Store-and-forward bounds a delivery with addTimeout: Agent reports that
    cancel as ResponseNeverReceived([CancelledError]); it must come out as the
    TimeoutError addTimeout makes of a cancel (target unreachable, retried later),
    not as a 499 a queue would treat as the request's own fault."""
    from twisted.python.failure import Failure
    from twisted.web._newclient import ResponseNeverReceived
    from harmony.backends.http import client_side_cause

    clock = task.Clock()
    pool = _pool(clock, 2)
    pending = defer.Deferred(lambda d: d.errback(client_side_cause(
        Failure(ResponseNeverReceived([Failure(defer.CancelledError())])))))
    d = pool.call(RequestEnvelope(method="POST"), lambda t: pending)
    d.addTimeout(5, clock)
    clock.advance(5)
    assert _result(d).check(defer.TimeoutError)
    assert [(t.in_flight, t.client_aborts_total) for t in pool.targets] == [(0, 0), (0, 0)]


def test_cancelled_request_releases_target():
    clock = task.Clock()
    pool = _pool(clock, 1)
    d = pool.call(RequestEnvelope(), lambda t: defer.Deferred())
    assert pool.targets[0].in_flight == 1
    d.cancel()
    d.addErrback(lambda f: None)
    assert pool.targets[0].in_flight == 0 and pool.targets[0].circuit == CLOSED


def test_smooth_weighted_sequence():
    clock = task.Clock()
    pool = TargetPool("be", [Target("a", url="http://a", weight=5), Target("b", url="http://b"),
                             Target("c", url="http://c")], clock, strategy="weighted")
    names = [pool.choose(RequestEnvelope()).name for _ in range(7)]
    assert names == ["a", "a", "b", "a", "c", "a", "a"]
