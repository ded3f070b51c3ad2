"""Load-balancing strategies: given the targets that may take a request now
(in configured order), pick one.

Each strategy sees only *candidates*, already filtered by health, circuit,
routing rules and the attempts already made, so none of them has to know why
a target is missing.
"""

from __future__ import annotations

import bisect
import hashlib


class RoundRobin:
    """Each target in turn; a skipped target does not make its successor take two turns."""

    def __init__(self, targets):
        self.order = {t.name: i for i, t in enumerate(targets)}
        self.size = len(targets)
        self.next = 0

    def pick(self, candidates, request):
        # The first candidate at or after the cursor, in configured order.
        best = min(candidates, key=lambda t: (self.order[t.name] - self.next) % self.size)
        self.next = (self.order[best.name] + 1) % self.size
        return best


class Weighted:
    """Smooth weighted round robin (as nginx does): weights 5:1:1 give
    a a b a c a a, not a a a a a b c, so no target gets bursts."""

    def __init__(self, targets):
        self.current = {t.name: 0 for t in targets}

    def pick(self, candidates, request):
        total = 0
        best = None
        for t in candidates:
            self.current[t.name] += t.weight
            total += t.weight
            if best is None or self.current[t.name] > self.current[best.name]:
                best = t
        self.current[best.name] -= total
        return best


class LeastConnections:
    """Fewest requests in flight per unit of weight; ties go round robin."""

    def __init__(self, targets):
        self.rr = RoundRobin(targets)

    def pick(self, candidates, request):
        low = min(t.in_flight / t.weight for t in candidates)
        return self.rr.pick([t for t in candidates if t.in_flight / t.weight == low], request)


class Failover:
    """Always the first available target in configured (priority) order."""

    def __init__(self, targets):
        pass

    def pick(self, candidates, request):
        return candidates[0]


def _point(text: str) -> int:
    return int.from_bytes(hashlib.md5(text.encode("utf-8"), usedforsecurity=False).digest()[:8], "big")


class ConsistentHash:
    """A hash ring (``VNODES`` points per unit of weight): the same key goes to the
    same target while it is available, and when a target leaves only its keys
    move.  Requests without the key go round robin."""

    VNODES = 160

    def __init__(self, targets, key):
        self.key = key
        self.rr = RoundRobin(targets)
        ring = sorted((_point(f"{t.name}#{i}"), t.name) for t in targets for i in range(self.VNODES * t.weight))
        self.points = [p for p, _ in ring]
        self.names = [n for _, n in ring]

    def pick(self, candidates, request):
        value = self.key.value(request) if self.key is not None else None
        if value is None:
            return self.rr.pick(candidates, request)
        by_name = {t.name: t for t in candidates}
        start = bisect.bisect(self.points, _point(value))
        n = len(self.names)
        for i in range(n):
            t = by_name.get(self.names[(start + i) % n])
            if t is not None:
                return t
        return candidates[0]


STRATEGIES = {
    "round_robin": RoundRobin,
    "weighted": Weighted,
    "least_connections": LeastConnections,
    "failover": Failover,
    "hash": ConsistentHash,
}
