"""``dicom_scu`` backend: a DICOM SCU in front of one or more PACS.

It performs the operation a request names in ``metadata["dimse_op"]``
(C-ECHO, C-FIND, C-GET, C-MOVE, C-STORE) and answers, following
:mod:`harmony.dicom.results`, with a :class:`ResultStream` in
``response.state.dicom_results`` that is fed *as the PACS answers*: C-FIND
matches as their pending responses arrive, retrieved instances as files the
moment each sub-operation lands.  The response body renders the same stream
for HTTP clients (DICOM JSON array, or multipart/related of application/dicom).

Associations are carried by the reactor (:mod:`harmony.dicom.ul`): no thread
per association, no polling.  The PACS are targets of a
:class:`~harmony.targets.TargetPool` like every HTTP-family backend's: a
strategy chooses one, C-ECHO health checks and a circuit breaker keep broken
ones out, and idempotent operations (C-ECHO, C-FIND, C-GET) are retried on the
next target when an association cannot be had.  Established associations are
pooled per target and reused.  The response fires once the association is up
and the first result (or the final status) is in, so a PACS that is down,
refuses or stalls gives 502/504 quickly instead of a response that never ends.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import time
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AllStoragePresentationContexts, build_context
from twisted.internet import defer, tcp
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from harmony.backends.base import Backend
from harmony.config.errors import OptionError
from harmony.dicom import blocking, charset, net, transfer
from harmony.dicom import status as dimse
from harmony.dicom.dicomjson import identifier_from_json, query_level
from harmony.dicom.files import Staging, read_instance
from harmony.dicom.render import ResultBodyProducer, release_rest
from harmony.dicom.results import (
    C_ECHO,
    C_FIND,
    C_GET,
    C_MOVE,
    C_STORE,
    LEVELS,
    OPERATIONS,
    STAGE_IN_MEMORY,
    BoundedResultStream,
    DicomInstance,
)
from harmony.dicom.ul import commands, datasets, storage
from harmony.dicom.ul.acceptor import AcceptorFactory, AcceptorLimits, AcceptorSettings
from harmony.dicom.ul.association import ESTABLISHED, AssociationAborted, AssociationRejected, after_delivery
from harmony.dicom.ul.requestor import RequestorSettings, associate
from harmony.dicom.ul.tls import client_options
from harmony.envelope import ResponseEnvelope
from harmony.errors import BackendTimeout, BackendUnavailable, BadRequest, HarmonyError
from harmony.log import get_logger
from harmony.targets import TargetPool
from harmony.web.sendfile import drop_sent

IMPLICIT_LE = str(ImplicitVRLittleEndian)
#: How many extra (SOP class, transfer syntax) pairs the pool proposes at most.
MAX_LEARNED = 16

log = get_logger("harmony.backends.dicom_scu")

STORE_BODY_LIMIT = 2 * 1024 * 1024 * 1024
#: Retrieved instances staged and not yet taken by the consumer, per retrieve, before the
#: PACS's next C-STORE sub-operation is answered (DICOM's own flow control).
DEFAULT_MAX_STAGED_BYTES = 128 * 1024 * 1024
#: Memory-backed file system for retrieved instances in flight, when the machine has one.
SHM = Path("/dev/shm")
#: Largest maximum PDU we advertise (0 in the config means this).
MAX_PDU_LIMIT = 16 * 1024 * 1024


#: Read size of an SCU association's socket (see ``_Receiver.association_established``).
RECEIVE_BYTES = 1024 * 1024
#: A staged instance's fragments are written once this many bytes are held (one
#: ``writev``, no copy into a buffer), and at the end.
GATHER_BYTES = 256 * 1024


class GatheringFile:
    """A staged instance's file, written with ``os.writev`` of the received
    fragments: big fragments go out without the copy into a write buffer that
    ``open(..., buffering=...)`` makes (a 256 KiB buffer copied two of a 512 KiB
    instance's three PDVs), small ones are gathered so a PACS sending small PDUs
    still costs one write per :data:`GATHER_BYTES`.  The fragments are the
    received PDUs' own memory (views), held until written."""

    def __init__(self, path):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._held: list = []
        self._bytes = 0

    def write(self, data) -> None:
        self._held.append(data)
        self._bytes += len(data)
        if self._bytes >= GATHER_BYTES:
            self._write_held()

    def _write_held(self) -> None:
        held, self._held, self._bytes = self._held, [], 0
        views = [memoryview(b).cast("B") for b in held]
        while views:
            written = os.writev(self._fd, views[:IOV_MAX])
            if not written:
                raise OSError(f"could not write the staged instance {self.path}")
            drop_sent(views, written)

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            if self._held:
                self._write_held()
        finally:
            fd, self._fd = self._fd, -1
            self._held = []
            os.close(fd)


IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

#: Memory staging (a consumer that asked, :data:`STAGE_IN_MEMORY`): instances are held
#: in memory while fewer than this many bytes are queued for the consumer, and beyond
#: it staged as files as usual ...
MEMORY_STAGING_BYTES = 8 * 1024 * 1024
#: ... and an instance larger than this goes to a file (what it held so far first).
MEMORY_INSTANCE_BYTES = 4 * 1024 * 1024


class MemoryFile:
    """A received instance held as the received fragments themselves (views of the
    PDUs, no copy), with its file meta in front; spilt into a :class:`GatheringFile`
    at *path* once over *spill_at* bytes or when something needs the file.

    Why: a staged file on tmpfs costs the page allocation when written, the read
    into the socket and the freeing when deleted -- 30 % of Harmony's CPU in a
    WADO-RS retrieve through the bridge (perf, bench/dimse/retrieve.py).  Bytes
    that are going to one HTTP client next need none of it."""

    def __init__(self, path, spill_at: int = MEMORY_INSTANCE_BYTES):
        self.path = path
        self.spill_at = spill_at
        self.buffers: list | None = []
        self.size = 0
        self._file: GatheringFile | None = None

    @property
    def in_memory(self) -> bool:
        return self._file is None

    def write(self, data) -> None:
        if self._file is not None:
            self._file.write(data)
            return
        self.buffers.append(data)
        self.size += len(data)
        if self.size > self.spill_at:
            self.spill()

    def spill(self) -> None:
        """Move what is held into the file at :attr:`path` (left open while receiving)."""
        if self._file is not None:
            return
        held, self.buffers = self.buffers, None
        self._file = GatheringFile(self.path)
        for data in held:
            self._file.write(data)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _fire(d: defer.Deferred) -> None:
    """A job's stream was cancelled: its ``cancel_requested`` fires (once)."""
    if not d.called:
        d.callback(None)


def _unanswered(stream, _answer: defer.Deferred) -> None:
    """Nobody will take a job's *stream* (its answer was cancelled): cancelling it sends the
    C-CANCEL, and makes :meth:`Job.put` release what the PACS still sends after it (it did,
    into a stream no one reads: instances left in memory or staging for good)."""
    stream.cancel()
    release_rest(stream)


def _ignore(_data) -> None:
    """A match of a C-FIND sent ahead nobody took over (:meth:`FindAhead.drop`)."""


class FindAhead:
    """A C-FIND sent to the PACS before the pipeline ran (:meth:`DicomScuBackend.find_ahead`).

    With no middleware and this backend alone behind ``dicom_scp``, which PACS a C-FIND
    goes to, on which pooled association and with which bytes, is known as soon as the
    request is decoded; the envelope, pipeline, target pool and job that decide it again
    took ~60-70 us before the request was out, each proxied C-FIND, while the PACS
    waited for it (bench/dimse, "C-FIND, eighth pass").  The request goes first; the
    pipeline then runs exactly as before and, the same target chosen, its attempt takes
    this request over (:meth:`DicomScuBackend._find_adopted`) instead of sending one:
    the PACS's answers can only be read once the reactor is back, after that.  Holds
    the pool's slot and the association until then."""

    __slots__ = ("backend", "target", "assoc", "known", "msg_id", "answered", "adopted")

    def __init__(self, backend, target, assoc, known, msg_id, answered):
        self.backend = backend
        self.target = target
        self.assoc = assoc
        #: ``(sop_class, context id, syntax, fields)``, as :meth:`DicomScuBackend._find` keeps them.
        self.known = known
        self.msg_id = msg_id
        #: The request's Deferred (its final response).
        self.answered = answered
        self.adopted = False

    def drop(self) -> None:
        """Nobody took the request over (the pipeline failed or went elsewhere): the PACS is
        asked to stop (C-CANCEL), what it still sends is ignored, and the association and
        slot go back to the pool once it has answered."""
        if self.adopted:
            return
        self.adopted = True   # once
        backend, target, assoc = self.backend, self.target, self.assoc
        if assoc.state == ESTABLISHED:
            assoc.send(self.known[1], {"CommandField": commands.C_CANCEL_RQ, "MessageIDBeingRespondedTo": self.msg_id})

        def back(result):
            backend.pool.give_back(target, assoc, not isinstance(result, Failure), QUERY)
            backend.pool.limit.release()
        self.answered.addBoth(back)


class Job:
    """One operation in flight: the stream it feeds and the readiness signal (all on the reactor)."""

    def __init__(self, op, request, max_staged_bytes: int = DEFAULT_MAX_STAGED_BYTES):
        self.op = op
        self.request = request
        self.cancel_requested: defer.Deferred[None] = defer.Deferred()
        # Neither the stream nor the answer's canceller holds the job: a job, its request
        # and everything they hold are then freed by reference counting when the operation
        # ends, not left as cyclic garbage for the collector (its young collections stopped
        # the reactor ~19 ms every ~400 proxied C-FINDs: bench/dimse/README.md, C-FIND).
        self.stream = BoundedResultStream(functools.partial(_fire, self.cancel_requested), max_staged_bytes)
        # Cancelled when the pipeline is (the DIMSE or HTTP client left, or gave
        # up): the PACS is asked to stop too (C-CANCEL), or never asked at all.
        self.ready: defer.Deferred = defer.Deferred(functools.partial(_unanswered, self.stream))
        self.items = 0
        #: Received instances being described on the DICOM pool, chained to keep their order.
        self.arrivals: defer.Deferred = defer.succeed(None)
        #: The consumer takes instances held in memory (:class:`MemoryFile`) while few are queued.
        self.in_memory = False
        #: :meth:`_ready` is put off until the delivery's writes are out (:meth:`_ready_soon`).
        self._ready_put_off = False

    def put(self, item):
        self.items += 1
        if self.stream.cancelled and isinstance(item, DicomInstance):
            item.release()
            return
        self.stream.put(item)
        self._ready_soon()

    def put_encoded(self, data: bytes, transfer_syntax: str) -> None:
        """A C-FIND match as the PACS sent it: its bytes go straight to a consumer that
        relays them in the same syntax (``ResultStream.put_encoded``), else it is put
        as a :class:`~harmony.dicom.ul.datasets.ReceivedIdentifier`, decoded when a
        consumer first looks inside (one that cannot be decoded then is that consumer's
        error, not the end of the query)."""
        self.items += 1
        self.stream.put_encoded(data, transfer_syntax, datasets.ReceivedIdentifier)
        if not self._ready_put_off:   # after a delivery's first match, nothing more to arrange
            self._ready_soon()

    def counts(self, command: dict):
        self.stream.set_counts(command.get("NumberOfRemainingSuboperations"),
                               command.get("NumberOfCompletedSuboperations") or 0,
                               command.get("NumberOfFailedSuboperations") or 0,
                               command.get("NumberOfWarningSuboperations") or 0)

    def finish(self, status, comment=None, failed_uids=()):
        self.stream.failed_sop_uids.extend(failed_uids)
        self.stream.finish(status, comment)
        self._ready_soon()

    def _ready(self):
        if not self.ready.called:
            self.ready.callback(self)

    def _ready_soon(self):
        """:meth:`_ready`; when the consumer already takes the results as they come
        (``state.dicom.results_listener``), once what they made it write is sent: the
        pipeline's answer (the target's verdict, observers) need not delay the client's."""
        if self.ready.called or self._ready_put_off:
            return
        if self.stream.listened or self.stream.done and self.request.state.dicom.results_listener is not None:
            self._ready_put_off = True   # once: every match of a delivery came here
            after_delivery(self._ready)
        else:
            self._ready()

    def failed(self, failure):
        if not self.ready.called and self.items == 0 and not self.stream.done:
            self.ready.errback(failure)
            return
        self._ready()   # results (or the end) came first: they are the answer, the failure ends them
        if not self.stream.done:
            err = failure.value
            status = (dimse.UNABLE_TO_PROCESS_TIMEOUT if isinstance(err, BackendTimeout)
                      else dimse.UNABLE_TO_PROCESS_BACKEND)
            self.stream.finish(status, str(err))


class _Receiver:
    """The association handler of an SCU association: C-STORE sub-operations of a C-GET
    (or C-MOVE arrivals on the incoming store listener) land here as staged files."""

    def __init__(self, backend, job_for, large_reads: bool = True):
        self.backend = backend
        self.job_for = job_for
        self.large_reads = large_reads

    def association_established(self, assoc):
        # Retrieved instances arrive as a few large PDUs back to back: read them in
        # large blocks (Twisted reads bufferSize at a time, 64 KiB by default: nine
        # reads and framer passes for a 512 KiB instance; bench/dimse/retrieve.py).
        # Not on a query association: its answers are small, and a read of up to 1 MiB
        # costs ~20 us more than one of 64 KiB however little comes (the buffer is
        # mapped and unmapped each time), twice per proxied C-FIND (bench/dimse).
        transport = assoc.transport
        if self.large_reads and isinstance(transport, tcp.Connection):
            transport.bufferSize = RECEIVE_BYTES
        elif not self.large_reads and isinstance(transport, tcp.Connection) and not transport.TLS \
                and transport.protocol is assoc:
            # A query association: its PACS's final response, already in when the matches
            # before it were read, goes out with them (Association._read_on; bench/dimse).
            assoc.read_on = True

    def association_closed(self, assoc):
        pass

    def dataset_sink(self, assoc, context_id, command):
        if command["CommandField"] != commands.C_STORE_RQ:
            return datasets.MemorySink()
        staging = self.backend.retrieve_staging.ensure()
        path = staging.new_path()
        job = self.job_for(assoc, command)
        memory = None
        if job is not None and job.in_memory and job.stream.queued_bytes < MEMORY_STAGING_BYTES:
            memory = MemoryFile(path, MEMORY_INSTANCE_BYTES)
        sink = datasets.PartTenSink(path, command, str(assoc.contexts[context_id].transfer_syntax[0]),
                                    STORE_BODY_LIMIT, source_aet=assoc.calling_aet,
                                    file=memory if memory is not None else GatheringFile(path))
        sink.memory = memory
        return sink

    def on_request(self, assoc, message):
        command = message.command
        if message.field == commands.C_ECHO_RQ:
            assoc.send(message.context_id, {"AffectedSOPClassUID": command["AffectedSOPClassUID"],
                                            "CommandField": commands.C_ECHO_RSP, "Status": dimse.SUCCESS,
                                            "MessageIDBeingRespondedTo": message.message_id})
            return
        if message.field != commands.C_STORE_RQ:
            assoc.abort("unexpected request on an SCU association")
            return
        defer.ensureDeferred(self._store(assoc, message))

    async def _store(self, assoc, message):
        """A sub-operation landed: answer the PACS at once (the file is complete in staging),
        then describe it on the DICOM pool and hand it to the job, in arrival order."""
        command = message.command
        job = self.job_for(assoc, command)
        path = message.dataset
        status = dimse.SUCCESS
        if job is None:
            log.warn("dicom_scu {name}: refused a C-STORE that belongs to no retrieve", name=self.backend.name)
            status = dimse.REFUSED_NOT_AUTHORISED
            _unlink(path)
        else:
            # The PACS waits for this answer: while the consumer is behind, it waits
            # (memory or disk in staging stays bounded whatever the study's size).
            await job.stream.room()
        if assoc.state == ESTABLISHED:
            assoc.send(message.context_id, {
                "AffectedSOPClassUID": command.get("AffectedSOPClassUID"), "CommandField": commands.C_STORE_RSP,
                "MessageIDBeingRespondedTo": message.message_id, "Status": status,
                "AffectedSOPInstanceUID": command.get("AffectedSOPInstanceUID")})
            # On the wire before the instance is relayed (which may write to the
            # client at once): the PACS sends the next one meanwhile.
            assoc.flush()
        if job is None:
            return
        sink = message.sink
        memory = getattr(sink, "memory", None)
        if memory is not None and memory.in_memory and getattr(sink, "described", None) is None:
            memory.spill()   # read_instance below reads the file
            memory.close()
        if memory is not None and memory.in_memory:
            study, series = sink.described
            described = defer.succeed(DicomInstance(
                path=path, sop_class_uid=command.get("AffectedSOPClassUID", ""),
                sop_instance_uid=command.get("AffectedSOPInstanceUID", ""),
                transfer_syntax_uid=str(assoc.contexts[message.context_id].transfer_syntax[0]),
                study_instance_uid=study, series_instance_uid=series, size=memory.size, data=memory.buffers))
        elif getattr(sink, "described", None) is not None:
            # The sink read the UIDs on the way in: no thread hop, no second read of the file.
            study, series = sink.described
            described = defer.succeed(DicomInstance(
                path=path, sop_class_uid=command.get("AffectedSOPClassUID", ""),
                sop_instance_uid=command.get("AffectedSOPInstanceUID", ""),
                transfer_syntax_uid=str(assoc.contexts[message.context_id].transfer_syntax[0]),
                study_instance_uid=study, series_instance_uid=series,
                size=sink.meta_length + sink.received, owned=True))
        else:
            described = blocking.run(self.backend.reactor, read_instance, path, True)
        # Items reach the job in the order the PACS sent them, however the threads finish.
        job.arrivals = job.arrivals.addCallback(lambda _: described).addCallbacks(
            job.put, self._unreadable, errbackArgs=(path, job))

    def _unreadable(self, failure, path, job):
        log.warn("dicom_scu {name}: received an unreadable instance: {error}", name=self.backend.name,
                 error=failure.getErrorMessage())
        _unlink(path)   # the consumer sees one instance fewer than counted: a failed sub-operation
        return None


#: Pooled associations of two kinds: "all" proposes everything (retrieves,
#: stores), "query" only verification and C-FIND, each C-FIND class once per
#: uncompressed little-endian syntax.  A C-FIND then runs in the syntax its
#: DIMSE client negotiated, so the matches go back to it as the PACS sent them
#: (harmony.dicom.ul.datasets.ReceivedIdentifier); the "all" set is full at
#: PS3.8's 128 contexts and has no room for the second syntax.
ALL, QUERY = "all", "query"


def query_contexts() -> list:
    contexts = [build_context(net.Verification)]
    for ops in net.QUERY_MODELS.values():
        for syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
            contexts.append(build_context(ops[C_FIND], [syntax]))
    return contexts


class Slots:
    """At most *limit* associations in use at once; a slot is taken without a Deferred
    when one is free (``take``), waited for otherwise (``wait``).  Twisted's
    DeferredSemaphore makes and fires a Deferred for every acquire, free or not: on a
    pooled C-FIND that was one of the few dozen steps between the client's request
    and the PACS's (bench/dimse)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.free = limit
        self._waiting: list[defer.Deferred] = []

    def take(self) -> bool:
        if self.free > 0 and not self._waiting:
            self.free -= 1
            return True
        return False

    def wait(self) -> defer.Deferred:
        """Fires once a slot is this caller's (it then holds it, as after ``take``)."""
        d: defer.Deferred[None] = defer.Deferred(self._withdraw)
        self._waiting.append(d)
        return d

    def _withdraw(self, d) -> None:
        if d in self._waiting:
            self._waiting.remove(d)

    def release(self) -> None:
        if self._waiting:
            self._waiting.pop(0).callback(None)   # the slot passes straight to the next in line
        else:
            self.free += 1


class AssociationPool:
    """Established associations per target and kind, reused while idle for less than *idle_secs*.

    Every pooled association of a kind proposes the same contexts (for "all":
    verification, Q/R in both roots, storage with the SCP role for C-GET), so
    any idle one can serve any operation of that kind.  ``max_concurrency``
    caps associations in use at once.
    """

    def __init__(self, backend, *, max_idle=4, idle_secs=15.0, max_concurrency=8):
        self.backend = backend
        self.max_idle = max_idle
        self.idle_secs = idle_secs
        self.limit = Slots(max_concurrency)
        self.contexts = net.requestor_contexts()
        self.roles = net.storage_roles(self.contexts)
        self.query_contexts = query_contexts()
        self.idle: dict[tuple[str, str], list] = {}
        #: (SOP class, transfer syntax) pairs met that the standard contexts lack, newest first.
        self.learned: list = []
        self._proposed = _pairs_of(self.contexts)

    def proposes(self, sop_class, syntax) -> bool:
        return (str(sop_class), str(syntax)) in self._proposed

    def learn(self, sop_class, syntax) -> None:
        """Propose (*sop_class*, *syntax*) on every association from now on: an
        instance in a syntax the standard contexts lack (JPEG-LS near-lossless
        CT, an MPEG-4 video) then goes as stored, and so does the rest of its
        study, over pooled associations - never a second association at once,
        which a peer serving one at a time (DCMTK's storescp) could not accept."""
        pair = (str(sop_class), str(syntax))
        if pair in self.learned:
            return
        self.learned = [pair] + self.learned[:MAX_LEARNED - 1]
        self.contexts = net.requestor_contexts(self.learned)
        self.roles = net.storage_roles(self.contexts)
        self._proposed = _pairs_of(self.contexts)
        stale = {key: idle for key, idle in self.idle.items() if key[1] == ALL}
        self.idle = {key: idle for key, idle in self.idle.items() if key[1] != ALL}
        for idle in stale.values():
            for assoc, _ in idle:
                assoc.release()

    def take_idle(self, target, kind=ALL):
        idle = self.idle.get((target.name, kind), [])
        now = time.monotonic()
        while idle:
            assoc, since = idle.pop()
            if assoc.state == ESTABLISHED and now - since < self.idle_secs:
                return assoc
            assoc.release()
        return None

    async def connect(self, target, contexts=None, roles=None, kind=ALL):
        backend = self.backend
        if contexts is None and kind == QUERY:
            contexts, roles = self.query_contexts, ()
        try:
            return await associate(backend.reactor, target.host, target.port, backend.settings, target.aet,
                                   contexts or self.contexts,
                                   handler=_Receiver(backend, backend.job_for, large_reads=kind != QUERY),
                                   tls_context=backend.tls_for(target),
                                   extra_items=self.roles if contexts is None else (roles or ()))
        except AssociationRejected:
            raise BackendUnavailable(f"PACS {target.aet} rejected the association") from None
        except (defer.TimeoutError, TimeoutError):
            raise BackendTimeout(f"PACS {target.aet} did not accept an association in time") from None
        except AssociationAborted as e:
            if "ACSE timeout" in str(e):
                raise BackendTimeout(f"PACS {target.aet} did not accept an association in time") from None
            if str(e).startswith("TLS handshake failed"):
                raise BackendUnavailable(f"PACS {target.aet}: {e}") from None
            raise BackendUnavailable(f"PACS {target.aet} aborted the association") from None
        except Exception as e:  # noqa: BLE001 - connection refused, DNS, TLS handshake ...
            if "timeout" in type(e).__name__.lower():
                raise BackendTimeout(f"PACS {target.aet} did not accept an association in time") from None
            raise BackendUnavailable(f"PACS {target.aet} could not be reached ({type(e).__name__})") from None

    def give_back(self, target, assoc, reusable: bool, kind=ALL):
        if reusable and assoc.state == ESTABLISHED:
            idle = self.idle.setdefault((target.name, kind), [])
            if len(idle) < self.max_idle:
                idle.append((assoc, time.monotonic()))
                return
        if assoc.state == ESTABLISHED:
            assoc.release()

    def close_all(self):
        waits = []
        for idle in self.idle.values():
            for assoc, _ in idle:
                waits.append(assoc.release())
        self.idle = {}
        return defer.DeferredList(waits, consumeErrors=True)


class DicomScuBackend(Backend):
    def __init__(self, name, reactor, target_pool: TargetPool, *, local_aet="HARMONY_SCU", retrieve_mode="get",
                 incoming_store_port=None, incoming_store_bind="0.0.0.0", persistent_store_scp=False,
                 tls=None, connect_timeout=5.0, acse_timeout=10.0, dimse_timeout=30.0,
                 network_timeout=60.0, max_pdu=0, max_concurrency=8, max_idle=4, staging_dir=None,
                 retrieve_staging_dir=None, max_staged_bytes=DEFAULT_MAX_STAGED_BYTES):
        super().__init__(name)
        self.reactor = reactor
        self.target_pool = target_pool
        #: The AE titles of this backend's PACS (the DICOMweb bridge routes /aets/{aet}/rs by them).
        self.ae_titles = tuple(t.aet for t in target_pool.targets)
        self.local_aet = local_aet
        self.retrieve_mode = retrieve_mode
        self.incoming_store_port = incoming_store_port
        self.incoming_store_bind = incoming_store_bind
        self.persistent_store_scp = persistent_store_scp
        self.tls = tls
        self.staging = Staging(staging_dir)
        #: Retrieved instances in flight: in memory (tmpfs) when available, since each
        #: is written, read once and deleted -- on a busy disk the write blocked the
        #: reactor for ~2 ms per instance (bench/dimse); the stream's limit bounds it.
        self.retrieve_staging = Staging(retrieve_staging_dir or staging_dir)
        self.max_staged_bytes = max_staged_bytes
        self.settings = RequestorSettings(local_aet=local_aet, max_pdu=max_pdu or MAX_PDU_LIMIT,
                                          acse_timeout=acse_timeout, dimse_timeout=dimse_timeout,
                                          network_timeout=network_timeout, connect_timeout=connect_timeout)
        self.pool = AssociationPool(self, max_idle=max_idle, max_concurrency=max_concurrency)
        self._msg_ids = itertools.count(1)
        self._gets: dict[int, Job] = {}       # id(association) -> C-GET job receiving on it
        self._moves: dict[int, Job] = {}      # message id -> C-MOVE job receiving on the store listener
        self._store_scp = None
        self._store_factory = None

    @classmethod
    def from_config(cls, name, options, ctx):
        implicit = None
        if "host" in options or "aet" in options or "port" in options:
            implicit = {"name": name, "aet": net.check_aet(options, "aet"), "host": options.str("host"),
                        "port": options.port("port", 104)}
        try:
            pool = TargetPool.from_options(name, options, ctx, kind="dimse", implicit=implicit)
        except OptionError as e:
            if e.key == "targets":
                raise OptionError("aet", "is required (with host and port), or name targets with aet/host/port") \
                    from None
            raise
        local_aet = net.check_aet(options, "local_aet", "HARMONY_SCU")
        mode = options.str("dimse_retrieve_mode", "get", choices=("get", "move"))
        store_port = options.port("incoming_store_port", None)
        if mode == "move" and store_port is None:
            raise OptionError("incoming_store_port", "is required when dimse_retrieve_mode = 'move'")
        tls = None
        if options.bool("use_tls", False):
            tls = {"cert": options.path("tls_cert", None), "key": options.path("tls_key", None),
                   "ca": options.path("tls_ca", None), "verify": options.bool("tls_verify", True)}
        staging = options.path("staging_dir", None)
        retrieve_staging = staging or _memory_staging(name, ctx.storage_path)
        staging = staging or (ctx.storage_path / "dimse-staging" / name)
        return cls(
            name, ctx.reactor, pool, local_aet=local_aet, retrieve_mode=mode,
            incoming_store_port=store_port,
            incoming_store_bind=options.str("incoming_store_bind", "0.0.0.0"),
            persistent_store_scp=options.bool("persistent_store_scp", False), tls=tls,
            connect_timeout=options.number("connect_timeout_secs", 5.0, minimum=0.01),
            acse_timeout=options.number("acse_timeout_secs", 10.0, minimum=0.01),
            dimse_timeout=options.number("dimse_timeout_secs", 30.0, minimum=0.01),
            network_timeout=options.number("network_timeout_secs", 60.0, minimum=0.01),
            max_pdu=options.int("max_pdu_size", 0, minimum=0, maximum=MAX_PDU_LIMIT),
            max_concurrency=options.int("max_concurrency", 8, minimum=1, maximum=256),
            max_idle=options.int("max_idle_associations", 4, minimum=0, maximum=256),
            staging_dir=staging, retrieve_staging_dir=retrieve_staging,
            max_staged_bytes=options.int("max_staged_mb", DEFAULT_MAX_STAGED_BYTES >> 20, minimum=1,
                                         maximum=1 << 20) << 20,
        )

    # ------------------------------------------------------------------ lifecycle

    def tls_for(self, target):
        if self.tls is None:
            return None
        return client_options(target.host, self.tls["cert"], self.tls["key"], self.tls["ca"], self.tls["verify"])

    def close(self):
        """Release idle associations and stop the store listener."""
        closing = self.pool.close_all()
        self._stop_store_scp()
        self.staging.clear()  # instances no consumer released
        if self.retrieve_staging.base != self.staging.base:
            self.retrieve_staging.clear()
            _remove_empty(self.retrieve_staging.base, SHM)
        return closing

    # ------------------------------------------------------------------ requests

    def send(self, request):
        try:
            op, identifier, _level, model = self.parse(request)
        except HarmonyError:
            return defer.fail()
        if op == C_STORE:
            return defer.ensureDeferred(self._store_request(request))
        return self.target_pool.call(request, lambda target: self._attempt(target, op, request, identifier, model))

    def _attempt(self, target, op, request, identifier, model):
        job = Job(op, request, self.max_staged_bytes)
        job.in_memory = bool(request.metadata.get(STAGE_IN_MEMORY)) and op in (C_GET, C_MOVE)
        if op == C_ECHO:
            work = self._echo
        elif op == C_FIND:
            work = self._find
        elif op == C_MOVE and self._third_party(request):
            work = self._move_elsewhere
        else:
            # A retrieve whose instances come back through Harmony: how to fetch
            # them from the PACS is this backend's choice, not the caller's.
            work = self._move_here if self.retrieve_mode == "move" else self._get
        ahead = request.state.dicom.ahead if op == C_FIND else None
        if ahead is not None and not ahead.adopted and ahead.target is target:
            d = self._with_ahead(ahead, job, lambda assoc: work(assoc, job, identifier, model))
        else:
            d = self._with_association(target, job, lambda assoc: work(assoc, job, identifier, model),
                                       QUERY if op == C_FIND else ALL)
        d.addErrback(job.failed)
        return job.ready.addCallback(self.respond)

    def parse(self, request):
        """(op, identifier Dataset, level, model) from metadata and the normalised view.

        An HTTP caller may send ``{"dimse_op": ..., "query_level": ...,
        "query_model": ..., "identifier": {DICOM JSON}}`` instead of metadata.
        """
        md = request.metadata
        # A DIMSE client's identifier nobody read yet (dicom_scp): not made here either
        # while its bytes can be relayed (_relayed_identifier).
        doc = request.normalized if request.normalized_read() else None
        if isinstance(doc, dict) and "identifier" in doc and ("dimse_op" in doc or "dimse_op" not in md):
            for key in ("dimse_op", "query_level", "query_model", "move_destination"):
                if key in doc and key not in md:
                    if not isinstance(doc[key], str):
                        raise BadRequest(f"{key} must be a string")
                    md[key] = doc[key]
            doc = doc["identifier"]
        if "dimse_op" not in md and request.query_value("dimse_op"):
            md["dimse_op"] = request.query_value("dimse_op")  # e.g. POST ?dimse_op=C-STORE with a DICOM body
        op = (md.get("dimse_op") or "").upper()
        if op not in OPERATIONS:
            raise BadRequest(f"dimse_op must be one of {', '.join(OPERATIONS)}, got {op or 'none'!r} "
                             "(set it in metadata, or POST a JSON body {\"dimse_op\": ..., \"identifier\": ...} "
                             "with Content-Type: application/json)")
        model = (md.get("query_model") or "study").lower()
        if model not in net.QUERY_MODELS:
            raise BadRequest(f"query_model must be 'study' or 'patient', got {model!r}")
        if op in (C_ECHO, C_STORE):
            return op, None, None, model
        relayed = _relayed_identifier(request, doc)
        if relayed is None:
            if doc is None:
                doc = request.normalized
            relayed = _encoded_identifier(md, doc)
        if relayed is not None:
            return op, relayed, md["query_level"], model
        # Unicode from JSON: ISO_IR 192 when not ASCII, or the PACS would get '?'.
        identifier = charset.declare(identifier_from_json(doc))
        level = query_level(identifier, md.get("query_level"))
        identifier.QueryRetrieveLevel = level
        md["query_level"] = level
        return op, identifier, level, model

    def _third_party(self, request) -> bool:
        dest = request.metadata.get("move_destination")
        return bool(dest) and dest != self.local_aet and request.metadata.get("move_delivery") != "proxy"

    def respond(self, job: Job) -> ResponseEnvelope:
        stream = job.stream
        md = {"dimse_op": job.op}
        if stream.status is not None:  # the metadata view; the status itself is the stream's
            md[dimse.METADATA_KEY] = dimse.label(stream.status)
        if stream.status is not None and dimse.is_failure(stream.status) and job.items == 0:
            doc = {"dimse_op": job.op, "dimse_status": stream.status, "error_comment": stream.error_comment,
                   "completed": stream.completed, "failed": stream.failed}
            resp = ResponseEnvelope.json(dimse.http_status_for(stream.status), doc)
        elif job.op == C_FIND and job.request.state.dicom.results_listener is not None:
            # Relayed by dicom_scp as they came (no middleware between): nobody reads a body,
            # and making one was part of the work after the client's final response.
            resp = ResponseEnvelope(status=200)
        elif job.op in (C_FIND, C_GET) or job.op == C_MOVE and not self._third_party(job.request):
            body = ResultBodyProducer(stream, "json" if job.op == C_FIND else "multipart", request=job.request)
            resp = ResponseEnvelope(status=200, headers=Headers({"Content-Type": [body.content_type]}), body=body)
        else:
            doc = {"dimse_op": job.op, "dimse_status": stream.status, "completed": stream.completed,
                   "failed": stream.failed, "warning": stream.warning, "remaining": stream.remaining}
            resp = ResponseEnvelope.json(200, doc)
        resp.metadata.update(md)
        resp.state.dicom_results = stream
        return resp

    # ------------------------------------------------------------------ operations (on the reactor)

    def _with_association(self, target, job, body, kind=ALL) -> defer.Deferred:
        """Run ``body(assoc)`` (a Deferred or coroutine firing with whether the association
        may be reused) on a pooled association to *target*; a reused one that turns out
        dead before any result is replaced once by a fresh one.

        When a slot is free and an idle association is at hand -- a pooled C-FIND's
        usual case -- this is plain callbacks: the coroutine (and its Deferred) was a
        few of the steps between the client's request and the PACS's (bench/dimse).
        Otherwise :meth:`_with_new_association` waits for a slot or connects."""
        limit = self.pool.limit
        if job.cancel_requested.called or not limit.take():
            return defer.ensureDeferred(self._with_new_association(target, job, body, kind))
        assoc = self.pool.take_idle(target, kind)
        if assoc is None:
            return defer.ensureDeferred(self._with_new_association(target, job, body, kind, slot_held=True))
        try:
            ran = body(assoc)
            d = ran if isinstance(ran, defer.Deferred) else defer.ensureDeferred(ran)
        except Exception:  # noqa: BLE001 - answered below like the body's own failure
            d = defer.fail()
        return self._pooled_done(d, target, assoc, kind, job, body)

    def _pooled_done(self, d: defer.Deferred, target, assoc, kind, job, body) -> defer.Deferred:
        """*d*, a job's *body* running on *assoc* (a pooled association, its slot held): the
        association given back and the slot freed when it ends; a pooled association the
        PACS had closed, found dead before any result, is replaced once by a fresh one."""
        limit = self.pool.limit

        def done(reusable):
            self.pool.give_back(target, assoc, reusable, kind)
            limit.release()

        def failed(failure):
            self.pool.give_back(target, assoc, False)
            if failure.check(AssociationAborted) and job.items == 0:
                # A pooled association the PACS had closed: once more on a fresh one, slot still held.
                return defer.ensureDeferred(self._with_new_association(target, job, body, kind, slot_held=True,
                                                                       after=failure.value))
            limit.release()
            if failure.check(AssociationAborted):
                raise _lost(target, failure.value)
            return failure

        return d.addCallbacks(done, failed)

    def find_ahead(self, data: bytes, syntax: str, level: str, model: str | None) -> FindAhead | None:
        """Send a C-FIND of *data* (an identifier in the DIMSE client's *syntax*, at *level*)
        now, before the pipeline runs (:class:`FindAhead`), when this backend surely sends
        it so: the pool of one target without routing rules, that target healthy (what
        ``TargetPool.choose`` checks for a pool of one), a slot free and an idle query
        association at hand.  ``None``: the usual way (the caller runs the pipeline alone)."""
        pool = self.target_pool
        if len(pool.targets) != 1 or pool.rules or level not in LEVELS:
            return None
        model = (model or "study").lower()
        if model not in net.QUERY_MODELS:
            return None
        target = pool.targets[0]
        limit = self.pool.limit
        if not target.healthy or not limit.take():
            return None
        assoc = self.pool.take_idle(target, QUERY)
        if assoc is None:
            limit.release()
            return None
        try:
            known = self._find_known(assoc, model, syntax)
            msg_id = self._next_msg_id()
            identifier = data if known[2] == syntax else datasets.encode_relayed(  # as received, in its syntax
                datasets.ReceivedIdentifier(data, syntax), known[2])
            answered = assoc.request(known[1], commands.encode_with_id(known[3], "MessageID", msg_id), identifier,
                                     on_pending_data=_ignore, message_id=msg_id)
        except Exception:  # noqa: BLE001 - the usual way then, which meets (and answers) it again
            self.pool.give_back(target, assoc, False)
            limit.release()
            return None
        return FindAhead(self, target, assoc, known, msg_id, answered)

    def _with_ahead(self, ahead: FindAhead, job, body) -> defer.Deferred:
        """:meth:`_with_association` for a C-FIND already sent (:class:`FindAhead`): its
        slot and association are held; the pooled association found dead before any
        result is replaced once by a fresh one, as there."""
        ahead.adopted = True
        return self._pooled_done(self._find_adopted(ahead, job), ahead.target, ahead.assoc, QUERY, job, body)

    async def _with_new_association(self, target, job, body, kind=ALL, slot_held=False, after=None):
        """:meth:`_with_association` when it must wait for a slot (``slot_held``: it has one)
        or connect: a fresh association (*after*: the pooled one failed with that, so
        only a fresh one is tried, and its failure is final)."""
        limit = self.pool.limit
        if not slot_held and not limit.take():
            await limit.wait()
        if job.cancel_requested.called:
            # Cancelled while waiting for an association slot: the PACS was never asked.
            limit.release()
            job.finish(dimse.CANCEL)
            return
        try:
            assoc = self.pool.take_idle(target, kind) if after is None else None
            reused = assoc is not None
            if assoc is None:
                assoc = await self.pool.connect(target, kind=kind)
            try:
                if job.cancel_requested.called:
                    # Cancelled while the association was negotiated: nothing to ask the PACS.
                    job.finish(dimse.CANCEL)
                    reusable = True
                else:
                    reusable = await body(assoc)
            except AssociationAborted as e:
                self.pool.give_back(target, assoc, False)
                if not (reused and job.items == 0):
                    raise _lost(target, e) from None
                assoc = await self.pool.connect(target, kind=kind)
                try:
                    reusable = await body(assoc)
                except AssociationAborted as e2:
                    self.pool.give_back(target, assoc, False)
                    raise _lost(target, e2) from None
            except BaseException:
                self.pool.give_back(target, assoc, False)
                raise
            self.pool.give_back(target, assoc, reusable, kind)
        finally:
            limit.release()

    def _context(self, assoc, sop_class, syntax=None) -> int:
        """The accepted context for *sop_class*, in *syntax* if one was accepted in it
        (worked out once per association: a pooled one answers many requests)."""
        key = ("context", sop_class, syntax)
        cid = assoc.memo.get(key)
        if cid is None:
            cid = assoc.memo[key] = self._find_context(assoc, sop_class, syntax)
        return cid

    def _find_context(self, assoc, sop_class, syntax) -> int:
        found = None
        for cid, cx in assoc.contexts.items():
            if str(cx.abstract_syntax) == str(sop_class):
                if syntax is None or str(cx.transfer_syntax[0]) == syntax:
                    return cid
                if found is None:
                    found = cid
        if found is not None:
            return found
        raise BackendUnavailable(f"the PACS did not accept {sop_class} on the association")

    def _next_msg_id(self) -> int:
        return next(self._msg_ids) % 65535 + 1

    async def _echo(self, assoc, job, _identifier, _model):
        cid = self._context(assoc, net.Verification)
        response = await assoc.request(cid, {"AffectedSOPClassUID": str(net.Verification),
                                             "CommandField": commands.C_ECHO_RQ})
        job.finish(response.command.get("Status"))
        return True

    def _cancel_on(self, assoc, job, cid, sop_class, msg_id):
        """Send C-CANCEL when the consumer cancels the stream; the result says whether it was sent."""
        sent = []

        def cancel(_):
            if assoc.state == ESTABLISHED:
                sent.append(True)
                assoc.send(cid, {"CommandField": commands.C_CANCEL_RQ, "MessageIDBeingRespondedTo": msg_id})
        job.cancel_requested.addCallback(cancel)
        return sent

    def _find(self, assoc, job, identifier, model) -> defer.Deferred:
        """The C-FIND on *assoc*; fires with whether the association may be reused.  Plain
        callbacks, not a coroutine: it runs on every proxied C-FIND before the request is out."""
        wanted = job.request.metadata.get("dimse_transfer_syntax")
        sop_class, cid, syntax, fields = self._find_known(assoc, model, wanted)
        msg_id = self._next_msg_id()
        command = commands.encode_with_id(fields, "MessageID", msg_id)
        answered = assoc.request(cid, command, datasets.encode_relayed(identifier, syntax), on_pending_data=_ignore,
                                 message_id=msg_id)
        return self._find_answers(assoc, job, (sop_class, cid, syntax, fields), msg_id, answered)

    def _find_adopted(self, ahead: FindAhead, job) -> defer.Deferred:
        """:meth:`_find` for a C-FIND already sent (:class:`FindAhead`): only its answers are taken."""
        return self._find_answers(ahead.assoc, job, ahead.known, ahead.msg_id, ahead.answered)

    def _find_known(self, assoc, model, wanted) -> tuple:
        """``(sop_class, context id, syntax, command fields)`` of a C-FIND on *assoc* for a client
        querying in *wanted* (worked out once per association, query model and syntax)."""
        key = ("find", model, wanted)
        known = assoc.memo.get(key)
        if known is None:
            sop_class = net.QUERY_MODELS[model][C_FIND]
            # The syntax of the DIMSE client behind this request (dicom_scp says), so
            # its matches can go back to it as the PACS sent them.
            cid = self._context(assoc, sop_class, wanted)
            known = assoc.memo[key] = (sop_class, cid, str(assoc.contexts[cid].transfer_syntax[0]), (
                ("AffectedSOPClassUID", str(sop_class)), ("CommandField", commands.C_FIND_RQ), ("Priority", 0),
                ("CommandDataSetType", commands.HAS_DATASET)))
        return known

    def _find_answers(self, assoc, job, known, msg_id, answered) -> defer.Deferred:
        """The C-FIND request *msg_id*, sent on *assoc*: its matches into *job*'s stream, a
        C-CANCEL when the stream is cancelled, its end; fires with whether *assoc* may be reused."""
        sop_class, cid, syntax, _fields = known
        cancelled = self._cancel_on(assoc, job, cid, sop_class, msg_id)

        def pending(data: bytes):
            # A match's bytes (the association makes no message for a match whose command
            # repeats the last one's: bench/dimse, C-FIND).
            if not job.stream.cancelled:
                job.put_encoded(data, syntax)

        def final(response):
            # On the call stack of the PACS's final response, not a coroutine step
            # later: the client's final response goes out with it.
            job.finish(response.command.get("Status"), response.command.get("ErrorComment"))
            return not cancelled

        assoc.hand_pending_data(msg_id, pending)
        answered.addCallback(final)
        listener = job.request.state.dicom.results_listener
        if listener is not None:
            listener(job.stream)   # the request is out: its matches may go to the client as they come
        return answered

    async def _retrieve(self, assoc, job, identifier, sop_class, msg_id, extra=None):
        cid = self._context(assoc, sop_class)
        syntax = str(assoc.contexts[cid].transfer_syntax[0])
        cancelled = self._cancel_on(assoc, job, cid, sop_class, msg_id)
        command = {"AffectedSOPClassUID": str(sop_class), "CommandField": extra.pop("CommandField"),
                   "MessageID": msg_id, "Priority": 0, **extra}
        response = await assoc.request(cid, command, datasets.encode_relayed(identifier, syntax),
                                       on_pending=lambda m: job.counts(m.command))
        final = response.command
        job.counts(final)
        failed = []
        if response.dataset:
            try:
                ds = datasets.decode(response.dataset, syntax)
                value = ds.get("FailedSOPInstanceUIDList")
                if value:
                    failed = [str(v) for v in (value if isinstance(value, (list, tuple)) or hasattr(
                        value, "__iter__") and not isinstance(value, str) else [value])]
            except Exception:  # noqa: BLE001 - the list is informative only
                pass
        await job.arrivals   # every received instance handed over before the stream ends
        job.finish(final.get("Status"), final.get("ErrorComment"), failed)
        return not cancelled

    def job_for(self, assoc, command):
        job = self._gets.get(id(assoc))
        if job is not None:
            return job
        originator = command.get("MoveOriginatorMessageID")
        job = self._moves.get(originator) if originator else None
        if job is None and len(self._moves) == 1:
            job = next(iter(self._moves.values()))
        return job

    async def _get(self, assoc, job, identifier, model):
        msg_id = self._next_msg_id()
        self._gets[id(assoc)] = job
        try:
            return await self._retrieve(assoc, job, identifier, net.QUERY_MODELS[model][C_GET], msg_id,
                                        {"CommandField": commands.C_GET_RQ})
        finally:
            self._gets.pop(id(assoc), None)

    async def _move_here(self, assoc, job, identifier, model):
        if self.incoming_store_port is None:
            raise BackendUnavailable("C-MOVE needs incoming_store_port (a C-STORE SCP to receive on)")
        msg_id = self._next_msg_id()
        self._moves[msg_id] = job
        try:
            self._start_store_scp()
            return await self._retrieve(assoc, job, identifier, net.QUERY_MODELS[model][C_MOVE], msg_id,
                                        {"CommandField": commands.C_MOVE_RQ, "MoveDestination": self.local_aet})
        finally:
            self._moves.pop(msg_id, None)
            if not self._moves and not self.persistent_store_scp:
                self._stop_store_scp()

    async def _move_elsewhere(self, assoc, job, identifier, model):
        return await self._retrieve(assoc, job, identifier, net.QUERY_MODELS[model][C_MOVE], self._next_msg_id(),
                                    {"CommandField": commands.C_MOVE_RQ,
                                     "MoveDestination": job.request.metadata["move_destination"]})

    # ------------------------------------------------------------------ C-MOVE receiver

    def _start_store_scp(self):
        """Listen for C-MOVE arrivals unless already listening."""
        if self._store_scp is not None:
            return
        contexts = [build_context(cx.abstract_syntax, net.ALL_SYNTAXES) for cx in AllStoragePresentationContexts]
        contexts.append(build_context(net.Verification, net.UNCOMPRESSED))
        limits = AcceptorLimits(max_associations=64, max_pdu=self.settings.max_pdu,
                                dimse_timeout=self.settings.dimse_timeout,
                                network_timeout=self.settings.network_timeout)
        settings = AcceptorSettings(self.local_aet, contexts, limits, require_called_aet=False)
        factory = AcceptorFactory(settings, _Receiver(self, self.job_for), self.reactor)
        try:
            self._store_scp = self.reactor.listenTCP(self.incoming_store_port, factory, backlog=64,
                                                     interface=self.incoming_store_bind)
        except Exception as e:
            raise BackendUnavailable(f"cannot listen for C-MOVE arrivals on port {self.incoming_store_port}: "
                                     f"{e}") from None
        self._store_factory = factory

    def _stop_store_scp(self):
        port, self._store_scp = self._store_scp, None
        if port is not None:
            port.stopListening()
            for assoc in list(self._store_factory.settings.associations):
                assoc.release()

    # ------------------------------------------------------------------ C-STORE

    async def _store_request(self, request):
        """C-STORE ``state.dicom.instance``, or a Part-10 request body spooled to staging."""
        instance = request.state.dicom.instance
        spooled = instance is None
        if spooled:
            if isinstance(request.body, (bytes, bytearray)):
                if not request.body:
                    raise BadRequest("C-STORE needs a DICOM instance (application/dicom body)")
                path = await blocking.run(self.reactor, _write_temp, self.staging, bytes(request.body))
            else:
                path = await _spool(request.body, self.staging)
            try:
                instance = await blocking.run(self.reactor, read_instance, path, True)
            except Exception:
                os.unlink(path)
                raise BadRequest("the body is not a readable DICOM Part-10 instance") from None
        try:
            return await self.target_pool.call(request, lambda target: defer.ensureDeferred(
                self._store_to(target, request, instance)))
        finally:
            if spooled:
                instance.release()

    async def _store_to(self, target, request, instance):
        """C-STORE on a pooled association.  A (SOP class, transfer syntax) pair
        the pool does not propose is learned and the instance sent on a fresh
        association that proposes it; a syntax the PACS refuses is decompressed,
        or fails with 0xC003 and a comment naming it (harmony.dicom.transfer)."""
        job = Job(C_STORE, request)
        pair = (instance.sop_class_uid, instance.transfer_syntax_uid)
        unproposed = []

        async def body(assoc, may_learn=True):
            if may_learn and not storage.accepts_as_stored(assoc, *pair) and not self.pool.proposes(*pair):
                unproposed.append(pair)
                return False  # not pooled: its contexts are about to be out of date
            if any(str(cx.abstract_syntax) == instance.sop_class_uid for cx in assoc.contexts.values()):
                status = await storage.c_store(assoc, instance, self.reactor)
            else:
                status = await self._store_alone(target, instance)
            job.finish(status, storage.comment_for(status, instance))
            return True

        async def store():
            await self._with_association(target, job, body)
            if unproposed:
                self.pool.learn(*pair)
                await self._with_association(target, job, lambda assoc: body(assoc, may_learn=False))

        d = defer.ensureDeferred(store())
        d.addErrback(job.failed)
        await job.ready
        return self.respond(job)

    async def _store_alone(self, target, instance) -> int:
        """A storage class outside the pooled association's 128 contexts (or one the
        PACS did not accept there): a one-off association just for it."""
        assoc = await self.pool.connect(target, transfer.contexts_for(instance.sop_class_uid,
                                                                       instance.transfer_syntax_uid))
        try:
            if not assoc.contexts:
                raise BackendUnavailable(f"the PACS does not accept SOP class {instance.sop_class_uid}")
            return await storage.c_store(assoc, instance, self.reactor)
        finally:
            if assoc.state == ESTABLISHED:
                assoc.release()


def _memory_staging(name: str, storage_path) -> Path | None:
    """A folder on /dev/shm for retrieved instances in flight, when it is there and writable:
    one per Harmony storage path and backend, as the disk one (a process that died leaves
    its files to the next that stages there, as files.Staging does on disk)."""
    if storage_path is None or not (SHM.is_dir() and os.access(SHM, os.W_OK | os.X_OK)):
        return None
    owner = hashlib.sha256(str(Path(storage_path).resolve()).encode()).hexdigest()[:16]
    return SHM / f"harmony-{os.getuid()}" / owner / "dimse-staging" / name


def _remove_empty(folder: Path, stop: Path) -> None:
    """Remove *folder* and its parents up to *stop* while they are empty (others may still use them)."""
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _relayed_identifier(request, doc):
    """The identifier exactly as a DIMSE client sent it (``dicom_scp`` keeps it in
    ``state.dicom.received_identifier``), as long as no middleware changed the request's
    DICOM JSON since: sent on unchanged (no JSON -> Dataset -> bytes, ~20 % of a
    proxied C-FIND's CPU); ``None`` otherwise."""
    kept = request.state.dicom.received_identifier
    if kept is None:
        return None
    data, syntax, snapshot = kept
    level = request.metadata.get("query_level")
    if not request.normalized_read():
        # Never read, so never changed: dicom_scp read its level from these bytes.
        return datasets.ReceivedIdentifier(data, syntax) if level in LEVELS else None
    if not isinstance(doc, dict):
        return None
    try:
        # No snapshot: the pipeline had no middleware that could change it.
        unchanged = snapshot is None or json.dumps(doc) == snapshot
    except (TypeError, ValueError):
        return None
    if not unchanged or level not in LEVELS or doc.get("00080052", {}).get("Value") != [level]:
        return None
    return datasets.ReceivedIdentifier(data, syntax)


def _encoded_identifier(md, doc):
    """A DICOM JSON identifier of the common shape (flat ASCII text, the level in it
    as in metadata: the DICOMweb bridge's C-FIND) encoded straight to bytes, as a
    received identifier: JSON -> pydicom Dataset -> bytes was a fifth of a QIDO-RS
    request's CPU.  ``None`` for anything else (pydicom does it, and validates)."""
    level = md.get("query_level")
    if level not in LEVELS or not isinstance(doc, dict) or (doc.get("00080052") or {}).get("Value") != [level]:
        return None
    data = datasets.identifier_bytes(doc, IMPLICIT_LE)
    return None if data is None else datasets.ReceivedIdentifier(data, IMPLICIT_LE)


def _lost(target, error: AssociationAborted) -> HarmonyError:
    """What an association that ended under an operation means for the pipeline."""
    if "timeout" in str(error).lower():
        return BackendTimeout(str(error))
    return BackendUnavailable(f"PACS {target.aet}: {error}")


def _pairs_of(contexts) -> set:
    return {(str(cx.abstract_syntax), str(ts)) for cx in contexts for ts in cx.transfer_syntax}


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except (FileNotFoundError, TypeError):
        pass


def _write_temp(staging: Staging, data: bytes):
    staging.ensure()
    path = staging.new_path()
    with open(path, "wb") as f:
        f.write(data)
    return path


def _spool(producer, staging: Staging) -> defer.Deferred:
    """Write a streamed request body to a staging file (fires with its path)."""
    staging.ensure()
    path = staging.new_path()
    f = open(path, "wb")
    size = [0]

    class Sink:
        def write(self, data):
            size[0] += len(data)
            if size[0] > STORE_BODY_LIMIT:
                raise BadRequest("the instance is too large")
            f.write(data)

        def registerProducer(self, producer, streaming):
            pass

        def unregisterProducer(self):
            pass

    def done(result):
        f.close()
        if isinstance(result, Failure):
            os.unlink(path)
            return result
        return path

    return producer.startProducing(Sink()).addBoth(done)


__all__ = ["DicomScuBackend"]
