"""Management API, metrics and hot reload against a running Harmony on
real loopback ports (upstreams from tests/upstreams.py)."""

import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor

from harmony.config import ConfigErrors, load_config
from harmony.management.settings import ManagementSettings, is_loopback
from harmony.runtime import build_runtime
from harmony.service import HarmonyService
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.peers import free_port, wait_for
from tests.upstreams import KillableUpstream, lb_pipeline as pipes, served_by

TOKEN = "s3cret-token-0123456789"
MANAGEMENT = f"""
[management]
enabled = true
bind_port = 0
token = "{TOKEN}"
"""


@pytest.fixture
def servers():
    started = [KillableUpstream(n).start() for n in ("a", "b")]
    yield started
    for s in started:
        pytest_twisted.blockon(s.kill())


def admin_url(running, path):
    port = running.service.management.port.getHost().port
    return f"http://127.0.0.1:{port}/admin{path}"


def auth(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


async def admin_get(running, path, token=TOKEN):
    r = await treq.get(admin_url(running, path), headers=auth(token))
    return r, await r.content()


@pytest.fixture
def harmony(tmp_path, servers):
    path = write_config(tmp_path, MINIMAL_MAIN + MANAGEMENT, {"lb": pipes(servers)})
    running = pytest_twisted.blockon(start_harmony(path))
    running.config_path = path
    yield running
    pytest_twisted.blockon(running.stop())


# ---------------------------------------------------------------- settings and auth


@pytest.mark.parametrize("section,key,message", [
    ("enabled = true", "management.token", "will not start without a token"),
    ("enabled = true\nallow_unauthenticated = true\nbind_address = '0.0.0.0'", "management.allow_unauthenticated",
     "only honoured on loopback"),
    ("enabled = true\nallow_unauthenticated = true\nlisten = 'tcp:9901'", "management.allow_unauthenticated",
     "only honoured on loopback"),
    ("enabled = true\ntoken = 'short'", "management.token", "at least 16"),
    ("enabled = true\ntoken_file = 'missing.txt'", "management.token_file", "cannot read"),
    ("enabled = true\nnetwork = 'nope'\ntoken = '0123456789abcdef'", "management.network", "unknown network"),
    ("enabled = true\nbase_path = '../x'\ntoken = '0123456789abcdef'", "management.base_path", "plain path"),
    ("enabeld = true", "management.enabeld", "unknown key (did you mean 'enabled'?)"),
])
def test_management_settings_refuse_insecure_or_bad(tmp_path, section, key, message):
    path = write_config(tmp_path, MINIMAL_MAIN + "\n[management]\n" + section + "\n")
    with pytest.raises(ConfigErrors) as e:
        ManagementSettings.from_config(load_config(path))
    text = e.value.render()
    assert f"harmony.toml: [{key}]" in text and message in text, text


def test_management_is_off_by_default_and_loopback_unauthenticated_only_by_choice(tmp_path):
    path = write_config(tmp_path, MINIMAL_MAIN)
    s = ManagementSettings.from_config(load_config(path))
    assert not s.enabled and s.listen == "tcp:9901:interface=127.0.0.1"
    path = write_config(tmp_path, MINIMAL_MAIN + "[management]\nenabled = true\nallow_unauthenticated = true\n")
    s = ManagementSettings.from_config(load_config(path))
    assert s.enabled and s.token is None
    assert is_loopback("tcp:1:interface=::1".replace(":", "\\:").replace("tcp\\:1\\:interface=", "tcp:1:interface="))
    assert not is_loopback("tcp:8080") and not is_loopback("systemd:domain=INET:index=0")


@pytest_twisted.ensureDeferred
async def test_401_without_or_with_wrong_token(harmony):
    for headers in ({}, auth("wrong-token-000000000000"), {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": "Bearer"}):
        r = await treq.get(admin_url(harmony, "/info"), headers=headers)
        assert r.code == 401, headers
        assert r.headers.getRawHeaders("www-authenticate") == ['Bearer realm="harmony-management"']
        doc = json.loads(await r.content())
        assert doc["status"] == 401 and "version" not in doc
    r, _ = await admin_get(harmony, "/info")
    assert r.code == 200


@pytest_twisted.ensureDeferred
async def test_token_file_and_mounting_on_a_network(tmp_path, servers):
    (tmp_path / "token").write_text(TOKEN + "\n")
    main = MINIMAL_MAIN + '[management]\nenabled = true\nnetwork = "default"\nbase_path = "ops/admin"\ntoken_file = "token"\n'
    running = await start_harmony(write_config(tmp_path, main, {"lb": pipes(servers)}))
    try:
        assert running.service.management is None  # no listener of its own
        r = await treq.get(running.url("/ops/admin/targets"), headers=auth())
        assert r.code == 200
        doc = json.loads(await r.content())
        assert doc["backends"][0]["backend"] == "up"
        r = await treq.get(running.url("/ops/admin/targets"))
        assert r.code == 401
        await r.content()
        r = await treq.get(running.url("/api/x"))
        assert r.code == 200  # the pipeline's route still works beside it
        await r.content()
    finally:
        await running.stop()


def test_mounted_base_path_must_not_collide_with_a_route(tmp_path, servers):
    main = MINIMAL_MAIN + f'[management]\nenabled = true\nnetwork = "default"\nbase_path = "api"\ntoken = "{TOKEN}"\n'
    path = write_config(tmp_path, main, {"lb": pipes(servers)})
    with pytest.raises(ConfigErrors) as e:
        HarmonyService(build_runtime(load_config(path), reactor), reactor)
    assert "[management.base_path]: '/api' is also the prefix of endpoint 'api'" in e.value.render()
    from harmony.cli import main as cli
    assert cli(["check", "-c", str(path)]) == 1  # harmony check (ExecStartPre) catches it too


# ---------------------------------------------------------------- resources


@pytest_twisted.ensureDeferred
async def test_info_pipelines_routes_targets(harmony):
    r, body = await admin_get(harmony, "/info")
    info = json.loads(body)
    import harmony as pkg
    import twisted
    assert info["version"] == pkg.__version__ and info["twisted_version"] == twisted.__version__
    assert info["config_path"] == str(harmony.config_path) and info["uptime_seconds"] >= 0
    assert info["started_at"].endswith("+00:00") and info["proxy_id"] == "test"
    _, body = await admin_get(harmony, "/pipelines")
    assert json.loads(body)["pipelines"] == [{"name": "lb", "description": "lb", "networks": ["default"],
                                              "endpoints": ["api"], "middleware": [], "backends": ["up"]}]
    _, body = await admin_get(harmony, "/routes")
    doc = json.loads(body)
    assert doc["routes"] == [{"network": "default", "listen": "tcp:0:interface=127.0.0.1", "prefix": "/api",
                              "endpoint": "api", "service": "http", "pipeline": "lb", "port": harmony.port()}]
    assert doc["management"]["authenticated"] is True
    await treq.get(harmony.url("/api/x")).addCallback(treq.content)
    _, body = await admin_get(harmony, "/targets")
    (backend,) = json.loads(body)["backends"]
    assert backend["strategy"] == "round_robin"
    assert [(t["name"], t["healthy"], t["circuit"], t["in_flight"]) for t in backend["targets"]] == [
        ("a", True, "closed", 0), ("b", True, "closed", 0)]
    r = await treq.post(admin_url(harmony, "/info"), b"", headers=auth())
    assert r.code == 405
    r = await treq.get(admin_url(harmony, "/nope"), headers=auth())
    assert r.code == 404


def families(text):
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def sample(fams, name, **labels):
    for fam in fams.values():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


@pytest_twisted.ensureDeferred
async def test_metrics_text_parses_and_counts(harmony, servers):
    for _ in range(4):
        await treq.get(harmony.url("/api/x")).addCallback(treq.content)
    await treq.post(harmony.url("/api/x"), b"12345").addCallback(treq.content)
    await servers[1].kill()
    await treq.get(harmony.url("/api/x")).addCallback(treq.content)
    await treq.get(harmony.url("/api/x"), headers={"X-Backend": "evil"}).addCallback(treq.content)
    r, body = await admin_get(harmony, "/metrics")
    assert r.headers.getRawHeaders("content-type")[0].startswith("text/plain; version=")
    fams = families(body)
    assert sample(fams, "harmony_requests_total", pipeline="lb", endpoint="api", backend="up", status="200") == 7
    assert sample(fams, "harmony_request_duration_seconds_count", pipeline="lb", endpoint="api", backend="up") == 7
    assert sample(fams, "harmony_request_bytes_total", pipeline="lb", endpoint="api") == 5
    assert sample(fams, "harmony_target_healthy", backend="up", target="a") == 1
    assert sample(fams, "harmony_target_circuit_state", backend="up", target="b", state="closed") == 1
    assert sample(fams, "harmony_target_failures_total", backend="up", target="b") == 2  # both GETs after the kill
    assert sample(fams, "harmony_target_retries_total", backend="up", target="a") == 2  # ... went on to a
    assert sample(fams, "harmony_reloads_total", result="failure") == 0
    assert sample(fams, "harmony_info", proxy_id="test") == 1
    # label values come from config names only
    labels = {v for f in fams.values() for s in f.samples for v in s.labels.values()}
    assert "evil" not in labels


def test_metrics_labels_never_come_from_the_request():
    from harmony.envelope import RequestEnvelope, ResponseEnvelope
    from harmony.management.metrics import HarmonyMetrics
    from harmony.pipeline import Pipeline
    from harmony.state import ResponseState

    class FakeService:  # the metrics only read .runtime and target_pools() from it
        runtime = type("R", (), {"config": type("C", (), {"proxy": type("P", (), {"id": "x"})})(),
                                 "endpoints": {"scp": object()}, "pipelines": {}, "backends": {},
                                 "listeners": lambda self: []})()

        def target_pools(self):
            return []

    m = HarmonyMetrics(FakeService())
    p = Pipeline("dimse", [], [])
    m.instrument(type("R", (), {"endpoints": {"scp": None}, "pipelines": {"dimse": p}})())
    req = RequestEnvelope(metadata={"endpoint": "scp", "backend": "x" * 50, "dimse_op": "C-FIND"})
    p.observers[0](req, ResponseEnvelope(200, state=ResponseState(dimse_status=0xFF00)), 0.01)
    req = RequestEnvelope(metadata={"endpoint": "made-up", "dimse_op": "C-HACK"})
    p.observers[0](req, ResponseEnvelope(999, metadata={"dimse_status": "rm -rf"},
                                         state=ResponseState(dimse_status=0x1FFFF)), 0.01)
    fams = families(m.text())
    assert sample(fams, "harmony_dimse_operations_total", endpoint="scp", operation="C-FIND", status="0xFF00") == 1
    assert sample(fams, "harmony_dimse_operations_total", endpoint="other", operation="other", status="other") == 1
    assert sample(fams, "harmony_requests_total", backend="none", status="other") == 1


def test_each_service_has_its_own_registry(tmp_path):
    path = write_config(tmp_path, MINIMAL_MAIN)
    a = HarmonyService(build_runtime(load_config(path), reactor), reactor)
    b = HarmonyService(build_runtime(load_config(path), reactor), reactor)
    assert a.metrics.registry is not b.metrics.registry
    a.metrics.reloaded(False)
    assert sample(families(b.metrics.text()), "harmony_reloads_total", result="failure") == 0


# ---------------------------------------------------------------- reload


async def post_reload(running, token=TOKEN):
    r = await treq.post(admin_url(running, "/reload"), b"", headers=auth(token))
    return r.code, json.loads(await r.content())


@pytest_twisted.ensureDeferred
async def test_reload_success_swaps_routes_and_keeps_listener_and_unchanged_backend(harmony, servers, tmp_path):
    port = harmony.port()
    backend = harmony.service.runtime.backends["up"]
    write_config(tmp_path, MINIMAL_MAIN + MANAGEMENT, {"lb": pipes(servers, description="v2", prefix="/v2")})
    code, doc = await post_reload(harmony)
    assert code == 200 and doc["ok"] is True
    assert doc["changes"]["backends_kept"] == ["up"]
    assert harmony.port() == port  # same socket
    assert harmony.service.runtime.backends["up"] is backend  # same pool, same target state
    r = await treq.get(harmony.url("/v2/x"))
    assert r.code == 200
    await r.content()
    r = await treq.get(harmony.url("/api/x"))
    assert r.code == 404
    await r.content()
    _, body = await admin_get(harmony, "/pipelines")
    assert json.loads(body)["pipelines"][0]["description"] == "v2"
    fams = families((await admin_get(harmony, "/metrics"))[1])
    assert sample(fams, "harmony_reloads_total", result="success") == 1
    assert sample(fams, "harmony_last_reload_success") == 1
    # request metrics continue on the new pipelines
    assert sample(fams, "harmony_requests_total", pipeline="lb", status="200") == 1


@pytest_twisted.ensureDeferred
async def test_reload_failure_keeps_old_config_serving(harmony, servers, tmp_path):
    good = (tmp_path / "pipelines" / "lb.toml").read_text()
    (tmp_path / "pipelines" / "lb.toml").write_text(good.replace('[backends.up]\nservice = "http"', '[backends.up]\nservice = "nope"'))
    code, doc = await post_reload(harmony)
    assert code == 422
    assert doc["title"] == "Reload Failed" and "previous one keeps running" in doc["detail"]
    assert any("[backends.up.service]: unknown backend type 'nope'" in e for e in doc["errors"])
    r = await treq.get(harmony.url("/api/x"))
    assert r.code == 200
    await r.content()
    (tmp_path / "harmony.toml").write_text("[proxy\nbroken")
    code, doc = await post_reload(harmony)
    assert code == 422 and "invalid TOML" in doc["errors"][0]
    fams = families((await admin_get(harmony, "/metrics"))[1])
    assert sample(fams, "harmony_reloads_total", result="failure") == 2
    assert sample(fams, "harmony_last_reload_success") == 0
    _, body = await admin_get(harmony, "/info")
    assert json.loads(body)["reload"]["ok"] is False


@pytest_twisted.ensureDeferred
async def test_reload_rebinds_changed_network_and_changed_backend_keeps_target_state(harmony, servers, tmp_path):
    pool = harmony.service.runtime.backends["up"].target_pool
    pool.by_name["a"].failures_total = 7  # state to carry over
    main = MINIMAL_MAIN.replace("bind_port = 0", f"bind_port = {free_port()}") + MANAGEMENT
    text = pipes(servers).replace('targets = ["a", "b"]\n', 'targets = ["a", "b"]\nstrategy = "failover"\n', 1)
    write_config(tmp_path, main, {"lb": text})
    code, doc = await post_reload(harmony)
    assert code == 200, doc
    assert doc["changes"]["networks_rebound"] == ["default"] and doc["changes"]["backends_rebuilt"] == ["up"]
    new_pool = harmony.service.runtime.backends["up"].target_pool
    assert new_pool is not pool and new_pool.strategy_name == "failover"
    assert new_pool.by_name["a"].failures_total == 7
    bodies = []
    for _ in range(3):
        r = await treq.get(harmony.url("/api/x"))
        bodies.append(await r.content())
    assert served_by(bodies) == {"a": 3}


@pytest_twisted.ensureDeferred
async def test_reload_under_load_fails_no_request(harmony, servers, tmp_path):
    results = []
    stop = []

    async def client():
        while not stop:
            r = await treq.get(harmony.url("/api/x"))
            await r.content()
            results.append(r.code)

    clients = [defer.ensureDeferred(client()) for _ in range(4)]
    for i in range(6):
        # alternate a description change (backend kept) and a target change (backend rebuilt)
        chosen = servers if i % 2 else servers[:1]
        write_config(tmp_path, MINIMAL_MAIN + MANAGEMENT, {"lb": pipes(chosen, description=f"v{i}")})
        code, doc = await post_reload(harmony)
        assert code == 200, doc
        n = len(results)
        while len(results) < n + 5:  # let traffic flow on this config
            await _tick()
    stop.append(True)
    await defer.gatherResults(clients)
    assert len(results) >= 30
    assert set(results) == {200}, {c: results.count(c) for c in set(results)}


def _tick():
    d = defer.Deferred()
    reactor.callLater(0.005, d.callback, None)
    return d


# ---------------------------------------------------------------- SIGHUP, with twistd as in production


ECHO = """
[pipelines.echo]
networks = ["default"]
endpoints = ["e"]
backends = ["echo"]
[endpoints.e]
service = "http"
path_prefix = "{prefix}"
[backends.echo]
service = "echo"
"""


def test_sighup_reloads_a_running_twistd(tmp_path):
    port = free_port()
    main = MINIMAL_MAIN.replace("bind_port = 0", f"bind_port = {port}")
    path = write_config(tmp_path, main, {"p": ECHO.format(prefix="/before")})
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    proc = subprocess.Popen([twistd, "-n", "--pidfile=", "harmony", "-c", str(path)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def status(p):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{p}", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    try:
        wait_for(lambda: status("/before/x") == 200, 30, "twistd harmony", proc)
        write_config(tmp_path, main, {"p": ECHO.format(prefix="/after")})
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: status("/after/x") == 200, 30, "route after SIGHUP", proc)
        assert status("/before/x") == 404
        assert proc.poll() is None  # still running
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    assert "SIGHUP: reloading configuration" in out and "configuration reloaded" in out, out


# ---------------------------------------------------------------- self-listening endpoints across reloads


LINE = """
[endpoint_types.line]
module = "tests.listener_endpoint:LineEndpoint"

[pipelines.lines]
endpoints = ["scp"]
backends = ["{backend}"]

[endpoints.scp]
service = "line"
listen = "tcp:{port}:interface=127.0.0.1"

[backends.echo]
service = "echo"

[backends.up]
service = "http"
base_url = "{upstream}"
"""


class _Client:
    """A line client on a real TCP connection that stays open (an 'association')."""

    def __init__(self):
        from twisted.internet.protocol import ClientFactory
        from twisted.protocols.basic import LineReceiver

        client = self

        class P(LineReceiver):
            delimiter = b"\n"

            def connectionMade(self):
                client.proto = self
                client.connected.callback(None)

            def lineReceived(self, line):
                client.waiting.pop(0).callback(line)

            def connectionLost(self, reason):
                client.lost = True

        self.factory = ClientFactory.forProtocol(P)
        self.connected = defer.Deferred()
        self.waiting = []
        self.lost = False

    def ask(self, text):
        d = defer.Deferred()
        self.waiting.append(d)
        self.proto.sendLine(text.encode())
        return d


@pytest_twisted.ensureDeferred
async def test_open_connection_on_unchanged_listener_survives_reload(tmp_path, servers):
    port = free_port()
    text = LINE.format(port=port, upstream=servers[0].url, backend="echo")
    running = await start_harmony(write_config(tmp_path, MINIMAL_MAIN + MANAGEMENT, {"l": text}))
    try:
        scp = running.service.runtime.endpoints["scp"]
        await scp.listening
        client = _Client()
        reactor.connectTCP("127.0.0.1", port, client.factory)
        await client.connected
        assert json.loads(await client.ask("one"))["path"] == "/one"  # the echo backend
        fams = families((await admin_get(running, "/metrics"))[1])
        assert sample(fams, "harmony_associations_open", endpoint="scp") == 1
        assert sample(fams, "harmony_requests_total", pipeline="lines", endpoint="scp", backend="echo") == 1
        _, body = await admin_get(running, "/routes")
        assert {"network": "-", "listen": f"tcp:{port}:interface=127.0.0.1", "prefix": "-", "endpoint": "scp",
                "service": "line", "pipeline": "lines", "port": None} in json.loads(body)["routes"]
        # Same listener, new backend for its pipeline.
        write_config(tmp_path, MINIMAL_MAIN + MANAGEMENT, {"l": LINE.format(port=port, upstream=servers[0].url,
                                                                              backend="up")})
        code, doc = await post_reload(running)
        assert code == 200 and doc["changes"]["listeners_restarted"] == []
        assert running.service.runtime.endpoints["scp"] is scp
        assert json.loads(await client.ask("two")) == {"served_by": "a", "path": "/two"}  # same connection
        assert not client.lost
        # A changed listener is restarted; its old connections are not the new pipeline's.
        other = free_port()
        write_config(tmp_path, MINIMAL_MAIN + MANAGEMENT, {"l": LINE.format(port=other, upstream=servers[0].url,
                                                                              backend="echo")})
        code, doc = await post_reload(running)
        assert code == 200 and doc["changes"]["listeners_restarted"] == ["scp"]
        new = running.service.runtime.endpoints["scp"]
        assert new is not scp and new.port.getHost().port == other and scp.port is None
        client.proto.transport.loseConnection()
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_deidentify_quarantine_and_counters_behind_the_token(tmp_path):
    """The deidentify middleware's report (counters, quarantined instances) is an API route and a metric."""
    from harmony.deid import generate_secret_file

    generate_secret_file(tmp_path / "deid.key")
    pipeline = f"""
[pipelines.research]
endpoints = ["scp"]
middleware = ["deid"]
backends = ["archive"]
[endpoints.scp]
service = "dicom_scp"
[endpoints.scp.options]
local_aet = "HARMONY"
bind_addr = "127.0.0.1"
port = {free_port()}
enable_store = true
[middleware.deid]
service = "deidentify"
[middleware.deid.options]
secret_file = "{tmp_path / 'deid.key'}"
[backends.archive]
service = "local_archive"
"""
    main = MINIMAL_MAIN + MANAGEMENT + f'\n[storage.options]\npath = "{tmp_path / "var"}"\n'
    running = await start_harmony(write_config(tmp_path, main, {"research": pipeline}))
    try:
        r, body = await admin_get(running, "/deidentify", token="wrong-token-0123456789")
        assert r.code == 401
        r, body = await admin_get(running, "/deidentify")
        assert r.code == 200, body
        report = json.loads(body)["deidentify"]
        assert set(report) == {"deid"} and report["deid"]["quarantined"] == []
        assert isinstance(report["deid"]["counts"], dict)
        r, body = await admin_get(running, "/metrics")
        assert b"harmony_deidentify_instances" in body
    finally:
        await running.stop()
