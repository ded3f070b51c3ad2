"""Twisted's private names Harmony relies on, and why each one.

setup.cfg bounds Twisted (``twisted[tls]>=24.7,<27``); tests/compat/test_twisted.py
checks each name below against the installed Twisted and that its version is inside
the tested range, so a new major release fails there first.
"""

from __future__ import annotations

# The HTTP/1.1 client protocol (Agent's), subclassed to keep the ``Connection`` header of
# an answer visible, so the hop-by-hop names it lists can be dropped (harmony.backends.http).
from twisted.web._newclient import HTTP11ClientProtocol

# The HTTP/1.1 client connection factory: subclassed to silence its per-connection
# "Starting factory" log line (Agent offers no public switch).
from twisted.web.client import _HTTP11ClientFactory as HTTP11ClientFactory

# The endpoint factory Agent uses by default (TLS via the policy, HostnameEndpoint):
# wrapped so IPv4 literals skip HostnameEndpoint's happy-eyeballs delay.
from twisted.web.client import _StandardEndpointFactory as StandardEndpointFactory

#: The versions of Twisted this code is tested on: [lowest, first untested).
TESTED_RANGE = ((24, 7), (27, 0))


def set_pool_factory(pool, factory) -> None:
    """Make *pool* (an ``HTTPConnectionPool``) build connections with *factory*.
    The pool has no public hook for its protocol factory."""
    if not hasattr(pool, "_factory"):
        raise AttributeError("HTTPConnectionPool._factory is gone: see harmony.compat.twisted")
    pool._factory = factory


def quiescent_callback(factory):
    """The callback an ``HTTP11ClientFactory`` hands each protocol it builds (the pool's
    "connection idle again" hook), for a ``buildProtocol`` that builds a subclass."""
    return factory._quiescentCallback


def response_parser(protocol):
    """The response parser of an ``HTTP11ClientProtocol`` with a request in flight
    (``_parser``: its ``headers`` and ``headerReceived``), or None between requests."""
    return getattr(protocol, "_parser", None)


def server_tls_options(endpoint):
    """The TLS context factory of an ``SSL4ServerEndpoint`` (from an ``ssl:`` listen
    string), so a worker process can wrap an adopted socket in the same TLS."""
    return endpoint._sslContextFactory


def version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def tested(version: str) -> bool:
    low, high = TESTED_RANGE
    return low <= version_tuple(version) < high


__all__ = ["HTTP11ClientFactory", "HTTP11ClientProtocol", "StandardEndpointFactory", "TESTED_RANGE",
           "quiescent_callback", "response_parser", "set_pool_factory", "server_tls_options", "tested", "version_tuple"]
