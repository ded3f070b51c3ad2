"""DIMSE targets: C-ECHO health checks and failover against two real DIMSE
peers, Orthanc and DCMTK's dcmqrscp, on 127.0.0.1."""

import json

import pytest
import pytest_twisted
import treq
from twisted.internet import task

from harmony.targets import Target
from harmony.targets.dimse_health import EchoFailed, echo
from harmony.targets.health import HealthMonitor, HealthSettings
from harmony.targets.pool import TargetPool
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.peers import Dcmqrscp


@pytest.fixture
def dcmqrscp(tmp_path):
    server = Dcmqrscp(tmp_path / "qr", single_process=False).start()
    yield server
    server.stop()


def dimse_pool(orthanc, dcmqrscp, clock, **health):
    targets = [Target("orthanc", host="127.0.0.1", port=orthanc.dicom_port, aet=orthanc.aet),
               Target("dcmtk", host="127.0.0.1", port=dcmqrscp.port, aet=dcmqrscp.aet)]
    settings = HealthSettings(kind="dimse", interval_secs=10, timeout_secs=5, healthy_threshold=1,
                              unhealthy_threshold=1, **health)
    from twisted.internet import reactor
    return TargetPool("pacs", targets, clock, health=settings, reactor=reactor)


@pytest_twisted.ensureDeferred
async def test_echo_against_both_peers_and_a_closed_port(orthanc, dcmqrscp, dead_port):
    from twisted.internet import reactor
    assert await echo(reactor, "127.0.0.1", orthanc.dicom_port, orthanc.aet, "HARMONY", 5) == 0
    assert await echo(reactor, "127.0.0.1", dcmqrscp.port, dcmqrscp.aet, "HARMONY", 5) == 0
    # (A wrong called AE is not tried here: dcmqrscp 3.6.7 --single-process
    # crashes with SIGSEGV after rejecting such an association.)
    with pytest.raises(EchoFailed, match="no association with X@127.0.0.1"):
        await echo(reactor, "127.0.0.1", dead_port, "X", "HARMONY", 5)


@pytest_twisted.ensureDeferred
async def test_c_echo_health_checks_on_clock(orthanc, dcmqrscp):
    clock = task.Clock()
    pool = dimse_pool(orthanc, dcmqrscp, clock)
    pool.start()
    monitor: HealthMonitor = pool.monitor
    try:
        await monitor.last_run
        assert [t.healthy for t in pool.targets] == [True, True]
        assert [c.getTime() for c in clock.getDelayedCalls()] == [10.0]
        dcmqrscp.stop()
        clock.advance(10)
        await monitor.last_run
        dcmtk = pool.by_name["dcmtk"]
        assert not dcmtk.healthy and "health check failed: no association with DCMQRSCP" in dcmtk.last_error
        assert pool.by_name["orthanc"].healthy
        dcmqrscp.start()
        clock.advance(10)
        await monitor.last_run
        assert dcmtk.healthy
    finally:
        pool.stop()


@pytest_twisted.ensureDeferred
async def test_dimse_backend_fails_over_between_orthanc_and_dcmqrscp(tmp_path, orthanc, dcmqrscp):
    text = f"""
[backend_types.echo_scu]
module = "tests.dimse_echo_backend:EchoScuBackend"

[pipelines.p]
networks = ["default"]
endpoints = ["api"]
backends = ["pacs"]

[endpoints.api]
service = "http"
path_prefix = "/echo"

[backends.pacs]
service = "echo_scu"
targets = ["dcmtk", "orthanc"]
strategy = "failover"

[backends.pacs.health]
interval_secs = 3600
timeout_secs = 5

[targets.dcmtk]
host = "127.0.0.1"
port = {dcmqrscp.port}
aet = "{dcmqrscp.aet}"

[targets.orthanc]
host = "127.0.0.1"
port = {orthanc.dicom_port}
aet = "{orthanc.aet}"
"""
    running = await start_harmony(write_config(tmp_path, MINIMAL_MAIN, {"p": text}))
    try:
        pool = running.service.runtime.backends["pacs"].target_pool
        assert pool.health.kind == "dimse"
        await pool.monitor.last_run

        async def who():
            r = await treq.get(running.url("/echo"))
            return r.code, json.loads(await r.content())

        assert await who() == (200, {"target": "dcmtk", "status": 0})
        dcmqrscp.stop()
        # C-ECHO is idempotent: the failed attempt is retried on Orthanc.
        assert await who() == (200, {"target": "orthanc", "status": 0})
        assert "C-ECHO to dcmtk failed" in pool.by_name["dcmtk"].last_error
    finally:
        await running.stop()


def test_dimse_target_tables_are_checked(tmp_path):
    from harmony.config import ConfigErrors, load_config
    from harmony.runtime import build_runtime
    text = """
[backend_types.echo_scu]
module = "tests.dimse_echo_backend:EchoScuBackend"
[pipelines.p]
backends = ["pacs"]
[backends.pacs]
service = "echo_scu"
targets = ["x"]
[targets.x]
host = "127.0.0.1"
port = 70000
aet = "A_TITLE_THAT_IS_FAR_TOO_LONG"
"""
    with pytest.raises(ConfigErrors) as e:
        build_runtime(load_config(write_config(tmp_path, MINIMAL_MAIN, {"p": text})))
    assert "p.toml: [targets.x.port]: must be a port number 1-65535, got 70000" in e.value.render()
