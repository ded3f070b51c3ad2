"""harmony.targets.health in memory: HTTP GET checks against a twisted.web resource on a
MemoryReactorClock (tests.memory.Wires), thresholds, timeouts on the clock, and the settings."""

from __future__ import annotations

import types

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from harmony.config.errors import OptionError
from harmony.config.options import Options
from harmony.targets.health import HealthMonitor, HealthSettings
from harmony.targets.target import Target
from tests.memory import Wires, result_of, upstream_site

PORT = 8081


class Health(Resource):
    isLeaf = True
    status = 200
    hang = False

    def render(self, request):
        if self.hang:
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        return b"ok"


def _monitor(**options):
    reactor = MemoryReactorClock()
    health = Health()
    upstream_site(reactor, health, PORT)
    target = Target("t1", url=f"http://127.0.0.1:{PORT}")
    pool = types.SimpleNamespace(backend="be", targets=[target], tls_policy=None)
    settings = HealthSettings.from_options(Options({"path": "/healthz", **options}), "url")
    return HealthMonitor(pool, settings, reactor), health, target, reactor, Wires(reactor)


def _round(monitor, wires):
    return result_of(wires.run(monitor.run_once()))


def test_failures_past_the_threshold_make_a_target_unhealthy_and_successes_bring_it_back():
    monitor, health, target, _reactor, wires = _monitor(unhealthy_threshold=2, healthy_threshold=2)
    health.status = 503
    _round(monitor, wires)
    assert target.healthy
    _round(monitor, wires)
    assert not target.healthy and "503" in target.last_error
    health.status = 200
    _round(monitor, wires)
    assert not target.healthy
    _round(monitor, wires)
    assert target.healthy


def test_a_check_that_hangs_times_out_on_the_clock():
    monitor, health, target, reactor, wires = _monitor(timeout_secs=2, unhealthy_threshold=1)
    health.hang = True
    d = monitor.run_once()
    wires.run(d, rounds=3)
    reactor.advance(2.5)
    result_of(d)
    assert not target.healthy and "timed out after 2s" in target.last_error


@pytest.mark.parametrize("options, kind, key", [
    ({"type": "tcp"}, "url", "type"), ({"type": "dimse"}, "url", "type"), ({"type": "http"}, "mllp", "type"),
    ({"path": "healthz"}, "url", "path"), ({"expect_status": [200, 700]}, "url", "expect_status"),
    ({"calling_aet": "X" * 17}, "dimse", "calling_aet"),
])
def test_settings_errors_name_their_key(options, kind, key):
    with pytest.raises(OptionError) as e:
        HealthSettings.from_options(Options(options), kind)
    assert e.value.key == key


def test_defaults_by_target_kind():
    assert HealthSettings.from_options(Options({}), "mllp").kind == "tcp"
    assert HealthSettings.from_options(Options({"expect_status": 204}), "url").expect_status == (204,)
