"""Twisted's private names Harmony relies on, and why each one.

setup.cfg bounds Twisted (``twisted[tls]>=24.7,<27``); tests/compat/test_twisted.py
checks each name below against the installed Twisted and that its version is inside
the tested range, so a new major release fails there first.
"""

from __future__ import annotations

# The endpoint factory Agent uses by default (TLS via the policy, HostnameEndpoint):
# wrapped so IPv4 literals skip HostnameEndpoint's happy-eyeballs delay.
from twisted.web.client import _StandardEndpointFactory as StandardEndpointFactory

#: The versions of Twisted this code is tested on: [lowest, first untested).
TESTED_RANGE = ((24, 7), (27, 0))


def server_tls_options(endpoint):
    """The TLS context factory of an ``SSL4ServerEndpoint`` (from an ``ssl:`` listen
    string), so a worker process can wrap an adopted socket in the same TLS."""
    return endpoint._sslContextFactory


def header_name_encoder():
    """twisted.web's cached header-name encoder (``encode(name)`` -> the Header-Case
    bytes ``Headers`` keys by, validated once per distinct name), so headers parsed
    elsewhere (harmony.web.upstream_client) can go into ``Headers._rawHeaders`` directly."""
    from twisted.web import http_headers
    return http_headers._nameEncoder


def version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def tested(version: str) -> bool:
    low, high = TESTED_RANGE
    return low <= version_tuple(version) < high


__all__ = ["StandardEndpointFactory", "TESTED_RANGE", "header_name_encoder", "server_tls_options", "tested",
           "version_tuple"]
