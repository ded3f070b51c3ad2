"""``dicom_scu`` backend: a DICOM SCU (pynetdicom) in front of a PACS.

It performs the operation a request names in ``metadata["dimse_op"]``
(C-ECHO, C-FIND, C-GET, C-MOVE, C-STORE) and answers, following
:mod:`harmony.dicom.results`, with a :class:`ResultStream` in
``response.context["dicom_results"]`` that is fed *as the PACS answers*: C-FIND
matches as pynetdicom yields them, retrieved instances as files the moment each
sub-operation lands.  The response body renders the same stream for HTTP
clients (DICOM JSON array, or multipart/related of application/dicom).

pynetdicom is blocking, so every association runs in this backend's own thread
pool (sized by ``max_concurrency``: each thread holds one association, and the
reactor's shared pool must stay free for DNS and other users).  Results cross
back with ``reactor.callFromThread``.  The response fires once the association
is up and the first result (or the final status) is in, so a PACS that is down,
refuses or stalls gives 502/504 quickly instead of a response that never ends.
"""

from __future__ import annotations

import itertools
import os
import threading
import time

from pynetdicom import AE, AllStoragePresentationContexts, evt
from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.http_headers import Headers

from harmony.backends.base import Backend
from harmony.config.errors import OptionError
from harmony.dicom import charset, net, transfer
from harmony.dicom import status as dimse
from harmony.dicom.dicomjson import identifier_from_json, query_level
from harmony.dicom.files import Staging, read_instance
from harmony.dicom.render import ResultBodyProducer
from harmony.dicom.results import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE, OPERATIONS, DicomInstance, ResultStream
from harmony.envelope import ResponseEnvelope
from harmony.errors import BackendTimeout, BackendUnavailable, BadRequest, HarmonyError
from harmony.log import get_logger

log = get_logger("harmony.backends.dicom_scu")

STORE_BODY_LIMIT = 2 * 1024 * 1024 * 1024
#: How many extra (SOP class, transfer syntax) pairs the pool proposes at most.
MAX_LEARNED = 16


class Peer:
    def __init__(self, name, aet, host, port):
        self.name, self.aet, self.host, self.port = name, aet, host, port

    def __repr__(self):
        return f"{self.aet}@{self.host}:{self.port}"


class AssociationPool:
    """Idle associations to reuse, one AE for all of them.

    Every association proposes the same contexts (verification, Q/R in both
    roots, storage with the SCP role for C-GET), so any idle one can serve any
    operation.  Runs in worker threads; ``lock`` guards the idle list.
    """

    def __init__(self, ae, peers, *, max_pdu, tls_context=None, max_idle=4, idle_secs=15.0):
        self.ae = ae
        self.peers = peers
        self.max_pdu = max_pdu
        self.tls_context = tls_context
        self.max_idle = max_idle
        self.idle_secs = idle_secs
        self.contexts = net.requestor_contexts()
        self.roles = net.storage_roles(self.contexts)
        self.lock = threading.Lock()
        self.idle: list = []
        #: (SOP class, transfer syntax) pairs met that the standard contexts lack, newest first.
        self.learned: list = []

    def learn(self, sop_class, syntax) -> None:
        """Propose (*sop_class*, *syntax*) on every association from now on:
        an instance in a syntax the standard contexts lack (JPEG-LS near-lossless
        CT, an MPEG-4 video) is then sent as stored, and so are the rest of its
        study, over the pooled association rather than one opened per instance
        (which a peer serving one association at a time could not even accept)."""
        pair = (str(sop_class), str(syntax))
        with self.lock:
            if pair in self.learned:
                return
            self.learned = [pair] + self.learned[:MAX_LEARNED - 1]
            self.contexts = net.requestor_contexts(self.learned)
            self.roles = net.storage_roles(self.contexts)
            stale, self.idle = self.idle, []
        for assoc, _ in stale:
            _close(assoc)

    def acquire(self):
        stale = []
        with self.lock:
            now = time.monotonic()
            found = None
            while self.idle:
                assoc, since = self.idle.pop()
                if assoc.is_established and now - since < self.idle_secs:
                    found = assoc
                    break
                stale.append(assoc)
        for assoc in stale:
            _close(assoc)
        if found is not None:
            net.set_busy(found, True)
            return found, True
        return self.connect(), False

    def connect(self, contexts=None):
        """A new association (to the first peer that accepts one); *contexts*
        replaces the standard set for a one-off association."""
        last: HarmonyError = BackendUnavailable("no PACS configured")
        for peer in self.peers:
            started = time.monotonic()
            tls = (self.tls_context, peer.host) if self.tls_context is not None else None
            assoc = self.ae.associate(peer.host, peer.port, contexts or self.contexts, ae_title=peer.aet,
                                      max_pdu=self.max_pdu, ext_neg=None if contexts else self.roles,
                                      tls_args=tls, evt_handlers=net.NODELAY_HANDLERS)
            if assoc.is_established:
                return assoc
            elapsed = time.monotonic() - started
            if assoc.is_rejected:
                last = BackendUnavailable(f"PACS {peer.aet} rejected the association")
            elif elapsed >= min(t for t in (self.ae.connection_timeout, self.ae.acse_timeout) if t) * 0.9:
                last = BackendTimeout(f"PACS {peer.aet} did not accept an association in time")
            else:
                last = BackendUnavailable(f"PACS {peer.aet} could not be reached")
            log.warn("dicom_scu: association to {peer} failed: {detail}", peer=repr(peer), detail=last.detail)
        raise last

    def give_back(self, assoc, reusable: bool):
        if reusable and assoc.is_established:
            net.set_busy(assoc, False)
            with self.lock:
                if len(self.idle) < self.max_idle:
                    self.idle.append((assoc, time.monotonic()))
                    return
        _close(assoc)

    def close_all(self):
        with self.lock:
            idle, self.idle = self.idle, []
        for assoc, _ in idle:
            _close(assoc)


