"""harmony.dicom.ul.filesend: the PDUs a file becomes, sent by sendfile on real
sockets (a full socket leaves the rest for the buffered way, byte for byte),
and an association sending a large data set to a peer that stops reading
(the sender's memory stays at a block, then everything arrives intact)."""

from __future__ import annotations

import os
import select
import socket

import pytest_twisted
from pydicom.filereader import read_file_meta_info
from twisted.internet import reactor, task

from harmony.dicom.ul import filesend, pdu
from harmony.dicom.ul.acceptor import AcceptorFactory, AcceptorLimits, AcceptorSettings
from harmony.dicom.ul.association import FileDataset
from harmony.dicom.ul.requestor import RequestorSettings, associate
from tests.dicom.ul.memory import CONTEXTS, EchoStoreHandler
from tests.dicom_data import make_instance, save

STORE_CLASS = "1.2.840.10008.5.1.4.1.1.2"   # CT Image Storage, one of CONTEXTS


def reference(context_id: int, data: bytes, fragment: int) -> bytes:
    """The PDU stream pdu.pdata makes of *data* (what the association always sent)."""
    if not data:
        return pdu.pdata(context_id, 0x02, b"")
    return b"".join(pdu.pdata(context_id, 0x02 if start + fragment >= len(data) else 0x00,
                              data[start:start + fragment]) for start in range(0, len(data), fragment))


