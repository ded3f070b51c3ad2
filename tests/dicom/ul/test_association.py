"""harmony.dicom.ul.association and .acceptor in memory: negotiation, limits, timers, faults."""

import struct

import pytest

from harmony.dicom.ul import commands, pdu
from harmony.dicom.ul.acceptor import AcceptorLimits
from harmony.dicom.ul.association import (
    CLOSE_DRAIN_BYTES,
    CLOSE_GRACE_SECS,
    CLOSED,
    ESTABLISHED,
    AssociationAborted,
    AssociationRejected,
    after_delivery,
)
from tests.dicom.ul.memory import EchoStoreHandler, acceptor, connect, pump, requestor

ECHO = {"AffectedSOPClassUID": "1.2.840.10008.1.1", "CommandField": commands.C_ECHO_RQ}
STORE = {"AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "CommandField": commands.C_STORE_RQ,
         "Priority": 0, "AffectedSOPInstanceUID": "1.2.3"}


def established_pair(limits=None, handler=None, **kw):
    clock, factory = acceptor(limits, handler, **kw)
    server, st = connect(factory)
    client, ct = requestor(clock)
    pump(client, ct, server, st)
    return clock, factory, server, st, client, ct


def lost(assoc):
    """What the reactor does once a closing transport is gone."""
    assoc.transport.gone()


def timers(assoc):
    """The calls *assoc* has pending on the (shared) clock."""
    return [call for call in assoc.reactor.getDelayedCalls() if getattr(call.func, "__self__", None) is assoc]


def test_echo_round_trip_and_release():
    clock, factory, server, st, client, ct = established_pair()
    assert server.state == client.state == ESTABLISHED
    assert server.calling_aet == "SCU" and server.called_aet == "HARMONY"
    assert client.peer_max_pdu == 65536
    answers = []
    client.request(1, ECHO).addCallback(answers.append)
    pump(client, ct, server, st)
    assert answers[0].command["Status"] == 0
    client.release()
    pump(client, ct, server, st)
    assert st.write_closed and not st.disconnecting  # the A-RELEASE-RP's sender reads on (Sta13)
    assert ct.disconnecting                           # its reader closes (AR-3)
    ct.flushed()
    st.peer_closes()
    assert st.ended_by == ct.ended_by == "FIN"
    assert not clock.getDelayedCalls()


def test_store_dataset_reassembled_from_fragments_of_the_peers_maximum():
    handler = EchoStoreHandler()
    clock, factory, server, st, client, ct = established_pair(handler=handler)
    client.peer_max_pdu = 1000                       # as if the acceptor had advertised 1000
    data = bytes(range(256)) * 40
    client.request(3, STORE, data)
    written = ct.value()
    sizes = []
    offset = 0
    while offset < len(written):
        _t, length = struct.unpack_from(">BxI", written, offset)
        sizes.append(length)
        offset += 6 + length
    assert max(sizes) <= 1000 and len(sizes) > 10
    pump(client, ct, server, st)
    assert handler.stored == [data]


def test_silent_connections_cut_after_acse_timeout_and_never_counted():
    clock, factory = acceptor(AcceptorLimits(max_associations=1, acse_timeout=5))
    silent = [connect(factory, port=50000 + i) for i in range(12)]
    assert factory.settings.connections == 12 and not factory.settings.associations
    # A real association still gets in while twelve sockets say nothing.
    server, st = connect(factory, port=41000)
    client, ct = requestor(clock)
    pump(client, ct, server, st)
    assert server.state == ESTABLISHED
    clock.advance(5)
    for assoc, transport in silent:
        assert assoc.state == CLOSED and transport.write_closed
        assert transport.value() == pdu.abort(2, 0)
        lost(assoc)
    assert factory.settings.connections == 1
    assert server.state == ESTABLISHED                  # established associations have no ARTIM


def test_association_limit_counts_associations_and_answers_busy():
    clock, factory = acceptor(AcceptorLimits(max_associations=1))
    first, ft = connect(factory, port=1)
    c1, c1t = requestor(clock)
    pump(c1, c1t, first, ft)
    second, sec_t = connect(factory, port=2)
    c2, c2t = requestor(clock)
    failures = []
    c2.established.addErrback(failures.append)
    pump(c2, c2t, second, sec_t)
    rejected = failures[0].value
    assert isinstance(rejected, AssociationRejected)
    assert (rejected.result, rejected.source, rejected.reason) == (2, 3, 2)
    lost(first)                                       # the first one ends: room again
    third, tt = connect(factory, port=3)
    c3, c3t = requestor(clock)
    pump(c3, c3t, third, tt)
    assert third.state == ESTABLISHED