_close = net.close_association


class Job:
    """One operation in flight: the stream it feeds and the readiness signal.

    Methods without ``_thread`` run on the reactor; workers call the
    ``*_thread`` variants, which hop over with ``callFromThread``.
    """

    def __init__(self, reactor, op, request):
        self.reactor = reactor
        self.op = op
        self.request = request
        self.cancel_event = threading.Event()
        self.stream = ResultStream(on_cancel=self.cancel_event.set)
        self.ready: defer.Deferred = defer.Deferred()
        self.items = 0

    # reactor side
    def put(self, item):
        self.items += 1
        if self.stream.cancelled and isinstance(item, DicomInstance):
            item.release()
            return
        self.stream.put(item)
        self._ready()

    def counts(self, remaining, completed, failed, warning):
        self.stream.set_counts(remaining, completed, failed, warning)

    def finish(self, status, comment=None, failed_uids=()):
        self.stream.failed_sop_uids.extend(failed_uids)
        self.stream.finish(status, comment)
        self._ready()

    def _ready(self):
        if not self.ready.called:
            self.ready.callback(self)

    def failed(self, failure):
        if not self.ready.called:
            self.ready.errback(failure)
        else:
            err = failure.value
            status = dimse.UNABLE_TO_PROCESS_TIMEOUT if isinstance(err, BackendTimeout) else dimse.UNABLE_TO_PROCESS_BACKEND
            self.stream.finish(status, str(err))

    # worker side
    def put_thread(self, item):
        self.reactor.callFromThread(self.put, item)

    def counts_thread(self, status_ds):
        self.reactor.callFromThread(self.counts, *suboperation_counts(status_ds))

    def finish_thread(self, status, comment=None, failed_uids=()):
        self.reactor.callFromThread(self.finish, status, comment, list(failed_uids))


def suboperation_counts(status_ds):
    get = status_ds.get
    return (get("NumberOfRemainingSuboperations"), get("NumberOfCompletedSuboperations") or 0,
            get("NumberOfFailedSuboperations") or 0, get("NumberOfWarningSuboperations") or 0)


