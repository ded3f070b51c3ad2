"""``dicom_scp`` endpoint: Harmony as a DICOM application entity (SCP).

A Twisted service listening with :mod:`harmony.dicom.ul` -- associations
carried by the reactor, no thread per association.  Each DIMSE request
becomes a :class:`RequestEnvelope` (``protocol = dimse``, the identifier as
DICOM JSON in ``normalized``) and goes through the pipeline, so auth,
transforms and filters apply to DIMSE traffic as to HTTP.  The backend answers
with a :class:`~harmony.dicom.results.ResultStream`; the service handlers
(:class:`ScpServices`, one coroutine per DIMSE service) turn it back into
DIMSE *as it fills*: a pending C-FIND response per match, a C-STORE
sub-operation per retrieved instance.  A C-STORE data set is written to a
Part-10 file while it arrives; reading it (validation) happens on the DICOM
thread pool (:mod:`harmony.dicom.blocking`), never on the reactor -- except a
small instance stored into ``storage_dir`` alone, which is held in memory,
checked from its bytes and handed to the folder's journal whole
(:meth:`ScpServices._store_held`).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AllStoragePresentationContexts, build_context
from pynetdicom.sop_class import Verification
from twisted.application.service import Service
from twisted.internet import defer, fdesc
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread
from zope.interface import implementer, provider

from harmony.config.errors import OptionError
from harmony.dicom import blocking, charset, net
from harmony.dicom import status as dimse
from harmony.dicom.dicomjson import identifier_to_json
from harmony.dicom.files import Staging, check_complete, durable_move, parse_stamped, read_instance, valid_uid
from harmony.dicom.rawscan import ScanDeclined, scan_bytes, scan_file
from harmony.dicom.render import release_rest
from harmony.dicom.results import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE, DicomInstance
from harmony.dicom.uids import strip_padding
from harmony.dicom.ul import commands, datasets, storage
from harmony.dicom.ul.acceptor import (
    AcceptorFactory,
    AcceptorLimits,
    AcceptorSettings,
    BalancedPort,
    SharedAssociationCount,
    adopt_balanced,
    listen_balanced,
)
from harmony.dicom.ul.association import AssociationAborted, AssociationRejected
from harmony.dicom.ul.requestor import RequestorSettings, associate
from harmony.dicom.ul.tls import server_options
from harmony.envelope import MadeOnRead, RequestEnvelope, ResponseEnvelope, new_request_id
from harmony.errors import (
    AuthenticationFailed,
    BackendTimeout,
    BadRequest,
    Forbidden,
    HarmonyError,
    InsufficientStorage,
    PayloadTooLarge,
    mark_client_gone,
)
from harmony.interfaces import IComponentFactory, IEndpoint
from harmony.log import get_logger
from harmony.state import DicomRequestFacts, RequestState
from harmony.storage.journal import FolderJournal

log = get_logger("harmony.endpoints.dicom_scp")

#: Status when a request's pipeline gives no DICOM results at all.
NO_RESULTS = dimse.UNABLE_TO_PROCESS
CANCELLED = object()
#: Largest C-STORE data set accepted by default (a large multi-frame study object fits; a 4 GiB claim does not).
DEFAULT_MAX_DATASET_BYTES = 4 * 1024 ** 3 - 1
#: Largest maximum PDU length we advertise (and accept).
MAX_PDU_LIMIT = 16 * 1024 * 1024

_RESPONSE_OF = {commands.C_FIND_RQ: commands.C_FIND_RSP, commands.C_GET_RQ: commands.C_GET_RSP,
                commands.C_MOVE_RQ: commands.C_MOVE_RSP, commands.C_STORE_RQ: commands.C_STORE_RSP,
                commands.C_ECHO_RQ: commands.C_ECHO_RSP}
_OPERATION_OF = {commands.C_FIND_RQ: C_FIND, commands.C_GET_RQ: C_GET, commands.C_MOVE_RQ: C_MOVE,
                 commands.C_STORE_RQ: C_STORE, commands.C_ECHO_RQ: C_ECHO}
#: The ScpServices method serving each request (``on_find`` ...).
_HANDLER_OF = {field: f"on_{name[2:].lower()}" for field, name in _OPERATION_OF.items()}


#: Staging files a dicom_scp keeps created ahead for the next C-STOREs.
SPARE_STAGED_FILES = 8
#: A C-STORE data set up to this size, into a backend that files it from its bytes
#: (:meth:`DicomScpEndpoint.checked_downstream`), is kept in memory rather than
#: staged to a file (:class:`SpoolingSink`); the store's journal takes instances
#: up to the same size (harmony.storage.store.JOURNAL_MAX_BYTES) in its commit.
IN_MEMORY_BYTES = 256 * 1024


def dimse_status_for(error: HarmonyError, op: str) -> int:
    """The PS3.4 failure status a proxy error becomes on a DIMSE association."""
    if isinstance(error, BackendTimeout) or error.status == 504:
        return dimse.UNABLE_TO_PROCESS_TIMEOUT
    if isinstance(error, (InsufficientStorage, PayloadTooLarge)):
        return dimse.STORE_OUT_OF_RESOURCES if op == C_STORE else dimse.OUT_OF_RESOURCES_SUBOPS if op in (
            C_GET, C_MOVE) else dimse.OUT_OF_RESOURCES
    if isinstance(error, (Forbidden, AuthenticationFailed)):
        return dimse.REFUSED_NOT_AUTHORISED if op == C_STORE else dimse.UNABLE_TO_PROCESS
    if isinstance(error, BadRequest) or error.status in (400, 422):
        if op == C_STORE:
            # A store's refusal may name its own (the data set is not the instance it was sent as: 0xA900).
            return getattr(error, "dimse_status", None) or dimse.STORE_CANNOT_UNDERSTAND
        return dimse.IDENTIFIER_MISMATCH
    if error.status in (502, 503):
        return dimse.UNABLE_TO_PROCESS_BACKEND
    return dimse.PROCESSING_FAILURE if op == C_STORE else dimse.UNABLE_TO_PROCESS


def _comment(text: str | None) -> str | None:
    if not text:
        return None
    return text.encode("ascii", "replace").decode("ascii")[:64]


@implementer(IEndpoint)
@provider(IComponentFactory)
class DicomScpEndpoint(Service):
    transport = "dimse"
    protocol = "dimse"

    def __init__(self, name, reactor, *, local_aet, bind_addr="0.0.0.0", port=11112, enable_echo=True,
                 enable_find=False, enable_get=False, enable_move=False, enable_store=False, storage_dir=None,
                 forward_store=None, allowed_calling_aets=None, move_destinations=None, max_associations=10,
                 max_pdu_size=65536, acse_timeout=30.0, dimse_timeout=30.0, network_timeout=60.0,
                 request_timeout=300.0, tls=None, max_connections=512, max_connections_per_source=128,
                 max_dataset_bytes=DEFAULT_MAX_DATASET_BYTES, backlog=128, staging_dir=None):
        self.name = name
        self.reactor = reactor
        self.local_aet = local_aet
        self.bind_addr = bind_addr
        self.port = port
        self.enabled = {C_ECHO: enable_echo, C_FIND: enable_find, C_GET: enable_get, C_MOVE: enable_move,
                        C_STORE: enable_store}
        self.storage_dir = storage_dir
        #: Files into storage_dir go through a journal: one cheap flush before Success, not two in a row.
        self.storage_journal = FolderJournal(Path(storage_dir)) if storage_dir is not None else None
        self.forward_store = storage_dir is None if forward_store is None else forward_store
        self.allowed_calling_aets = allowed_calling_aets
        self.move_destinations = move_destinations or {}
        self.limits = AcceptorLimits(max_associations=max_associations, max_connections=max_connections,
                                     max_connections_per_source=max_connections_per_source,
                                     max_pdu=max_pdu_size, acse_timeout=acse_timeout, dimse_timeout=dimse_timeout,
                                     network_timeout=network_timeout, backlog=backlog)
        self.max_dataset_bytes = max_dataset_bytes
        self.request_timeout = request_timeout
        self.tls = tls
        self.staging = Staging(Path(staging_dir) if staging_dir else Path("dicom_scp-staging") / name)
        #: Set by HarmonyService from the pipeline that names this endpoint.
        self.pipeline = None
        #: (middleware, backends, answer) of checked_downstream, for the lists it was asked of.
        self._downstream_known: tuple | None = None
        self.factory = None
        self.listening = None
        #: In a worker process: (fd, family, count fd, slots, slot) of the main
        #: process's listening socket and association count (harmony.workers).
        self.inherited: tuple | None = None
        #: Associations of this listener across every process sharing it.
        self.shared_count: SharedAssociationCount | None = None
        self.services = ScpServices(self)
        #: Every operation's deadline on one timer (the pipeline's answer, a backend silent mid-stream).
        self.deadlines = Deadlines(reactor)

    @classmethod
    def from_config(cls, name, options, ctx):
        dests = {}
        for aet, where in (options.table("move_destinations", None) or {}).items():
            if isinstance(where, str) and ":" in where:
                host, _, port = where.rpartition(":")
                where = {"host": host, "port": port}
            if not isinstance(where, dict) or "host" not in where or "port" not in where:
                raise OptionError(f"move_destinations.{aet}", "must be {host = ..., port = ...} or 'host:port'")
            try:
                port = int(where["port"])
            except (TypeError, ValueError):
                raise OptionError(f"move_destinations.{aet}.port",
                                  f"must be a port number, got {where['port']!r}") from None
            if len(aet) > 16 or not aet.isascii():
                raise OptionError("move_destinations", f"{aet!r} is not an AE title")
            dests[aet] = (str(where["host"]), port)
        allowed = options.list("allowed_calling_aets", None)
        tls = None
        if "tls_cert" in options or "tls_key" in options:
            cert, key = options.path("tls_cert"), options.path("tls_key")
            try:
                tls = server_options(cert, key, options.path("tls_ca", None))
            except Exception as e:  # noqa: BLE001 - OpenSSL and PEM parsing raise many types
                raise OptionError("tls_cert", f"cannot load the certificate/key: {e}") from None
        storage_dir = options.path("storage_dir", None)
        enable_store = options.bool("enable_store", False)
        forward = options.bool("forward_store", None) if "forward_store" in options else None
        staging = options.path("staging_dir", None)
        if staging is None and storage_dir is not None:
            # Beside the store, on its file system: storing a received instance is then a rename.
            staging = Path(storage_dir) / ".staging"
        elif staging is None and ctx.storage_path is not None:
            staging = Path(ctx.storage_path) / "dicom_scp-staging" / name
        return cls(
            name, ctx.reactor, local_aet=net.check_aet(options, "local_aet"),
            # All interfaces, as Harmony's own dicom_scp does (issue 4, and configs
            # written for it must keep working): modalities must reach a DICOM node.
            # Restrict callers with allowed_calling_aets; the default etc/ config binds loopback.
            bind_addr=options.str("bind_addr", "0.0.0.0"), port=options.port("port", 11112),
            enable_echo=options.bool("enable_echo", True), enable_find=options.bool("enable_find", False),
            enable_get=options.bool("enable_get", False), enable_move=options.bool("enable_move", False),
            enable_store=enable_store, storage_dir=storage_dir, forward_store=forward,
            allowed_calling_aets=[a.strip() for a in allowed] if allowed else None,
            move_destinations=dests,
            max_associations=options.int("max_associations", 10, minimum=1, maximum=10000),
            max_connections=options.int("max_connections", 512, minimum=1, maximum=100000),
            max_connections_per_source=options.int("max_connections_per_source", 128, minimum=1, maximum=100000),
            # 0 meant "unlimited" under pynetdicom; a peer must never be allowed an
            # unlimited PDU, so it now means the largest we accept.
            max_pdu_size=options.int("max_pdu_size", 65536, minimum=0, maximum=MAX_PDU_LIMIT) or MAX_PDU_LIMIT,
            max_dataset_bytes=options.int("max_dataset_bytes", DEFAULT_MAX_DATASET_BYTES, minimum=1024),
            backlog=options.int("backlog", 128, minimum=1, maximum=65535),
            acse_timeout=options.number("acse_timeout_secs", 30.0, minimum=0.01),
            dimse_timeout=options.number("dimse_timeout_secs", 30.0, minimum=0.01),
            network_timeout=options.number("network_timeout_secs", 60.0, minimum=0.01),
            request_timeout=options.number("request_timeout_secs", 300.0, minimum=0.01),
            tls=tls, staging_dir=staging,
        )

    # ------------------------------------------------------------------ service

    @property
    def listen_description(self) -> str:
        tls = "+tls" if self.tls is not None else ""
        return f"dimse{tls}:{self.bind_addr}:{self.port} aet={self.local_aet}"

    @property
    def bound_port(self) -> int | None:
        return self.listening.getHost().port if self.listening is not None else None

    @property
    def bound_address(self) -> tuple[str, int] | None:
        if self.listening is None:
            return None
        host = self.listening.getHost()
        return host.host, host.port

    def supported_contexts(self) -> list:
        contexts = []
        if self.enabled[C_ECHO]:
            contexts.append(build_context(Verification, net.UNCOMPRESSED))
        for model in net.QUERY_MODELS.values():
            for op in (C_FIND, C_GET, C_MOVE):
                if self.enabled[op]:
                    contexts.append(build_context(model[op], net.UNCOMPRESSED))
        if self.enabled[C_STORE] or self.enabled[C_GET]:
            for cx in AllStoragePresentationContexts:
                context = build_context(cx.abstract_syntax, net.ALL_SYNTAXES)
                if self.enabled[C_GET]:
                    # A C-GET requestor proposes to be the storage SCP for our
                    # sub-operations; accepting that role needs both flags.
                    context.scu_role = True
                    context.scp_role = True
                contexts.append(context)
        return contexts

    def startService(self):
        super().startService()
        settings = AcceptorSettings(self.local_aet, self.supported_contexts(), self.limits,
                                    allowed_calling_aets=self.allowed_calling_aets,
                                    honour_compressed_preference=self.enabled[C_GET])
        self.factory = AcceptorFactory(settings, self.services, self.reactor)
        if self.enabled[C_STORE]:
            try:
                self.staging.ensure()
            except OSError as e:
                # Still serve echo/find/get; each C-STORE is refused with Out of Resources.
                log.error("dicom_scp {name}: cannot create its staging folder {path}: {error}", name=self.name,
                          path=str(self.staging.base), error=e.strerror)
            if self.storage_journal is not None:
                if self.storage_journal.closed:  # started again after a stop
                    self.storage_journal = FolderJournal(self.storage_dir)
                try:
                    self.storage_journal.open()  # what a crash left journaled is written again first
                except OSError as e:
                    log.error("dicom_scp {name}: cannot open the journal of storage_dir {path}: {error}",
                              name=self.name, path=str(self.storage_dir), error=e.strerror)
                else:
                    # The reactor journals held instances itself, through an io_uring (no writer
                    # thread between it and the disk; harmony.storage.journal), where it can.
                    self.storage_journal.use_ring(self.reactor)
        if self.inherited is not None:
            self._adopt(*self.inherited)
            return
        try:
            self.listening = listen_balanced(self.reactor, self.port, self.factory, backlog=self.limits.backlog,
                                             interface=self.bind_addr, tls=self.tls)
        except Exception as e:
            log.critical("dicom_scp {name} cannot listen on {host}:{port}: {error}", name=self.name,
                         host=self.bind_addr, port=self.port, error=str(e))
            raise
        log.info("dicom_scp {name} listening on {host}:{port} as {aet}", name=self.name, host=self.bind_addr,
                 port=self.bound_port, aet=self.local_aet)

    # ------------------------------------------------------------------ worker processes

    def share(self, slots: int) -> tuple[int, int, int]:
        """Let worker processes serve this listener too (harmony.workers, main
        process): (listening fd, address family, shared count fd); from now on
        ``max_associations`` and the connection caps count the associations
        and connections of all *slots* processes (slot 0 is ours)."""
        if self.shared_count is None:
            self.shared_count = SharedAssociationCount.create(slots, self.limits.max_connections, self.reactor)
            self.factory.settings.share_counts(self.shared_count)
            if isinstance(self.listening, BalancedPort):
                self.listening.share(self.shared_count)
        return self.listening.fileno(), int(self.listening.socket.family), self.shared_count.fd

    def worker_ended(self, slot: int) -> None:
        """A worker process is gone: its associations and connections went with it (main process)."""
        if self.shared_count is not None:
            self.shared_count.clear(slot)

    def _adopt(self, fd: int, family: int, count_fd: int, slots: int, slot: int) -> None:
        """Serve the main process's listening socket (a worker process)."""
        factory = self.factory
        self.shared_count = SharedAssociationCount(count_fd, slots, slot, self.reactor)
        factory.settings.share_counts(self.shared_count)
        if self.tls is not None:
            factory = TLSMemoryBIOFactory(self.tls, False, factory)
        fdesc.setNonBlocking(fd)  # another process may take the connection first: never block in accept()
        self.listening = adopt_balanced(self.reactor, fd, socket.AddressFamily(family), factory, self.shared_count)
        os.close(fd)  # adoptStreamPort dup()s it
        log.info("dicom_scp {name} serving the shared {host}:{port} as {aet}", name=self.name,
                 host=self.bind_addr, port=self.bound_port, aet=self.local_aet)

    def stopService(self):
        super().stopService()
        listening, self.listening = self.listening, None
        waits = []
        if listening is not None:
            waits.append(defer.maybeDeferred(listening.stopListening))
        self.services.discard_spares()
        if self.factory is not None:
            for assoc in list(self.factory.settings.associations):
                assoc.abort("Harmony is stopping")
                waits.append(assoc.closed)
        done = defer.DeferredList(waits, consumeErrors=True)
        if self.storage_journal is not None:
            journal = self.storage_journal
            done.addCallback(lambda result: blocking.run(self.reactor, journal.close).addBoth(lambda _: result))
        return done

    # ------------------------------------------------------------------ pipeline glue

    def pre_process(self, request):
        return request

    def post_process(self, request, response):
        return response

    def error_response(self, error: HarmonyError, request):
        op = request.metadata.get("dimse_op", "")
        status = dimse_status_for(error, op)
        resp = ResponseEnvelope.json(error.status, {"dimse_status": status, "detail": error.detail})
        return dimse.record(resp, status, error.detail)

    def envelope(self, assoc, context, op: str, identifier: Dataset | dict | MadeOnRead | None = None,
                 received: bytes | None = None, **extra) -> RequestEnvelope:
        """The pipeline request for one DIMSE operation; *received*: the identifier's
        bytes as the client sent them, which a ``dicom_scu`` backend relays unchanged
        when no middleware changed ``normalized``."""
        fixed = self._fixed_metadata(assoc, context, op)
        md = fixed[0].copy()
        md["request_id"] = new_request_id()
        normalized: dict | MadeOnRead | None = None
        if isinstance(identifier, MadeOnRead):
            normalized = identifier   # its level came in extra (ScpServices.on_find)
        elif identifier is not None:
            # The identifier as DICOM JSON already (ScpServices.identifier), or a Dataset.
            doc = identifier if isinstance(identifier, dict) else identifier_to_json(identifier)
            normalized = doc
            level = (doc.get("00080052", {}).get("Value") or [""])[0]
            level = str(level or "").strip().upper()
            if level:
                md["query_level"] = level
        if extra:
            md.update({k: v for k, v in extra.items() if v is not None})
        received_identifier = None
        if received is not None and normalized is not None:
            # No middleware, nobody to change it before the backend: no snapshot to compare.
            pipeline = self.pipeline
            snapshot = None if pipeline is not None and not pipeline.middleware else json.dumps(normalized)
            received_identifier = (received, md["dimse_transfer_syntax"], snapshot)
        return RequestEnvelope(method="DIMSE", path=fixed[1], metadata=md, normalized=normalized, client_ip=fixed[2],
                               scheme=fixed[3], host=self.local_aet,
                               state=RequestState(dicom=DicomRequestFacts(association=assoc,
                                                                          received_identifier=received_identifier)))

    def _fixed_metadata(self, assoc, context, op: str) -> tuple:
        """(metadata, path, client address, scheme) every *op* on *context* of *assoc* shares:
        worked out once per association (a pooled client sends many requests on one),
        not per request (bench/dimse, C-FIND).  Callers copy the metadata."""
        key = ("envelope", self.name, context.context_id, op)
        fixed = assoc.memo.get(key)
        if fixed is None:
            md = {"protocol": "dimse", "endpoint": self.name, "dimse_op": op,
                  "calling_aet": assoc.calling_aet, "called_aet": assoc.called_aet,
                  "sop_class_uid": str(context.abstract_syntax),
                  # A dicom_scu backend queries in this syntax when it can, so that
                  # C-FIND matches pass through without being decoded.
                  "dimse_transfer_syntax": str(context.transfer_syntax[0])}
            model_op = net.MODEL_OF.get(md["sop_class_uid"])
            if model_op:
                md["query_model"] = model_op[0]
            fixed = assoc.memo[key] = (md, f"/{md['called_aet']}/{op}", str(assoc.peer_address[0]),
                                       "dimse+tls" if self.tls is not None else "dimse")
        return fixed

    def find_ahead(self, op, level: str):
        """A C-FIND sent to the PACS before the pipeline runs (``dicom_scu.FindAhead``), when
        the pipeline has no middleware and one backend that can send it now (``find_ahead``);
        else ``None``.  *level*: the identifier's Query/Retrieve Level, read from its bytes."""
        pipeline = self.pipeline
        if pipeline is None or pipeline.middleware or len(pipeline.backends) != 1:
            return None
        send = getattr(pipeline.backends[0], "find_ahead", None)
        if send is None:
            return None
        model = self._fixed_metadata(op.assoc, op.context, C_FIND)[0].get("query_model")
        return send(op.message.dataset, op.transfer_syntax, level, model)

    def header_has_readers(self) -> bool:
        """Whether a C-STORE's header as DICOM JSON (``request.normalized``) may be read: by
        middleware, or by a backend that does not say it never reads it
        (``reads_store_header = False``).  Making it cost ~40 % of a stored instance's CPU."""
        pipeline = self.pipeline
        return pipeline is None or bool(pipeline.middleware) or any(
            getattr(backend, "reads_store_header", True) for backend in pipeline.backends)

    def checked_downstream(self) -> bool:
        """Whether a received instance may go down the pipeline unparsed: nothing reads it
        on the way (no middleware) and every backend checks the file itself before filing
        it (``checks_received_instances``: the store parses it anyway).  Then the endpoint's
        own parse, a worker-thread hop per C-STORE, is skipped (bench/dimse "CPU per instance")."""
        pipeline = self.pipeline
        if pipeline is None:
            return False
        # Asked twice per C-STORE: the answer is kept for the pipeline's current lists
        # (a reload sets new ones, or a new pipeline).
        known = self._downstream_known
        if known is not None and known[0] is pipeline.middleware and known[1] is pipeline.backends:
            return known[2]
        checked = (self.forward_store and self.storage_dir is None and not pipeline.middleware
                   and bool(pipeline.backends)
                   and all(getattr(backend, "checks_received_instances", False) for backend in pipeline.backends))
        self._downstream_known = (pipeline.middleware, pipeline.backends, checked)
        return checked

    async def run_pipeline(self, env, op: Operation | None = None) -> ResponseEnvelope:
        """Run *env* through the pipeline, with a deadline; *op*'s C-CANCEL or
        hang-up cancels it (a hang-up first marks the request as its client's doing)."""
        return await self.start_pipeline(env, op)

    def start_pipeline(self, env, op: Operation | None = None) -> defer.Deferred:
        """:meth:`run_pipeline` without a coroutine: fires with the ResponseEnvelope."""
        if self.pipeline is None:
            return defer.succeed(self.error_response(HarmonyError("no pipeline serves this endpoint"), env))
        d = self.pipeline.handle(env, self)
        if op is not None:
            op.watch(env, d)
        return self.within_deadline(d, env)

    def within_deadline(self, d: defer.Deferred, env) -> defer.Deferred:
        """*d* (the pipeline running *env*), answered with a timeout error after ``request_timeout``.
        The deadline is an entry in the listener's one ``Deadlines`` timer, not a ``callLater``
        per operation (bench/dimse: C-FIND and C-STORE both pass here)."""
        if d.called:
            return d
        key = id(env)
        timed_out = []

        def expired():
            timed_out.append(True)
            d.cancel()

        def settled(result):
            self.deadlines.drop(key)
            if timed_out and isinstance(result, Failure) and result.check(defer.CancelledError):
                return self.error_response(BackendTimeout("the pipeline did not answer in time"), env)
            return result
        self.deadlines.set(key, self.request_timeout, expired)
        return d.addBoth(settled)

    def results_of(self, response):
        """(stream, None) or (None, (failure status, comment))."""
        stream = response.state.dicom_results
        if stream is None:
            # A backend that is not a DICOM one (or an error): never pass that
            # off as "success, no matches".
            status = NO_RESULTS if response.state.dimse_status is None else response.state.dimse_status
            comment = response.state.error_comment or "the pipeline gave no DICOM results"
            return None, (status, comment)
        if stream.done and dimse.is_failure(stream.status) and stream.total() == 0:
            return None, (stream.status if stream.status is not None else NO_RESULTS, stream.error_comment)
        return stream, None