def test_connection_caps_total_and_per_source():
    clock, factory = acceptor(AcceptorLimits(max_connections=5, max_connections_per_source=2))
    assert connect(factory, "10.0.0.1", 1)[0] and connect(factory, "10.0.0.1", 2)[0]
    assert connect(factory, "10.0.0.1", 3)[0] is None
    for i in range(3):
        assert connect(factory, f"10.0.0.{i + 2}", 4)[0]
    assert connect(factory, "10.0.0.9", 5)[0] is None
    assert factory.refused == 2


def test_wrong_calling_and_called_aet_rejected():
    clock, factory = acceptor(allowed_calling_aets=["MODALITY"])
    for called, calling, reason in (("HARMONY", "INTRUDER", 3), ("OTHER", "MODALITY", 7)):
        server, st = connect(factory)
        client, ct = requestor(clock, called=called, calling=calling)
        failures = []
        client.established.addErrback(failures.append)
        pump(client, ct, server, st)
        assert failures[0].value.reason == reason


def test_oversized_pdu_after_association_is_aborted_at_its_header():
    clock, factory, server, st, client, ct = established_pair(AcceptorLimits(max_pdu=16384))
    st.clear()
    server.dataReceived(struct.pack(">BxI", pdu.P_DATA_TF, 0xFFFFFFFF) + b"\0" * 65536)
    assert server.state == CLOSED and st.write_closed
    assert st.value() == pdu.abort(2, 6)


def test_pdata_before_association_aborts():
    clock, factory = acceptor()
    server, st = connect(factory)
    server.dataReceived(pdu.pdata(1, 3, b"\0" * 10))
    assert server.state == CLOSED and st.value() == pdu.abort(2, 2)


def test_garbage_association_request_aborts():
    clock, factory = acceptor()
    server, st = connect(factory)
    server.dataReceived(pdu.header(pdu.A_ASSOCIATE_RQ, 10) + b"\x01" * 10)
    assert server.state == CLOSED and st.value() == pdu.abort(2, 6)


def test_dataset_over_the_sinks_limit_aborts():
    clock, factory, server, st, client, ct = established_pair(handler=EchoStoreHandler(limit=1000))
    failures = []
    client.request(3, STORE, b"x" * 5000).addErrback(failures.append)
    pump(client, ct, server, st)
    assert server.state == CLOSED and client.state == CLOSED     # the client got the A-ABORT
    lost(client)
    assert failures and failures[0].check(AssociationAborted)


def test_dimse_timeout_aborts_and_fails_the_request():
    clock, factory, server, st, client, ct = established_pair()
    server.handler.on_request = lambda assoc, message: None     # never answers
    failures = []
    client.request(1, ECHO).addErrback(failures.append)
    pump(client, ct, server, st)
    clock.advance(client.settings.dimse_timeout)
    assert client.state == CLOSED
    # Failed when the A-ABORT is sent, not once the peer (which did not answer) closes.
    assert failures and failures[0].check(AssociationAborted)
    assert "DIMSE timeout" in str(failures[0].value)


def test_idle_association_closed_after_network_timeout():
    clock, factory, server, st, client, ct = established_pair(AcceptorLimits(network_timeout=60))
    clock.advance(59)
    assert server.state == ESTABLISHED
    clock.advance(1)
    assert server.state == CLOSED


def test_an_active_association_outlives_the_network_timeout_on_one_idle_timer():
    """Activity is noted, not a timer reset per PDU or per write: the one idle call stays
    where it was while requests go both ways, and the association closes a full network
    timeout after its last activity."""
    clock, factory, server, st, client, ct = established_pair(AcceptorLimits(network_timeout=60))
    first_call = server._idle
    answers = []
    for _ in range(5):
        clock.advance(20)
        client.request(1, ECHO).addCallback(answers.append)
        pump(client, ct, server, st)
        # the call made at establishment is kept until it fires at 60 s (it then sets itself again)
        assert (server._idle is first_call) == (clock.seconds() < 60)
    assert len(answers) == 5 and server.state == ESTABLISHED   # 100 s in, active every 20 s
    clock.advance(59)
    assert server.state == ESTABLISHED
    clock.advance(1)
    assert server.state == CLOSED


