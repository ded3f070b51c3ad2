"""Each private Twisted name in harmony.compat.twisted still exists and still does
what Harmony uses it for; the installed Twisted is inside the tested range."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import twisted
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint, serverFromString
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import BrowserLikePolicyForHTTPS, HTTPConnectionPool, URI

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


def test_the_pool_builds_connections_with_the_factory_we_set():
    reactor = MemoryReactorClock()
    pool = HTTPConnectionPool(reactor, persistent=False)

    class Quiet(compat.HTTP11ClientFactory):
        noisy = False

    compat.set_pool_factory(pool, Quiet)
    pool.getConnection(("http", b"127.0.0.1", 80), TCP4ClientEndpoint(reactor, "127.0.0.1", 80))
    host, port, factory, _timeout, _bind = reactor.tcpClients[0]
    assert (host, port) == ("127.0.0.1", 80)
    assert isinstance(factory._wrappedFactory, Quiet)  # the endpoint wraps what the pool passes


def test_set_pool_factory_refuses_a_pool_without_the_hook():
    class NoHook:
        pass

    try:
        compat.set_pool_factory(NoHook(), object)
    except AttributeError as e:
        assert "harmony.compat.twisted" in str(e)
    else:
        raise AssertionError("a pool without _factory was accepted")


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


def test_quiescent_callback_is_what_the_factory_hands_its_protocols():
    def idle_again(protocol):
        return None

    factory = compat.HTTP11ClientFactory(idle_again, "metadata")
    assert compat.quiescent_callback(factory) is idle_again
    assert isinstance(factory.buildProtocol(None), compat.HTTP11ClientProtocol)


def test_response_parser_of_a_protocol_with_a_request_in_flight():
    from twisted.internet.testing import StringTransport
    from twisted.web._newclient import Request
    from twisted.web.http_headers import Headers

    protocol = compat.HTTP11ClientProtocol()
    protocol.makeConnection(StringTransport())
    assert compat.response_parser(protocol) is None  # no request yet
    protocol.request(Request(b"GET", b"/", Headers({b"host": [b"upstream"]}), None))
    parser = compat.response_parser(protocol)
    assert parser is not None and callable(parser.headerReceived)
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\nX-Internal: 1\r\nConnection: X-Internal\r\nX-Other: 2\r\n")
    assert parser.headers.hasHeader(b"x-internal")  # filed as each header line completes
    assert parser.connHeaders.hasHeader(b"connection")
    assert not parser.headers.hasHeader(b"connection")  # why harmony.backends.http copies it back