class Deadlines:
    """The deadlines of a listener's operations in flight, watched by one timer.

    A ``callLater`` (or ``addTimeout``) per operation and a ``reset`` per match cost
    more than the rest of relaying a pooled C-FIND's match (bench/dimse).  Here an
    operation's deadline is a number in a dict: set, moved on and dropped without
    touching the reactor.  The one timer fires at the earliest deadline it was set
    for; entries that finished meanwhile are gone, those moved on are still waiting,
    and it is set again for the earliest of them -- with a fixed timeout about once
    per timeout, however many operations ran."""

    def __init__(self, reactor):
        self.reactor = reactor
        self._entries: dict = {}
        self._timer = None

    def set(self, key, seconds: float, on_expiry) -> None:
        """Call *on_expiry* unless *key* is moved on or dropped within *seconds*."""
        deadline = self.reactor.seconds() + seconds
        self._entries[key] = [deadline, on_expiry, seconds]
        self._arm(deadline)

    def move(self, key, seconds: float) -> None:
        """*key*'s deadline is now *seconds* from now (activity: a match came)."""
        entry = self._entries.get(key)
        if entry is not None:
            entry[0] = deadline = self.reactor.seconds() + seconds
            if seconds < entry[2]:
                # Moved sooner than the timer may be set for (a shorter timeout than it was
                # set with); with the same timeout it only moves later, and the timer finds
                # it still waiting when it fires (per match, no look at the timer).
                entry[2] = seconds
                timer = self._timer
                if timer is not None and timer.active() and timer.getTime() > deadline:
                    timer.reset(seconds)

    def drop(self, key) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)

    def _arm(self, deadline: float) -> None:
        timer = self._timer
        if timer is None or not timer.active():
            self._timer = self.reactor.callLater(max(deadline - self.reactor.seconds(), 0), self._expire)
        elif timer.getTime() > deadline:
            timer.reset(max(deadline - self.reactor.seconds(), 0))

    def _expire(self) -> None:
        self._timer = None
        now = self.reactor.seconds()
        expired = [key for key, (deadline, _call, _seconds) in self._entries.items() if deadline <= now]
        for key in expired:
            _deadline, call, _seconds = self._entries.pop(key)
            try:
                call()
            except Exception:
                log.failure("dicom_scp: an operation's timeout handler failed")
        if self._entries:
            self._arm(min(deadline for deadline, _call, _seconds in self._entries.values()))


