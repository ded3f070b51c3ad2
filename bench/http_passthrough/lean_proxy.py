#!/usr/bin/env python3
"""A minimal reverse proxy on the Twisted reactor, in four builds: the decision bench.

Not Harmony and not a product: no pipeline, no limits, no timeouts, no error
pages, GET-style requests without bodies only.  It answers one question with
numbers: how much of a passthrough's CPU is twisted.web's HTTP/1.1 (server
side: ``HTTPChannel``/``Request``; client side: ``Agent``/``HTTP11ClientProtocol``
with a persistent pool), and how much would go if either side were a plain
Twisted ``Protocol`` on httptools (llhttp, the parser in Node.js, in C)?

    python lean_proxy.py PORT UPSTREAM_PORT --front {twisted,lean} --back {agent,lean}

``--front twisted`` is a bare ``Resource`` on twisted.web's ``Site``; ``--front
lean`` parses requests with ``httptools.HttpRequestParser`` in a ``Protocol``.
``--back agent`` is ``Agent`` on a persistent ``HTTPConnectionPool``; ``--back
lean`` is a keep-alive pool of ``Protocol``s parsing answers with
``httptools.HttpResponseParser``.  decide.py runs all four next to nginx and
Harmony.
"""

from __future__ import annotations

import argparse
import sys

import httptools
from twisted.internet import defer, protocol, reactor
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
       b"upgrade", b"content-length", b"host"}


# --------------------------------------------------------------- lean back


class Back(protocol.Protocol):
    """One keep-alive upstream connection; answers go to ``self.sink``."""

    def __init__(self, pool):
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.sink = None
        self.headers = []

    def connectionMade(self):
        self.pool.connected(self)

    def send(self, head: bytes, sink):
        self.sink = sink
        self.headers = []
        self.transport.write(head)

    def dataReceived(self, data):
        self.parser.feed_data(data)

    def on_header(self, name, value):
        self.headers.append((name, value))

    def on_headers_complete(self):
        self.sink.head(self.parser.get_status_code(), self.headers)

    def on_body(self, body):
        self.sink.body(body)

    def on_message_complete(self):
        sink, self.sink = self.sink, None
        keep = self.parser.should_keep_alive()
        sink.done()
        if keep:
            self.pool.release(self)
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.pool.lost(self)
        if self.sink is not None:
            self.sink.failed()


class LeanPool(protocol.ClientFactory):
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.idle: list[Back] = []
        self.waiting: list = []

    def buildProtocol(self, addr):
        return Back(self)

    def send(self, head: bytes, sink):
        if self.idle:
            self.idle.pop().send(head, sink)
        else:
            self.waiting.append((head, sink))
            reactor.connectTCP(self.host, self.port, self)

    def connected(self, conn):
        self.release(conn)

    def release(self, conn):
        if self.waiting:
            conn.send(*self.waiting.pop(0))
        else:
            self.idle.append(conn)

    def lost(self, conn):
        if conn in self.idle:
            self.idle.remove(conn)


# -------------------------------------------------------------- lean front


class Front(protocol.Protocol):
    """One client connection parsed by httptools, proxied through the pool."""

    def __init__(self, pool):
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers = []

    def dataReceived(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.loseConnection()

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers.append((name, value))

    def on_message_complete(self):
        method = self.parser.get_method()
        lines = [method + b" " + self.url + b" HTTP/1.1\r\nHost: " + b"%s:%d" % (self.pool.host.encode(), self.pool.port)]
        for name, value in self.headers:
            if name.lower() not in HOP:
                lines.append(name + b": " + value)
        peer = self.transport.getPeer().host.encode()
        lines.append(b"X-Forwarded-For: " + peer)
        self.url, self.headers = b"", []
        self.pool.send(b"\r\n".join(lines) + b"\r\n\r\n", self)

    # sink side
    def head(self, status, headers):
        out = [b"HTTP/1.1 %d X" % status]
        for name, value in headers:
            if name.lower() not in HOP or name.lower() == b"content-length":
                out.append(name + b": " + value)
        self.transport.write(b"\r\n".join(out) + b"\r\n\r\n")

    def body(self, data):
        self.transport.write(data)

    def done(self):
        pass

    def failed(self):
        self.transport.loseConnection()


class FrontFactory(protocol.Factory):
    def __init__(self, pool):
        self.pool = pool

    def buildProtocol(self, addr):
        return Front(self.pool)


# --------------------------------------------------------- twisted.web front


class _RequestSink:
    def __init__(self, request):
        self.request = request

    def head(self, status, headers):
        self.request.setResponseCode(status)
        for name, value in headers:
            if name.lower() not in HOP or name.lower() == b"content-length":
                self.request.responseHeaders.addRawHeader(name, value)

    def body(self, data):
        self.request.write(data)

    def done(self):
        if not self.request._disconnected:
            self.request.finish()

    def failed(self):
        if not self.request._disconnected:
            self.request.loseConnection()


class _Relay(protocol.Protocol):
    def __init__(self, request, done):
        self.request, self.done = request, done

    def dataReceived(self, data):
        self.request.write(data)

    def connectionLost(self, reason):
        self.done.callback(None)


class ProxyResource(Resource):
    isLeaf = True

    def __init__(self, back, upstream):
        super().__init__()
        self.back = back
        self.upstream = upstream

    def render(self, request):
        if isinstance(self.back, LeanPool):
            lines = [request.method + b" " + request.uri + b" HTTP/1.1\r\nHost: " + self.upstream]
            for name, values in request.requestHeaders.getAllRawHeaders():
                if name.lower() not in HOP:
                    lines.extend(name + b": " + v for v in values)
            lines.append(b"X-Forwarded-For: " + request.getClientAddress().host.encode())
            self.back.send(b"\r\n".join(lines) + b"\r\n\r\n", _RequestSink(request))
            return NOT_DONE_YET
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in HOP:
                headers.setRawHeaders(name, values)
        headers.setRawHeaders(b"x-forwarded-for", [request.getClientAddress().host.encode()])
        d = self.back.request(request.method, b"http://" + self.upstream + request.uri, headers)

        def answered(response):
            request.setResponseCode(response.code)
            for name, values in response.headers.getAllRawHeaders():
                if name.lower() not in HOP or name.lower() == b"content-length":
                    request.responseHeaders.setRawHeaders(name, values)
            done = defer.Deferred()
            response.deliverBody(_Relay(request, done))
            return done

        d.addCallback(answered).addBoth(lambda _: None if request._disconnected else request.finish())
        return NOT_DONE_YET


class QuietSite(Site):
    noisy = False

    def log(self, request):
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port", type=int)
    parser.add_argument("upstream_port", type=int)
    parser.add_argument("--front", choices=("twisted", "lean"), default="lean")
    parser.add_argument("--back", choices=("agent", "lean"), default="lean")
    args = parser.parse_args(argv)
    if args.back == "lean":
        back = LeanPool("127.0.0.1", args.upstream_port)
    else:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 64
        back = Agent(reactor, pool=pool)
    if args.front == "lean":
        if not isinstance(back, LeanPool):
            parser.error("--front lean needs --back lean")
        factory = FrontFactory(back)
    else:
        factory = QuietSite(ProxyResource(back, b"127.0.0.1:%d" % args.upstream_port))
    reactor.listenTCP(args.port, factory, interface="127.0.0.1", backlog=1024)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
