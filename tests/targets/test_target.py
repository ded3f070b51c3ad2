"""harmony.targets.target: one upstream's circuit breaker and active-check health, on given times."""

from __future__ import annotations

from harmony.targets.target import CLOSED, HALF_OPEN, OPEN, Target


def test_failures_open_the_circuit_and_one_probe_closes_it():
    t = Target("pacs")
    for _ in range(2):
        t.begin()
        assert t.failed("refused", now=10.0, threshold=3) is False
    t.begin()
    assert t.failed("refused", now=11.0, threshold=3) is True
    assert t.circuit == OPEN and not t.available(now=20.0, open_secs=30)
    assert t.available(now=41.0, open_secs=30) and t.circuit == HALF_OPEN
    t.begin()
    assert not t.available(now=41.5, open_secs=30)  # one probe at a time
    t.succeeded()
    assert t.circuit == CLOSED and t.consecutive_failures == 0 and t.in_flight == 0


def test_a_failed_probe_reopens_and_a_pool_of_one_never_opens():
    t = Target("pacs", circuit=HALF_OPEN)
    t.begin()
    assert t.failed("timeout", now=5.0, threshold=3) and t.circuit == OPEN and t.opened_at == 5.0
    alone = Target("only")
    for _ in range(10):
        alone.begin()
        assert alone.failed("x", now=1.0, threshold=None) is False
    assert alone.circuit == CLOSED and alone.failures_total == 10


def test_a_client_leaving_is_no_verdict():
    t = Target("pacs", circuit=HALF_OPEN)
    t.begin()
    t.released(client_left=True)
    assert (t.in_flight, t.probing, t.client_aborts_total, t.failures_total) == (0, False, 1, 0)


def test_health_changes_after_thresholds_and_recovery_closes_the_circuit():
    t = Target("pacs")
    assert not t.check_result(False, "refused", 1.0, healthy_threshold=2, unhealthy_threshold=2)
    assert t.check_result(False, "refused", 2.0, 2, 2) and not t.healthy
    assert not t.available(now=3.0, open_secs=0)
    t.circuit = OPEN
    assert not t.check_result(True, None, 4.0, 2, 2)
    assert t.check_result(True, None, 5.0, 2, 2) and t.healthy and t.circuit == CLOSED


def test_state_describe_and_reload_identity():
    dimse = Target("pacs", host="10.0.0.5", port=104, aet="PACS")
    assert dimse.describe() == "PACS@10.0.0.5:104" and Target("u", url="http://x").describe() == "http://x"
    dimse.begin()
    dimse.failed("boom", now=10.0, threshold=5)
    state = dimse.state(now=12.5)
    assert state["last_error"] == "boom" and state["last_error_age_secs"] == 2.5
    assert state["address"] == dimse.describe()
    fresh = Target("pacs", host="10.0.0.5", port=104, aet="PACS")
    assert fresh.config_key() == dimse.config_key()
    fresh.adopt_state(dimse)
    assert fresh.failures_total == 1 and fresh.in_flight == 0  # in-flight belongs to the old object
