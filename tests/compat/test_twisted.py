"""Each private Twisted name in harmony.compat.twisted still exists and still does
what Harmony uses it for; the installed Twisted is inside the tested range."""

from __future__ import annotations

import configparser
import os
import re
from pathlib import Path

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import URI, BrowserLikePolicyForHTTPS

import twisted
from harmony.compat import twisted as compat
from tests.tls_certs import make_pki

SETUP_CFG = Path(__file__).resolve().parents[2] / "setup.cfg"


def test_the_installed_twisted_is_inside_the_tested_range():
    assert compat.tested(twisted.__version__), twisted.__version__


def test_setup_cfg_bounds_twisted_to_the_tested_range():
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG)
    requirement = next(line for line in cfg["options"]["install_requires"].split("\n")
                       if line.strip().startswith("twisted"))
    low = re.search(r">=\s*([\d.]+)", requirement).group(1)
    high = re.search(r"<\s*([\d.]+)", requirement)
    assert high is not None, f"{requirement!r} has no upper bound"
    assert (compat.version_tuple(low), compat.version_tuple(high.group(1) + ".0")) == compat.TESTED_RANGE


def test_version_range_edges():
    assert compat.tested("24.7.0") and compat.tested("26.10.0rc1")
    assert not compat.tested("24.3.0") and not compat.tested("27.1.0")


def test_the_standard_endpoint_factory_makes_tls_endpoints_from_the_policy():
    reactor = MemoryReactorClock()
    factory = compat.StandardEndpointFactory(reactor, BrowserLikePolicyForHTTPS(), 5, None)
    endpoint = factory.endpointForURI(URI.fromBytes(b"https://example.org:8443/x"))
    assert IStreamClientEndpoint.providedBy(endpoint)
    assert type(endpoint).__name__ == "_WrapperEndpoint"  # wrapClientTLS around a HostnameEndpoint


def test_server_tls_options_of_an_ssl_listen_string(tmp_path):
    pki = make_pki(tmp_path)
    key, cert = pki["server"]
    endpoint = serverFromString(MemoryReactorClock(), f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    assert isinstance(endpoint, SSL4ServerEndpoint)
    options = compat.server_tls_options(endpoint)
    assert options.getContext() is not None  # a usable OpenSSL context for TLSMemoryBIOFactory


def test_header_name_encoder_gives_the_keys_headers_stores_by():
    from twisted.web.http_headers import Headers

    encode = compat.header_name_encoder().encode
    headers = Headers()
    headers.addRawHeader(b"etag", b'"1"')
    headers.addRawHeader(b"x-request-id", b"a")
    assert set(headers._rawHeaders) == {encode(b"ETAG"), encode(b"X-Request-Id")}
    assert encode(b"etag") == b"ETag"  # Twisted's special cases, not plain capitalisation


def test_header_name_lookup_is_the_encoders_own_cache():
    cache, encode = compat.header_name_lookup()
    assert encode(b"x-made-up-for-the-test") == b"X-Made-Up-For-The-Test"
    assert cache.get(b"x-made-up-for-the-test") == b"X-Made-Up-For-The-Test"  # filled by encode
    assert cache.get(b"never-seen-before-here") is None


def test_send_now_writes_a_tcp_connection_at_once_and_queues_behind_pending_bytes():
    """send_now() reads FileDescriptor's private queue (dataBuffer, _tempDataBuffer):
    with nothing queued the bytes are on the socket before the reactor turns again;
    with something queued they go behind it (order kept); other transports just write."""
    import socket

    from twisted.internet import reactor, tcp
    from twisted.internet.testing import StringTransport

    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        conn = tcp.Connection(a, None, reactor)
        conn.connected = 1
        compat.send_now(conn, b"now")
        assert b.recv(100) == b"now" and not conn.dataBuffer and not conn._tempDataBuffer
        conn._tempDataBuffer.append(b"first")
        conn._tempDataLen = 5
        conn.startWriting = lambda: None   # not registered with the reactor in this test
        compat.send_now(conn, b"second")
        assert conn._tempDataBuffer == [b"first", b"second"]
        conn.connected = 0
    finally:
        a.close()
        b.close()
    plain = StringTransport()
    compat.send_now(plain, b"x")
    assert plain.value() == b"x"


# send_now over a real loopback connection: what the socket does not take at once
# still arrives, in order, after what it did.
BIG = bytes(range(256)) * 40_000  # ~10 MB: far more than one send takes


class _Writer(protocol.Protocol):
    def connectionMade(self):
        compat.send_now(self.transport, b"head:")
        compat.send_now(self.transport, BIG)  # queued behind the first if the socket is busy
        compat.send_now(self.transport, b":tail")
        self.transport.loseConnection()


class _Reader(protocol.Protocol):
    def __init__(self):
        self.chunks: list[bytes] = []
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason):
        self.done.callback(b"".join(self.chunks))