class DicomScuBackend(Backend):
    def __init__(self, name, reactor, peers, *, local_aet="HARMONY_SCU", retrieve_mode="get",
                 incoming_store_port=None, incoming_store_bind="0.0.0.0", persistent_store_scp=False,
                 tls_context=None, connect_timeout=5.0, acse_timeout=10.0, dimse_timeout=30.0,
                 network_timeout=60.0, max_pdu=0, max_concurrency=8, max_idle=4, staging_dir=None):
        super().__init__(name)
        self.reactor = reactor
        self.peers = peers
        self.local_aet = local_aet
        self.retrieve_mode = retrieve_mode
        self.incoming_store_port = incoming_store_port
        self.incoming_store_bind = incoming_store_bind
        self.persistent_store_scp = persistent_store_scp
        self.staging = Staging(staging_dir)
        self.ae = AE(ae_title=local_aet)
        self.ae.connection_timeout = connect_timeout
        self.ae.acse_timeout = acse_timeout
        self.ae.dimse_timeout = dimse_timeout
        self.ae.network_timeout = network_timeout
        self.ae.maximum_pdu_size = max_pdu
        self.pool = AssociationPool(self.ae, peers, max_pdu=max_pdu, tls_context=tls_context, max_idle=max_idle)
        self.threads = ThreadPool(minthreads=0, maxthreads=max_concurrency, name=f"dicom_scu:{name}")
        self._trigger = None
        self._msg_ids = itertools.count(1)
        self._moves: dict[int, Job] = {}
        self._moves_lock = threading.Lock()
        self._store_scp = None
        self._store_lock = threading.Lock()

    @classmethod
    def from_config(cls, name, options, ctx):
        peers = []
        if "host" in options or "aet" in options or "port" in options:
            peers.append(Peer(name, net.check_aet(options, "aet"), options.str("host"), options.port("port", 104)))
        for t in ctx.targets():
            missing = [k for k in ("aet", "host", "port") if k not in t]
            if missing:
                raise OptionError("targets", f"target {t['name']!r} needs {', '.join(missing)}")
            peers.append(Peer(t["name"], str(t["aet"]), str(t["host"]), int(t["port"])))
        if not peers:
            raise OptionError("aet", "is required (with host and port), or name targets with aet/host/port")
        local_aet = net.check_aet(options, "local_aet", "HARMONY_SCU")
        mode = options.str("dimse_retrieve_mode", "get", choices=("get", "move"))
        store_port = options.port("incoming_store_port", None)
        if mode == "move" and store_port is None:
            raise OptionError("incoming_store_port", "is required when dimse_retrieve_mode = 'move'")
        tls = None
        if options.bool("use_tls", False):
            tls = net.client_tls_context(options.path("tls_cert", None), options.path("tls_key", None),
                                         options.path("tls_ca", None), options.bool("tls_verify", True))
        staging = options.path("staging_dir", None) or (ctx.storage_path / "dimse-staging" / name)
        return cls(
            name, ctx.reactor, peers, local_aet=local_aet, retrieve_mode=mode,
            incoming_store_port=store_port,
            incoming_store_bind=options.str("incoming_store_bind", "0.0.0.0"),
            persistent_store_scp=options.bool("persistent_store_scp", False), tls_context=tls,
            connect_timeout=options.number("connect_timeout_secs", 5.0, minimum=0.01),
            acse_timeout=options.number("acse_timeout_secs", 10.0, minimum=0.01),
            dimse_timeout=options.number("dimse_timeout_secs", 30.0, minimum=0.01),
            network_timeout=options.number("network_timeout_secs", 60.0, minimum=0.01),
            max_pdu=options.int("max_pdu_size", 0, minimum=0, maximum=2 ** 32 - 1),
            max_concurrency=options.int("max_concurrency", 8, minimum=1, maximum=256),
            max_idle=options.int("max_idle_associations", 4, minimum=0, maximum=256),
            staging_dir=staging,
        )

    # ------------------------------------------------------------------ lifecycle

    def _run(self, fn, *args):
        if not self.threads.started:
            self.threads.start()
            self._trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self._stop_threads)
        return threads.deferToThreadPool(self.reactor, self.threads, fn, *args)

    def _stop_threads(self):
        if self.threads.started:
            self.threads.stop()

    def close(self):
        """Release idle associations and stop the store SCP, then the threads."""
        if not self.threads.started:
            return defer.succeed(None)

        def stop(_):
            if self._trigger is not None:
                self.reactor.removeSystemEventTrigger(self._trigger)
                self._trigger = None
            self._stop_threads()

        return self._run(self._close_blocking).addBoth(stop)

    def _close_blocking(self):
        self.pool.close_all()
        self._stop_store_scp()
        self.staging.clear()  # instances no consumer released

    # ------------------------------------------------------------------ requests

    def send(self, request):
        try:
            op, identifier, level, model = self.parse(request)
        except HarmonyError:
            return defer.fail()
        job = Job(self.reactor, op, request)
        if op == C_ECHO:
            work = self._echo
        elif op == C_FIND:
            work = self._find
        elif op == C_STORE:
            return self._store(job, request)
        elif op == C_MOVE and self._third_party(request):
            work = self._move_elsewhere
        else:
            # A retrieve whose instances come back through Harmony: how to fetch
            # them from the PACS is this backend's choice, not the caller's.
            work = self._move_here if self.retrieve_mode == "move" else self._get
        d = self._run(work, job, identifier, model)
        d.addErrback(job.failed)
        return job.ready.addCallback(self.respond)

    def parse(self, request):
        """(op, identifier Dataset, level, model) from metadata and the normalised view.

        An HTTP caller may send ``{"dimse_op": ..., "query_level": ...,
        "query_model": ..., "identifier": {DICOM JSON}}`` instead of metadata.
        """
        md = request.metadata
        doc = request.normalized
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
        # Unicode from JSON: ISO_IR 192 when not ASCII, or pydicom would send '?'.
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
        if stream.status is not None:
            md["dimse_status"] = f"0x{stream.status:04X}"
        if stream.status is not None and dimse.is_failure(stream.status) and job.items == 0:
            doc = {"dimse_op": job.op, "dimse_status": stream.status, "error_comment": stream.error_comment,
                   "completed": stream.completed, "failed": stream.failed}
            resp = ResponseEnvelope.json(dimse.http_status_for(stream.status), doc)
        elif job.op in (C_FIND, C_GET) or job.op == C_MOVE and not self._third_party(job.request):
            body = ResultBodyProducer(stream, "json" if job.op == C_FIND else "multipart")
            resp = ResponseEnvelope(status=200, headers=Headers({"Content-Type": [body.content_type]}), body=body)
        else:
            doc = {"dimse_op": job.op, "dimse_status": stream.status, "completed": stream.completed,
                   "failed": stream.failed, "warning": stream.warning, "remaining": stream.remaining}
            resp = ResponseEnvelope.json(200, doc)
        resp.metadata.update(md)
        resp.context["dicom_results"] = stream
        return resp

    # ------------------------------------------------------------------ workers (threads)

    def _with_association(self, job, body):
        """Run *body(assoc)* on a pooled association; a reused one that turns out
        dead before any result is replaced once by a fresh one."""
        assoc, reused = self.pool.acquire()
        try:
            ok = _guarded(body, assoc)
        except _DeadAssociation as e:
            self.pool.give_back(assoc, False)
            if not (reused and job.items == 0):
                raise e.error from None
            assoc = self.pool.connect()
            try:
                ok = _guarded(body, assoc)
            except _DeadAssociation as e2:
                self.pool.give_back(assoc, False)
                raise e2.error from None
            except BaseException:
                self.pool.give_back(assoc, False)
                raise
        except BaseException:
            self.pool.give_back(assoc, False)
            raise
        self.pool.give_back(assoc, ok)

    def _echo(self, job, _identifier, _model):
        def body(assoc):
            status = assoc.send_c_echo()
            if not status:
                raise _DeadAssociation(BackendTimeout("no C-ECHO response"))
            job.finish_thread(int(status.Status))
            return True
        self._with_association(job, body)

    def _find(self, job, identifier, model):
        sop_class = net.QUERY_MODELS[model][C_FIND]
        msg_id = self._next_msg_id()

        def body(assoc):
            final = None
            cancel_sent = False
            for status, ident in assoc.send_c_find(identifier, sop_class, msg_id=msg_id):
                if not status:
                    raise _DeadAssociation(BackendTimeout("the PACS stopped answering the C-FIND"))
                code = int(status.Status)
                if dimse.is_pending(code):
                    if ident is not None and not job.cancel_event.is_set():
                        job.put_thread(ident)
                    if job.cancel_event.is_set() and not cancel_sent:
                        assoc.send_c_cancel(msg_id, query_model=sop_class)
                        cancel_sent = True
                else:
                    final = (code, status.get("ErrorComment"))
            job.finish_thread(*final)
            return not cancel_sent
        self._with_association(job, body)

    def _get(self, job, identifier, model):
        sop_class = net.QUERY_MODELS[model][C_GET]
        msg_id = self._next_msg_id()

        def on_store(event):
            return self._accept_instance(event, job)

        def body(assoc):
            assoc.bind(evt.EVT_C_STORE, on_store)
            try:
                return self._retrieve(job, assoc.send_c_get(identifier, sop_class, msg_id=msg_id),
                                      assoc, msg_id, sop_class)
            finally:
                assoc.unbind(evt.EVT_C_STORE, on_store)
        self._with_association(job, body)

    def _move_here(self, job, identifier, model):
        if self.incoming_store_port is None:
            raise BackendUnavailable("C-MOVE needs incoming_store_port (a C-STORE SCP to receive on)")
        sop_class = net.QUERY_MODELS[model][C_MOVE]
        msg_id = self._next_msg_id()
        # Registering the move and starting the receiver happen under one lock, as
        # do unregistering and stopping it, so a move never loses its receiver to
        # another move that just finished.
        with self._store_lock:
            with self._moves_lock:
                self._moves[msg_id] = job
            try:
                self._start_store_scp_locked()
            except BaseException:
                with self._moves_lock:
                    self._moves.pop(msg_id, None)
                raise
        try:
            self._with_association(job, lambda assoc: self._retrieve(
                job, assoc.send_c_move(identifier, self.local_aet, sop_class, msg_id=msg_id),
                assoc, msg_id, sop_class))
        finally:
            server = None
            with self._store_lock:
                with self._moves_lock:
                    self._moves.pop(msg_id, None)
                    idle = not self._moves
                if idle and not self.persistent_store_scp:
                    server, self._store_scp = self._store_scp, None
            if server is not None:
                server.shutdown()

    def _move_elsewhere(self, job, identifier, model):
        sop_class = net.QUERY_MODELS[model][C_MOVE]
        msg_id = self._next_msg_id()
        dest = job.request.metadata["move_destination"]
        self._with_association(job, lambda assoc: self._retrieve(
            job, assoc.send_c_move(identifier, dest, sop_class, msg_id=msg_id), assoc, msg_id, sop_class))

    def _retrieve(self, job, responses, assoc, msg_id, sop_class):
        final = None
        cancel_sent = False
        for status, ident in responses:
            if not status:
                raise _DeadAssociation(BackendTimeout("the PACS stopped answering the retrieve"))
            code = int(status.Status)
            job.counts_thread(status)
            if dimse.is_pending(code):
                if job.cancel_event.is_set() and not cancel_sent:
                    assoc.send_c_cancel(msg_id, query_model=sop_class)
                    cancel_sent = True
                continue
            failed = []
            if ident is not None and "FailedSOPInstanceUIDList" in ident:
                value = ident.FailedSOPInstanceUIDList
                failed = [str(v) for v in (value if isinstance(value, (list, tuple)) or hasattr(value, "__iter__")
                                           and not isinstance(value, str) else [value])]
            final = (code, status.get("ErrorComment"), failed)
        job.finish_thread(*final)
        return not cancel_sent

    def _accept_instance(self, event, job):
        """EVT_C_STORE (C-GET sub-operation or C-MOVE arrival): stage the file as received."""
        try:
            self.staging.ensure()
            staged = self.staging.adopt(event.dataset_path)
            job.put_thread(read_instance(staged, owned=True))
        except OSError as e:
            log.error("dicom_scu {name}: cannot stage a received instance: {error}", name=self.name, error=str(e))
            return dimse.STORE_OUT_OF_RESOURCES
        except Exception as e:  # noqa: BLE001 - a corrupt dataset fails this sub-operation, not the thread
            log.warn("dicom_scu {name}: received an unreadable instance: {error}", name=self.name, error=str(e))
            return dimse.STORE_CANNOT_UNDERSTAND
        return dimse.SUCCESS

    def _next_msg_id(self) -> int:
        return next(self._msg_ids) % 65535 + 1

    # ------------------------------------------------------------------ C-MOVE receiver

    def _start_store_scp_locked(self):
        """Start the C-MOVE receiver unless it runs (caller holds ``_store_lock``)."""
        if self._store_scp is not None:
            return
        ae = AE(ae_title=self.local_aet)
        ae.network_timeout = self.ae.network_timeout
        ae.dimse_timeout = self.ae.dimse_timeout
        ae.maximum_pdu_size = self.ae.maximum_pdu_size
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, net.ALL_SYNTAXES)
        handlers = net.NODELAY_HANDLERS + [(evt.EVT_C_STORE, self._on_move_store)]
        try:
            self._store_scp = ae.start_server((self.incoming_store_bind, self.incoming_store_port),
                                              block=False, evt_handlers=handlers)
        except OSError as e:
            raise BackendUnavailable(f"cannot listen for C-MOVE arrivals on port {self.incoming_store_port}: "
                                     f"{e.strerror}") from None

    def _stop_store_scp(self):
        with self._store_lock:
            server, self._store_scp = self._store_scp, None
        if server is not None:
            server.shutdown()

    def _on_move_store(self, event):
        originator = event.request.MoveOriginatorMessageID
        with self._moves_lock:
            job = self._moves.get(originator) if originator else None
            if job is None and len(self._moves) == 1:
                job = next(iter(self._moves.values()))
        if job is None:
            log.warn("dicom_scu {name}: refused a C-STORE that belongs to no C-MOVE", name=self.name)
            return dimse.REFUSED_NOT_AUTHORISED
        return self._accept_instance(event, job)

    # ------------------------------------------------------------------ C-STORE

    @defer.inlineCallbacks
    def _store(self, job, request):
        """C-STORE ``context["instance"]``, or a Part-10 request body spooled to staging."""
        instance = request.context.get("instance")
        spooled = instance is None
        if spooled:
            if isinstance(request.body, (bytes, bytearray)):
                if not request.body:
                    raise BadRequest("C-STORE needs a DICOM instance (application/dicom body)")
                path = yield self._run(_write_temp, self.staging, bytes(request.body))
            else:
                path = yield _spool(request.body, self.staging)
            try:
                instance = yield self._run(read_instance, path, True)
            except Exception:
                os.unlink(path)
                raise BadRequest("the body is not a readable DICOM Part-10 instance") from None
        d = self._run(self._store_blocking, job, instance, spooled)
        d.addErrback(job.failed)
        yield job.ready
        return self.respond(job)

    def _store_blocking(self, job, instance: DicomInstance, spooled: bool):
        """C-STORE on a pooled association.  A (SOP class, transfer syntax) pair
        the association did not propose is learned by the pool and the instance
        sent on a fresh association that proposes it; a syntax the PACS refuses
        is decompressed, or fails with a status naming it (0xC003)."""
        pair = (instance.sop_class_uid, instance.transfer_syntax_uid)
        unproposed = []

        def body(assoc, may_learn=True):
            if may_learn and not transfer.accepts_as_stored(assoc, *pair) and not transfer.was_proposed(assoc, *pair):
                unproposed.append(pair)
                return False  # not pooled: its contexts are about to be out of date
            try:
                status = net.send_instance(assoc, instance)
            except transfer.SyntaxRefused as e:
                log.warn("dicom_scu {name}: {detail}", name=self.name, detail=str(e))
                job.finish_thread(e.status, e.comment)
                return True
            if not status:
                raise _DeadAssociation(BackendTimeout("no C-STORE response"))
            if spooled:
                instance.release()  # before the answer, so a caller never sees it linger
            job.finish_thread(int(status.Status), status.get("ErrorComment"))
            return True

        try:
            self._with_association(job, body)
            if unproposed:
                self.pool.learn(*pair)
                self._with_association(job, lambda assoc: body(assoc, may_learn=False))
        finally:
            if spooled:
                instance.release()


def _guarded(body, assoc):
    try:
        return body(assoc)
    except ValueError as e:
        # pynetdicom: no accepted presentation context for the SOP class, or a
        # dataset it cannot encode for the one accepted.
        raise BackendUnavailable(f"the PACS cannot serve this request: {e}") from None


class _DeadAssociation(Exception):
    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


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