class Operation:
    """One DIMSE request being served: its message, and a C-CANCEL that may arrive meanwhile."""

    def __init__(self, assoc, message, deadlines: Deadlines | None = None):
        self.assoc = assoc
        self.message = message
        #: The listener's :class:`Deadlines` (the relay's silence timer); ``None``: its own ``callLater``.
        self.deadlines = deadlines
        self.context = context = assoc.contexts[message.context_id]
        key = ("syntax", message.context_id)
        syntax = assoc.memo.get(key)   # pynetdicom's context properties, read once per association
        if syntax is None:
            syntax = assoc.memo[key] = str(context.transfer_syntax[0])
        self.transfer_syntax = syntax
        self._waiter: defer.Deferred | None = None
        #: A pending C-FIND response's command, encoded and framed once: ``(bytes, PDUs)``.
        self._pending_command: tuple[bytes, bytes] | None = None
        self._pipeline: tuple | None = None
        self.cancelled = False
        #: The final response was sent (:meth:`respond_final`).
        self.answered = False
        #: ``(stream, outcome)`` of the relay started before the pipeline answered (:meth:`relay_early`).
        self.early: tuple | None = None
        self._timing: tuple | None = None

    def watch(self, env, d: defer.Deferred) -> None:
        """*d*, the pipeline running *env*, is cancelled with the operation."""
        self._pipeline = (env, d)
        d.addBoth(self._unwatch)

    def _unwatch(self, result):
        self._pipeline = None
        return result

    def cancel(self, client_left: bool = False) -> None:
        """C-CANCEL arrived, or the association ended (*client_left*): the operation
        stops at its next item, and a pipeline still waiting for its first result
        is cancelled -- when the client left, as the client's doing, so a backend's
        target pool counts a client abort, never a failure of the PACS."""
        self.cancelled = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.called:
            waiter.callback(CANCELLED)
        if self._pipeline is not None:
            env, d = self._pipeline
            if client_left:
                mark_client_gone(env)
            d.cancel()

    def abandon(self, env, stream, client_left: bool = False) -> None:
        """The relay stops before *stream*'s end (C-CANCEL, the client left, the
        C-MOVE destination is unreachable): the backend is asked to stop and what it
        still sends is released.  A client that left (*client_left*, or the
        association is no longer established, whichever noticed first) is marked
        client-gone BEFORE the stream is cancelled: the target pool counts a client
        abort from that mark once the stream is abandoned (``ResultStream.when_abandoned``)."""
        if client_left or self.assoc.state != "established":
            mark_client_gone(env)
        stream.cancel()
        release_rest(stream)

    def respond(self, status: int, *, identifier: bytes | None = None, comment: str | None = None, **counts):
        command = {"AffectedSOPClassUID": self.message.command.get("AffectedSOPClassUID", str(
            self.context.abstract_syntax)), "CommandField": _RESPONSE_OF[self.message.field],
            "MessageIDBeingRespondedTo": self.message.message_id, "Status": status}
        if self.message.field == commands.C_STORE_RQ:
            command["AffectedSOPInstanceUID"] = self.message.command.get("AffectedSOPInstanceUID")
        command.update({k: v for k, v in counts.items() if v is not None})
        if comment and status not in (dimse.SUCCESS, dimse.PENDING, dimse.PENDING_WARNING):
            command["ErrorComment"] = _comment(comment)
        return self.assoc.send(self.message.context_id, command, identifier)

    def _response_fields(self, status: int, dataset: bool) -> tuple:
        command = self.message.command
        sop_class = command.get("AffectedSOPClassUID")
        if sop_class is None:   # not read from the context when the request says it (every real one)
            sop_class = str(self.context.abstract_syntax)
        return (("AffectedSOPClassUID", sop_class), ("CommandField", _RESPONSE_OF[command["CommandField"]]),
                ("Status", status), ("CommandDataSetType", commands.HAS_DATASET if dataset else commands.NO_DATASET))

    def respond_match(self, identifier: bytes) -> None:
        """A pending C-FIND response with *identifier*: the same command every time, encoded once."""
        pending = self._pending_command or self._frame_pending()
        # more: the next match, or the final response, follows; they go out together.
        self.assoc.post_framed(self.message.context_id, pending[0], pending[1], identifier, more=True)

    def _frame_pending(self) -> tuple[bytes, bytes]:
        """The pending response's command, encoded and framed (once per operation)."""
        command = commands.encode_with_id(self._response_fields(dimse.PENDING, True),
                                          "MessageIDBeingRespondedTo", self.message.message_id)
        pending = self._pending_command = (command, self.assoc.command_pdus(self.message.context_id, command))
        return pending

    def respond_final(self, status: int) -> None:
        """The final response of a C-FIND that ended without a comment to send (Success,
        or a failure the PACS gave none for), from an encoded template, at once."""
        self.answered = True
        self.assoc.post(self.message.context_id, commands.encode_with_id(
            self._response_fields(status, False), "MessageIDBeingRespondedTo", self.message.message_id))

    async def next(self, stream, timeout: float, reactor):
        """The stream's next item, :data:`CANCELLED` once the peer sent C-CANCEL or left,
        or :class:`BackendTimeout` when the backend is silent for *timeout* seconds.

        An item already queued is taken at once; otherwise one Deferred waits for
        whichever comes first (per match, a DeferredList and a callback on the
        association's end cost more than the rest of relaying it)."""
        if self.cancelled or self.assoc.state != "established":
            return CANCELLED
        item = stream.next()
        if item.called:
            return await item
        waiter = self._waiter = defer.Deferred()

        def arrived(result):
            if waiter.called:
                if isinstance(result, DicomInstance):
                    result.release()   # came after the wait ended: nobody will send it
            elif isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
            return None

        def silent():
            if not waiter.called:
                waiter.errback(BackendTimeout(f"no result from the backend for {timeout:g}s"))

        item.addBoth(arrived)
        timer = reactor.callLater(timeout, silent)
        try:
            return await waiter
        finally:
            if timer.active():
                timer.cancel()
            if self._waiter is waiter:
                self._waiter = None


    def relay_early(self, stream) -> None:
        """``state.dicom.results_listener``: relay *stream* from now on, before the
        pipeline's answer (see :meth:`ScpServices.on_find`); a stream that replaces an
        earlier one (the target pool retried elsewhere) takes over from it."""
        if self.early is not None:
            if self.early[0] is stream:
                return
            self.stop_early()
        timeout, reactor = self._timing
        outcome = self.relay_matches(stream, timeout, reactor)
        self.early = (stream, outcome)

    def stop_early(self) -> None:
        """Stop the early relay (the pipeline answered otherwise); its outcome is dropped."""
        early, self.early = self.early, None
        if early is not None:
            stream, outcome = early
            if not outcome.called:
                outcome.callback(CANCELLED)   # relay_matches' stop: unlisten, timer cancelled
            outcome.addErrback(lambda _: None)

    def relay_matches(self, stream, timeout: float, reactor) -> defer.Deferred:
        """Send each C-FIND match to the client the moment the backend puts it
        (:meth:`ResultStream.listen`: no Deferred, coroutine step or timer per
        match); fires with ``None`` at the stream's end, :data:`CANCELLED` once the
        peer sent C-CANCEL or left, or fails with the stream's failure or with
        :class:`BackendTimeout` when the backend is silent for *timeout* seconds."""
        done = self._waiter = defer.Deferred()
        syntax = self.transfer_syntax
        assoc = self.assoc
        context_id = self.message.context_id

        def relaying() -> bool:
            """Whether a match that came now is sent (the backend was heard: its silence timer restarts)."""
            if done.called:
                return False
            if assoc.state != "established":
                done.callback(CANCELLED)
                return False
            if deadlines is not None:
                deadlines.move(self, timeout)
            else:
                timer.reset(timeout)
            return True

        def on_encoded(data: bytes):
            # A match as the PACS sent it, in our syntax: on as those bytes -- what
            # on_match sends for a match nobody looked into, without a Dataset made.
            # relaying() and respond_match() inlined: this runs for every match.
            if done.called:
                return
            if assoc.state != "established":
                done.callback(CANCELLED)
                return
            if deadlines is not None:
                deadlines.move(self, timeout)
            else:
                timer.reset(timeout)
            pending = self._pending_command or self._frame_pending()
            assoc.post_framed(context_id, pending[0], pending[1], data, more=True)

        def on_match(item):
            if not relaying():
                return
            # A JSON match is Unicode: give it a character set that encodes it.
            match = item if isinstance(item, Dataset) else charset.declare(Dataset.from_json(item))
            try:
                # A match nobody changed goes as the PACS sent it, when it came in our syntax.
                encoded = datasets.encode_relayed(match, syntax)
            except Exception:  # noqa: BLE001 - one undecodable match must not end the query
                log.warn("dicom_scp: dropped a C-FIND match that cannot be encoded")
                return
            self.respond_match(encoded)

        def silent():
            if not done.called:
                done.errback(BackendTimeout(f"no result from the backend for {timeout:g}s"))

        def ended(result):
            if not done.called:
                if isinstance(result, Failure):
                    done.errback(result)
                    return
                if assoc.state == "established" and not self.cancelled:
                    # The final response on the call stack of the stream's end (the
                    # PACS's final response): the client has it a coroutine step sooner.
                    status = stream.status
                    if status == dimse.SUCCESS:   # the usual end, without the category look-ups
                        self.respond_final(status)
                    elif not dimse.is_failure(status):
                        self.respond_final(dimse.SUCCESS)
                    elif not stream.error_comment:
                        self.respond_final(status)
                done.callback(None)

        def stop(result):
            if deadlines is not None:
                deadlines.drop(self)
            elif timer.active():
                timer.cancel()
            stream.unlisten()
            if self._waiter is done:
                self._waiter = None
            return result

        if self.cancelled or assoc.state != "established":
            return defer.succeed(CANCELLED)
        deadlines = self.deadlines
        timer = None
        if deadlines is not None:
            deadlines.set(self, timeout, silent)
        else:
            timer = reactor.callLater(timeout, silent)
        stream.listen(on_match, (syntax, on_encoded)).addBoth(ended)
        return done.addBoth(stop)


