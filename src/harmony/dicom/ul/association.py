"""One DICOM association as a Twisted protocol (PS3.8 upper layer, PS3.7 DIMSE framing).

Why not pynetdicom's :class:`~pynetdicom.association.Association`: it runs
two threads per association that poll with sleeps and watch the socket with
``select()``; here the reactor delivers bytes when they arrive, timers are
``callLater``, and nothing runs while a peer is silent.  The state machine
is PS3.8 §9.2's, reduced to the states a DIMSE application can be in:

``AWAIT_RQ`` (acceptor, ARTIM running) -> ``ESTABLISHED`` -> ``RELEASING``
(we sent A-RELEASE-RQ) -> ``CLOSED``; a requestor starts in ``AWAIT_AC``.  ``CLOSED``
after our own last PDU is Sta13: our side shut, reading on until the peer closes
(:meth:`Association._close`), so the kernel never resets what we sent.

What arrives is checked before it is kept: a PDU's declared length against the
limit of the state (:mod:`.pdu`), a command set against
:data:`~.commands.MAX_COMMAND_BYTES`, a data set against the sink the service
handler chose for it (in memory with a cap, or spooled to a file).  Any
violation is an A-ABORT and a closed connection, never a growing buffer.

Sending is flow-controlled: a data set from a file is read and written in
blocks only while the transport is not paused, and messages never interleave
(a send queue per association), so a slow peer holds one block of memory.

Sending is also batched per reactor turn: what any association writes while the
reactor hands bytes to one of them (a relayed C-FIND: the request in, the
request out; the PACS's matches in, the client's out) is kept and sent with one
``send()`` per association when that delivery ends, rather than left to
Twisted's next turn (:func:`harmony.compat.twisted.send_now`): a proxied C-FIND
went through two reactor turns fewer, and as few system calls as before.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from pynetdicom import pdu as pn_pdu
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import negotiate_as_requestor
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from harmony.compat.twisted import direct_socket, flush_buffered, send_now
from harmony.dicom import status as dimse
from harmony.dicom.ul import commands, filesend, pdu
from harmony.dicom.ul.datasets import MAX_IDENTIFIER_BYTES, MemorySink
from harmony.dicom.ul.proposal import AE_FIELDS, Proposal, decode_associate_rq
from harmony.log import get_logger

log = get_logger("harmony.dicom.ul")

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1442.1"   # Harmony's implementation class
IMPLEMENTATION_VERSION = "HARMONY_UL_1"

AWAIT_RQ, AWAIT_AC, ESTABLISHED, RELEASING, CLOSED = "await-rq", "await-ac", "established", "releasing", "closed"

#: Slack above our advertised maximum PDU: some peers count the PDV header into the
#: fragment, some do not; refusing a PDU 12 bytes too long helps nobody.
PDU_SLACK = 64
#: How long a connection may stay open after our last PDU (PS3.8 Sta13: the peer reads
#: it and closes; one that does not, or stops reading, is cut then).
CLOSE_GRACE_SECS = 5.0
#: How much a peer may still send after our last PDU (read and dropped: the rest of a data
#: set on its way) before it is cut at once rather than waited for.
CLOSE_DRAIN_BYTES = 1 << 20
#: Largest data set a response may carry (received by the association itself, not a handler's
#: sink: a response's data set is an identifier -- a C-FIND match, a failed-UID list).
MAX_RESPONSE_DATASET = MAX_IDENTIFIER_BYTES
#: The AE title fields in an A-ASSOCIATE-AC PDU (its six-byte header first).
_AC_AE_FIELDS = slice(6 + AE_FIELDS.start, 6 + AE_FIELDS.stop)



class _Batch:
    """Writes made while bytes are being delivered to an association, sent when the delivery ends."""

    def __init__(self):
        #: How many ``dataReceived`` calls are running (a handler may deliver to another).
        self.depth = 0
        #: Associations holding written bytes not yet sent.
        self.waiting: list[Association] = []
        #: Calls put off until what the delivery wrote is sent (:func:`after_delivery`).
        self.after: list = []

    def flush(self) -> None:
        while self.waiting or self.after:
            while self.waiting:
                waiting, self.waiting = self.waiting, []
                for assoc in waiting:
                    assoc._flush_out()
            if self.after:
                after, self.after = self.after, []
                self.depth += 1      # what they write goes out together, at the end
                try:
                    for call in after:
                        try:
                            call()
                        except Exception:
                            log.failure("dicom ul: a call put off until after a delivery failed")
                finally:
                    self.depth -= 1


_batch = _Batch()


def after_delivery(call) -> None:
    """Run *call* once the bytes being delivered to an association are handled and what
    that wrote is sent (at once outside a delivery): bookkeeping that need not delay
    the answer it follows (a proxied C-FIND's pipeline verdict after its matches)."""
    if _batch.depth:
        _batch.after.append(call)
    else:
        call()


class DatasetSink(Protocol):
    """Where a data set's fragments go as they arrive (``handler.dataset_sink``:
    harmony.dicom.ul.datasets' MemorySink, PartTenSink, DiscardSink)."""

    def write(self, fragment) -> None: ...

    def close(self) -> object: ...

    def abort(self) -> None: ...


class AssociationAborted(Exception):
    """The association ended (A-ABORT, a closed connection or a timeout) before the operation finished."""


class Reject(tuple):
    """A negotiation's refusal: (result, source, reason) of an A-ASSOCIATE-RJ (PS3.8 Table 9-21)."""

    def __new__(cls, result: int, source: int, reason: int):
        return super().__new__(cls, (result, source, reason))


class AssociationRejected(Exception):
    def __init__(self, result: int, source: int, reason: int):
        super().__init__(f"association rejected (result {result}, source {source}, reason {reason})")
        self.result, self.source, self.reason = result, source, reason


class Message:
    """A received DIMSE message: command (``dict``), context, data set (what the sink's ``close`` gave)
    and the sink that received it (it may have learnt something on the way)."""

    __slots__ = ("context_id", "command", "dataset", "sink")

    def __init__(self, context_id: int, command: dict, dataset=None):
        self.context_id = context_id
        self.command = command
        self.dataset = dataset
        self.sink: DatasetSink | None = None

    @property
    def field(self) -> int:
        return self.command["CommandField"]

    @property
    def message_id(self) -> int | None:
        return self.command.get("MessageID")


class FileDataset:
    """A data set to send from a file, starting at *offset*; ``None``: the file is
    Part-10 and the data set follows its header (found when the file is opened to
    be sent, on the same descriptor)."""

    __slots__ = ("path", "offset")

    def __init__(self, path, offset: int | None = 0):
        self.path = path
        self.offset = offset


@implementer(IPushProducer)
class _Flow:
    """The transport's back-pressure as Deferreds: :meth:`ready` fires when writing may go on."""

    def __init__(self):
        self.paused = False
        self._waiters: list[defer.Deferred] = []

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def stopProducing(self):
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(AssociationAborted("connection closed while sending"))

    def ready(self) -> defer.Deferred:
        if not self.paused:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(d)
        return d


class _Pending:
    """A request we sent, waiting for its response(s); *deadline*: when the DIMSE
    timeout runs out (``None``: never), moved on by each pending response."""

    __slots__ = ("deferred", "on_pending", "on_pending_data", "timeout", "deadline")

    def __init__(self, on_pending, timeout: float | None, now: float, on_pending_data=None):
        self.deferred: defer.Deferred = defer.Deferred()
        self.on_pending = on_pending
        #: Takes a pending response's data set (bytes) instead of *on_pending* taking the message.
        self.on_pending_data = on_pending_data
        self.timeout = timeout or None
        self.deadline = now + timeout if timeout else None


class Association(protocol.Protocol):
    """One association, acceptor or requestor; :class:`ServiceUser` subclasses hold the DIMSE side.

    *settings* carries the local AE title, our maximum PDU, timeouts and, for an
    acceptor, the negotiation policy; *handler* answers DIMSE requests
    (``handler.dataset_sink(assoc, context_id, command)`` and
    ``handler.on_request(assoc, message)``).
    """

    def __init__(self, settings, handler, reactor, *, requestor: A_ASSOCIATE | None = None,
                 request_pdu: bytes | None = None, answers: BoundedCache | None = None):
        self.settings = settings
        self.handler = handler
        self.reactor = reactor
        self.is_requestor = requestor is not None
        self.state = AWAIT_AC if self.is_requestor else AWAIT_RQ
        self._rq_primitive = requestor
        #: A requestor's A-ASSOCIATE-RQ PDU when made already (for every association asking the
        #: same: harmony.dicom.ul.requestor), and the answers read to it before, kept by their
        #: bytes: (the peer's maximum PDU, the negotiated contexts).
        self._request_pdu = request_pdu
        self._answers = answers
        self.framer = pdu.PDUFramer(pdu.MAX_ASSOCIATE_PDU)
        self.calling_aet = ""
        self.called_aet = ""
        self.peer_address: tuple[str, int] | None = None
        #: Accepted presentation contexts by id: (abstract syntax, transfer syntax, PresentationContext).
        self.contexts: dict[int, object] = {}
        self.peer_max_pdu = 0
        self.implementation_class_uid = ""
        self.user_identity = None
        # fires with self once established (requestor & acceptor)
        self.established: defer.Deferred[Association] = defer.Deferred()
        # fires with the reason (None for a clean release) once the connection is gone
        self.closed: defer.Deferred = defer.Deferred()
        self._command = bytearray()
        self._command_context = None
        self._incoming: Message | None = None
        self._sink: DatasetSink | None = None
        self._flow = _Flow()
        self._send_queue: deque = deque()
        self._sending = False
        self._message_ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._artim = None
        self._idle = None
        #: When bytes last moved either way (the idle timer's reference, :meth:`_touch`).
        self._active_at = 0.0
        #: One timer for the DIMSE timeouts of every request outstanding (:meth:`_check_dimse`).
        self._dimse_timer = None
        self._release_waiter: defer.Deferred | None = None
        self._end_reason: str | None = None
        #: Whether :meth:`_end` ran (what waited on the association was told).
        self._ended = False
        #: Bytes read and dropped since the association ended (:data:`CLOSE_DRAIN_BYTES`).
        self._drained = 0
        #: What service code worked out once for this association (e.g. which context an instance goes on).
        self.memo: dict = {}
        #: Bytes written during a delivery, sent when it ends (:class:`_Batch`).
        self._out: list[bytes] = []
        #: An acceptor's admission still being decided (a Deferred[bool], set by the factory
        #: when the listener's count shared with other processes was locked); None: admitted.
        self.admission: defer.Deferred | None = None
        #: While a decision is awaited: what arrived meanwhile (:meth:`_hold`).
        self._held: _Held | None = None
        #: A P-DATA-TF PDU holding a command whole, as received (:meth:`_on_pdata`): what a
        #: pending response's command is learnt from.
        self._command_pdu = None
        #: ``(command PDU, context id, _Pending, message id)``: the pending response a request with
        #: ``on_pending_data`` was last sent; a PDU with the same bytes is that response
        #: again, its data set taken without a decode (:meth:`_on_pending_pdu`).
        self._repeat: tuple | None = None
        #: The last PDU was that repeated command: its data set is expected next.
        self._repeat_next = False
        #: Read once more before a delivery's writes and put-off calls while a request is
        #: outstanding (:meth:`_read_on`): set by the owner of a plain-TCP association whose
        #: transport delivers straight to it and never pauses (``dicom_scu``'s query associations).
        self.read_on = False

    # ------------------------------------------------------------------ connection

    def connectionMade(self):
        peer = self.transport.getPeer()
        self.peer_address = (getattr(peer, "host", ""), getattr(peer, "port", 0))
        _set_nodelay(self.transport)
        self.transport.registerProducer(self._flow, True)
        self.settings.connection_made(self)
        if self.state == AWAIT_AC:
            self._write(self._request_pdu or self._encode_associate_rq())
            self._start_artim()
        else:
            self._start_artim()
            if self.admission is not None:
                self._hold(self.admission, self._admitted)

    def _admitted(self, admitted):
        """The listener decided after a wait: a refusal closes the connection without a
        word, as one decided at once does (None: the shared count stayed locked, logged)."""
        if not admitted:
            self._end_reason = ("connection limit reached" if admitted is False else
                                "the listener's shared count stayed locked")
            self.state = CLOSED
            self._stop_artim()
            self.transport.loseConnection()

    def connectionLost(self, reason=protocol.connectionDone):
        was = self.state
        self.state = CLOSED
        self._out = []
        self._cancel_timers()
        if self._end_reason is None and not self._ended:
            self._end_reason = _tls_failure(reason)
        self.settings.connection_lost(self, was)
        self._end()
        if not self.closed.called:
            self.closed.callback(self._end_reason)

    def _end(self) -> None:
        """The association is over: what waits on it is told, once -- when our last PDU is
        written (:meth:`_close`; the connection may linger a moment in Sta13) or when
        the connection is lost, whichever comes first.  ``closed`` waits for the
        connection (a stopping listener lets its A-ABORTs go out)."""
        if self._ended:
            return
        self._ended = True
        self._repeat = None
        if self._sink is not None:
            self._sink.abort()
            self._sink = None
        self._flow.stopProducing()
        error = AssociationAborted(self._end_reason or "connection closed")
        pending, self._pending = self._pending, {}
        for p in pending.values():
            p.deferred.errback(Failure(error))
        if self.is_requestor and not self.established.called:
            self.established.errback(Failure(error))
        if self._release_waiter is not None and not self._release_waiter.called:
            self._release_waiter.callback(None)
        self.settings.association_ended(self)
        self.handler.association_closed(self)

    # ------------------------------------------------------------------ timers

    def _start_artim(self):
        self._stop_artim()
        self._artim = self.reactor.callLater(self.settings.acse_timeout, self._artim_expired)

    def _stop_artim(self):
        if self._artim is not None and self._artim.active():
            self._artim.cancel()
        self._artim = None

    def _artim_expired(self):
        self._artim = None
        if self.state in (AWAIT_RQ, AWAIT_AC):
            self._abort_connection("no association negotiated within the ACSE timeout", reason=0x00)
        elif self.state == RELEASING:
            self._end_reason = "release not confirmed in time"
            self.transport.abortConnection()

    def _touch(self):
        """Activity in either direction: the idle (network) timer counts from now.  The
        timer is not moved each time (a ``reset`` per PDU and per message sent): it
        notes the time, and on expiry sets itself again for what is left."""
        timeout = self.settings.network_timeout
        if not timeout:
            return
        self._active_at = self.reactor.seconds()
        if self._idle is None:
            self._idle = self.reactor.callLater(timeout, self._idle_expired)

    def _idle_expired(self):
        self._idle = None
        left = self._active_at + self.settings.network_timeout - self.reactor.seconds()
        if left > 0:
            self._idle = self.reactor.callLater(left, self._idle_expired)
            return
        if self._pending or self._sending or self._incoming is not None:
            self._abort_connection("network timeout during an operation")
        else:
            self._abort_connection("idle association closed after the network timeout")

    def _cancel_timers(self):
        self._stop_artim()
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        if self._dimse_timer is not None and self._dimse_timer.active():
            self._dimse_timer.cancel()
        self._dimse_timer = None

    def _arm_dimse(self, deadline: float) -> None:
        """Have :meth:`_check_dimse` run by *deadline*.  One timer per association,
        not a ``callLater`` and a cancel per request: a proxied C-FIND was a few
        dozen small steps, this was two of them.  The timer armed for an earlier
        request usually fires first and is set again for what is still waiting."""
        timer = self._dimse_timer
        if timer is None or not timer.active():
            self._dimse_timer = self.reactor.callLater(max(deadline - self.reactor.seconds(), 0),
                                                       self._check_dimse)
        elif timer.getTime() > deadline:   # a shorter timeout than the one armed
            timer.reset(max(deadline - self.reactor.seconds(), 0))

    def _check_dimse(self):
        """A request whose DIMSE timeout ran out aborts the association; otherwise the
        timer is set for the next deadline of those still waiting."""
        self._dimse_timer = None
        now = self.reactor.seconds()
        earliest = None
        for message_id, waiting in self._pending.items():
            deadline = waiting.deadline
            if deadline is None:
                continue
            if deadline <= now:
                self._abort_connection(f"no response to message {message_id} within the DIMSE timeout")
                return
            if earliest is None or deadline < earliest:
                earliest = deadline
        if earliest is not None:
            self._arm_dimse(earliest)

    # ------------------------------------------------------------------ receiving

    def dataReceived(self, data: bytes):
        if self.state == CLOSED:
            # Sta13 (see _close): dropped; a peer that keeps sending is not waited for.
            drained = self._drained
            self._drained = drained + len(data)
            if drained <= CLOSE_DRAIN_BYTES < self._drained:
                self.transport.abortConnection()
            return
        if self._held is not None:
            self._held.data += data
            if len(self._held.data) > pdu.MAX_ASSOCIATE_PDU + 6:
                try:  # a header over the limit is refused as it would be unheld (reason 0x06)
                    pdu.PDUFramer(self.framer.max_length).feed(bytes(self._held.data))
                except pdu.PDUError as e:
                    self._abort_connection(str(e), reason=e.reason)
                    return
                self._abort_connection("more than an A-ASSOCIATE-RQ sent before it was answered")
            return
        self._touch()
        self._receive(data)

    def _receive(self, data: bytes, parsed: Sequence = ()):
        _batch.depth += 1
        try:
            if parsed:
                pdus = [*parsed, *self.framer.feed(data)] if data else list(parsed)
            else:
                pdus = self.framer.feed(data)
            for index, (pdu_type, body) in enumerate(pdus):
                if self._repeat is not None and pdu_type == pdu.P_DATA_TF and self._on_pending_pdu(body):
                    continue   # a match's PDU taken in two calls fewer (only set while established)
                self._on_pdu(pdu_type, body)
                if self.state == CLOSED:
                    return
                if self._held is not None:
                    self._held.pdus = pdus[index + 1:]
                    return
        except pdu.PDUError as e:
            self._abort_connection(str(e), reason=e.reason)
        except commands.CommandError as e:
            self._abort_connection(f"malformed command set: {e}", reason=0x06)
        finally:
            try:
                if _batch.depth == 1 and self.read_on and self._pending and self.state == ESTABLISHED \
                        and (_batch.waiting or _batch.after):
                    self._read_on()
            finally:
                _batch.depth -= 1
                if not _batch.depth:
                    _batch.flush()

    def _read_on(self) -> None:
        """What the peer sent since this delivery's read, delivered as part of it: read
        once more before the delivery's writes go out and its put-off calls run.

        A PACS answers a C-FIND in several writes (its pending responses, then the
        final one), and the reactor may read the first before the rest is in: what then
        follows the first delivery -- the matches' send and the pipeline's answer
        (:func:`after_delivery`: the target pool's verdict, the observers) -- ran while
        the final response waited in the socket, on the path of the client's answer
        (bench/dimse, "C-FIND, eighth pass").  Read now, the final goes out with the
        matches in one send and that work after it, when the client needs nothing more
        of us; with nothing there the answer runs as before, only after a ``recv`` that
        found nothing (a few microseconds, while the PACS is still working).

        One read, not a loop: a PACS streaming many matches is read as before, a
        delivery at a time.  An error is left to the reactor's next read (the socket
        keeps reporting it: a reset reads as the end of the connection, which ends the
        association the same way)."""
        transport = self.transport
        if not transport.connected or transport.disconnecting:
            return
        try:
            data = transport.socket.recv(transport.bufferSize)
        except OSError:
            return   # EAGAIN: nothing yet
        if data:
            self.dataReceived(data)

    def _on_pdu(self, pdu_type: int, body: bytes):
        state = self.state
        if pdu_type == pdu.P_DATA_TF:
            if state not in (ESTABLISHED, RELEASING):
                raise pdu.PDUError("P-DATA-TF before the association was established", reason=0x02)
            self._on_pdata(body)
        elif pdu_type == pdu.A_ASSOCIATE_RQ:
            if state != AWAIT_RQ:
                raise pdu.PDUError("unexpected A-ASSOCIATE-RQ", reason=0x02)
            self._on_associate_rq(body)
        elif pdu_type == pdu.A_ASSOCIATE_AC:
            if state != AWAIT_AC:
                raise pdu.PDUError("unexpected A-ASSOCIATE-AC", reason=0x02)
            self._on_associate_ac(body)
        elif pdu_type == pdu.A_ASSOCIATE_RJ:
            if state != AWAIT_AC:
                raise pdu.PDUError("unexpected A-ASSOCIATE-RJ", reason=0x02)
            result, source, reason = pdu.parse_rj(body)
            self._end_reason = "association rejected"
            self.state = CLOSED
            self.established.errback(Failure(AssociationRejected(result, source, reason)))
            self._close(answered=True)
        elif pdu_type == pdu.A_RELEASE_RQ:
            if state not in (ESTABLISHED, RELEASING):
                raise pdu.PDUError("unexpected A-RELEASE-RQ", reason=0x02)
            self._write(pdu.release_rp())
            self._end_reason = None
            self.state = CLOSED
            self._close()
        elif pdu_type == pdu.A_RELEASE_RP:
            if state != RELEASING:
                raise pdu.PDUError("unexpected A-RELEASE-RP", reason=0x02)
            self._end_reason = None
            self.state = CLOSED
            self._close(answered=True)
        elif pdu_type == pdu.A_ABORT:
            source, reason = pdu.parse_abort(body)
            self._end_reason = f"peer aborted the association (source {source}, reason {reason})"
            self.state = CLOSED
            self.transport.abortConnection()

    def _on_pdata(self, body):
        # The PDV items one by one (pdu.pdvs, inlined: one struct call per item header).
        offset, end = 0, len(body)
        view = body if type(body) is memoryview else memoryview(body)
        unpack = pdu.PDV_ITEM.unpack_from
        while offset < end:
            if end - offset < 6:
                raise pdu.PDUError("truncated PDV item", reason=0x06)
            item_length, context_id, control = unpack(body, offset)
            if item_length < 2 or offset + 4 + item_length > end:
                raise pdu.PDUError(f"PDV item length {item_length} does not fit its PDU", reason=0x06)
            fragment = view[offset + 6:offset + 4 + item_length]
            offset += 4 + item_length
            if context_id not in self.contexts:
                raise pdu.PDUError(f"PDV on presentation context {context_id}, which was not accepted", 0x06)
            if control & 0x01:                       # command fragment
                if self._incoming is not None:
                    raise pdu.PDUError("command fragment while a data set was expected", reason=0x02)
                if control & 0x02 and self._command_context is None:
                    # The usual command: whole in one fragment, decoded from it (not gathered first).
                    if len(fragment) > commands.MAX_COMMAND_BYTES:
                        raise pdu.PDUError("command set over the limit", reason=0x06)
                    command = commands.decode(bytes(fragment))
                    if end == 4 + item_length and command["CommandField"] & commands.RESPONSE_BIT:
                        self._command_pdu = body   # a response's command alone in its PDU: see _dispatch
                elif self._command_context is not None and self._command_context != context_id:
                    raise pdu.PDUError("command fragments on two presentation contexts", reason=0x02)
                else:
                    self._command_context = context_id
                    if len(self._command) + len(fragment) > commands.MAX_COMMAND_BYTES:
                        raise pdu.PDUError("command set over the limit", reason=0x06)
                    self._command += fragment
                    if not control & 0x02:
                        continue
                    command = commands.decode(bytes(self._command))
                    self._command = bytearray()
                    self._command_context = None
                message = Message(context_id, command)
                if commands.has_dataset(command):
                    self._incoming = message
                    # A response's data set is an identifier we asked for (a C-FIND match, a
                    # retrieve's failed-UID list): kept here, not by a sink of the handler's
                    # (None until a second fragment needs one; see below).
                    self._sink = (None if command["CommandField"] & commands.RESPONSE_BIT
                                  else self.handler.dataset_sink(self, context_id, command))
                else:
                    self._dispatch(message)
            else:                                    # data set fragment
                message = self._incoming
                if message is None or message.context_id != context_id:
                    raise pdu.PDUError("data set fragment without its command", reason=0x02)
                sink = self._sink
                if sink is None:
                    if control & 0x02 and len(fragment) <= MAX_RESPONSE_DATASET:
                        # A response's data set in one fragment (every C-FIND match a PACS sends):
                        # its bytes, with no sink made, written to and closed, per match (bench/dimse).
                        self._incoming = None
                        message.dataset = bytes(fragment)
                        self._dispatch(message)
                        continue
                    sink = self._sink = MemorySink(MAX_RESPONSE_DATASET)
                sink.write(fragment)
                if control & 0x02:
                    self._sink = self._incoming = None
                    message.dataset = sink.close()
                    message.sink = sink
                    self._dispatch(message)

    def _on_pending_pdu(self, body) -> bool:
        """A PDU of the pending response last seen (``_repeat``) taken without the PDV loop,
        command decode, :class:`Message` and dispatch: its command PDU by comparing bytes,
        then its data set, whole in the next PDU, handed to ``on_pending_data``.  A C-FIND's
        matches are such pairs, every one the same command (bench/dimse, C-FIND: most of
        relaying a match was receiving it).  ``False``: not such a PDU, for :meth:`_on_pdata`."""
        command_pdu, context_id, waiting, responding_to = self._repeat
        if self._repeat_next:
            self._repeat_next = False
            n = len(body)
            if (n >= 6 and body[5] == 0x02 and body[4] == context_id and n <= MAX_RESPONSE_DATASET
                    and pdu.PDV_ITEM.unpack_from(body)[0] + 4 == n):
                # The data set, last fragment, alone in its PDU: the pending response is whole.
                if waiting.timeout is not None:
                    waiting.deadline = self.reactor.seconds() + waiting.timeout
                waiting.on_pending_data(bytes(body[6:]))
                return True
            # Anything else goes on as if the command had come the usual way.
            self._command_pdu = None
            self._incoming = Message(context_id, commands.decode(command_pdu[6:]))
            self._sink = None
            return False
        if body == command_pdu and self._incoming is None and self._command_context is None:
            if self._pending.get(responding_to) is not waiting:
                self._repeat = None   # that request ended (its DIMSE timeout): the usual way, and its warning
                return False
            self._repeat_next = True
            return True
        return False

    def _dispatch(self, message: Message):
        command = message.command
        if command["CommandField"] & commands.RESPONSE_BIT:   # commands.is_response, inlined: per message
            responding_to = command.get("MessageIDBeingRespondedTo")
            waiting = self._pending.get(responding_to)
            command_pdu, self._command_pdu = self._command_pdu, None
            if waiting is None:
                log.warn("dicom ul: {field} answers message {mid}, which is not outstanding",
                         field=commands.NAMES.get(message.field, hex(message.field)), mid=responding_to)
                return
            status = command.get("Status")
            if status == dimse.PENDING or status == dimse.PENDING_WARNING:   # dimse.is_pending, inlined: per match
                if waiting.timeout is not None:
                    waiting.deadline = self.reactor.seconds() + waiting.timeout
                if waiting.on_pending_data is not None and message.dataset is not None:
                    if command_pdu is not None:
                        # The next pending response of this request is likely these bytes again.
                        self._repeat = (bytes(command_pdu), message.context_id, waiting, responding_to)
                    waiting.on_pending_data(message.dataset)
                elif waiting.on_pending is not None:
                    waiting.on_pending(message)
                return
            del self._pending[responding_to]
            if self._repeat is not None and self._repeat[2] is waiting:
                self._repeat = None
            waiting.deferred.callback(message)
            return
        try:
            self.handler.on_request(self, message)
        except Exception:
            log.failure("dicom ul: the service handler failed on {field}",
                        field=commands.NAMES.get(message.field, hex(message.field)))
            self.abort()

    # ------------------------------------------------------------------ negotiation

    def _on_associate_rq(self, body: bytes):
        try:
            proposal = decode_associate_rq(body)
        except Exception as e:   # pynetdicom raises assorted errors on garbage
            raise pdu.PDUError(f"malformed A-ASSOCIATE-RQ: {e.__class__.__name__}", reason=0x06) from None
        primitive = proposal.primitive
        self.calling_aet = _aet(primitive.calling_ae_title)
        self.called_aet = _aet(primitive.called_ae_title)
        self._rq_primitive = primitive
        for item in primitive.user_information:
            if isinstance(item, MaximumLengthNotification):
                self.peer_max_pdu = item.maximum_length_received or 0
            elif isinstance(item, ImplementationClassUIDNotification):
                self.implementation_class_uid = str(item.implementation_class_uid or "")
            elif item.__class__.__name__ == "UserIdentityNegotiation":
                self.user_identity = item
        decision = self.settings.negotiate(self, proposal)
        if isinstance(decision, defer.Deferred):
            self._hold(decision, lambda decided: self._answer_associate_rq(proposal, decided))
        else:
            self._answer_associate_rq(proposal, decision)

    def _hold(self, decision: defer.Deferred, then) -> None:
        """Read nothing more until *decision* fires (an acceptor waiting for the count it
        shares with other processes), then call *then* with it and go on with what came
        meanwhile (kept, at most one A-ASSOCIATE-RQ's worth: a peer waits for our answer)."""
        self._held = _Held()

        def decided(result):
            held, self._held = self._held, None
            if self.state != CLOSED:
                try:
                    then(result)
                except Exception:
                    log.failure("dicom ul: answering {peer} after a wait failed", peer=self.peer_address[0])
                    self._abort_connection("internal error")
                    return result
                if self.state != CLOSED:
                    self._receive(bytes(held.data), held.pdus)
            return result
        decision.addCallback(decided)

    def _answer_associate_rq(self, proposal: Proposal, decision) -> None:
        if isinstance(decision, Reject):
            result, source, reason = decision
            self._write(pdu.associate_rj(result, source, reason))
            self._end_reason = "association rejected"
            self.state = CLOSED
            self._stop_artim()
            self._close()
            return
        accepted, extra_items = decision
        self.contexts = {cx.context_id: cx for cx in accepted if cx.result == 0x00}
        # The answer to a proposal is the same but for the AE title fields, which echo the
        # request's (PS3.8 Table 9-17): kept by the proposal's key, those spliced in.
        cache = getattr(self.settings, "accept_pdus", None)
        answer = cache.get(proposal.key) if cache is not None else None
        if answer is None:
            primitive = proposal.primitive
            ac = A_ASSOCIATE()
            ac.application_context_name = APPLICATION_CONTEXT
            ac.calling_ae_title = primitive.calling_ae_title
            ac.called_ae_title = primitive.called_ae_title
            ac.result = 0x00
            ac.result_source = 0x01
            ac.presentation_context_definition_results_list = accepted
            ac.user_information = self._user_information() + list(extra_items)
            answer = pn_pdu.A_ASSOCIATE_AC(ac).encode()
            if cache is not None:
                cache.put(proposal.key, answer)
        encoded = answer[:_AC_AE_FIELDS.start] + proposal.ae_fields + answer[_AC_AE_FIELDS.stop:]
        self._write(encoded)
        self._stop_artim()
        self._set_established()

    def _user_information(self) -> list:
        return user_information(self.settings.max_pdu)

    def _encode_associate_rq(self) -> bytes:
        return encode_associate_rq(self._rq_primitive, self.settings.max_pdu)

    def _on_associate_ac(self, body: bytes):
        answers = self._answers
        known = answers.get(body) if answers is not None else None
        if known is None:
            known = self._negotiated(body)
            if answers is not None:
                answers.put(body, known)
        self.peer_max_pdu, results = known
        rq = self._rq_primitive
        self.calling_aet = _aet(rq.calling_ae_title)
        self.called_aet = _aet(rq.called_ae_title)
        self.contexts = {cx.context_id: cx for cx in results if cx.result == 0x00}
        self._stop_artim()
        self._set_established()

    def _negotiated(self, body: bytes) -> tuple[int, list]:
        """(the peer's maximum PDU, the negotiated contexts) of the A-ASSOCIATE-AC *body*:
        pynetdicom's decode and ``negotiate_as_requestor`` (~7 ms for 128 contexts)."""
        ac = pn_pdu.A_ASSOCIATE_AC()
        try:
            ac.decode(pdu.header(pdu.A_ASSOCIATE_AC, len(body)) + body)
            primitive = ac.to_primitive()
        except Exception as e:
            raise pdu.PDUError(f"malformed A-ASSOCIATE-AC: {e.__class__.__name__}", reason=0x06) from None
        roles = {}
        peer_max = 0
        for item in primitive.user_information:
            if isinstance(item, MaximumLengthNotification):
                peer_max = item.maximum_length_received or 0
            elif isinstance(item, SCP_SCU_RoleSelectionNegotiation):
                roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
        results = negotiate_as_requestor(self._rq_primitive.presentation_context_definition_list,
                                         primitive.presentation_context_definition_results_list, roles)
        return peer_max, results

    def _set_established(self):
        self.state = ESTABLISHED
        self.framer.max_length = (self.settings.max_pdu or 0xFFFFFFFF) + PDU_SLACK
        self._touch()
        self.settings.association_established(self)
        self.handler.association_established(self)
        if not self.established.called:
            self.established.callback(self)

    # ------------------------------------------------------------------ sending

    def _write(self, data: bytes, more: bool = False):
        """Send *data* now, with whatever this association wrote before it in the turn.
        With *more* (another message of the same turn follows it: a C-FIND's next
        match) it waits, at most until the delivery running ends (:class:`_Batch`)."""
        out = self._out
        out.append(data)
        if more and _batch.depth:
            if len(out) == 1:
                _batch.waiting.append(self)
            return
        self._flush_out()

    def _write_many(self, chunks: list[bytes], more: bool = False):
        out = self._out
        out.extend(chunks)
        if more and _batch.depth:
            if len(out) == len(chunks):
                _batch.waiting.append(self)
            return
        self._flush_out()

    def _flush_out(self):
        out = self._out
        if out:
            self._out = []
            if self.transport is not None:
                send_now(self.transport, out[0] if len(out) == 1 else b"".join(out))
            # Activity for the idle timer once per send, not once per message written
            # (a proxied C-FIND's matches and final response go out in one send).
            self._touch()

    @property
    def peer_max_pdu(self) -> int:
        """The largest PDU the peer receives (0: no limit said), as negotiated."""
        return self._peer_max_pdu

    @peer_max_pdu.setter
    def peer_max_pdu(self, value: int) -> None:
        self._peer_max_pdu = value
        # PDU length = 6 (PDV item header) + fragment; the peer's maximum counts the whole PDU body.
        peer = value or 0
        if peer <= 0 or peer > 4 * 1024 * 1024:
            peer = 4 * 1024 * 1024
        #: The largest data-set fragment a P-DATA PDU to the peer carries, worked out when the
        #: maximum is set rather than on every message sent (eight times a proxied C-FIND).
        self.max_fragment = max(peer - 6, 1)

    def _fragment_size(self) -> int:
        return self.max_fragment

    def send(self, context_id: int, command: dict | bytes, dataset=None, more: bool = False) -> defer.Deferred:
        """Send one message (*dataset*: ``None``, bytes, or a :class:`FileDataset`); fires once written.

        *command* may be already encoded (bytes, its CommandDataSetType right), for a
        response sent many times over (a C-FIND's pending responses).  *more*: another
        message follows in this turn, so this one may wait to go out with it."""
        if self.state != ESTABLISHED:
            return defer.fail(AssociationAborted(f"association is {self.state}"))
        if not isinstance(command, bytes):
            if dataset is not None:
                command = dict(command, CommandDataSetType=commands.HAS_DATASET)
            command = commands.encode(command)
        d: defer.Deferred = defer.Deferred()
        self._send_queue.append((context_id, command, dataset, d, more))
        if not self._sending:
            self._drain()
        return d

    def post(self, context_id: int, command: bytes, dataset: bytes | None = None, more: bool = False) -> None:
        """:meth:`send` for a message nobody waits on (an SCP's responses): written at
        once, with no Deferred, when nothing is queued before it; an association that
        ended meanwhile drops it (the service handler learns that from ``closed``)."""
        if self.state == ESTABLISHED and not self._sending and not self._send_queue:
            self._write_message(context_id, command, dataset, more)
        elif self.state == ESTABLISHED:
            self.send(context_id, command, dataset, more).addErrback(_ended_meanwhile)

    def command_pdus(self, context_id: int, command: bytes) -> bytes:
        """*command* (encoded) framed as the P-DATA-TF PDU(s) that carry it, for
        :meth:`post_framed`: a response sent many times over is framed once."""
        return self._command_pdus(context_id, command)

    def post_framed(self, context_id: int, command: bytes, framed: bytes, dataset: bytes, more: bool = False) -> None:
        """:meth:`post` of *command* with *dataset*, *framed* being its :meth:`command_pdus`
        (a C-FIND's pending responses, one per match: framing the same command again
        and cutting a small data set into fragments were most of relaying a match)."""
        if self.state == ESTABLISHED and not self._sending and not self._send_queue and \
                len(dataset) <= self.max_fragment:
            self._write_many([framed, pdu.pdata(context_id, 0x02, dataset)], more)
        else:
            self.post(context_id, command, dataset, more)

    def _write_message(self, context_id: int, command: bytes, dataset: bytes | None, more: bool) -> None:
        if dataset is None:
            self._write_command(context_id, command, more)
        else:
            # The command and its data set in one write: outside a delivery (a C-FIND
            # sent for a DICOMweb query) they went out as two sends, two wake-ups of the PACS.
            self._write_data(context_id, dataset, more, head=self._command_pdus(context_id, command))

    def flush(self) -> None:
        """Put what was sent so far on the wire now rather than at the reactor's next
        turn: for an answer the peer waits on before it sends more (a C-STORE
        sub-operation's response, so the PACS reads its next instance while this
        one is relayed)."""
        self._flush_out()
        flush_buffered(self.transport)

    def request(self, context_id: int, command: dict | bytes, dataset=None, on_pending=None,
                timeout: float | None = None, message_id: int | None = None,
                on_pending_data=None) -> defer.Deferred:
        """Send a request; fires with its final response :class:`Message`.

        Pending responses (0xFF00/0xFF01) go to *on_pending* and restart the DIMSE timer.
        *on_pending_data* instead takes the data set (bytes) of each pending response
        that has one (a C-FIND's matches): no message is made for a pending response
        whose command is the same bytes as the last one's (:meth:`_on_pending_pdu`).
        *command* may be already encoded (:func:`.commands.encode_with_id`), with its
        *message_id* given.
        """
        if isinstance(command, bytes):
            if message_id is None:
                raise ValueError("an encoded request needs its message_id")
        else:
            message_id = command.get("MessageID")
            if message_id is None:
                message_id = self.next_message_id()
                command = dict(command, MessageID=message_id)
        timeout = self.settings.dimse_timeout if timeout is None else timeout
        waiting = _Pending(on_pending, timeout, self.reactor.seconds(), on_pending_data)
        self._pending[message_id] = waiting
        if waiting.deadline is not None:
            self._arm_dimse(waiting.deadline)
        if self.state == ESTABLISHED and not self._sending and not self._send_queue and (
                dataset is None or isinstance(dataset, bytes)):
            # Nothing queued before it: written now, without a Deferred for "sent".
            if not isinstance(command, bytes):
                if dataset is not None:
                    command = dict(command, CommandDataSetType=commands.HAS_DATASET)
                command = commands.encode(command)
            self._write_message(context_id, command, dataset, False)
        else:
            self.send(context_id, command, dataset).addErrback(self._send_failed, message_id)
        return waiting.deferred

    def hand_pending_data(self, message_id: int, on_pending_data) -> None:
        """The pending responses' data sets of the outstanding request *message_id* go to
        *on_pending_data* from now on (a C-FIND sent before its consumer was made:
        ``dicom_scu.FindAhead``)."""
        waiting = self._pending.get(message_id)
        if waiting is not None:
            waiting.on_pending_data = on_pending_data

    def _send_failed(self, failure, message_id):
        waiting = self._pending.pop(message_id, None)
        if waiting is not None:
            waiting.deferred.errback(failure)

    def next_message_id(self) -> int:
        message_id = next(self._message_ids) & 0xFFFF
        if message_id == 0:
            message_id = next(self._message_ids) & 0xFFFF
        return message_id

    def _drain(self):
        """Write queued messages in order; one data set from a file at a time, paced by the transport."""
        self._sending = True
        while self._send_queue and self.state in (ESTABLISHED, RELEASING):
            context_id, command_bytes, dataset, d, more = self._send_queue[0]
            if isinstance(dataset, FileDataset):
                self._send_queue.popleft()
                result = defer.ensureDeferred(self._send_file(context_id, command_bytes, dataset))
                result.addBoth(self._file_sent, d)
                return
            self._send_queue.popleft()
            self._write_message(context_id, command_bytes, dataset, more)
            d.callback(None)
        self._sending = False
        if self.state == CLOSED:
            self._fail_queue()

    def _file_sent(self, result, d):
        self._sending = False
        if isinstance(result, Failure):
            d.errback(result)
            if self.state != CLOSED:
                self.abort()
            return None
        d.callback(None)
        if self._send_queue:
            self._drain()
        return None

    def _fail_queue(self):
        queue, self._send_queue = self._send_queue, deque()
        for _cid, _command, _dataset, d, _more in queue:
            d.errback(AssociationAborted("association closed before the message was sent"))

    def _write_command(self, context_id: int, command_bytes: bytes, more: bool = False):
        self._write(self._command_pdus(context_id, command_bytes), more)

    def _command_pdus(self, context_id: int, command_bytes: bytes) -> bytes:
        size = self.max_fragment
        if len(command_bytes) <= size:
            return pdu.pdata(context_id, 0x03, command_bytes)
        return b"".join(pdu.pdata(context_id, 0x03 if start + size >= len(command_bytes) else 0x01,
                                  command_bytes[start:start + size])
                        for start in range(0, len(command_bytes), size))

    def _write_data(self, context_id: int, data: bytes, more: bool = False, head: bytes | None = None):
        """The data set's P-DATA PDUs, after *head* (its command's PDUs) when given."""
        size = self.max_fragment
        view = memoryview(data)
        n = len(data)
        chunks = [head] if head is not None else []
        if n == 0:
            chunks.append(pdu.pdata(context_id, 0x02, b""))
            self._write_many(chunks, more)
            return
        for start in range(0, n, size):
            last = start + size >= n
            chunks.append(pdu.pdata(context_id, 0x02 if last else 0x00, view[start:start + size]))
        self._write_many(chunks, more)

    async def _send_file(self, context_id: int, command_bytes: bytes, dataset: FileDataset):
        """The command, then the data set from its file (:mod:`.filesend`): straight to
        the socket while it takes it, the rest in blocks paced by the transport."""
        command = self._command_pdus(context_id, command_bytes)
        fd = os.open(dataset.path, os.O_RDONLY)
        try:
            start = dataset.offset if dataset.offset is not None else filesend.dataset_start(fd)
            pdus = filesend.Plan(context_id, start, os.fstat(fd).st_size, self._fragment_size())
            index = 0
            self._flush_out()   # what this association wrote before (a batched message) goes first
            direct = direct_socket(self.transport)
            if direct is not None:
                sock, held = direct
                try:
                    index, rest = filesend.send_direct(sock, fd, pdus, held + command)
                except ConnectionError as e:   # the peer reset or closed: the association is over
                    raise AssociationAborted(f"connection lost while sending a data set ({e.strerror})") from None
                if rest:
                    self._write(rest)
            else:
                self._write(command)
            self._touch()
            while index < len(pdus):
                await self._flow.ready()
                if self.state == CLOSED:
                    raise AssociationAborted("association closed while sending a data set")
                block, index = pdus.block(fd, index)
                self._write(block)
                self._touch()
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ ending

    def release(self) -> defer.Deferred:
        """A-RELEASE-RQ; fires when the peer confirmed (or the connection ended)."""
        if self.state != ESTABLISHED:
            return defer.succeed(None)
        self.state = RELEASING
        self._release_waiter = defer.Deferred()
        self._write(pdu.release_rq())
        self._start_artim()
        return self._release_waiter

    def abort(self, reason: str = "aborted by Harmony"):
        """A-ABORT as the service user, then close."""
        if self.state == CLOSED:
            return
        self._end_reason = reason
        self.state = CLOSED
        self._write(pdu.abort(source=0x00))
        self._close()

    def _abort_connection(self, why: str, reason: int = 0x00):
        """A-ABORT as the service provider (a protocol fault or a timer), then close."""
        if self.state == CLOSED:
            return
        log.info("dicom ul: aborting association with {peer}: {why}", peer=self.peer_address and
                 self.peer_address[0], why=why)
        self._end_reason = why
        self.state = CLOSED
        self._write(pdu.abort(source=0x02, reason=reason))
        self._close()

    def _close(self, answered: bool = False):
        """The association is over: we wrote our last PDU (A-ASSOCIATE-RJ, A-RELEASE-RP,
        A-ABORT) or, *answered*, read the peer's answer to our request (its RJ or RP).

        PS3.8 has the side that read the answer close the connection (AE-4, AR-3), and
        the side that sent the last PDU wait for that close, bounded by the ARTIM timer
        (Sta13).  So after our own last PDU we shut our sending side (a FIN after it;
        under TLS a close_notify) but go on *reading*, dropping what comes, until the
        peer closes: closing a socket that has unread bytes makes the kernel answer
        with a RST instead of a FIN, and a RST throws away what we sent and the network
        had not delivered yet -- on some systems also what the peer had received but
        not read -- so the peer would learn of a reset, not of our RJ or A-ABORT.  A
        peer that never closes (or stops reading) is cut after :data:`CLOSE_GRACE_SECS`,
        one that sends more than :data:`CLOSE_DRAIN_BYTES` meanwhile (an oversized
        PDU's "body", a flood) at once; nothing it sends is kept."""
        self._flush_out()
        self._cancel_timers()
        # Our producer would hold back the FIN (and TLS's close_notify) while it is
        # registered: nothing more is produced for this connection.
        self.transport.unregisterProducer()
        half_close = None if answered or _is_tls(self.transport) else \
            getattr(self.transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()
        else:   # TLS: loseConnection sends close_notify and reads on until the peer's
            # zope's interface methods take no self for mypy (no mypy-zope plug-in).
            self.transport.loseConnection()  # type: ignore[misc]
        self._idle = self.reactor.callLater(CLOSE_GRACE_SECS, self.transport.abortConnection)
        self._end()


def _ended_meanwhile(failure):
    failure.trap(AssociationAborted)


class _Held:
    """What an association received while its listener decided about it."""

    __slots__ = ("pdus", "data")

    def __init__(self):
        self.pdus: list = []
        self.data = bytearray()


def user_information(max_pdu: int) -> list:
    """Our user information items: maximum PDU, implementation class and version."""
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION
    return [max_length, impl, version]


def encode_associate_rq(primitive: A_ASSOCIATE, max_pdu: int) -> bytes:
    """The A-ASSOCIATE-RQ PDU of *primitive*, our user information first (added to it)."""
    primitive.user_information = user_information(max_pdu) + list(primitive.user_information or [])
    return pn_pdu.A_ASSOCIATE_RQ(primitive).encode()


class BoundedCache:
    """A small insertion-ordered map that forgets its oldest entry beyond *size*."""

    def __init__(self, size: int = 32):
        self.size = size
        self._items: dict = {}

    def get(self, key):
        return self._items.get(key)

    def put(self, key, value) -> None:
        self._items[key] = value
        if len(self._items) > self.size:
            del self._items[next(iter(self._items))]


def _aet(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return (value or "").strip()


def _tls_failure(reason) -> str | None:
    """"TLS handshake failed: ..." when the connection ended on a TLS error
    (a certificate the other side's CA did not sign, no client certificate):
    the cause an operator needs, where "connection closed" says nothing."""
    error = getattr(reason, "value", None)
    if type(error).__module__.split(".")[0] != "OpenSSL":
        return None
    details = [part for arg in getattr(error, "args", ()) if isinstance(arg, list)
               for entry in arg if isinstance(entry, tuple) for part in entry[-1:] if part]
    return "TLS handshake failed: " + ("; ".join(map(str, details)) or str(error) or type(error).__name__)


def _is_tls(transport) -> bool:
    """Whether *transport* is TLS (whose wrapper lends the TCP transport's
    ``loseWriteConnection``, which would send a FIN without a close_notify)."""
    return ISSLTransport.providedBy(transport)


def _set_nodelay(transport) -> None:
    """TCP_NODELAY on the connection (under TLS too): without it every multi-PDU
    exchange waits ~40 ms on Nagle and delayed ACKs (field notes)."""
    while transport is not None:
        set_nodelay = getattr(transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            try:
                set_nodelay(True)
            except OSError:
                pass
            return
        transport = getattr(transport, "transport", None)
