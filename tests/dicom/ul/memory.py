"""In-memory associations for the fast tier: two protocols on StringTransports and a clock."""

from __future__ import annotations

from pynetdicom import build_context
from pynetdicom.sop_class import CTImageStorage, Verification
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from harmony.dicom.ul import commands
from harmony.dicom.ul.acceptor import AcceptorFactory, AcceptorLimits, AcceptorSettings
from harmony.dicom.ul.association import Association
from harmony.dicom.ul.datasets import MemorySink
from harmony.dicom.ul.requestor import RequestorSettings, request_primitive

CONTEXTS = [build_context(Verification), build_context(CTImageStorage)]


class EchoStoreHandler:
    """Answers C-ECHO and C-STORE with success; keeps what was stored."""

    def __init__(self, limit=1 << 20):
        self.stored = []
        self.limit = limit
        self.closed = []

    def dataset_sink(self, assoc, context_id, command):
        return MemorySink(self.limit)

    def on_request(self, assoc, message):
        field = message.field
        reply = {"AffectedSOPClassUID": message.command["AffectedSOPClassUID"],
                 "MessageIDBeingRespondedTo": message.message_id, "Status": 0}
        if field == commands.C_ECHO_RQ:
            assoc.send(message.context_id, dict(reply, CommandField=commands.C_ECHO_RSP))
        elif field == commands.C_STORE_RQ:
            self.stored.append(message.dataset)
            assoc.send(message.context_id, dict(reply, CommandField=commands.C_STORE_RSP,
                                                AffectedSOPInstanceUID=message.command["AffectedSOPInstanceUID"]))

    def association_established(self, assoc):
        pass

    def association_closed(self, assoc):
        self.closed.append(assoc)


def acceptor(limits=None, handler=None, **kw):
    clock = MemoryReactorClock()
    settings = AcceptorSettings("HARMONY", CONTEXTS, limits or AcceptorLimits(), **kw)
    factory = AcceptorFactory(settings, handler or EchoStoreHandler(), clock)
    return clock, factory


def connect(factory, host="127.0.0.1", port=40000):
    """A server-side association on a StringTransport, as if *host* had connected."""
    assoc = factory.buildProtocol(IPv4Address("TCP", host, port))
    if assoc is None:
        return None, None
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    assoc.makeConnection(transport)
    return assoc, transport


def requestor(clock, called="HARMONY", calling="SCU", handler=None, contexts=CONTEXTS, max_pdu=16384):
    settings = RequestorSettings(local_aet=calling, max_pdu=max_pdu)
    assoc = Association(settings, handler or EchoStoreHandler(), clock,
                        requestor=request_primitive(calling, called, contexts))
    transport = StringTransport()
    assoc.makeConnection(transport)
    return assoc, transport


def pump(a, ta, b, tb, rounds=20):
    """Move bytes both ways until both transports are quiet."""
    for _ in range(rounds):
        moved = False
        for src, dst in ((ta, b), (tb, a)):
            data = src.value()
            if data:
                src.clear()
                dst.dataReceived(data)
                moved = True
        if not moved:
            return