def test_closing_peer_that_stops_reading_is_cut():
    clock, factory = acceptor()
    server, st = connect(factory)
    server.dataReceived(b"\x09garbage")
    assert st.write_closed and not st.disconnected
    clock.advance(CLOSE_GRACE_SECS)
    assert st.disconnected


# PS3.8 Sta13: after our last PDU (A-ASSOCIATE-RJ, A-RELEASE-RP, A-ABORT) the peer reads it and
# closes; we shut our side and read on until then.  Closing while the peer's bytes sit unread
# would make the kernel answer with a RST, which destroys the PDU on its way (SocketTransport).

def test_an_a_associate_rj_is_followed_by_a_fin_even_when_the_peer_sent_more():
    clock, factory = acceptor(AcceptorLimits(max_associations=0))
    server, st = connect(factory)
    client, ct = requestor(clock)
    st.arrive(ct.value())
    assert st.value() == pdu.associate_rj(2, 3, 2)
    st.arrive(pdu.pdata(1, 3, b"\0" * 64))     # sent before the peer read the RJ
    st.flushed()                               # the reactor's next turn: nothing closes yet
    assert st.ended_by is None and st.write_closed
    st.peer_closes()                           # the peer read the RJ and closed
    assert st.ended_by == "FIN" and st.unread == 0
    assert not timers(server)


def test_an_a_abort_mid_data_set_is_followed_by_a_fin_while_the_peer_sends_the_rest():
    clock, factory, server, st, client, ct = established_pair(AcceptorLimits(max_pdu=4096),
                                                              handler=EchoStoreHandler(limit=1000))
    client.request(3, STORE, b"x" * 60000)     # in fragments of 4 KB
    wire = ct.value()
    ct.clear()
    st.arrive(wire[:5000])                     # the limit is passed in the first fragment
    assert server.state == CLOSED and st.value().endswith(pdu.abort(2, 0))
    kept = len(server.framer._buffer)
    st.arrive(wire[5000:])                     # the rest was on its way: read and dropped
    st.flushed()
    st.peer_closes()
    assert st.ended_by == "FIN" and st.unread == 0
    assert len(server.framer._buffer) == kept  # nothing of it kept


def test_a_released_association_stops_counting_before_its_peer_closes():
    clock, factory = acceptor(AcceptorLimits(max_associations=1))
    first, ft = connect(factory, port=1)
    c1, c1t = requestor(clock)
    pump(c1, c1t, first, ft)
    c1.release()
    pump(c1, c1t, first, ft)
    assert ft.write_closed and ft.ended_by is None       # A-RELEASE-RP sent, the peer not gone yet
    second, sec_t = connect(factory, port=2)
    c2, c2t = requestor(clock)
    pump(c2, c2t, second, sec_t)
    assert second.state == ESTABLISHED


