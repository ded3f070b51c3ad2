"""harmony.web.client: IPv4 literals are connected to directly (and once per target), everything
else through Twisted's standard endpoint factory; checked on a MemoryReactorClock."""

from __future__ import annotations

from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import URI, BrowserLikePolicyForHTTPS

from harmony.web.client import DirectEndpointFactory


def _factory(reactor):
    return DirectEndpointFactory(reactor, 3.5, BrowserLikePolicyForHTTPS())


def test_an_ipv4_literal_is_a_plain_tcp_endpoint_reused_per_target():
    reactor = MemoryReactorClock()
    factory = _factory(reactor)
    endpoint = factory.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8042/x"))
    assert isinstance(endpoint, TCP4ClientEndpoint)
    assert factory.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8042/other")) is endpoint
    assert factory.endpointForURI(URI.fromBytes(b"http://127.0.0.1:8043/")) is not endpoint
    endpoint.connect(object())
    host, port, _factory_, timeout, _bind = reactor.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", 8042, 3.5)


def test_names_and_https_go_through_the_standard_factory():
    reactor = MemoryReactorClock()
    factory = _factory(reactor)
    by_name = factory.endpointForURI(URI.fromBytes(b"http://pacs.test:8042/"))
    assert not isinstance(by_name, TCP4ClientEndpoint)
    secure = factory.endpointForURI(URI.fromBytes(b"https://127.0.0.1:8443/"))
    assert not isinstance(secure, TCP4ClientEndpoint)