@pytest_twisted.ensureDeferred
async def test_send_now_a_large_write_arrives_whole_and_in_order_over_a_real_socket():
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(_Writer), interface="127.0.0.1")
    try:
        reader = _Reader()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), reader)
        received = await reader.done
    finally:
        await port.stopListening()
    assert received == b"head:" + BIG + b":tail"


class _PolledEnd:
    """A readable end of a socket pair, as the epoll reactor sees a connection."""

    def __init__(self, sock, fail=False):
        self.sock = sock
        self.fail = fail
        self.read: list[bytes] = []
        self.lost: list = []

    def fileno(self):
        return self.sock.fileno()

    def logPrefix(self):
        return "reader"

    def doRead(self):
        data = self.sock.recv(100)
        if self.fail:
            raise RuntimeError("a read that fails")
        self.read.append(data)

    def connectionLost(self, reason):
        self.lost.append(reason)


def test_lean_poll_dispatches_events_without_the_legacy_log_context(monkeypatch):
    """Each event goes to ``_doReadOrWrite`` straight (Twisted's ``doPoll`` opened a
    log context around each: 3.4 us an event, bench/dimse); a read that raises is
    still Twisted's to handle: logged, and the connection dropped."""
    import socket

    from twisted.internet.epollreactor import EPollReactor
    from twisted.python import log

    poller = EPollReactor()
    try:
        assert compat.lean_poll(poller)
        monkeypatch.setattr(log, "callWithLogger", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("used")))
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        reader, failing = _PolledEnd(b), _PolledEnd(d, fail=True)
        poller.addReader(reader)
        poller.addReader(failing)
        a.send(b"hello")
        c.send(b"boom")
        errors = []
        log.addObserver(errors.append)
        try:
            poller.doIteration(1)
        finally:
            log.removeObserver(errors.append)
        assert reader.read == [b"hello"] and not reader.lost
        assert failing.lost and any(e.get("isError") for e in errors)
        assert reader in poller.getReaders() and failing not in poller.getReaders()
        for s in (a, b, c, d):
            s.close()
    finally:
        poller._poller.close()
    monkeypatch.setenv(compat.LEAN_POLL_ENV, "0")
    assert not compat.lean_poll(EPollReactor()) and not compat.lean_poll(MemoryReactorClock())


def test_lean_poll_wakes_the_reactor_with_one_write_and_leaves_a_closed_waker_alone(monkeypatch):
    """``callFromThread``'s wake-up writes its byte directly (Twisted's went through a
    deprecation proxy, bench/ingest session 11); a full pipe is a reactor woken already,
    and a closed waker is not written to."""
    import errno

    from twisted.internet.epollreactor import EPollReactor

    reactor = EPollReactor()
    try:
        assert compat.lean_poll(reactor)
        reactor.wakeUp()
        assert os.read(reactor.waker.i, 10) == b"x"
        writes = []

        def full(fd, data):
            writes.append(fd)
            raise BlockingIOError(errno.EAGAIN, "full")
        monkeypatch.setattr(os, "write", full)
        compat._lean_wake(reactor)   # picks up the patched write
        reactor.wakeUp()
        assert writes == [reactor.waker.o]
        fd, reactor.waker.o = reactor.waker.o, None
        reactor.wakeUp()
        assert writes == [fd]
        reactor.waker.o = fd
    finally:
        reactor._poller.close()


