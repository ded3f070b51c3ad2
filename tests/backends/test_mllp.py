"""harmony.backends.mllp in memory: a message to an MLLP receiver on a MemoryReactorClock (the TCP
connection completed by twisted.test.iosim), its ACK brought back, AE resent after the delay, AR
never, a silent receiver timed out, and the connection kept for the next message.  The receiver
here is a small Protocol answering by a rule; the real-peer tests are in tests/hl7/."""

from __future__ import annotations

import json
import types

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock

from harmony.backends.mllp import MllpBackend
from harmony.config.errors import OptionError
from harmony.errors import BackendTimeout, BadRequest
from harmony.hl7.ack import build_ack
from harmony.hl7.framing import MllpDecoder, frame
from harmony.hl7.message import parse_message
from tests.memory import Wires, build, failure_of, request, result_of

PORT = 2575
MESSAGE = (b"MSH|^~\\&|HARMONY|HOSP|LAB|NORTH|20260101120000||ORU^R01|MSG42|P|2.5\r"
           b"PID|1||SYN-9||Synthetic^Result\r")


class Receiver(Protocol):
    def __init__(self, peer):
        self.peer = peer
        self.decoder = MllpDecoder(1 << 20)

    def dataReceived(self, data):
        for raw in self.decoder.feed(data):
            self.peer.received.append(raw)
            code = self.peer.codes.pop(0) if self.peer.codes else "AA"
            if code is not None:
                self.transport.write(frame(build_ack(code, parse_message(raw))))


class Peer(Factory):
    """The receiving system: answers each message with the next code of *codes* (None: silence)."""

    def __init__(self, codes=()):
        self.codes = list(codes)
        self.received = []
        self.connections = 0

    def buildProtocol(self, addr):
        self.connections += 1
        return Receiver(self)


def _rig(codes=(), **options):
    reactor = MemoryReactorClock()
    peer = Peer(codes)
    reactor.listenTCP(PORT, peer, interface="127.0.0.1")
    ctx = types.SimpleNamespace(reactor=reactor, targets=lambda: [], component=None,
                                config=types.SimpleNamespace(targets={}))
    backend = build(MllpBackend, {"host": "127.0.0.1", "port": PORT, "retry_delay_secs": 5, **options},
                    name="lab", ctx=ctx)
    return backend, peer, reactor, Wires(reactor)


def _send(backend, wires, body=MESSAGE, **kwargs):
    return wires.run(backend.send(request("POST", body=body, **kwargs)))


def test_the_receivers_ack_comes_back_and_the_connection_is_reused():
    backend, peer, _reactor, wires = _rig()
    response = result_of(_send(backend, wires))
    assert response.status == 200 and response.state.hl7_ack_code == "AA"
    assert peer.received == [MESSAGE] and b"MSA|AA|MSG42" in response.body
    assert result_of(_send(backend, wires)).status == 200
    assert peer.connections == 1


def test_an_ae_is_sent_again_after_the_delay_and_an_ar_never():
    backend, peer, reactor, wires = _rig(codes=["AE", "AA"])
    d = _send(backend, wires)
    assert not d.called and len(peer.received) == 1
    reactor.advance(5)
    assert result_of(wires.run(d)).status == 200 and len(peer.received) == 2
    rejecting, peer2, _reactor2, wires2 = _rig(codes=["AR"])
    response = result_of(_send(rejecting, wires2))
    assert response.status == 422 and len(peer2.received) == 1


def test_a_silent_receiver_times_out_and_its_connection_is_not_reused():
    backend, peer, reactor, wires = _rig(codes=[None], ack_timeout_secs=2, ack_retries=0)
    d = _send(backend, wires)
    reactor.advance(2.5)
    failure_of(wires.run(d), BackendTimeout)
    assert result_of(_send(backend, wires)).status == 200
    assert peer.connections == 2  # a late ACK must never be read as the next message's


def test_a_json_view_is_written_as_er7_with_a_control_id():
    backend, peer, _reactor, wires = _rig()
    view = {"MSH": {"3": "HARMONY", "9": {"1": "ADT", "2": "A08"}, "12": "2.5"}, "PID": [{"3": "SYN-1"}]}
    response = result_of(_send(backend, wires, body=json.dumps(view).encode(),
                               headers={"Content-Type": "application/json"}))
    assert response.status == 200
    sent = parse_message(peer.received[0])
    assert sent.message_type == "ADT" and sent.control_id


@pytest.mark.parametrize("body", [b"not hl7 at all", b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01||P|2.5\r"])
def test_what_is_not_a_sendable_message_is_a_bad_request(body):
    backend, peer, _reactor, wires = _rig()
    failure_of(_send(backend, wires, body=body), BadRequest)
    assert peer.received == []


def test_a_host_is_required():
    ctx = types.SimpleNamespace(reactor=MemoryReactorClock(), targets=lambda: [], component=None,
                                config=types.SimpleNamespace(targets={}))
    with pytest.raises(OptionError) as e:
        build(MllpBackend, {}, ctx=ctx)
    assert e.value.key == "host"
