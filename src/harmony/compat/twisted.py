"""Twisted's private names Harmony relies on, and why each one.

setup.cfg bounds Twisted (``twisted[tls]>=24.7,<27``); tests/compat/test_twisted.py
checks each name below against the installed Twisted and that its version is inside
the tested range, so a new major release fails there first.
"""

from __future__ import annotations

# The endpoint factory Agent uses by default (TLS via the policy, HostnameEndpoint):
# wrapped so IPv4 literals skip HostnameEndpoint's happy-eyeballs delay.
from twisted.internet import tcp
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


def send_now(transport, data: bytes) -> None:
    """Write *data* to *transport* at once when it is a plain TCP connection with
    nothing queued before it: one ``send()`` now rather than ``transport.write``'s
    wait for the reactor's next turn (an ``EPOLLOUT`` registration, a poll, a
    ``doWrite`` and the deregistration; measured on every C-FIND a DIMSE proxy
    relays, harmony.dicom.ul.association).  What the socket does not take, and
    anything for a TLS or queued transport, goes through ``transport.write`` as
    usual, so the order of the bytes and Twisted's flow control stay as they were.
    Private: ``dataBuffer`` / ``_tempDataBuffer`` (``FileDescriptor``'s queue)."""
    if (isinstance(transport, tcp.Connection) and transport.connected and not transport.disconnecting
            and not transport.dataBuffer and not transport._tempDataBuffer):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent >= len(data):
                return
            data = data[sent:]
        # else the connection is lost: transport.write lets Twisted find out as it always does
    transport.write(data)


def version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def tested(version: str) -> bool:
    low, high = TESTED_RANGE
    return low <= version_tuple(version) < high


__all__ = ["StandardEndpointFactory", "TESTED_RANGE", "header_name_encoder", "send_now", "server_tls_options",
           "tested", "version_tuple"]