def test_plan_and_blocks_are_the_pdus_pdata_makes(tmp_path):
    path = tmp_path / "raw"
    data = os.urandom(100_003)
    path.write_bytes(b"x" * 17 + data)
    fd = os.open(path, os.O_RDONLY)
    try:
        for fragment in (1000, 4096, 99_999, 100_003, 1 << 20):
            plan = filesend.Plan(5, 17, 17 + len(data), fragment)
            assert len(plan) == -(-len(data) // fragment)
            out, index = b"", 0
            while index < len(plan):
                block, index = plan.block(fd, index, budget=30_000)
                out += block
            assert out == reference(5, data, fragment)
        empty = filesend.Plan(1, 17, 17, 1000)
        assert len(empty) == 1 and empty.block(fd, 0)[0] == pdu.pdata(1, 0x02, b"")
    finally:
        os.close(fd)


def test_dataset_start_of_part_ten_files(tmp_path):
    path = save(make_instance(rows=4, cols=4), tmp_path / "a.dcm")
    fd = os.open(path, os.O_RDONLY)
    try:
        start = filesend.dataset_start(fd)
    finally:
        os.close(fd)
    assert start == 128 + 4 + 12 + read_file_meta_info(path).FileMetaInformationGroupLength


def tcp_pair(sndbuf: int):
    server = socket.create_server(("127.0.0.1", 0))
    sender = socket.create_connection(server.getsockname())
    receiver, _ = server.accept()
    server.close()
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    sender.setblocking(False)
    return sender, receiver


def drain(sock, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, "connection closed early"
        got += chunk
    return bytes(got)


def exchange(sender, receiver, following: bytes, total: int) -> bytes:
    """Read *total* bytes on *receiver* while *following* is written on the
    non-blocking *sender* (the socket is full: one side alone would block)."""
    receiver.setblocking(False)
    got = bytearray()
    left = memoryview(following)
    while len(got) < total:
        readable, writable, _ = select.select([receiver], [sender] if left else [], [], 10)
        assert readable or writable, "stalled"
        if writable:
            left = left[sender.send(left):]
        if readable:
            chunk = receiver.recv(1 << 20)
            assert chunk, "connection closed early"
            got += chunk
    return bytes(got)


def test_send_direct_stops_at_a_full_socket_and_the_rest_completes_the_stream(tmp_path):
    """A peer that does not read: sendfile sends what the socket takes, the rest
    (one PDU at most) comes back to go the buffered way, then whole blocks follow;
    together exactly the PDUs pdata makes."""
    data = os.urandom(3 * 1024 * 1024 + 11)
    path = tmp_path / "big"
    path.write_bytes(data)
    prefix = pdu.pdata(1, 0x03, b"command")
    for fragment in (16_372, 131_066, 300_000):   # batches per sendmsg; the largest by sendfile
        sender, receiver = tcp_pair(64 * 1024)
        fd = os.open(path, os.O_RDONLY)
        try:
            plan = filesend.Plan(1, 0, len(data), fragment)
            index, rest = filesend.send_direct(sender, fd, plan, prefix)
            assert index < len(plan) and rest, "the socket should have filled up"
            following = rest
            while index < len(plan):
                block, index = plan.block(fd, index)
                following += block
            expected = prefix + reference(1, data, fragment)
            sent = len(expected) - len(following)
            assert 0 < sent < len(expected)
            assert exchange(sender, receiver, following, len(expected)) == expected
        finally:
            os.close(fd)
            sender.close()
            receiver.close()


def test_send_direct_sends_everything_a_reader_takes(tmp_path):
    data = os.urandom(400_000)
    path = tmp_path / "f"
    path.write_bytes(data)
    sender, receiver = tcp_pair(4 * 1024 * 1024)
    fd = os.open(path, os.O_RDONLY)
    try:
        for fragment in (131_066, 300_000):
            plan = filesend.Plan(3, 0, len(data), fragment)
            assert filesend.send_direct(sender, fd, plan, b"response") == (len(plan), b"")
            expected = b"response" + reference(3, data, fragment)
            assert drain(receiver, len(expected)) == expected
    finally:
        os.close(fd)
        sender.close()
        receiver.close()


class _Paused(EchoStoreHandler):
    """A storage SCP whose connection stops reading once the association is up."""

    def association_established(self, assoc):
        assoc.transport.pauseProducing()
        self.assoc = assoc


@pytest_twisted.ensureDeferred
async def test_a_peer_that_stops_reading_holds_the_sender_to_a_block(tmp_path, monkeypatch):
    """An association sends a 24 MiB data set from a file over real TCP to a peer
    that reads nothing: what Harmony holds in memory stays within a block or two
    (the kernel's socket buffers take the rest), and once the peer reads again
    the data set arrives byte for byte."""
    sendfile_calls = []
    real_sendfile = os.sendfile
    monkeypatch.setattr(filesend.os, "sendfile", lambda *a: sendfile_calls.append(a) or real_sendfile(*a))
    data = os.urandom(24 * 1024 * 1024)
    path = tmp_path / "big.raw"
    path.write_bytes(data)
    handler = _Paused(limit=64 * 1024 * 1024)
    settings = AcceptorSettings("HARMONY", CONTEXTS, AcceptorLimits(max_pdu=1 << 20))
    port = reactor.listenTCP(0, AcceptorFactory(settings, handler, reactor), interface="127.0.0.1")
    try:
        assoc = await associate(reactor, "127.0.0.1", port.getHost().port, RequestorSettings(local_aet="SCU"),
                                "HARMONY", CONTEXTS)
        context = next(cid for cid, cx in assoc.contexts.items() if str(cx.abstract_syntax) == STORE_CLASS)
        answer = assoc.request(context, {"AffectedSOPClassUID": STORE_CLASS, "CommandField": 0x0001,
                                         "Priority": 0, "AffectedSOPInstanceUID": "1.2.3"}, FileDataset(path))
        # Reactor turns (no timers) until the sender is held back: the sockets are
        # full and Twisted's buffer is over its limit.
        while not assoc._flow.paused:
            await task.deferLater(reactor, 0, lambda: None)
        held = []
        for _ in range(20):   # and it stays held back, holding no more
            transport = assoc.transport
            held.append(len(transport.dataBuffer) - transport.offset + transport._tempDataLen)
            await task.deferLater(reactor, 0, lambda: None)
        assert max(held) <= 2 * filesend.BATCH, held
        assert not answer.called
        handler.assoc.transport.resumeProducing()
        response = await answer
        assert response.command["Status"] == 0
        assert handler.stored == [data]
        assert sendfile_calls, "plain TCP: the data set should have gone by sendfile first"
        await assoc.release()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_requestors_reads_reach_the_association_without_the_endpoints_wrapper():
    """Once connected, the transport delivers to the association itself: the client
    endpoint's wrapper only passed each read (and the end) on, one call a read on
    every pooled association (bench/dimse, C-FIND); reads and the end still arrive."""
    handler = EchoStoreHandler()
    settings = AcceptorSettings("HARMONY", CONTEXTS, AcceptorLimits())
    port = reactor.listenTCP(0, AcceptorFactory(settings, handler, reactor), interface="127.0.0.1")
    try:
        assoc = await associate(reactor, "127.0.0.1", port.getHost().port, RequestorSettings(local_aet="SCU"),
                                "HARMONY", CONTEXTS)
        assert assoc.transport.protocol is assoc
        response = await assoc.request(1, {"AffectedSOPClassUID": "1.2.840.10008.1.1", "CommandField": 0x0030})
        assert response.command["Status"] == 0
        await assoc.release()
        assert (await assoc.closed) is None        # the connection's end reached the association too
    finally:
        await port.stopListening()