def test_a_peer_that_never_closes_after_our_last_pdu_is_cut_and_one_that_floods_at_once():
    clock, factory = acceptor(AcceptorLimits(max_associations=0))
    server, st = connect(factory)
    client, ct = requestor(clock)
    st.arrive(ct.value())
    st.arrive(b"\xff" * (CLOSE_DRAIN_BYTES // 2))  # trailing bytes: read, dropped, waited on
    clock.advance(CLOSE_GRACE_SECS - 0.5)
    assert st.ended_by is None and not st.disconnected and len(server.framer._buffer) == 0
    clock.advance(0.5)
    assert st.disconnected                         # never closed: cut (the ARTIM of Sta13)
    st.flushed()
    assert st.ended_by == "RST" and factory.settings.connections == 0

    flooding, ft = connect(factory)
    ft.arrive(ct.value())
    for _ in range(CLOSE_DRAIN_BYTES // 65536 + 1):
        assert not ft.disconnected
        ft.arrive(b"\xff" * 65536)
    assert ft.disconnected                         # cut at once, not read for the grace period
    assert len(flooding.framer._buffer) == 0


def test_pending_responses_reach_the_caller_before_the_final_one():
    clock, factory, server, st, client, ct = established_pair()

    def answer(assoc, message):
        for status in (0xFF00, 0xFF00, 0x0000):
            assoc.send(message.context_id, {"AffectedSOPClassUID": "1.2.840.10008.1.1",
                                            "CommandField": commands.C_ECHO_RSP, "Status": status,
                                            "MessageIDBeingRespondedTo": message.message_id})
    server.handler.on_request = answer
    pending, final = [], []
    client.request(1, ECHO, on_pending=pending.append).addCallback(final.append)
    pump(client, ct, server, st)
    assert len(pending) == 2 and final[0].command["Status"] == 0


class _TwoAnswers(EchoStoreHandler):
    """Answers a C-ECHO with two messages, the first marked ``more``, and records what the
    transport held in between (the batch of one delivery)."""

    def __init__(self):
        super().__init__()
        self.written_meanwhile = None

    def on_request(self, assoc, message):
        reply = {"AffectedSOPClassUID": message.command["AffectedSOPClassUID"],
                 "MessageIDBeingRespondedTo": message.message_id, "CommandField": commands.C_ECHO_RSP}
        assoc.send(message.context_id, dict(reply, Status=0xFF00), more=True)
        self.written_meanwhile = assoc.transport.value()
        assoc.send(message.context_id, dict(reply, Status=0))


def test_a_message_marked_more_waits_for_the_next_and_both_leave_in_order():
    handler = _TwoAnswers()
    clock, factory, server, st, client, ct = established_pair(handler=handler)
    st.clear()
    pending, answers = [], []
    client.request(1, ECHO, on_pending=pending.append).addCallback(answers.append)
    pump(client, ct, server, st)
    assert handler.written_meanwhile == b""          # held back while the delivery ran
    assert [p.command["Status"] for p in pending] == [0xFF00] and answers[0].command["Status"] == 0


def test_more_outside_a_delivery_is_sent_at_once():
    clock, factory, server, st, client, ct = established_pair()
    ct.clear()
    client.send(1, ECHO, more=True)   # a timer or a thread's callback: no delivery will flush it later
    assert ct.value() != b""


def test_one_dimse_timer_per_association_not_one_per_request():
    clock, factory, server, st, client, ct = established_pair()
    client.request(1, ECHO)
    pump(client, ct, server, st)
    after_one = len(clock.getDelayedCalls())
    answers = []
    for _ in range(30):
        client.request(1, ECHO).addCallback(answers.append)
        pump(client, ct, server, st)
    assert len(answers) == 30 and len(clock.getDelayedCalls()) == after_one
    clock.advance(client.settings.dimse_timeout)   # the timer fires with nothing waiting: no abort
    assert client.state == ESTABLISHED


def test_a_pending_response_moves_the_dimse_deadline_on():
    clock, factory, server, st, client, ct = established_pair()
    held = []
    server.handler.on_request = lambda assoc, message: held.append(message)     # answers when told
    failures = []
    client.request(1, ECHO).addErrback(failures.append)
    pump(client, ct, server, st)
    timeout = client.settings.dimse_timeout
    clock.advance(timeout * 0.75)
    server.send(held[0].context_id, {"AffectedSOPClassUID": "1.2.840.10008.1.1", "CommandField": commands.C_ECHO_RSP,
                                     "Status": 0xFF00, "MessageIDBeingRespondedTo": held[0].message_id})
    pump(client, ct, server, st)
    clock.advance(timeout * 0.5)          # past the first deadline, within the moved one
    assert client.state == ESTABLISHED and not failures
    clock.advance(timeout * 0.5)
    assert client.state == CLOSED
    lost(client)
    assert failures[0].check(AssociationAborted) and "DIMSE timeout" in str(failures[0].value)


def test_calls_put_off_until_after_a_delivery_run_once_its_writes_are_sent():
    clock, factory, server, st, client, ct = established_pair()
    seen = []

    def answer(assoc, message):
        # A pending answer held for the end of the delivery, and bookkeeping put off after it.
        assoc.post(message.context_id, commands.encode({
            "AffectedSOPClassUID": "1.2.840.10008.1.1", "CommandField": commands.C_ECHO_RSP, "Status": 0,
            "MessageIDBeingRespondedTo": message.message_id}), more=True)
        after_delivery(lambda: seen.append(len(st.value())))
        seen.append(len(st.value()))
    server.handler.on_request = answer
    answers = []
    before = len(st.value())
    client.request(1, ECHO).addCallback(answers.append)
    pump(client, ct, server, st)
    assert seen[0] == before and seen[1] > before     # the call ran after the answer was written
    assert answers and answers[0].command["Status"] == 0
    after_delivery(lambda: seen.append("now"))          # outside a delivery: at once
    assert seen[-1] == "now"


def test_a_command_and_its_data_set_leave_in_one_write_outside_a_delivery():
    """A request sent from outside a DIMSE delivery (a C-FIND for a DICOMweb query)
    went out as two sends, command then data set: two wake-ups of the PACS for one
    message.  Now one write carries both, and the peer still reads one message."""
    handler = EchoStoreHandler()
    clock, factory, server, st, client, ct = established_pair(handler=handler)
    writes = []
    real_write = ct.write
    ct.write = lambda data: (writes.append(bytes(data)), real_write(data))[1]
    data = b"\x08\x00\x18\x00\x06\x00\x00\x001.2.3\x00"   # (0008,0018) UI "1.2.3", implicit VR LE
    answers = []
    client.request(1, STORE, data).addCallback(answers.append)
    assert len(writes) == 1
    pdus = writes[0]
    first_len = struct.unpack(">I", pdus[2:6])[0]
    command_pdu, data_pdu = pdus[:6 + first_len], pdus[6 + first_len:]
    assert command_pdu[0] == data_pdu[0] == 0x04            # two P-DATA-TF PDUs
    assert command_pdu[11] == 0x03 and data_pdu[11] == 0x02  # last command fragment, then last data fragment
    assert data_pdu.endswith(data)
    pump(client, ct, server, st)
    assert answers and answers[0].command["Status"] == 0 and len(handler.stored) == 1


def _find_rsp(message_id, status, dataset=True):
    return commands.encode({"AffectedSOPClassUID": "1.2.840.10008.1.1", "CommandField": 0x8020,
                            "MessageIDBeingRespondedTo": message_id, "Status": status,
                            "CommandDataSetType": commands.HAS_DATASET if dataset else commands.NO_DATASET})


def test_repeated_pending_responses_are_taken_as_their_data_sets_without_a_decode(monkeypatch):
    """A C-FIND's matches: every pending response the same command, then a data set.  With
    ``on_pending_data`` the first is decoded; a command PDU with the same bytes again is
    that response again -- its data set goes on as bytes, no command decoded, no message
    made (bench/dimse, C-FIND).  Any other shape (a data set in two fragments, another
    status, the command and data set in one PDU) still arrives whole and in order."""
    clock, factory, server, st, client, ct = established_pair()
    got, finals = [], []
    client.request(1, {"AffectedSOPClassUID": "1.2.840.10008.1.1", "CommandField": commands.C_FIND_RQ,
                       "Priority": 0}, b"", on_pending_data=got.append,
                   on_pending=lambda m: got.append(("message", m))).addCallback(finals.append)
    message_id = 1
    pending, warning = _find_rsp(message_id, 0xFF00), _find_rsp(message_id, 0xFF01)
    decoded = []
    real_decode = commands.decode
    monkeypatch.setattr(commands, "decode", lambda data: decoded.append(1) or real_decode(data))
    matches = [bytes([i]) * (10 + i) for i in range(7)]
    wire = [pdu.pdata(1, 0x03, pending) + pdu.pdata(1, 0x02, matches[0]),    # learnt here
            pdu.pdata(1, 0x03, pending) + pdu.pdata(1, 0x02, matches[1]),    # repeats: no decode
            pdu.pdata(1, 0x03, pending) + pdu.pdata(1, 0x00, matches[2][:5]) + pdu.pdata(1, 0x02, matches[2][5:]),
            pdu.pdata(1, 0x03, warning) + pdu.pdata(1, 0x02, matches[3]),    # another status: decoded
            pdu.pdata(1, 0x03, pending) + pdu.pdata(1, 0x02, matches[4]),
            pdu.header(pdu.P_DATA_TF, 2 * 6 + len(pending) + len(matches[5])) +  # both PDVs in one PDU
            struct.pack(">IBB", len(pending) + 2, 1, 0x03) + pending +
            struct.pack(">IBB", len(matches[5]) + 2, 1, 0x02) + matches[5],
            pdu.pdata(1, 0x03, pending) + pdu.pdata(1, 0x02, matches[6]),
            pdu.pdata(1, 0x03, _find_rsp(message_id, 0, dataset=False))]
    client.dataReceived(b"".join(wire[:2]))
    assert got == matches[:2] and len(decoded) == 1
    for data in wire[2:]:
        client.dataReceived(data)
    assert got == matches and all(type(g) is bytes for g in got)
    assert finals and finals[0].command["Status"] == 0
    # decoded: the first; the one whose data set came in two fragments (its command matched, then decoded
    # when the data set did not come whole); the warning, learnt in turn; the pending after it; the
    # two-PDV PDU; the final -- not matches[1] nor matches[6], repeats of the command last learnt.
    assert len(decoded) == 6
    assert client._repeat is None                    # forgotten with the request


class _Waiting:
    """A socket holding what the peer sent since the last read (``recv`` as a
    non-blocking socket answers: the bytes, or ``BlockingIOError`` once empty)."""

    def __init__(self, *chunks):
        self.chunks = list(chunks)
        self.reads = 0

    def recv(self, size):
        self.reads += 1
        if not self.chunks:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return self.chunks.pop(0)


def _reading_on(client, ct, *waiting) -> _Waiting:
    sock = _Waiting(*waiting)
    ct.socket, ct.bufferSize, ct.connected, ct.disconnecting = sock, 65536, True, False
    client.read_on = True
    return sock


@pytest.mark.parametrize("read_on", [True, False])
def test_a_final_response_already_in_is_read_before_the_deliverys_put_off_work(read_on):
    """A PACS's matches read before its final response was in: with ``read_on`` the
    association reads once more before what the delivery put off (the pipeline's answer
    of a proxied C-FIND) runs, so the final is handled -- and relayed with the matches --
    first (bench/dimse, "C-FIND, eighth pass"); without it, that work ran while the final
    waited in the socket."""
    clock, factory, server, st, client, ct = established_pair()
    seen = []

    def pending(data):
        seen.append(data)
        if len(seen) == 1:
            after_delivery(lambda: seen.append(("put off ran; final handled", answered.called)))

    answered = client.request(1, {"AffectedSOPClassUID": "1.2.840.10008.1.1", "CommandField": commands.C_FIND_RQ,
                                  "Priority": 0}, b"", on_pending_data=pending)
    final = pdu.pdata(1, 0x03, _find_rsp(1, 0, dataset=False))
    sock = _reading_on(client, ct, final)
    client.read_on = read_on
    client.dataReceived(pdu.pdata(1, 0x03, _find_rsp(1, 0xFF00)) + pdu.pdata(1, 0x02, b"m1"))
    if read_on:
        assert seen == [b"m1", ("put off ran; final handled", True)] and sock.reads == 1
        assert answered.called and answered.result.command["Status"] == 0
        client.dataReceived(b"")   # nothing outstanding: no read on
        assert sock.reads == 1
    else:
        assert seen == [b"m1", ("put off ran; final handled", False)] and sock.reads == 0
        client.dataReceived(final)
        assert answered.result.command["Status"] == 0


def test_reading_on_with_nothing_in_runs_the_put_off_work_and_reads_once():
    """Nothing more in yet (the PACS still working): one ``recv`` that finds nothing, then the
    put-off work as before; a PACS that keeps sending is read a delivery at a time, one read
    on each, not drained in a loop; a delivery that put nothing off and wrote nothing reads
    no more."""
    clock, factory, server, st, client, ct = established_pair()
    seen, after = [], []

    def pending(data):
        seen.append(data)
        after_delivery(lambda: after.append(len(seen)))

    answered = client.request(1, {"AffectedSOPClassUID": "1.2.840.10008.1.1", "CommandField": commands.C_FIND_RQ,
                                  "Priority": 0}, b"", on_pending_data=pending)
    match = pdu.pdata(1, 0x03, _find_rsp(1, 0xFF00)) + pdu.pdata(1, 0x02, b"m")
    sock = _reading_on(client, ct)
    client.dataReceived(match)
    assert seen == [b"m"] and after == [1] and sock.reads == 1 and not answered.called
    sock.chunks = [match, match, match]
    client.dataReceived(match)
    assert len(seen) == 3 and after == [1, 3, 3] and sock.reads == 2 and sock.chunks == [match, match]
    client.dataReceived(b"")   # nothing put off or written: no read on
    assert sock.reads == 2
    client.dataReceived(b"".join(sock.chunks) + pdu.pdata(1, 0x03, _find_rsp(1, 0, dataset=False)))
    assert len(seen) == 5 and answered.result.command["Status"] == 0 and sock.reads == 2   # none outstanding


def test_a_read_on_that_raises_leaves_no_delivery_open():
    """What the extra read delivers raising (a consumer's bug) propagates as any delivery's
    would, and the delivery still ends: later writes are not held for a flush that never comes."""
    from harmony.dicom.ul import association as ul
    clock, factory, server, st, client, ct = established_pair()

    def pending(data):
        after_delivery(lambda: None)
        if data == b"m2":
            raise RuntimeError("a consumer's bug")

    client.request(1, {"AffectedSOPClassUID": "1.2.840.10008.1.1", "CommandField": commands.C_FIND_RQ,
                       "Priority": 0}, b"", on_pending_data=pending)
    match = pdu.pdata(1, 0x03, _find_rsp(1, 0xFF00))
    _reading_on(client, ct, match + pdu.pdata(1, 0x02, b"m2"))
    with pytest.raises(RuntimeError):
        client.dataReceived(match + pdu.pdata(1, 0x02, b"m1"))
    assert ul._batch.depth == 0 and not ul._batch.after


def test_a_response_data_set_is_kept_by_the_association_not_a_handlers_sink():
    """A response's data set is an identifier we asked for: the association keeps it (in one
    fragment, as that fragment's bytes); the handler's sinks are for requests' data sets."""

    class NoResponseSinks(EchoStoreHandler):
        def dataset_sink(self, assoc, context_id, command):
            assert not command["CommandField"] & commands.RESPONSE_BIT, "a sink asked for a response"
            return super().dataset_sink(assoc, context_id, command)

    clock, factory = acceptor()
    server, st = connect(factory)
    client, ct = requestor(clock, handler=NoResponseSinks())
    pump(client, ct, server, st)
    got = []
    client.request(1, {"AffectedSOPClassUID": "1.2.840.10008.1.1", "CommandField": commands.C_FIND_RQ,
                       "Priority": 0}, b"", on_pending=got.append).addCallback(got.append)
    client.dataReceived(pdu.pdata(1, 0x03, _find_rsp(1, 0xFF00)) + pdu.pdata(1, 0x00, b"ab") +
                        pdu.pdata(1, 0x02, b"cd") + pdu.pdata(1, 0x03, _find_rsp(1, 0xFF00)) +
                        pdu.pdata(1, 0x02, b"ef") + pdu.pdata(1, 0x03, _find_rsp(1, 0, dataset=False)))
    assert [m.dataset for m in got] == [b"abcd", b"ef", None] and client.state == ESTABLISHED


@pytest.mark.parametrize("repeated", [False, True])
def test_a_response_data_set_over_the_limit_aborts_the_association(monkeypatch, repeated):
    """A hostile or broken PACS's match that never ends: the association keeps a response's
    data set itself (no handler sink caps it), so it is cut at MAX_RESPONSE_DATASET, in
    fragments or in one, and whether its command came the usual way or as a repeat of the
    last one (taken without a decode) -- the association is aborted, nothing grows."""
    from harmony.dicom.ul import association as association_module
    monkeypatch.setattr(association_module, "MAX_RESPONSE_DATASET", 8)
    clock, factory, server, st, client, ct = established_pair()
    got = []
    client.request(1, {"AffectedSOPClassUID": "1.2.840.10008.1.1", "CommandField": commands.C_FIND_RQ,
                       "Priority": 0}, b"", on_pending_data=got.append).addErrback(lambda _: None)
    pending = _find_rsp(1, 0xFF00)
    if repeated:
        client.dataReceived(pdu.pdata(1, 0x03, pending) + pdu.pdata(1, 0x02, b"small"))   # learnt
        assert got == [b"small"] and client._repeat is not None
        client.dataReceived(pdu.pdata(1, 0x03, pending) + pdu.pdata(1, 0x02, b"x" * 9))   # one fragment, too big
    else:
        client.dataReceived(pdu.pdata(1, 0x03, pending) + pdu.pdata(1, 0x00, b"x" * 5) + pdu.pdata(1, 0x00, b"y" * 5))
    assert client.state == CLOSED and ct.value().endswith(pdu.abort(2, 0))
    assert got == ([b"small"] if repeated else [])