class ScpServices:
    """The DIMSE service handlers of one ``dicom_scp`` endpoint: one coroutine per service.

    Requests on an association are served in order (asynchronous operations are
    not negotiated), except C-CANCEL, which reaches the operation it names at once.
    """

    def __init__(self, endpoint: DicomScpEndpoint):
        self.endpoint = endpoint
        self.running: dict[tuple[int, int], Operation] = {}
        #: Staging files created ahead, off the reactor: (path, open file) (see _staged_file).
        self._spares: list[tuple] = []
        self._making = False

    # -- association hooks

    def association_established(self, assoc):
        pass

    def association_closed(self, assoc):
        for key, op in list(self.running.items()):
            if key[0] == id(assoc):
                op.cancel(client_left=True)

    def dataset_sink(self, assoc, context_id, command):
        endpoint = self.endpoint
        if command["CommandField"] == commands.C_STORE_RQ and endpoint.enabled[C_STORE]:
            key = ("syntax", context_id)
            transfer_syntax = assoc.memo.get(key)   # as Operation reads it: once per association
            if transfer_syntax is None:
                transfer_syntax = assoc.memo[key] = str(assoc.contexts[context_id].transfer_syntax[0])
            journal = endpoint.storage_journal
            if journal is not None and not endpoint.forward_store and not journal.closed:
                # Into storage_dir only: a small instance is held in memory and handed to the journal whole.
                return datasets.HeldSink(command, transfer_syntax, endpoint.max_dataset_bytes, journal.max_bytes,
                                         lambda: self._part_ten_sink(assoc, command, transfer_syntax),
                                         source_aet=assoc.calling_aet)
            if endpoint.checked_downstream():
                return SpoolingSink(self, command, transfer_syntax, endpoint.max_dataset_bytes, assoc.calling_aet)
            return self._part_ten_sink(assoc, command, transfer_syntax)
        return datasets.MemorySink()

    def _part_ten_sink(self, assoc, command, transfer_syntax):
        return staging_sink(self, command, transfer_syntax, self.endpoint.max_dataset_bytes, assoc.calling_aet)

    def _staged_file(self):
        """A new staging file for a C-STORE data set, open for writing.

        Creating a file can block for a millisecond or more while the file
        system commits other writers' fsyncs: on the reactor thread that was
        the largest cost of a received instance (py-spy, bench/dimse C-STORE).
        So a few are created ahead on a worker thread and handed out here; the
        reactor creates one itself only when the spares ran out."""
        staging = self.endpoint.staging.ensure()
        if self._spares:
            spare = self._spares.pop()
        else:
            path = staging.new_path()
            spare = (path, open(path, "wb"))
        self._make_spares(staging)
        return spare

    def _make_spares(self, staging) -> None:
        """Refill the spares once they are down to half, all in one worker-thread hop: a hop
        per C-STORE (a thread hand-off and a reactor wake-up) cost ~4 % of a received
        instance's CPU (bench/dimse, "CPU per instance")."""
        if self._making or len(self._spares) > SPARE_STAGED_FILES // 2 or not self.endpoint.running:
            return
        self._making = True
        wanted = SPARE_STAGED_FILES - len(self._spares)

        def make():
            made: list[tuple] = []
            for _ in range(wanted):
                path = staging.new_path().with_suffix(".part")  # not yet an instance: nothing counts it as one
                try:
                    made.append((path, open(path, "wb")))
                except OSError:
                    if not made:
                        raise
                    break
            return made

        def made(spares):
            self._making = False
            if self.endpoint.running:
                self._spares.extend(spares)
            else:
                for spare in spares:
                    _discard_spare(spare)

        def failed(failure):
            self._making = False  # the next C-STORE opens its own file and reports the error
        blocking.run(self.endpoint.reactor, make).addCallbacks(made, failed)

    def _write_staged(self, data: list) -> Path | None:
        """A data set held in memory written to a staging file after all (rare: see
        _store_described); None if it cannot be (on_store answers out of resources)."""
        try:
            path, file = self._staged_file()
            with file:
                for chunk in data:
                    file.write(chunk)
            return path
        except OSError as e:
            log.error("dicom_scp {name}: cannot stage a C-STORE data set: {error}", name=self.endpoint.name,
                      error=e.strerror)
            return None

    def discard_spares(self) -> None:
        spares, self._spares = self._spares, []
        for spare in spares:
            _discard_spare(spare)

    def on_request(self, assoc, message):
        field = message.field
        if field == commands.C_STORE_RQ and isinstance(message.dataset, bytes) and \
                self._serves_store(assoc, message.context_id):
            self._store_held(assoc, message)
            return
        if field == commands.C_CANCEL_RQ:
            op = self.running.get((id(assoc), message.command.get("MessageIDBeingRespondedTo")))
            if op is not None:
                op.cancel()
            return
        op = Operation(assoc, message, self.endpoint.deadlines)
        name = _OPERATION_OF.get(field)
        handler = getattr(self, _HANDLER_OF[field], None) if name else None
        if handler is None:
            # An N-service or a request we do not serve on this context.
            if field in (commands.C_ECHO_RQ,) or field in _RESPONSE_OF:
                op.respond(dimse.SOP_CLASS_NOT_SUPPORTED)
            else:
                assoc.abort("unsupported DIMSE request")
            return
        served_key = ("serves", message.context_id, field)
        served = assoc.memo.get(served_key)   # once per association and service, not per request
        if served is None:
            served = assoc.memo[served_key] = self.endpoint.enabled[name] and _serves(op.context, name)
        if not served:
            _discard(message)
            op.respond(dimse.SOP_CLASS_NOT_SUPPORTED)
            return
        key = (id(assoc), message.message_id)
        self.running[key] = op
        try:
            d = self._store_described(op) if field == commands.C_STORE_RQ else None
        except Exception:  # noqa: BLE001 - answered by _failed, as a coroutine's failure would be
            d = defer.fail()
        if d is None:
            try:
                started = handler(op)   # a coroutine, or a Deferred (on_find: plain calls up to the PACS)
                d = started if isinstance(started, defer.Deferred) else defer.ensureDeferred(started)
            except Exception:  # noqa: BLE001 - answered by _failed, as a coroutine's failure would be
                d = defer.fail()
        d.addErrback(self._failed, op)
        d.addBoth(self._ended, key)

    def _ended(self, _result, key) -> None:
        """An operation is over: forgotten, and its early relay's stream let go -- the stream's
        end holds the request (the target pool's abandon watch) and the request holds the
        operation (its results listener), so kept they were a cycle of everything the
        operation made, left to the garbage collector (bench/dimse/README.md, C-FIND)."""
        op = self.running.pop(key, None)
        if op is not None:
            op.early = None

    def _serves_store(self, assoc, context_id: int) -> bool:
        key = ("serves-store", context_id)
        serves = assoc.memo.get(key)
        if serves is None:
            serves = assoc.memo[key] = self.endpoint.enabled[C_STORE] and _serves(assoc.contexts[context_id], C_STORE)
        return serves

    # -- C-STORE of an instance held in memory, into storage_dir only

    def _store_held(self, assoc, message) -> None:
        """A C-STORE into ``storage_dir`` (no forwarding) of a data set held in memory
        (:class:`~harmony.dicom.ul.datasets.HeldSink`): checked here from its bytes,
        handed to the folder's journal, which writes it, flushes it and names it on
        its one writer thread, and answered from there (:meth:`_held_stored`).  One
        thread hand-off each way, no Deferred, coroutine or staging file per
        instance: the reactor's per-instance steps were ~42 % of this path's wall
        time (bench/dimse, "storage_dir")."""
        data = message.dataset
        try:
            uids = _held_uids(data)
        except ScanDeclined:   # left to pydicom, off the reactor
            d = blocking.run(self.endpoint.reactor, _parsed_uids, data)
            d.addCallbacks(lambda uids: self._file_held(assoc, message, uids),
                           lambda _failure: self._unreadable_held(assoc, message))
            return
        except Exception:  # noqa: BLE001 - anything the scanner raises means a corrupt data set
            self._unreadable_held(assoc, message)
            return
        self._file_held(assoc, message, uids)

    def _unreadable_held(self, assoc, message) -> None:
        log.warn("dicom_scp {name}: refused an unreadable C-STORE dataset", name=self.endpoint.name)
        _respond_held(assoc, message, dimse.STORE_CANNOT_UNDERSTAND, "cannot decode the dataset")

    def _file_held(self, assoc, message, uids: tuple) -> None:
        endpoint = self.endpoint
        command = message.command
        sop_class, sop_instance, study, series = uids
        if not (valid_uid(sop_instance) and valid_uid(study) and valid_uid(series)):
            _respond_held(assoc, message, dimse.STORE_CANNOT_UNDERSTAND, "missing or invalid UIDs in the dataset")
            return
        if sop_instance != command.get("AffectedSOPInstanceUID") or sop_class != command.get("AffectedSOPClassUID"):
            _respond_held(assoc, message, dimse.STORE_DATASET_MISMATCH, "dataset does not match the C-STORE request")
            return
        call_from_thread = endpoint.reactor.callFromThread

        def stored(error):   # on the reactor when its ring wrote the journal, else on the journal's writer
            if isInIOThread():
                self._held_stored(assoc, message, error)
            else:
                call_from_thread(self._held_stored, assoc, message, error)
        try:
            endpoint.storage_journal.store(f"{endpoint.storage_dir}/{study}/{series}/{sop_instance}.dcm",
                                           message.dataset, stored)
        except (OSError, ValueError) as e:
            self._held_stored(assoc, message, e)

    def _held_stored(self, assoc, message, error) -> None:
        """The journal's answer for a held instance (on the reactor)."""
        if error is None:
            _respond_held(assoc, message, dimse.SUCCESS)
            return
        log.error("dicom_scp {name}: cannot store an instance: {error}", name=self.endpoint.name,
                  error=getattr(error, "strerror", None) or str(error))
        _respond_held(assoc, message, dimse.STORE_OUT_OF_RESOURCES, "cannot write to storage")

    def _failed(self, failure, op: Operation):
        if failure.check(AssociationAborted):
            return None
        log.failure("dicom_scp {name}: {op} failed", failure, name=self.endpoint.name,
                    op=_OPERATION_OF.get(op.message.field, "?"))
        if op.assoc.state == "established":
            op.respond(dimse.PROCESSING_FAILURE if op.message.field == commands.C_STORE_RQ
                       else dimse.UNABLE_TO_PROCESS, comment="internal error")
        return None

    # -- C-ECHO

    async def on_echo(self, op: Operation):
        await op.respond(dimse.SUCCESS)

    # -- C-FIND

    def identifier(self, op: Operation) -> dict | None:
        """The request's identifier as DICOM JSON (what middleware reads), ``None`` if undecodable."""
        data = op.message.dataset or b""
        doc = datasets.identifier_json(data, op.transfer_syntax)
        if doc is not None:
            return doc
        try:
            return identifier_to_json(datasets.decode(data, op.transfer_syntax))
        except Exception:  # noqa: BLE001 - pydicom raises many types for bad input
            return None

    def on_find(self, op: Operation) -> defer.Deferred:
        """A C-FIND: plain calls from the request to the pipeline (and, with ``dicom_scu``,
        to the PACS) -- a coroutine's start was a few of the microseconds on that way
        (bench/dimse); what comes of the pipeline's answer is :meth:`_find_answered`."""
        endpoint = self.endpoint
        pipeline = endpoint.pipeline
        direct = pipeline is not None and not pipeline.middleware
        # Without middleware the identifier's DICOM JSON is made only if something reads it
        # (a routing rule): one that surely converts is only checked here, its level read.
        level = datasets.identifier_level(op.message.dataset or b"", op.transfer_syntax) if direct else None
        if level is not None:
            identifier: dict | MadeOnRead | None = MadeOnRead(lambda: self.identifier(op))
        else:
            identifier = self.identifier(op)
            if identifier is None:
                return op.respond(dimse.IDENTIFIER_MISMATCH, comment="cannot decode the identifier")
        # The request to the PACS first, when the one backend can say now that it sends it
        # (dicom_scu.FindAhead): what follows -- envelope, pipeline, target pool -- then
        # runs while the PACS works, and the pipeline's attempt takes the request over.
        ahead = endpoint.find_ahead(op, level) if level else None
        try:
            env = endpoint.envelope(op.assoc, op.context, C_FIND, identifier, op.message.dataset,
                                    query_level=level or None)
            if direct:
                # Nobody between us and the backend reads or replaces its results: relay them
                # from the moment the request is out.  The pipeline's answer waits for the
                # first match; the client's matches (and final response) need not.
                op._timing = (endpoint.request_timeout, endpoint.reactor)
                env.state.dicom.results_listener = op.relay_early
                env.state.dicom.ahead = ahead
            answered = endpoint.start_pipeline(env, op)
        finally:
            if ahead is not None and not ahead.adopted:
                ahead.drop()   # the pipeline went another way: the PACS is told to stop
        return answered.addCallback(self._find_answered_early, op, env)

    def _find_answered_early(self, response, op: Operation, env):
        """The pipeline's answer to a C-FIND the early relay already answered in full (its usual
        end with no middleware: the final response went out on the PACS's call stack) needs
        nothing more -- no coroutine for it, after every proxied C-FIND; anything else is
        :meth:`_find_answered`'s."""
        early = op.early
        if (early is not None and op.answered and not op.cancelled and early[1].called
                and early[0] is response.state.dicom_results and self.endpoint.results_of(response)[1] is None):
            return None
        return defer.ensureDeferred(self._find_answered(op, env, response))

    async def _find_answered(self, op: Operation, env, response):
        """The C-FIND's matches and final response from the pipeline's answer (with an
        early relay, usually sent already: then only its outcome is checked)."""
        endpoint = self.endpoint
        stream, failure = endpoint.results_of(response)
        early = op.early
        if early is not None and (early[0] is not stream or op.cancelled or failure is not None):
            op.stop_early()
            early = None
        if op.cancelled:
            if stream is not None:
                op.abandon(env, stream)
            if op.assoc.state == "established":
                await op.respond(dimse.CANCEL)
            return
        if failure is not None:
            if not op.answered:
                await op.respond(failure[0], comment=failure[1])
            return
        try:
            outcome = await (early[1] if early is not None else
                             op.relay_matches(stream, endpoint.request_timeout, endpoint.reactor))
        except Exception as e:  # noqa: BLE001 - the backend broke or stalled mid-stream
            status, comment = _broken(stream, e)
            await op.respond(status, comment=comment)
            return
        if outcome is CANCELLED:
            op.abandon(env, stream)
            if op.assoc.state == "established":
                await op.respond(dimse.CANCEL)
            return
        if op.answered:
            return
        if dimse.is_failure(stream.status):
            await op.respond(stream.status, comment=stream.error_comment)
        else:
            await op.respond(dimse.SUCCESS)

    # -- C-GET and C-MOVE

    async def on_get(self, op: Operation):
        identifier = self.identifier(op)
        if identifier is None:
            await op.respond(dimse.IDENTIFIER_MISMATCH, comment="cannot decode the identifier")
            return
        env = self.endpoint.envelope(op.assoc, op.context, C_GET, identifier, op.message.dataset)
        await self._retrieve(op, env, op.assoc, None)

    async def on_move(self, op: Operation):
        endpoint = self.endpoint
        destination = op.message.command.get("MoveDestination", "").strip()
        where = endpoint.move_destinations.get(destination)
        if where is None:
            log.warn("dicom_scp {name}: C-MOVE to unknown destination {dest}", name=endpoint.name, dest=destination)
            await op.respond(dimse.MOVE_DESTINATION_UNKNOWN, comment="move destination unknown")
            return
        identifier = self.identifier(op)
        if identifier is None:
            await op.respond(dimse.IDENTIFIER_MISMATCH, comment="cannot decode the identifier")
            return
        env = endpoint.envelope(op.assoc, op.context, C_MOVE, identifier, op.message.dataset,
                                move_destination=destination,
                                move_delivery="proxy")
        await self._retrieve(op, env, None, (destination, where))

    async def _open_destination(self, destination, where, pairs=()):
        """The association to a C-MOVE destination; it proposes *pairs* (SOP
        class, transfer syntax) of the instances to send ahead of the standard
        storage contexts, so compressed ones go as stored."""
        endpoint = self.endpoint
        settings = RequestorSettings(local_aet=endpoint.local_aet, max_pdu=endpoint.limits.max_pdu,
                                     acse_timeout=endpoint.limits.acse_timeout,
                                     dimse_timeout=endpoint.limits.dimse_timeout,
                                     network_timeout=endpoint.limits.network_timeout)
        return await associate(endpoint.reactor, where[0], where[1], settings, destination,
                               net.storage_contexts(pairs))

    async def _retrieve(self, op: Operation, env, target, destination):
        """The common body of C-GET and C-MOVE: announce the count, then one
        sub-operation per instance as it arrives from the backend."""
        endpoint = self.endpoint
        response = await endpoint.run_pipeline(env, op)
        stream, failure = endpoint.results_of(response)
        if op.cancelled:
            if stream is not None:
                op.abandon(env, stream)
            if op.assoc.state == "established":
                await op.respond(dimse.CANCEL, NumberOfRemainingSuboperations=0, NumberOfCompletedSuboperations=0,
                                 NumberOfFailedSuboperations=0, NumberOfWarningSuboperations=0)
            return
        if failure is not None:
            await op.respond(failure[0], comment=failure[1], NumberOfRemainingSuboperations=0,
                             NumberOfCompletedSuboperations=0, NumberOfFailedSuboperations=0,
                             NumberOfWarningSuboperations=0)
            return
        await stream.when_counted()
        total = stream.total()
        completed = failed = warning = 0
        failed_uids: list[str] = []
        originator = None
        if destination is not None:
            originator = (op.assoc.calling_aet, op.message.message_id)
        try:
            while True:
                try:
                    item = await op.next(stream, endpoint.request_timeout, endpoint.reactor)
                except Exception as e:  # noqa: BLE001 - the backend broke or stalled mid-stream
                    status, comment = _broken(stream, e)
                    await op.respond(status, comment=comment, identifier=_failed_list(failed_uids, op))
                    return
                if item is CANCELLED:
                    op.abandon(env, stream)
                    if op.assoc.state == "established":
                        await op.respond(dimse.CANCEL, NumberOfRemainingSuboperations=max(
                            total - completed - failed - warning, 0), NumberOfCompletedSuboperations=completed,
                            NumberOfFailedSuboperations=failed, NumberOfWarningSuboperations=warning,
                            identifier=_failed_list(failed_uids, op))
                    return
                if item is None:
                    break
                if not isinstance(item, DicomInstance) or completed + failed + warning >= total:
                    if isinstance(item, DicomInstance):
                        item.release()  # beyond the announced count: cannot be reported
                    continue
                try:
                    if target is None:
                        try:
                            # Opened at the first instance: by then a local archive has
                            # listed them all, so their own syntaxes can be proposed.
                            pairs = [(item.sop_class_uid, item.transfer_syntax_uid)] + _pairs_listed(stream)
                            target = await self._open_destination(destination[0], destination[1], pairs)
                        except (AssociationRejected, AssociationAborted, OSError, ConnectionError) as e:
                            log.warn("dicom_scp {name}: C-MOVE destination {dest} unreachable: {error}",
                                     name=endpoint.name, dest=destination[0], error=str(e))
                            op.abandon(env, stream)
                            item.release()
                            await op.respond(dimse.UNABLE_TO_PROCESS_BACKEND,
                                             comment="move destination unreachable",
                                             NumberOfRemainingSuboperations=0,
                                             NumberOfCompletedSuboperations=0,
                                             NumberOfFailedSuboperations=total, NumberOfWarningSuboperations=0)
                            return
                    status = await storage.c_store(target, item, endpoint.reactor, originator=originator)
                except AssociationAborted:
                    # The C-GET client (or the C-MOVE destination) left mid sub-operation:
                    # the PACS is asked to stop (C-CANCEL) and what it already sent is
                    # released, as on a C-CANCEL -- not left staged until the PACS gives up.
                    op.abandon(env, stream, client_left=target is op.assoc)
                    raise
                finally:
                    item.release()
                if status is None or dimse.is_failure(status):
                    failed += 1
                    failed_uids.append(item.sop_instance_uid)
                elif status != dimse.SUCCESS:
                    warning += 1
                else:
                    completed += 1
                # A pending response after every sub-operation, the last one too
                # (remaining 0), as Orthanc and pynetdicom answer.
                remaining = max(total - completed - failed - warning, 0)
                await op.respond(dimse.PENDING, NumberOfRemainingSuboperations=remaining,
                                 NumberOfCompletedSuboperations=completed, NumberOfFailedSuboperations=failed,
                                 NumberOfWarningSuboperations=warning)
        finally:
            if destination is not None and target is not None:
                target.release()
        sent = completed + failed + warning
        if stream.failed or dimse.is_failure(stream.status) or sent < total:
            failed_uids += [u for u in stream.failed_sop_uids if u not in failed_uids]
            failed += max(total - sent, 0)
        if failed or warning:
            status = dimse.WARNING_SUBOPS if completed or warning else (
                stream.status if dimse.is_failure(stream.status) else dimse.OUT_OF_RESOURCES_SUBOPS)
        else:
            status = dimse.SUCCESS
        await op.respond(status, comment=stream.error_comment if status != dimse.SUCCESS else None,
                         NumberOfRemainingSuboperations=0 if status != dimse.SUCCESS else None,
                         NumberOfCompletedSuboperations=completed, NumberOfFailedSuboperations=failed,
                         NumberOfWarningSuboperations=warning,
                         identifier=_failed_list(failed_uids, op) if failed_uids else None)

    # -- C-STORE

    async def on_store(self, op: Operation):
        """Durable in storage_dir and/or accepted downstream before Success."""
        endpoint = self.endpoint
        path = op.message.dataset
        command = op.message.command
        if path is None:       # the data set could not be staged (see dataset_sink)
            await op.respond(dimse.STORE_OUT_OF_RESOURCES, comment="cannot write to storage")
            return
        # The store's C-STORE with a described instance took _store_described before this.
        early = _journal_early(endpoint.storage_journal, endpoint.storage_dir, path, command,
                               getattr(op.message.sink, "described", None), op.message.sink)
        try:
            instance, header, refusal = await blocking.run(
                endpoint.reactor, _read_received, path, endpoint.forward_store and endpoint.header_has_readers(),
                command, endpoint.storage_dir, endpoint.storage_journal, early)
        except Exception:  # noqa: BLE001 - any decode failure means a corrupt dataset
            _unlink(path)
            log.warn("dicom_scp {name}: refused an unreadable C-STORE dataset", name=endpoint.name)
            await op.respond(dimse.STORE_CANNOT_UNDERSTAND, comment="cannot decode the dataset")
            return
        try:
            if isinstance(refusal, OSError):
                log.error("dicom_scp {name}: cannot store an instance: {error}", name=endpoint.name,
                          error=refusal.strerror)
                await op.respond(dimse.STORE_OUT_OF_RESOURCES, comment="cannot write to storage")
                return
            if refusal is not None:
                await op.respond(refusal[0], comment=refusal[1])
                return
            if not endpoint.forward_store:
                await op.respond(dimse.SUCCESS)
                return
            await self._store_through(op, instance, header)
        finally:
            instance.release()

    def _store_described(self, op: Operation) -> defer.Deferred | None:
        """The common C-STORE, with plain callbacks: an instance described from the
        request and the data set's head (its UIDs), down a pipeline with no middleware
        to backends that check the file themselves (the store reads it anyway).  ``None``
        for any other C-STORE (:meth:`on_store`).  A coroutine per instance and two
        nested ones cost a visible share of the reactor's time per instance (bench/dimse
        "CPU per instance"); this is the path every plain archive ingest takes."""
        endpoint = self.endpoint
        message = op.message
        sink = message.sink
        data = message.dataset.data if isinstance(message.dataset, InMemory) else None
        checked = endpoint.checked_downstream()
        if data is not None and not checked:
            # Held in memory for a pipeline that changed meanwhile (a reload): staged after all.
            message.dataset = self._write_staged(data)
            return None
        if message.dataset is None or not checked:
            return None
        if data is not None:
            # In memory: the store reads (and checks) the UIDs from its bytes; reading the
            # head here as well was ~5 % of the reactor's time per instance (bench/ingest).
            described: tuple[str, str] | None = ("", "")
        else:
            described = getattr(sink, "described", None)
            if described is None:
                return None
        command = message.command
        instance = DicomInstance(path=message.dataset.path if data is not None else message.dataset,
                                 sop_class_uid=strip_padding(command.get("AffectedSOPClassUID", "")),
                                 sop_instance_uid=strip_padding(command.get("AffectedSOPInstanceUID", "")),
                                 transfer_syntax_uid=op.transfer_syntax, study_instance_uid=described[0],
                                 series_instance_uid=described[1], size=sink.meta_length + sink.received,
                                 owned=data is None, unchecked=True, data=data)
        env = self._store_envelope(op, instance, None)
        d = endpoint.within_deadline(endpoint.pipeline.handle(env, endpoint), env)
        d.addCallback(self._answer_store, op)
        return d.addBoth(_released, instance)

    def _store_envelope(self, op: Operation, instance: DicomInstance, header: dict | None):
        env = self.endpoint.envelope(op.assoc, op.context, C_STORE, None, sop_instance_uid=instance.sop_instance_uid)
        env.state.dicom.instance = instance
        env.normalized = header
        return env

    async def _store_through(self, op: Operation, instance: DicomInstance, header: dict | None):
        """The received *instance* through the pipeline; its answer to the sender."""
        response = await self.endpoint.run_pipeline(self._store_envelope(op, instance, header))
        answered = self._answer_store(response, op)
        if answered is not None:
            await answered

    def _answer_store(self, response, op: Operation) -> defer.Deferred | None:
        """The C-STORE response for the pipeline's *response*, once its stream (if any) is counted
        (a Deferred then; None when it was written at once)."""
        stream = response.state.dicom_results
        if stream is None:
            status = response.state.dimse_status
            if status is None:
                status = dimse.SUCCESS if response.status < 300 else dimse.PROCESSING_FAILURE
            # Encoded directly and written at once (no command dict, generic encode and
            # Deferred per instance): the same bytes as op.respond (tests/dicom/ul).
            _respond_held(op.assoc, op.message, status, response.state.error_comment)
            return None

        def counted(_):
            return op.respond(stream.status if stream.status is not None else dimse.PROCESSING_FAILURE,
                              comment=stream.error_comment)
        return stream.when_counted().addCallback(counted)


