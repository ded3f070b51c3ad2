"""In-memory associations for the fast tier: two protocols on socket-like StringTransports and a clock."""

from __future__ import annotations

from pynetdicom import build_context
from pynetdicom.sop_class import CTImageStorage, Verification
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

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


class SocketTransport(StringTransport):
    """A StringTransport that keeps what a TCP socket's kernel would about how it ends.

    ``loseConnection`` stops reading at once (Twisted's does), and the socket closes
    once what was written is flushed; ``loseWriteConnection`` sends our FIN and reading
    goes on.  Bytes the peer sends that reach the socket (:meth:`arrive`) after reading
    stopped stay unread, and closing a socket with unread bytes makes the kernel send a
    RST instead of a FIN (RFC 1122 4.2.2.13): our last bytes not yet delivered are
    thrown away, and some peers' systems throw away what they had not read yet.
    """

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.write_closed = False
        #: Bytes that reached the socket after we stopped reading.
        self.unread = 0
        #: How the socket ended: None while open, "FIN" or "RST".
        self.ended_by: str | None = None
        #: The association it carries (set by connect and requestor).
        self.protocol = None

    def loseWriteConnection(self):
        self.write_closed = True

    def arrive(self, data: bytes) -> None:
        """*data* from the peer reaches the socket: delivered if we read, else left unread."""
        if self.ended_by is not None:
            return
        if self.disconnecting:
            self.unread += len(data)
        else:
            self.protocol.dataReceived(data)

    def peer_closes(self) -> None:
        """The peer's FIN reaches the socket: read (the connection is lost) if we still read."""
        if self.ended_by is None and not self.disconnecting:
            self.gone()

    def flushed(self) -> None:
        """The reactor's turn after ``loseConnection``: what was written went out, the socket closes."""
        if self.ended_by is None and self.disconnecting:
            self.gone()

    def gone(self) -> None:
        """The socket closes (and the association hears of it): with a RST when bytes were left unread."""
        if self.ended_by is not None:
            return
        self.ended_by = "RST" if self.unread or self.disconnected else "FIN"
        self.protocol.connectionLost(Failure(ConnectionDone()))


def acceptor(limits=None, handler=None, **kw):
    clock = MemoryReactorClock()
    settings = AcceptorSettings("HARMONY", CONTEXTS, limits or AcceptorLimits(), **kw)
    factory = AcceptorFactory(settings, handler or EchoStoreHandler(), clock)
    return clock, factory


def connect(factory, host="127.0.0.1", port=40000):
    """A server-side association on a :class:`SocketTransport`, as if *host* had connected."""
    assoc = factory.buildProtocol(IPv4Address("TCP", host, port))
    if assoc is None:
        return None, None
    transport = SocketTransport(peerAddress=IPv4Address("TCP", host, port))
    transport.protocol = assoc
    assoc.makeConnection(transport)
    return assoc, transport


def requestor(clock, called="HARMONY", calling="SCU", handler=None, contexts=CONTEXTS, max_pdu=16384):
    settings = RequestorSettings(local_aet=calling, max_pdu=max_pdu)
    assoc = Association(settings, handler or EchoStoreHandler(), clock,
                        requestor=request_primitive(calling, called, contexts))
    transport = SocketTransport()
    transport.protocol = assoc
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
