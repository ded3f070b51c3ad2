"""Targets: the upstreams a backend may pick among, and how it picks.

A backend names ``targets = ["a", "b"]`` and gets a :class:`TargetPool` that
chooses one per request (strategy + routing rules), skips unhealthy ones
(active checks, circuit breaker) and retries idempotent requests on the next
target.  The pool knows nothing of protocols: the backend hands it a function
that sends one request to one target.  See docs/targets.md.
"""

from harmony.targets.pool import TargetPool
from harmony.targets.target import CLOSED, HALF_OPEN, OPEN, Target

__all__ = ["TargetPool", "Target", "CLOSED", "OPEN", "HALF_OPEN"]