class InMemory:
    """What a :class:`SpoolingSink` that kept its data set in memory closes with: the
    Part-10 file's bytes as chunks in order (meta information first), for
    :attr:`DicomInstance.data`; *path* names no file (nothing was staged)."""

    __slots__ = ("data", "path")

    def __init__(self, data: list):
        self.data = data
        self.path = _NO_FILE


#: What an :class:`InMemory` names as its path (one Path for all: one per instance was a
#: pathlib parse on the reactor for each C-STORE).
_NO_FILE = Path(os.devnull)


def staging_sink(services: ScpServices, command: dict, transfer_syntax: str, limit: int, source_aet: str):
    """A C-STORE data set written to a new staging file; if none can be made, a sink
    that reads the rest and drops it (its ``close`` gives None: the C-STORE is
    refused "cannot write to storage", the association goes on)."""
    try:
        path, file = services._staged_file()
        return datasets.PartTenSink(path, command, transfer_syntax, limit, source_aet=source_aet, file=file)
    except OSError as e:
        log.error("dicom_scp {name}: cannot stage a C-STORE data set: {error}", name=services.endpoint.name,
                  error=e.strerror)
        return datasets.DiscardSink(limit)


class SpoolingSink(datasets.HeldSink):
    """A C-STORE data set for a backend that files it from its bytes: held in memory
    up to :data:`IN_MEMORY_BYTES` of data set (a :class:`~harmony.dicom.ul.datasets.HeldSink`),
    else staged to a file like any other (:func:`staging_sink`, which it goes on
    into at that size).

    A small instance held in memory is filed by the store straight from its bytes:
    no staging file made ahead on a worker thread, written on the reactor, then
    read back, stat'ed, linked and unlinked by a storage thread (py-spy and
    strace, bench/ingest "C-STORE CPU per instance, session 7").  Memory stays
    bounded: one instance of at most that size per association.
    """

    __slots__ = ("_implicit", "_described", "_held")

    def __init__(self, services: ScpServices, command: dict, transfer_syntax: str, limit: int, source_aet: str):
        super().__init__(command, transfer_syntax, limit, 0,
                         lambda: staging_sink(services, command, transfer_syntax, limit, source_aet),
                         source_aet=source_aet)
        self.hold = self.meta_length + IN_MEMORY_BYTES
        self._implicit = datasets.HEAD_SYNTAXES.get(transfer_syntax)
        self._described: tuple[str, str] | None = None
        self._held: bytes | None = None

    @property
    def described(self) -> tuple[str, str] | None:
        """(Study, Series Instance UID) from the data set's head, when readable.  Read on
        demand for a data set held in memory: the common path files it without (the store
        reads the UIDs from the bytes), only a pipeline changed meanwhile asks."""
        if self.spilled is not None:
            return getattr(self.spilled, "described", None)
        if self._described is None and self._implicit is not None and self._held is not None:
            try:
                self._described = datasets.head_uids(memoryview(self._held)[self.meta_length:], self._implicit)
            except Exception:  # noqa: BLE001 - an unreadable head: the store reads (and judges) the bytes
                self._implicit = None   # not tried again
        return self._described

    def close(self):
        held = super().close()
        if not isinstance(held, bytes):
            return held    # spilled: the staging file's path (None when staging failed: refused)
        self._held = held
        return InMemory([held])


