"""harmony.dicom.ul.requestor: an A-ASSOCIATE-RQ made once for every association that asks
the same, and the PACS's answer to it read once.

``dicom_scu``'s request proposes 128 storage contexts: made and encoded by pynetdicom it
took ~15 ms of the reactor, and the answer's decode and negotiation ~7 ms more, for each
association opened to a PACS.  The real-peer suites (tests/backends/test_dicom_scu_peers.py)
run the whole path against Orthanc and DCMTK.
"""

from __future__ import annotations

from pynetdicom import build_context
from pynetdicom import pdu as pn_pdu

from harmony.dicom import net
from harmony.dicom.ul import association as ul
from harmony.dicom.ul.association import ESTABLISHED, Association
from harmony.dicom.ul.requestor import RequestorSettings, _request, request_primitive
from tests.dicom.ul.memory import CONTEXTS, EchoStoreHandler, SocketTransport, acceptor, connect, pump


def fresh_contexts():
    """The same contexts as new objects, as callers build them for every association."""
    return [build_context(cx.abstract_syntax, cx.transfer_syntax) for cx in net.requestor_contexts()]


def test_the_same_request_is_made_once_and_encoded_as_pynetdicom_encodes_it():
    settings = RequestorSettings(local_aet="HARMONY", max_pdu=16384)
    contexts = fresh_contexts()
    roles = net.storage_roles(contexts)
    first = _request(settings, "PACS", contexts, None, roles)
    again = _request(settings, "PACS", fresh_contexts(), None, net.storage_roles(fresh_contexts()))
    assert again is first
    reference = request_primitive("HARMONY", "PACS", fresh_contexts(), None, roles)
    assert first.pdu == ul.encode_associate_rq(reference, 16384)
    decoded = pn_pdu.A_ASSOCIATE_RQ()
    decoded.decode(first.pdu)
    assert len(decoded.to_primitive().presentation_context_definition_list) == 128
    # Anything asked differently is another request.
    assert _request(settings, "OTHER_PACS", contexts, None, roles) is not first
    assert _request(RequestorSettings(local_aet="HARMONY", max_pdu=65536), "PACS", contexts, None, roles) is not first
    assert _request(settings, "PACS", contexts[:10], None, roles) is not first
    assert _request(settings, "PACS", contexts, None, ()) is not first


def associate_in_memory(factory, request, port):
    settings = RequestorSettings(local_aet="SCU", max_pdu=16384)
    assoc = Association(settings, EchoStoreHandler(), factory.reactor, requestor=request.primitive,
                        request_pdu=request.pdu, answers=request.answers)
    transport = SocketTransport()
    transport.protocol = assoc
    assoc.makeConnection(transport)
    server, server_transport = connect(factory, port=port)
    pump(assoc, transport, server, server_transport)
    return assoc


def test_an_answer_read_before_is_not_decoded_again(monkeypatch):
    clock, factory = acceptor()
    request = _request(RequestorSettings(local_aet="SCU", max_pdu=16384), "HARMONY", CONTEXTS, None, ())
    decoded = []
    real = Association._negotiated

    def counted(self, body):
        decoded.append(body)
        return real(self, body)

    monkeypatch.setattr(Association, "_negotiated", counted)
    first = associate_in_memory(factory, request, 40001)
    second = associate_in_memory(factory, request, 40002)
    assert first.state == second.state == ESTABLISHED
    assert len(decoded) == 1
    assert {i: str(cx.abstract_syntax) for i, cx in second.contexts.items()} == \
        {i: str(cx.abstract_syntax) for i, cx in first.contexts.items()}
    assert len(second.contexts) == len(CONTEXTS)
    assert second.peer_max_pdu == first.peer_max_pdu == factory.settings.max_pdu
    assert second.called_aet == "HARMONY" and second.calling_aet == "SCU"