@pytest_twisted.ensureDeferred
async def test_lean_io_reads_and_writes_what_twisted_would_and_keeps_its_endings(monkeypatch):
    """With the libc reads and writes that keep the GIL: 2 MiB echoed whole through
    partial writes (the rest of a buffer sent later comes as a ``memoryview``, written
    Twisted's way), a peer's close is a clean end and its reset a lost connection, as
    with Twisted's own reads."""
    import socket
    import struct
    import threading

    from twisted.internet import tcp, threads
    from twisted.internet.error import ConnectionDone, ConnectionLost

    monkeypatch.setattr(tcp.Connection, "doRead", tcp.Connection.doRead)   # restored after the test
    monkeypatch.setattr(tcp.Connection, "writeSomeData", tcp.Connection.writeSomeData)
    monkeypatch.setattr(compat, "_lean_io_installed", False)
    assert compat.lean_io() and tcp.Connection.doRead.__module__ == compat.__name__
    endings = [defer.Deferred(), defer.Deferred()]

    class Echo(protocol.Protocol):
        def dataReceived(self, data):
            self.transport.write(data)

        def connectionLost(self, reason):
            endings.pop(0).callback([reason])   # (a Failure itself would errback)

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    try:
        payload = os.urandom(2 * 1024 * 1024)

        def client():
            s = socket.create_connection(("127.0.0.1", port.getHost().port))
            sender = threading.Thread(target=s.sendall, args=(payload,))
            sender.start()
            got = bytearray()
            while len(got) < len(payload):
                chunk = s.recv(1 << 20)
                assert chunk, "the echo ended early"
                got += chunk
            sender.join()
            s.close()
            return bytes(got)
        first, second = endings
        assert await threads.deferToThread(client) == payload
        assert (await first)[0].check(ConnectionDone)

        def reset():
            s = socket.create_connection(("127.0.0.1", port.getHost().port))
            s.sendall(b"x")
            assert s.recv(10) == b"x"
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()   # an RST
        await threads.deferToThread(reset)
        [lost] = await second
        assert lost.check(ConnectionLost) and not lost.check(ConnectionDone)
    finally:
        await defer.maybeDeferred(port.stopListening)
    monkeypatch.setenv(compat.LEAN_IO_ENV, "0")
    monkeypatch.setattr(compat, "_lean_io_installed", False)
    assert not compat.lean_io()


@pytest_twisted.ensureDeferred
async def test_lean_io_carries_tls_whole(tmp_path, monkeypatch):
    """TLS rides on the lean reads and writes unchanged (Twisted's TLS sits above the
    TCP transport): a stdlib ``ssl`` client verifying the server echoes 512 KiB whole."""
    import socket
    import ssl

    from twisted.internet import tcp, threads

    monkeypatch.setattr(tcp.Connection, "doRead", tcp.Connection.doRead)   # restored after the test
    monkeypatch.setattr(tcp.Connection, "writeSomeData", tcp.Connection.writeSomeData)
    monkeypatch.setattr(compat, "_lean_io_installed", False)
    assert compat.lean_io()
    pki = make_pki(tmp_path)
    key, cert = pki["server"]

    class Echo(protocol.Protocol):
        def dataReceived(self, data):
            self.transport.write(data)

    endpoint = serverFromString(reactor, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    port = await endpoint.listen(protocol.Factory.forProtocol(Echo))
    try:
        payload = os.urandom(512 * 1024)

        def client():
            context = ssl.create_default_context(cafile=str(pki["ca"]))
            with socket.create_connection(("127.0.0.1", port.getHost().port)) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                got = bytearray()
                for at in range(0, len(payload), 64 * 1024):   # one thread: an SSL socket is not shared
                    s.sendall(payload[at:at + 64 * 1024])
                    while len(got) < min(len(payload), at + 64 * 1024):
                        chunk = s.recv(1 << 16)
                        assert chunk, "the echo ended early"
                        got += chunk
                return bytes(got)
        assert await threads.deferToThread(client) == payload
    finally:
        await defer.maybeDeferred(port.stopListening)
