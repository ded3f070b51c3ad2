"""harmony.web.bridge: twisted.web requests to envelopes and envelopes back, on DummyRequests."""

from __future__ import annotations

import io
import socket

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.web import resource, server
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from harmony.envelope import ResponseEnvelope
from harmony.web.bridge import envelope_from_request, request_body, request_id_for, write_response
from harmony.web.streaming import INLINE_BODY_LIMIT
from tests.memory import response


def _request(uri=b"/api/items/7?b=2&a=1", method=b"POST", body=b"", **headers):
    r = DummyRequest([b""])
    r.uri, r.path, r.method = uri, uri.partition(b"?")[0], method
    r.content = io.BytesIO(body)
    r.client = IPv4Address("TCP", "192.0.2.5", 40000)
    r.isSecure = lambda: False
    for name, value in headers.items():
        r.requestHeaders.setRawHeaders(name.replace("_", "-"), [value])
    return r


def test_an_envelope_from_a_request():
    req = _request(body=b'{"a": 1}', Content_Type="application/json", Host="harmony.test", X_Request_ID="abc-1")
    env = envelope_from_request(req, "/api", "api", "http")
    assert (env.method, env.path, env.subpath) == ("POST", "/api/items/7", "/items/7")
    assert env.query == [("b", "2"), ("a", "1")] and env.raw_query == b"b=2&a=1"
    assert env.normalized == {"a": 1} and env.body == b'{"a": 1}'
    assert env.metadata == {"protocol": "http", "request_id": "abc-1", "endpoint": "api"}
    assert (env.client_ip, env.host, env.scheme) == ("192.0.2.5", "harmony.test", "http")


def test_request_ids_are_the_clients_only_when_sane():
    assert request_id_for(_request(X_Request_ID="ok_id-1.2:3")) == "ok_id-1.2:3"
    made = request_id_for(_request(X_Request_ID="<script>"))
    assert made != "<script>" and len(made) == 32


def test_large_bodies_stay_streams():
    assert request_body(_request(body=b"")) == b""
    big = request_body(_request(body=b"x" * (INLINE_BODY_LIMIT + 1)))
    assert not isinstance(big, bytes) and big.length == INLINE_BODY_LIMIT + 1


def test_write_response_sets_status_headers_length_and_drops_hop_by_hop():
    req = _request(method=b"GET")
    request_id_for(req)
    answer = response(201, headers={"Connection": "X-Hop", "X-Hop": "1", "Keep-Alive": "5", "X-Kept": "y"},
                      body=b"created")
    write_response(req, answer)
    assert req.responseCode == 201 and b"".join(req.written) == b"created" and req.finished
    h = req.responseHeaders
    assert h.getRawHeaders(b"content-length") == [b"7"] and h.getRawHeaders(b"x-kept") == [b"y"]
    assert not h.hasHeader(b"x-hop") and not h.hasHeader(b"keep-alive")
    assert h.getRawHeaders(b"x-request-id") == [req._harmony_request_id.encode()]


@pytest_twisted.ensureDeferred
async def test_a_whole_answer_is_on_the_socket_when_write_response_returns():
    """A bytes answer is sent at once, not at the reactor's next turn: what the turn
    still runs after it (the pipeline's observers, logging) must not delay the client.
    Checked over a real loopback connection (the client socket is read, non-blocking,
    from inside the server's render, before the reactor turns again)."""
    site = server.Site(resource.Resource())
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    client.setblocking(False)
    seen: defer.Deferred = defer.Deferred()

    class Answer(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            write_response(request, ResponseEnvelope(200, Headers({"Content-Type": ["application/json"]}),
                                                     b'{"ok": true}'))
            try:
                seen.callback(client.recv(65536))
            except BlockingIOError:
                seen.callback(b"")
            return server.NOT_DONE_YET

    site.resource = Answer()
    try:
        client.sendall(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
        got = await seen
    finally:
        client.close()
        await port.stopListening()
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b'{"ok": true}')