def _released(result, instance: DicomInstance):
    instance.release()
    return result


def _broken(stream, error) -> tuple[int, str]:
    """(status, comment) for a backend that broke or stalled mid-stream; its stream is cancelled."""
    stream.cancel()
    if isinstance(error, BackendTimeout):
        return dimse.UNABLE_TO_PROCESS_TIMEOUT, str(error)
    return dimse.UNABLE_TO_PROCESS_BACKEND, str(error)


def _serves(context, op: str) -> bool:
    uid = str(context.abstract_syntax)
    if op == C_ECHO:
        return uid == str(Verification)
    if op == C_STORE:
        return uid not in net.MODEL_OF and uid != str(Verification)
    return net.MODEL_OF.get(uid, (None, None))[1] == op


def _discard(message) -> None:
    if isinstance(message.dataset, Path):
        _unlink(message.dataset)


def _discard_spare(spare) -> None:
    path, file = spare
    file.close()
    _unlink(path)


def _unlink(path) -> None:
    try:
        Path(path).unlink()
    except (FileNotFoundError, TypeError):
        pass


def _respond_held(assoc, message, status: int, comment: str | None = None) -> None:
    """The C-STORE-RSP for *message*, encoded directly and written at once (nobody waits on it)."""
    command = message.command
    assoc.post(message.context_id, commands.store_response(
        command.get("AffectedSOPClassUID", ""), command.get("AffectedSOPInstanceUID", ""), message.message_id,
        status, _comment(comment) if status != dimse.SUCCESS else None))


