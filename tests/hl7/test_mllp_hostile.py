"""Hostile and unusual MLLP clients against the ``mllp`` endpoint: oversized
messages and garbage are refused early (connection cut, memory bounded),
slow clients are timed out, a client that hangs up still gets its message
relayed, and only allowed sources and certified TLS clients get in."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from tests.hl7.peers import Receiver, acked_control_ids, adt
from tests.hl7.test_mllp_relay import relay_config, running
from tests.tls_certs import make_pki


class Client(Protocol):
    """A raw test client: records what comes back and when the server hangs up."""

    def __init__(self):
        self.data = b""
        self.closed = defer.Deferred()
        self.got = []

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.closed.callback(self.data)


async def connect(port, tls=None):
    if tls is not None:
        ep = SSL4ClientEndpoint(reactor, "127.0.0.1", port, tls)
    else:
        ep = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    return await connectProtocol(ep, Client())


#: With this seed python-hl7's first ACK control ID ends in "MSA" (MSH-10 = ...CMSA|P|2.5)
ACK_ID_ENDS_IN_MSA = 655


def within(d, seconds=5.0):
    return d.addTimeout(seconds, reactor)


@pytest.fixture
def receiver(tmp_path):
    r = Receiver(tmp_path).start()
    yield r
    r.stop()


@pytest_twisted.ensureDeferred
async def test_oversized_message_refused_before_its_end(tmp_path, receiver):
    h, ep = await running(relay_config(tmp_path, receiver.port, "max_message_bytes = 4096"))
    try:
        c = await connect(ep.bound_port)
        c.transport.write(b"\x0bMSH|^~\\&|" + b"A" * 8192)   # no end: the server must not wait for one
        data = await within(c.closed)
    finally:
        await h.stop()
    assert data == b"" and ep.refused["oversized message"] == 1
    assert receiver.control_ids() == []


@pytest_twisted.ensureDeferred
async def test_garbage_between_frames_cuts_the_connection(tmp_path, receiver):
    h, ep = await running(relay_config(tmp_path, receiver.port))
    try:
        c = await connect(ep.bound_port)
        c.transport.write(b"GET / HTTP/1.1\r\n\r\n\x0b" + adt("G-1") + b"\x1c\r")
        data = await within(c.closed)
    finally:
        await h.stop()
    assert data == b"" and ep.refused["bad framing"] == 1 and receiver.control_ids() == []


@pytest_twisted.ensureDeferred
async def test_slow_client_is_timed_out(tmp_path, receiver):
    h, ep = await running(relay_config(tmp_path, receiver.port, "idle_timeout_secs = 0.2"))
    try:
        c = await connect(ep.bound_port)
        c.transport.write(b"\x0bMSH|^~\\&|")   # and then nothing
        await within(c.closed)
        assert not ep.connections
    finally:
        await h.stop()


@pytest_twisted.ensureDeferred
async def test_client_hanging_up_still_gets_its_message_relayed(tmp_path, receiver):
    h, ep = await running(relay_config(tmp_path, receiver.port))
    finished = defer.Deferred()
    ep.pipeline.observers.append(lambda req, resp, secs: finished.callback(resp.status))
    try:
        c = await connect(ep.bound_port)
        c.transport.write(b"\x0b" + adt("HANGUP-1") + b"\x1c\r")
        c.transport.loseConnection()   # gone before any ACK can reach it
        status = await within(finished)
    finally:
        await h.stop()
    assert status == 200 and receiver.control_ids() == ["HANGUP-1"]


@pytest_twisted.ensureDeferred
async def test_source_not_allowed_is_refused(tmp_path, receiver):
    h, ep = await running(relay_config(tmp_path, receiver.port, 'allowed_sources = ["10.0.0.0/8"]'))
    try:
        c = await connect(ep.bound_port)
        c.transport.write(b"\x0b" + adt("SRC-1") + b"\x1c\r")
        data = await within(c.closed)
    finally:
        await h.stop()
    assert data == b"" and receiver.control_ids() == []


@pytest_twisted.ensureDeferred
async def test_tls_needs_a_client_certificate(tmp_path, receiver):
    pki = make_pki(tmp_path / "pki")
    opts = f'tls_cert = "{pki["server"][1]}"\ntls_key = "{pki["server"][0]}"\ntls_ca = "{pki["ca"]}"'
    h, ep = await running(relay_config(tmp_path, receiver.port, opts))
    ca = ssl.Certificate.loadPEM(pki["ca"].read_bytes())
    client_cert = ssl.PrivateCertificate.loadPEM(pki["client"][1].read_bytes() + pki["client"][0].read_bytes())
    try:
        good = await connect(ep.bound_port, ssl.optionsForClientTLS("127.0.0.1", trustRoot=ca,
                                                                    clientCertificate=client_cert))
        good.transport.write(b"\x0b" + adt("TLS-1") + b"\x1c\r")
        bad = await connect(ep.bound_port, ssl.optionsForClientTLS("127.0.0.1", trustRoot=ca))
        bad.transport.write(b"\x0b" + adt("TLS-2") + b"\x1c\r")
        refused = await within(bad.closed)
        while b"\x1c\r" not in good.data:
            await within(deferLater(0.01))
        good.transport.loseConnection()
    finally:
        await h.stop()
    assert b"MSA|AA|TLS-1" in good.data and b"MSA" not in refused
    assert receiver.control_ids() == ["TLS-1"]


def deferLater(seconds):
    from twisted.internet import task
    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_connections_past_the_limit_are_refused(tmp_path, receiver):
    h, ep = await running(relay_config(tmp_path, receiver.port, "max_connections = 2"))
    try:
        first, second = await connect(ep.bound_port), await connect(ep.bound_port)
        third = await connect(ep.bound_port)
        data = await within(third.closed)
        first.transport.write(b"\x0b" + adt("LIM-1") + b"\x1c\r")
        while b"\x1c\r" not in first.data:
            await within(deferLater(0.01))
        for c in (first, second):
            c.transport.loseConnection()
    finally:
        await h.stop()
    assert data == b"" and ep.refused["too many connections"] == 1
    assert b"MSA|AA|LIM-1" in first.data


@pytest.fixture
def seeded_receiver(tmp_path):
    r = Receiver(tmp_path, seed=ACK_ID_ENDS_IN_MSA).start()
    yield r
    r.stop()


@pytest_twisted.ensureDeferred
async def test_pipelined_flood_is_answered_in_order(tmp_path, seeded_receiver):
    """300 messages written at once without waiting for ACKs: the connection is
    read one message at a time (back-pressure), every message is relayed and
    acknowledged, in order.

    The receiver's first ACK has a control ID ending in "MSA": this test once
    read ACKs by searching for "MSA|" and then took MSH-12 ('2.5') for MSA-2,
    about one run in 140, whenever python-hl7's random MSH-10 ended so."""
    receiver = seeded_receiver
    h, ep = await running(relay_config(tmp_path, receiver.port))
    ids = [f"FLOOD-{i:03d}" for i in range(300)]
    try:
        c = await connect(ep.bound_port)
        c.transport.write(b"".join(b"\x0b" + adt(i) + b"\x1c\r" for i in ids))
        waited = 0.0
        while c.data.count(b"\x1c\r") < len(ids):
            assert waited < 60, "not every message was acknowledged"
            await within(deferLater(0.05))
            waited += 0.05
        c.transport.loseConnection()
    finally:
        await h.stop()
    acks = acked_control_ids(c.data)
    assert acks[0][1].split(b"\r")[0].split(b"|")[9].endswith(b"MSA"), "the seed no longer gives the hard case"
    wrong = [raw for (control_id, raw), expected in zip(acks, ids) if control_id != expected]
    assert not wrong, f"first ACK out of place, as received: {wrong[0]!r}"
    assert len(acks) == len(ids) and receiver.control_ids() == ids
