"""harmony.targets.strategies: each load-balancing strategy over the candidates it is given."""

from __future__ import annotations

from collections import Counter

from harmony.routing import KeySource
from harmony.targets.strategies import STRATEGIES, ConsistentHash, Failover, LeastConnections, RoundRobin, Weighted
from harmony.targets.target import Target
from tests.memory import request


def _targets(*weights):
    return [Target(f"t{i}", weight=w) for i, w in enumerate(weights)]


def _names(strategy, candidates, n, req=None):
    return [strategy.pick(candidates, req or request()).name for _ in range(n)]


def test_round_robin_takes_turns_and_a_skipped_target_gives_no_double_turn():
    ts = _targets(1, 1, 1)
    rr = RoundRobin(ts)
    assert _names(rr, ts, 4) == ["t0", "t1", "t2", "t0"]
    assert _names(rr, [ts[0], ts[2]], 2) == ["t2", "t0"]  # t1 is missing: t2 does not get two turns


def test_weighted_is_smooth():
    ts = _targets(5, 1, 1)
    assert "".join(n[-1] for n in _names(Weighted(ts), ts, 7)) == "0010200"


def test_least_connections_per_weight():
    ts = _targets(1, 2)
    ts[0].in_flight, ts[1].in_flight = 1, 1  # t1 carries half as much per unit of weight
    assert LeastConnections(ts).pick(ts, request()).name == "t1"


def test_failover_takes_the_first_available():
    ts = _targets(1, 1)
    assert _names(Failover(ts), ts, 3) == ["t0"] * 3
    assert Failover(ts).pick(ts[1:], request()).name == "t1"


def test_consistent_hash_keeps_keys_and_moves_only_the_leavers():
    ts = _targets(1, 1, 1)
    ring = ConsistentHash(ts, KeySource.parse("header:x-patient", "hash_key"))
    keyed = {f"p{i}": ring.pick(ts, request(headers={"X-Patient": f"p{i}"})).name for i in range(300)}
    assert set(keyed.values()) == {"t0", "t1", "t2"}
    assert all(ring.pick(ts, request(headers={"X-Patient": k})).name == v for k, v in keyed.items())
    without_t1 = [ts[0], ts[2]]
    moved = {k for k, v in keyed.items() if ring.pick(without_t1, request(headers={"X-Patient": k})).name != v}
    assert moved == {k for k, v in keyed.items() if v == "t1"}
    spread = Counter(keyed.values())
    assert min(spread.values()) > 50  # roughly even over 300 keys
    assert ring.pick(ts, request()).name in {"t0", "t1", "t2"}  # no key: round robin


def test_every_strategy_is_registered():
    assert set(STRATEGIES) == {"round_robin", "weighted", "least_connections", "failover", "hash"}