def _held_uids(data: bytes) -> tuple[str, str, str, str]:
    """(SOP class, SOP instance, study, series UIDs) of a Part-10 file held in memory,
    checked whole by harmony.dicom.rawscan; ScanDeclined leaves it to :func:`_parsed_uids`."""
    scanned = scan_bytes(data)
    return (scanned.sop_class_uid or "", scanned.sop_instance_uid or "", scanned.study_instance_uid or "",
            scanned.series_instance_uid or "")


def _parsed_uids(data: bytes) -> tuple[str, str, str, str]:
    """:func:`_held_uids` by pydicom's parse (checked whole); blocking."""
    ds = check_complete(data)
    meta = ds.file_meta
    return (strip_padding(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "")),
            strip_padding(ds.get("SOPInstanceUID", "") or meta.get("MediaStorageSOPInstanceUID", "")),
            strip_padding(ds.get("StudyInstanceUID", "")), strip_padding(ds.get("SeriesInstanceUID", "")))


def _journal_early(journal, storage_dir, path, command: dict, described, sink):
    """Start journaling a received file for *storage_dir* before it is checked
    (on the reactor: the commit thread and the worker thread wake together),
    named from the UIDs its head gave while it arrived; None when it cannot be."""
    if journal is None or described is None or path is None:
        return None
    sop_uid = strip_padding(command.get("AffectedSOPInstanceUID", ""))
    if not all(valid_uid(u) for u in (*described, sop_uid)):
        return None
    try:
        study, series = described
        return journal.begin(Path(path), _stored_at(storage_dir, study, series, sop_uid),
                             size=sink.meta_length + sink.received)
    except OSError:
        return None  # tried again, and reported, when the file is placed


