"""Twisted's private names Harmony relies on, and why each one.

setup.cfg bounds Twisted (``twisted[tls]>=24.7,<27``); tests/compat/test_twisted.py
checks each name below against the installed Twisted and that its version is inside
the tested range, so a new major release fails there first.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import sys
import time

from twisted.internet import main, tcp

# The endpoint factory Agent uses by default (TLS via the policy, HostnameEndpoint):
# wrapped so IPv4 literals skip HostnameEndpoint's happy-eyeballs delay.
from twisted.web.client import _StandardEndpointFactory as StandardEndpointFactory

from harmony.compat.spin import PollSpin

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


def lean_poll(reactor, spin: float = 0.0) -> bool:
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
    ``_doReadOrWrite`` (the epoll reactor's).  Returns whether it was installed.

    *spin*: seconds the reactor keeps polling without sleeping once it has nothing
    to do, before it blocks (:class:`harmony.compat.spin.PollSpin` says why and when
    it stands back); 0, or a system without what it needs, never spins."""
    from twisted.internet.epollreactor import EPollReactor
    if not isinstance(reactor, EPollReactor) or os.environ.get(LEAN_POLL_ENV, "1") == "0":
        return False
    selectables = reactor._selectables
    dispatch = reactor._doReadOrWrite
    poller = reactor._poller
    spinner = PollSpin.make(poller.fileno(), spin, reactor)
    clock = time.monotonic

    def do_poll(timeout):
        if timeout is None:
            timeout = -1   # wait indefinitely
        try:
            if spinner is None or timeout == 0:
                events = poller.poll(timeout, len(selectables))
            else:
                # Whatever is ready first (as poll(timeout) would return it at once);
                # nothing: the spin, then the sleep for what is left of the timeout.
                events = poller.poll(0, len(selectables))
                if not events:
                    began = clock()
                    if spinner.wait(timeout):
                        events = poller.poll(0, len(selectables))
                    if not events:
                        left = -1 if timeout < 0 else max(0.0, timeout - (clock() - began))
                        events = poller.poll(left, len(selectables))
                        spinner.slept(clock() - began, bool(events))
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


#: ``HARMONY_LEAN_IO=0`` keeps Twisted's own socket reads and writes, for A/B runs.
LEAN_IO_ENV = "HARMONY_LEAN_IO"


def lean_io() -> bool:
    """TCP connections read and write their non-blocking sockets without letting go
    of the GIL.

    ``socket.recv`` and ``socket.send`` let go of the GIL around the system call, as
    every call that might wait does; on a non-blocking socket they never wait.  On
    the reactor, under a C-STORE stream, letting go handed the GIL to the storage
    thread placing instances, and the reactor waited out that thread's turn before
    it could go on with the bytes it had just read: ``cProfile`` of the reactor put
    ~85 us on each ``recv`` and ~60 us on each ``send`` that take ~5 us in the kernel
    (bench/ingest, "C-STORE, session 13").  Through libc by ``ctypes.PyDLL`` (which
    keeps the GIL), the reactor lets go only where it waits - in ``epoll_wait``.
    Four associations: +3.7, +7 and +4.6 % inst/s, CPU an instance -4 to -7 %, in three
    sittings against the build without (``cpu_ab.py ... dimse4``); one association into
    ``storage_dir`` and a proxied C-FIND unchanged.

    Linux only; called next to :func:`lean_poll` by a serving process (harmony.tap,
    harmony.workers), whose reactor's thread is the only one that reads (one read
    buffer); a test run's reactor keeps Twisted's own.  TLS rides on it unchanged
    (Twisted's TLS is a protocol above this transport).  A write of anything but
    ``bytes`` (whose buffer ctypes hands over without a copy) goes Twisted's way.
    Errors are Twisted's: would-block reads nothing and writes 0, a reset or a
    broken pipe loses the connection (SIGPIPE is ignored by Python; MSG_NOSIGNAL
    anyway).  Private: ``Connection.doRead`` / ``writeSomeData``, ``_dataReceived``,
    ``SEND_LIMIT``.  Returns whether it was installed (once per process)."""
    global _lean_io_installed
    if _lean_io_installed or not sys.platform.startswith("linux") or os.environ.get(LEAN_IO_ENV, "1") == "0":
        return _lean_io_installed
    try:
        libc = ctypes.PyDLL(None, use_errno=True)   # PyDLL: the GIL is kept across each call
        recv, send = libc.recv, libc.send
    except (OSError, AttributeError):
        return False
    # No argtypes: ctypes' own conversions (an int is a C int, bytes and a ctypes array a
    # pointer, the result a C int) fit every value passed here, and cost less a call.
    get_errno = ctypes.get_errno
    global _lean_read_buffer
    buffer = _lean_read_buffer = ctypes.create_string_buffer(_LEAN_READ_BYTES)   # reads land in it
    view = memoryview(buffer)
    twisted_read, twisted_write = tcp.Connection.doRead, tcp.Connection.writeSomeData
    lost, would_block = main.CONNECTION_LOST, (errno.EAGAIN, errno.EINTR)
    write_would_block = (errno.EAGAIN, errno.EINTR, errno.ENOBUFS)

    def doRead(self):
        n = recv(self.socket.fileno(), buffer, min(self.bufferSize, _LEAN_READ_BYTES), 0)
        if n < 0:
            return None if get_errno() in would_block else lost
        return self._dataReceived(view[:n].tobytes())

    def writeSomeData(self, data):
        if type(data) is not bytes:
            return twisted_write(self, data)
        size = min(len(data), self.SEND_LIMIT)
        n = send(self.socket.fileno(), data, size, _MSG_NOSIGNAL)
        if n < 0:
            return 0 if get_errno() in write_would_block else lost
        return n

    doRead.__doc__, writeSomeData.__doc__ = twisted_read.__doc__, twisted_write.__doc__
    tcp.Connection.doRead = doRead  # type: ignore[method-assign]  # process-wide, on purpose
    tcp.Connection.writeSomeData = writeSomeData  # type: ignore[method-assign]
    _lean_io_installed = True
    return True


_lean_io_installed = False
_lean_read_buffer = None
#: The most one lean read takes (Twisted's own ``bufferSize``).
_LEAN_READ_BYTES = 65536
_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)


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
