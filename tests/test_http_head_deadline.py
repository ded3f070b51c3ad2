"""A request's head (request line and headers) must arrive within
HEAD_TIMEOUT of its first byte (task.Clock, in memory)."""

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from harmony.web.router import HarmonySite, PrefixRouter
from harmony.web.streaming import HEAD_TIMEOUT


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
    clock.advance(HEAD_TIMEOUT - 1)
    proto.dataReceived(b"Host: a\r\n\r\n")
    clock.advance(HEAD_TIMEOUT)
    assert transport.value().startswith(b"HTTP/1.1 404 ")  # PrefixRouter with no routes
    assert b"HTTP/1.1 408" not in transport.value()  # (a random request_id may contain "408")


def test_an_idle_keep_alive_connection_is_not_a_slow_head():
    clock, proto, transport = connect()
    proto.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    transport.clear()
    clock.advance(HEAD_TIMEOUT + 1)  # idle between requests: the Site's own timeout's job
    assert transport.value() == b"" and not transport.disconnecting


# ---------------------------------------------------------------- body data rate (issue 12, defect 19)

def connect_with(settings):
    clock, proto, transport = connect()
    proto.site.apply_settings(settings)
    return clock, proto, transport


def test_a_body_dripped_a_byte_every_3s_is_cut_with_408():
    clock, proto, transport = connect_with({"body_timeout_secs": 10, "body_min_rate": 10})
    proto.dataReceived(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n")
    for _ in range(3):  # each byte restarts the idle timeout; 3 bytes in 10 s is far below 100
        clock.advance(3)
        proto.dataReceived(b"x")
    assert transport.value() == b""
    clock.advance(1)
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 408 ") and b"application/problem+json" in answer
    assert b"body_min_rate" in answer and b"connection: close" in answer.lower()
    assert transport.disconnecting


def test_a_chunked_body_that_stalls_is_cut_with_408():
    clock, proto, transport = connect_with({"body_timeout_secs": 10, "body_min_rate": 0})
    proto.dataReceived(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    clock.advance(9.9)
    proto.dataReceived(b"1\r\n")  # rate 0: any byte in a window keeps it going (nginx client_body_timeout)
    clock.advance(10)
    assert transport.value() == b""
    clock.advance(10)  # a whole window without a byte
    assert transport.value().startswith(b"HTTP/1.1 408 ") and transport.disconnecting


def test_a_body_at_a_decent_rate_is_never_cut():
    clock, proto, transport = connect_with({"body_timeout_secs": 10, "body_min_rate": 10})
    proto.dataReceived(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 6000\r\n\r\n")
    for _ in range(30):  # 200 bytes every 2 s: 100 B/s over 60 s
        clock.advance(2)
        proto.dataReceived(b"x" * 200)
    assert transport.value().startswith(b"HTTP/1.1 404 ")  # complete, and answered (no route)
    clock.advance(100)
    assert b"HTTP/1.1 408" not in transport.value()  # (a random request_id may contain "408")


def test_a_window_in_which_we_paused_reading_is_not_the_clients_fault():
    from harmony.web.streaming import StreamingBody

    clock, proto, transport = connect_with({"body_timeout_secs": 10, "body_min_rate": 10})
    proto.dataReceived(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n")
    request = proto.requests[-1]
    cut = []
    request.body_too_slow = cut.append
    # As when the body streams to a backend that is slow to take it: we stop reading.
    request.body_stream = StreamingBody(transport, 100000)
    request.body_stream._pause_client()
    clock.advance(35)
    request.body_stream._resume_client()
    clock.advance(5)  # the window that began while we were not reading is not judged
    assert cut == [] and request.body_stream.client_pauses == 1
    clock.advance(10)  # a whole window of the client's own silence is
    assert len(cut) == 1 and cut[0].status == 408


def test_the_body_clock_can_be_turned_off():
    clock, proto, transport = connect_with({"body_timeout_secs": 0})
    proto.dataReceived(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
    clock.advance(3600)
    assert transport.value() == b""