def _read_received(path, with_header: bool, command: dict, storage_dir: Path | None = None, journal=None,
                   early=None):
    """Validate a received Part-10 file (every element inside it, its UIDs, its
    match with the C-STORE request), describe it, with its header as DICOM JSON
    when it goes on through the pipeline, and file it durably in *storage_dir*
    (through its *journal* when given, see harmony.storage.journal):
    one worker-thread hop per instance (each hop cost a thread hand-off and a
    reactor wake-up per instance, bench/dimse).

    *early*: the file's journal placement, begun before this hop from the UIDs
    its head gave (:func:`_journal_early`), so the journal's flush runs while
    the file is checked here (the flush was half of an instance's time,
    bench/dimse); a file that fails its checks has its record withdrawn before
    the answer.

    Returns ``(instance, header, refusal)``: refusal None, a (status, comment),
    or the OSError that kept the file out of *storage_dir*."""
    try:
        parsed = None
        instance = None if with_header else _scanned(path)
        if instance is None:
            parsed = parse_stamped(path)  # the one parse: validation, the header JSON and the store's index header
            instance = read_instance(path, ds=parsed[1])
            instance.parsed = parsed
        instance.owned = True
        uids = (instance.sop_instance_uid, instance.study_instance_uid, instance.series_instance_uid)
        if not all(valid_uid(u) for u in uids):
            return instance, None, (dimse.STORE_CANNOT_UNDERSTAND, "missing or invalid UIDs in the dataset")
        if instance.sop_instance_uid != command.get("AffectedSOPInstanceUID") or \
                instance.sop_class_uid != command.get("AffectedSOPClassUID"):
            return instance, None, (dimse.STORE_DATASET_MISMATCH, "dataset does not match the C-STORE request")
        header = _header_json(parsed[1]) if parsed is not None and with_header else None  # values from *path*
        if storage_dir is not None:
            dest = _stored_at(storage_dir, instance.study_instance_uid, instance.series_instance_uid,
                              instance.sop_instance_uid)
            try:
                if early is not None and early.dest == dest:
                    placement, early = early, None
                    placement.claim()
                elif journal is not None:
                    journal.place(Path(instance.path), dest)
                else:
                    durable_move(instance.path, dest)
            except OSError as e:
                return instance, None, e
            instance.path, instance.owned = dest, False
        return instance, header, None
    finally:
        if early is not None:  # refused, or named otherwise than its head said
            try:
                early.withdraw()
            except OSError as e:
                log.error("storage journal of {path}: a refused file's record could not be withdrawn ({error}); "
                          "a crash now would write it", path=str(storage_dir), error=e.strerror)


def _scanned(path) -> DicomInstance | None:
    """The received file described from its bytes (harmony.dicom.rawscan: checked
    whole, no pydicom Dataset; pydicom's parse was the largest part of the worker
    thread's CPU per instance), or None when the scanner leaves it to pydicom.
    Raises CorruptDataset for a file that cannot be complete."""
    try:
        scanned = scan_file(path)
        try:
            return DicomInstance(path=Path(path), sop_class_uid=scanned.sop_class_uid or "",
                                 sop_instance_uid=scanned.sop_instance_uid or "",
                                 transfer_syntax_uid=strip_padding(scanned.transfer_syntax_uid),
                                 study_instance_uid=scanned.study_instance_uid or "",
                                 series_instance_uid=scanned.series_instance_uid or "", size=len(scanned.data))
        finally:
            scanned.close()
    except ScanDeclined:
        return None


def _stored_at(storage_dir: Path, study: str, series: str, sop_instance: str) -> Path:
    """Where an instance is filed in *storage_dir*."""
    return storage_dir / study / series / f"{sop_instance}.dcm"


def _pairs_listed(stream) -> list:
    """The distinct (SOP class, transfer syntax) pairs of the instances queued
    in *stream* so far, commonest first."""
    counts: dict = {}
    for item in stream.queued():
        if isinstance(item, DicomInstance) and item.sop_class_uid and item.transfer_syntax_uid:
            pair = (item.sop_class_uid, item.transfer_syntax_uid)
            counts[pair] = counts.get(pair, 0) + 1
    return sorted(counts, key=counts.get, reverse=True)


def _failed_list(uids, op: Operation) -> bytes | None:
    if not uids:
        return None
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = list(uids)
    return datasets.encode(ds, op.transfer_syntax)


#: The first of the pixel data elements, (7FE0,0008) Float Pixel Data: where pydicom's
#: ``stop_before_pixels`` stops, and so where the header middleware sees ends.
_PIXELS_FROM = 0x7FE00008


def _header_json(ds) -> dict:
    """The received dataset without pixel data (nor anything after it), as DICOM JSON for
    middleware to read."""
    header = Dataset()
    for tag in sorted(ds.keys()):  # stop at the pixels without touching their (deferred) value
        if tag >= _PIXELS_FROM:
            break
        header.add(ds[tag])
    return header.to_json_dict(bulk_data_threshold=4096, bulk_data_element_handler=lambda _: "")


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip()

