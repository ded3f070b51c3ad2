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
    """``transport.write(data)``, sent at once when nothing is queued before it.

    Twisted's TCP transport always queues a write and sends it on the reactor's
    next turn, after registering the socket for write readiness (an ``epoll_ctl``)
    and unregistering it once the queue is empty (another).  For the small
    messages of the hot paths on a socket whose buffer is empty - a proxied
    C-FIND's PDUs (harmony.dicom.ul.association), an HTTP passthrough's request
    head and answer (harmony.web.upstream_client, harmony.web.fast_channel) -
    that is two system calls and a reactor turn to learn what ``send`` knows at
    once: strace counted them on every request (bench/dimse,
    bench/http_passthrough).

    Only a plain TCP connection (not TLS) with an empty queue and an open writing
    side qualifies (a registered producer is no bar: nothing is queued, so it is
    not due a pause); what the socket does not take, and any
    error, go through ``transport.write`` as usual (the queue, and ``doWrite``
    meeting the error and closing the connection), so the order of the bytes
    and Twisted's flow control stay as they were.  Private: ``dataBuffer`` /
    ``_tempDataBuffer`` (``FileDescriptor``'s queue), ``_writeDisconnected``."""
    if (isinstance(transport, tcp.Connection) and not transport.TLS and transport.connected
            and not transport.disconnecting and not transport._writeDisconnected
            and not transport.dataBuffer and not transport._tempDataBuffer):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent >= len(data):
                return
            data = data[sent:]
        # An error instance: transport.write below meets it in doWrite and closes as usual.
    transport.write(data)


def version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def tested(version: str) -> bool:
    low, high = TESTED_RANGE
    return low <= version_tuple(version) < high


__all__ = ["StandardEndpointFactory", "TESTED_RANGE", "header_name_encoder", "send_now", "server_tls_options",
           "tested", "version_tuple"]
