"""harmony.endpoints.mllp in memory: framed HL7 v2 messages on a StringTransport, the pipeline run
for real, and the ACK each one earns (AA, AE for a failure that may pass, AR for a refusal), one
message at a time with back-pressure, duplicates, sources and framing limits.  The real-socket and
real-peer tests are in tests/hl7/."""

from __future__ import annotations

import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from harmony.config.errors import OptionError
from harmony.endpoints.mllp import MllpEndpoint, _MllpFactory
from harmony.envelope import ResponseEnvelope
from harmony.errors import BackendUnavailable, Forbidden
from harmony.hl7.ack import read_ack
from harmony.hl7.framing import MllpDecoder, frame
from harmony.pipeline import Pipeline
from tests.memory import Answering, build


def _message(control_id="CTRL1", extra=""):
    return (f"MSH|^~\\&|LAB|NORTH|HARMONY|HOSP|20260101120000||ADT^A01|{control_id}|P|2.5{extra}\r"
            f"PID|1||SYN-1^^^HOSP||Synthetic^Patient\r").encode()


class Link:
    """One sender's connection to the endpoint."""

    def __init__(self, endpoint, host="127.0.0.1"):
        self.protocol = _MllpFactory(endpoint).buildProtocol(IPv4Address("TCP", host, 40000))
        self.protocol.callLater = endpoint.reactor.callLater  # the idle clock is the test's, not the reactor's
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        self.protocol.makeConnection(self.transport)
        self.decoder = MllpDecoder(1 << 20)

    def send(self, *messages):
        self.protocol.dataReceived(b"".join(frame(m) for m in messages))

    def acks(self):
        data = self.transport.value()
        self.transport.clear()
        return [read_ack(raw) for raw in self.decoder.feed(data)]


def _endpoint(respond=None, **options):
    reactor = MemoryReactorClock()
    endpoint = build(MllpEndpoint, {"port": 2575, **options}, name="adt",
                     ctx=types.SimpleNamespace(reactor=reactor))
    backend = Answering(respond or (lambda request: ResponseEnvelope(status=200)))
    endpoint.pipeline = Pipeline("hl7", [], [backend])
    return endpoint, backend, reactor


def test_a_message_goes_through_the_pipeline_and_earns_an_aa():
    endpoint, backend, _reactor = _endpoint()
    link = Link(endpoint)
    link.send(_message())
    (ack,) = link.acks()
    assert (ack.code, ack.control_id) == ("AA", "CTRL1")
    request = backend.requests[0]
    assert request.metadata["protocol"] == "hl7v2" and request.path == "/ADT/A01"
    assert request.body == _message() and request.normalized is not None
    assert endpoint.acks_sent["AA"] == 1


@pytest.mark.parametrize("error, code", [(BackendUnavailable("pacs down"), "AE"), (Forbidden("no"), "AR")])
def test_a_failure_is_ae_and_a_refusal_ar_with_an_err_segment(error, code):
    endpoint, _backend, _reactor = _endpoint(lambda request: error)
    link = Link(endpoint)
    link.send(_message())
    (ack,) = link.acks()
    assert ack.code == code and ack.error_code  # ERR-3 names the HL7 error


def test_an_unparseable_message_is_refused_without_reaching_the_backend():
    endpoint, backend, _reactor = _endpoint()
    link = Link(endpoint)
    link.send(b"PID|1||no header\r")
    (ack,) = link.acks()
    assert ack.code in ("AR", "AE") and backend.requests == []
    assert endpoint.refused["parse error"] == 1


def test_one_message_at_a_time_with_back_pressure():
    waiting = []
    endpoint, backend, _reactor = _endpoint(lambda request: waiting.append(defer.Deferred()) or waiting[-1])
    link = Link(endpoint)
    link.send(_message("C1"), _message("C2"))
    assert len(backend.requests) == 1 and link.transport.producerState == "paused"
    waiting[0].callback(ResponseEnvelope(status=200))
    assert [a.control_id for a in link.acks()] == ["C1"] and len(backend.requests) == 2
    waiting[1].callback(ResponseEnvelope(status=200))
    assert [a.control_id for a in link.acks()] == ["C2"] and link.transport.producerState == "producing"


