"""A request's head (request line and headers) must arrive within
HarmonyChannel.head_deadline of its first byte (task.Clock, in memory)."""

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from harmony.web.router import HarmonySite, PrefixRouter
from harmony.web.streaming import HarmonyChannel


def connect():
    clock = task.Clock()
    site = HarmonySite(PrefixRouter("default"), reactor=clock)
    proto = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 12345))
    transport = StringTransport()
    proto.makeConnection(transport)
    return clock, proto, transport


def test_a_head_dripping_in_slowly_gets_408_and_the_connection_closes():
    clock, proto, transport = connect()
    proto.dataReceived(b"GET /x HTTP/1.1\r\n")
    for _ in range(5):  # a byte every 10 s keeps the idle timeout (60 s) from ever firing
        clock.advance(10)
        proto.dataReceived(b"X")
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert transport.disconnecting


def test_a_head_that_arrives_in_time_is_served():
    clock, proto, transport = connect()
    proto.dataReceived(b"GET /x HTTP/1.1\r\n")
    clock.advance(HarmonyChannel.head_deadline - 1)
    proto.dataReceived(b"Host: a\r\n\r\n")
    clock.advance(HarmonyChannel.head_deadline)
    assert transport.value().startswith(b"HTTP/1.1 404 ")  # PrefixRouter with no routes
    assert b"408" not in transport.value()


def test_an_idle_keep_alive_connection_is_not_a_slow_head():
    clock, proto, transport = connect()
    proto.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    transport.clear()
    clock.advance(HarmonyChannel.head_deadline + 1)  # idle between requests: the Site's own timeout's job
    assert transport.value() == b"" and not transport.disconnecting
