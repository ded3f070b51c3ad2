"""Twisted's private names Harmony relies on, and why each one.

setup.cfg bounds Twisted (``twisted[tls]>=24.7,<27``); tests/compat/test_twisted.py
checks each name below against the installed Twisted and that its version is inside
the tested range, so a new major release fails there first.
"""

from __future__ import annotations

import errno
import os
import socket

from twisted.internet import tcp

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


def header_name_lookup():
    """``(cache, encode)``: the dict behind :func:`header_name_encoder` (a name as
    received -> its ``Headers`` key, filled by ``encode`` for names it has checked,
    bounded by Twisted) and ``encode`` itself.  ``cache.get(name) or encode(name)``
    is one C-level dict lookup for a name seen before, where ``encode`` is a Python
    call each time: the hot paths encode about fifteen names a proxied request."""
    encoder = header_name_encoder()
    return encoder._canonicalHeaderCache, encoder.encode


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


# Writing a data set's file straight to the socket (harmony.dicom.ul.filesend) needs the
# transport's socket and its write buffer: dataBuffer/offset, _tempDataBuffer/_tempDataLen.

def direct_socket(transport) -> tuple[socket.socket, bytes] | None:
    """``(socket, buffered)`` of *transport* when bytes may be written to its socket
    directly now: plain TCP (not TLS) and connected.  *buffered* is what Twisted held
    and had not begun to send (a response written just before), taken back to go
    first in the same ``sendmsg`` -- one send, one wake-up of the peer, where a flush
    then a send made two.  ``None`` means: use the transport."""
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
        return None
    if not transport.connected or transport.disconnecting:
        return None
    held = _take_buffered(transport)
    if held is None:
        if not flush_buffered(transport):
            return None
        held = b""
    return transport.socket, held


def _take_buffered(transport) -> bytes | None:
    """What Twisted buffered, removed from its buffer, when none of it was sent yet
    (else ``None``: flush instead).  Its writer registration stays; its next
    ``doWrite`` finds nothing and stops writing."""
    temp = getattr(transport, "_tempDataBuffer", None)
    data = getattr(transport, "dataBuffer", None)
    offset = getattr(transport, "offset", None)
    if not isinstance(temp, list) or data is None or offset is None or len(data) > offset \
            or not hasattr(transport, "_tempDataLen"):
        return None
    held = b"".join(temp)
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    return held


def flush_buffered(transport) -> bool:
    """Write what *transport* buffered now, as the reactor would at its next turn
    (``doWrite``; an error it meets the reactor meets again there), when it is plain
    TCP: for an answer a peer waits on before it sends more.  True when nothing is
    left buffered."""
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
        return False
    if not transport.connected or transport.disconnecting:
        return False
    if _buffered(transport):
        transport.doWrite()
        return not _buffered(transport)
    return True


def _buffered(transport) -> bool:
    # Twisted keeps what write() was given in dataBuffer (from offset) and in
    # _tempDataBuffer; an attribute missing means "assume buffered" (the safe way).
    data = getattr(transport, "dataBuffer", None)
    offset = getattr(transport, "offset", None)
    temp = getattr(transport, "_tempDataLen", None)
    if data is None or offset is None or temp is None:
        return True
    return len(data) > offset or temp > 0


def version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def tested(version: str) -> bool:
    low, high = TESTED_RANGE
    return low <= version_tuple(version) < high


__all__ = ["StandardEndpointFactory", "TESTED_RANGE", "direct_socket", "flush_buffered", "header_name_encoder",
           "header_name_lookup", "send_now", "server_tls_options", "tested", "version_tuple"]


#: ``HARMONY_LEAN_POLL=0`` keeps Twisted's own dispatch of poll events, for A/B runs.
LEAN_POLL_ENV = "HARMONY_LEAN_POLL"


def lean_poll(reactor) -> bool:
    """Dispatch an epoll reactor's events to their connections directly, without the
    legacy-log context Twisted opens around each one.

    ``EPollReactor.doPoll`` calls ``log.callWithLogger(selectable, _doReadOrWrite, ...)``
    for every event: a copy of the log context with the connection's prefix, pushed
    and popped around the read -- 3.4 us an event on this machine, three events a
    proxied C-FIND, each on its way to the PACS or back (bench/dimse, C-FIND).
    Harmony logs through ``twisted.logger`` with its own fields and never reads that
    context; ``_doReadOrWrite`` still catches what a read or write raises, logs it and
    drops the connection, only without the ``system`` prefix.  Called once per serving
    process (harmony.tap, harmony.workers), never by the service itself (a test run
    starts many services on one reactor).  Private: ``_poller``, ``_selectables``,
    ``_doReadOrWrite`` (the epoll reactor's).  Returns whether it was installed."""
    from twisted.internet.epollreactor import EPollReactor
    if not isinstance(reactor, EPollReactor) or os.environ.get(LEAN_POLL_ENV, "1") == "0":
        return False
    selectables = reactor._selectables
    dispatch = reactor._doReadOrWrite

    def do_poll(timeout):
        if timeout is None:
            timeout = -1   # wait indefinitely
        try:
            events = reactor._poller.poll(timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                dispatch(selectable, fd, event)

    reactor.doPoll = reactor.doIteration = do_poll  # type: ignore[method-assign]  # per instance, on purpose
    _lean_wake(reactor)
    return True


def _lean_wake(reactor) -> None:
    """The reactor's waker (what ``callFromThread`` writes to) with one ``os.write``.

    Twisted's ``_UnixWaker.wakeUp`` writes through ``util.untilConcludes``, reached
    through ``twisted.python.util``'s deprecation proxy (``_ModuleProxy.__getattribute__``
    in Python) -- on a storage thread once a committed batch, ~1.5 % of four C-STORE
    associations' GIL samples (bench/ingest, session 11).  Python retries EINTR itself
    (PEP 475); a full pipe means the reactor is woken already, as Twisted has it; the
    descriptor is read on each call (``None`` once the waker is closed).  Private: the
    waker's ``o``; left alone for any other waker."""
    from twisted.internet._signals import _UnixWaker
    waker = getattr(reactor, "waker", None)
    if type(waker) is not _UnixWaker:
        return
    write = os.write

    def wake_up():
        fd = waker.o
        if fd is not None:
            try:
                write(fd, b"x")
            except BlockingIOError:
                pass

    waker.wakeUp = wake_up  # type: ignore[method-assign]  # this waker only