@settings(max_examples=150)
@given(st.integers(1, 12), st.lists(st.integers(0, 4000), max_size=25), st.lists(st.integers(0, 3), max_size=25))
def test_pipelined_frames_cut_anywhere_are_acknowledged_once_each_in_order(count, cuts, answers_between):
    """A flood arriving in arbitrary TCP chunks (frames split and merged, more
    bytes even while the connection is paused) while the backend answers at
    arbitrary moments: every message reaches the backend once, in order, and
    each ACK names its own message."""
    waiting: list = []
    endpoint, backend, _reactor = _endpoint(lambda request: waiting.append(defer.Deferred()) or waiting[-1])
    link = Link(endpoint)
    ids = [f"P{i:02d}" for i in range(count)]
    stream = b"".join(frame(_message(i)) for i in ids)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    acks: list = []

    def answer(n):
        for _ in range(n):
            if waiting and not waiting[0].called:
                waiting.pop(0).callback(ResponseEnvelope(status=200))
        acks.extend(link.acks())

    for (a, b), n in zip(zip(points, points[1:]), answers_between + [0] * len(points)):
        link.protocol.dataReceived(stream[a:b])
        answer(n)
    while waiting:
        answer(1)
    assert [r.metadata["hl7.control_id"] for r in backend.requests] == ids
    assert [(ack.code, ack.control_id) for ack in acks] == [("AA", i) for i in ids]
    assert link.transport.producerState == "producing" and not link.protocol.pending


def test_a_duplicate_is_answered_as_the_first_time_not_sent_again():
    endpoint, backend, _reactor = _endpoint(duplicate_window_secs=60)
    link = Link(endpoint)
    link.send(_message("SAME"), _message("SAME"))
    assert [a.code for a in link.acks()] == ["AA", "AA"] and len(backend.requests) == 1
    rejecting, backend2, _ = _endpoint(duplicate_window_secs=60, duplicate_policy="reject")
    other = Link(rejecting)
    other.send(_message("SAME"), _message("SAME"))
    assert [a.code for a in other.acks()] == ["AA", "AR"] and len(backend2.requests) == 1


def test_a_source_not_allowed_and_bad_framing_close_the_connection():
    endpoint, _backend, _reactor = _endpoint(allowed_sources=["10.0.0.0/8"])
    outsider = Link(endpoint, host="192.0.2.7")
    assert outsider.transport.disconnecting or outsider.transport.disconnected
    assert endpoint.refused["source not allowed"] == 1
    small, _backend, _reactor = _endpoint(max_message_bytes=64)
    link = Link(small)
    link.send(_message())
    assert link.transport.disconnecting and small.refused["oversized message"] == 1


def test_a_silent_connection_is_closed_by_the_idle_clock():
    endpoint, _backend, reactor = _endpoint(idle_timeout_secs=30)
    link = Link(endpoint)
    reactor.advance(29)
    link.send(_message())  # traffic restarts the clock
    reactor.advance(29)
    assert not link.transport.disconnecting
    reactor.advance(2)
    assert link.transport.disconnecting


@pytest.mark.parametrize("options, key", [
    ({"ack_mode": "enhanced-please"}, "ack_mode"),
    ({"duplicate_policy": "ignore"}, "duplicate_policy"),
    ({"max_message_bytes": 10}, "max_message_bytes"),
    ({"allowed_sources": ["not-an-address"]}, "allowed_sources"),
])
def test_option_errors_name_their_key(options, key):
    with pytest.raises(OptionError) as e:
        _endpoint(**options)
    assert e.value.key.startswith(key)
