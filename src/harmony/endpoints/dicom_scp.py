"""``dicom_scp`` endpoint: Harmony as a DICOM application entity (SCP).

A Twisted service that runs a pynetdicom association server on its own port.
Each DIMSE request becomes a :class:`RequestEnvelope` (``protocol = dimse``,
the identifier as DICOM JSON in ``normalized``) and goes through the pipeline,
so auth, transforms and filters apply to DIMSE traffic as to HTTP.  The
backend answers with a :class:`~harmony.dicom.results.ResultStream`; the
handlers turn it back into DIMSE *as it fills*: a pending C-FIND response per
match, a C-STORE sub-operation per retrieved instance.

pynetdicom calls the handlers in its own association threads; they wait on the
reactor with ``blockingCallFromThread``, never the other way round, and each
has a deadline so a stuck backend becomes a failure status, not a hang.
"""

from __future__ import annotations

import functools
import queue

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.internet.threads import blockingCallFromThread
from twisted.python.failure import Failure
from zope.interface import implementer, provider

from harmony.config.errors import OptionError
from harmony.dicom import charset, net, transfer
from harmony.dicom import status as dimse
from harmony.dicom.dicomjson import identifier_to_json
from harmony.dicom.files import check_complete, durable_copy, read_instance, valid_uid
from harmony.dicom.render import release_rest
from harmony.dicom.results import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE, DicomInstance
from harmony.envelope import RequestEnvelope, ResponseEnvelope, new_request_id
from harmony.errors import (AuthenticationFailed, BackendTimeout, BadRequest, Forbidden, HarmonyError,
                            InsufficientStorage, PayloadTooLarge)
from harmony.interfaces import IComponentFactory, IEndpoint
from harmony.log import get_logger

log = get_logger("harmony.endpoints.dicom_scp")

#: Status when a request's pipeline gives no DICOM results at all.
NO_RESULTS = dimse.UNABLE_TO_PROCESS
#: How often a handler waiting on a slow backend looks for a C-CANCEL.
CANCEL_POLL_SECS = 0.05
CANCELLED = object()


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
        return dimse.STORE_CANNOT_UNDERSTAND if op == C_STORE else dimse.IDENTIFIER_MISMATCH
    if error.status in (502, 503):
        return dimse.UNABLE_TO_PROCESS_BACKEND
    return dimse.PROCESSING_FAILURE if op == C_STORE else dimse.UNABLE_TO_PROCESS


def status_dataset(status: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = comment.encode("ascii", "replace").decode("ascii")[:64]
    return ds


@implementer(IEndpoint)
@provider(IComponentFactory)
class DicomScpEndpoint(Service):
    transport = "dimse"
    protocol = "dimse"

    def __init__(self, name, reactor, *, local_aet, bind_addr="0.0.0.0", port=11112, enable_echo=True,
                 enable_find=False, enable_get=False, enable_move=False, enable_store=False, storage_dir=None,
                 forward_store=None, allowed_calling_aets=None, move_destinations=None, max_associations=10,
                 max_pdu_size=16382, acse_timeout=30.0, dimse_timeout=30.0, network_timeout=60.0,
                 request_timeout=300.0, tls_context=None):
        self.name = name
        self.reactor = reactor
        self.local_aet = local_aet
        self.bind_addr = bind_addr
        self.port = port
        self.enabled = {C_ECHO: enable_echo, C_FIND: enable_find, C_GET: enable_get, C_MOVE: enable_move,
                        C_STORE: enable_store}
        self.storage_dir = storage_dir
        self.forward_store = storage_dir is None if forward_store is None else forward_store
        self.allowed_calling_aets = allowed_calling_aets
        self.move_destinations = move_destinations or {}
        self.max_associations = max_associations
        self.max_pdu_size = max_pdu_size
        self.timeouts = (acse_timeout, dimse_timeout, network_timeout)
        self.request_timeout = request_timeout
        self.tls_context = tls_context
        #: Set by HarmonyService from the pipeline that names this endpoint.
        self.pipeline = None
        self.ae = None
        self.server = None
        self._trigger = None

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
                raise OptionError(f"move_destinations.{aet}.port", f"must be a port number, got {where['port']!r}")
            if len(aet) > 16 or not aet.isascii():
                raise OptionError("move_destinations", f"{aet!r} is not an AE title")
            dests[aet] = (str(where["host"]), port)
        allowed = options.list("allowed_calling_aets", None)
        tls = None
        if "tls_cert" in options or "tls_key" in options:
            cert, key = options.path("tls_cert"), options.path("tls_key")
            try:
                tls = net.server_tls_context(cert, key, options.path("tls_ca", None))
            except (OSError, ValueError) as e:
                raise OptionError("tls_cert", f"cannot load the certificate/key: {e}") from None
        storage_dir = options.path("storage_dir", None)
        enable_store = options.bool("enable_store", False)
        forward = options.bool("forward_store", None) if "forward_store" in options else None
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
            max_associations=options.int("max_associations", 10, minimum=1, maximum=1000),
            max_pdu_size=options.int("max_pdu_size", 16382, minimum=0, maximum=2 ** 32 - 1),
            acse_timeout=options.number("acse_timeout_secs", 30.0, minimum=0.01),
            dimse_timeout=options.number("dimse_timeout_secs", 30.0, minimum=0.01),
            network_timeout=options.number("network_timeout_secs", 60.0, minimum=0.01),
            request_timeout=options.number("request_timeout_secs", 300.0, minimum=0.01),
            tls_context=tls,
        )

    # ------------------------------------------------------------------ service

    @property
    def listen_description(self) -> str:
        tls = "+tls" if self.tls_context is not None else ""
        return f"dimse{tls}:{self.bind_addr}:{self.port} aet={self.local_aet}"

    @property
    def bound_port(self) -> int | None:
        return self.server.server_address[1] if self.server is not None else None

    def build_ae(self) -> AE:
        ae = AE(ae_title=self.local_aet)
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = self.timeouts
        ae.maximum_associations = self.max_associations
        ae.maximum_pdu_size = self.max_pdu_size
        # pynetdicom answers these with A-ASSOCIATE-RJ (called/calling AE not recognised).
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.allowed_calling_aets or [])
        if self.enabled[C_ECHO]:
            ae.add_supported_context(Verification)
        for model in net.QUERY_MODELS.values():
            for op in (C_FIND, C_GET, C_MOVE):
                if self.enabled[op]:
                    ae.add_supported_context(model[op])
        if self.enabled[C_STORE] or self.enabled[C_GET]:
            for cx in AllStoragePresentationContexts:
                # scp_role: a C-GET requestor proposes to be the storage SCP for
                # our sub-operations; accepting the role needs this flag.
                role = True if self.enabled[C_GET] else None
                ae.add_supported_context(cx.abstract_syntax, net.ALL_SYNTAXES, scu_role=role, scp_role=role)
        return ae

    def handlers(self) -> list:
        return net.NODELAY_HANDLERS + [
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_GET, self.on_get),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_C_STORE, self.on_store),
        ]

    def startService(self):
        super().startService()
        self.ae = self.build_ae()
        try:
            self.server = self.ae.start_server((self.bind_addr, self.port), block=False,
                                               ssl_context=self.tls_context, evt_handlers=self.handlers())
        except OSError as e:
            log.critical("dicom_scp {name} cannot listen on {host}:{port}: {error}", name=self.name,
                         host=self.bind_addr, port=self.port, error=e.strerror)
            raise
        # Without this the reactor's thread pool join waits on pynetdicom's
        # threads for ~30 s at exit.
        self._trigger = self.reactor.addSystemEventTrigger("before", "shutdown", self._shutdown)
        log.info("dicom_scp {name} listening on {host}:{port} as {aet}", name=self.name, host=self.bind_addr,
                 port=self.bound_port, aet=self.local_aet)

    def _shutdown(self):
        server, self.server = self.server, None
        if server is None:
            return None
        return threads.deferToThread(server.shutdown)

    def stopService(self):
        super().stopService()
        if self._trigger is not None:
            self.reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        return self._shutdown()

    # ------------------------------------------------------------------ pipeline glue

    def pre_process(self, request):
        return request

    def post_process(self, request, response):
        return response

    def error_response(self, error: HarmonyError, request):
        op = request.metadata.get("dimse_op", "")
        status = dimse_status_for(error, op)
        resp = ResponseEnvelope.json(error.status, {"dimse_status": status, "detail": error.detail})
        resp.metadata["dimse_status"] = f"0x{status:04X}"
        resp.context["dimse_status"] = status
        resp.context["error_comment"] = error.detail
        return resp

    def envelope(self, event, op: str, identifier: Dataset | None = None, **extra) -> RequestEnvelope:
        assoc = event.assoc
        requestor = assoc.requestor
        md = {"protocol": "dimse", "request_id": new_request_id(), "endpoint": self.name, "dimse_op": op,
              "calling_aet": _text(requestor.ae_title), "called_aet": _text(assoc.acceptor.ae_title),
              "sop_class_uid": str(event.context.abstract_syntax)}
        model_op = net.MODEL_OF.get(md["sop_class_uid"])
        if model_op:
            md["query_model"] = model_op[0]
        normalized = None
        if identifier is not None:
            level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
            if level:
                md["query_level"] = level
            normalized = identifier_to_json(identifier)
        md.update({k: v for k, v in extra.items() if v is not None})
        return RequestEnvelope(method="DIMSE", path=f"/{md['called_aet']}/{op}", metadata=md,
                               normalized=normalized, client_ip=str(requestor.address),
                               scheme="dimse+tls" if self.tls_context is not None else "dimse",
                               host=self.local_aet, context={"dimse_event": event})

    def run_pipeline(self, env) -> ResponseEnvelope:
        """Run *env* through the pipeline from a pynetdicom thread, with a deadline."""
        if self.pipeline is None:
            return self.error_response(HarmonyError("no pipeline serves this endpoint"), env)

        def call():
            d = self.pipeline.handle(env, self)
            d.addTimeout(self.request_timeout, self.reactor)
            return d
        try:
            return blockingCallFromThread(self.reactor, call)
        except defer.TimeoutError:
            return self.error_response(BackendTimeout("the pipeline did not answer in time"), env)

    def results_of(self, env, response):
        """(stream, None) or (None, failure status dataset)."""
        stream = response.context.get("dicom_results")
        if stream is None:
            # A backend that is not a DICOM one (or an error): never pass that
            # off as "success, no matches".
            status = response.context.get("dimse_status", NO_RESULTS)
            comment = response.context.get("error_comment") or "the pipeline gave no DICOM results"
            return None, status_dataset(status, comment)
        if stream.done and dimse.is_failure(stream.status) and stream.total() == 0:
            return None, status_dataset(stream.status if stream.status is not None else NO_RESULTS,
                                        stream.error_comment)
        return stream, None

    def _next(self, event, stream):
        """The stream's next item, or :data:`CANCELLED` once the peer sent a
        C-CANCEL (or went away) - noticed even while the backend is still
        working, by waking every :data:`CANCEL_POLL_SECS`."""
        box: queue.Queue = queue.Queue(1)
        self.reactor.callFromThread(lambda: stream.next().addBoth(box.put))
        waited = 0.0
        while True:
            try:
                result = box.get(timeout=CANCEL_POLL_SECS)
            except queue.Empty:
                if event.is_cancelled or not event.assoc.is_established:
                    return CANCELLED
                waited += CANCEL_POLL_SECS
                if waited >= self.request_timeout:
                    self._cancel(stream)
                    raise BackendTimeout(f"no result from the backend for {self.request_timeout:g}s")
                continue
            if isinstance(result, Failure):
                result.raiseException()
            return result

    def _cancel(self, stream):
        self.reactor.callFromThread(lambda: (stream.cancel(), release_rest(stream)))

    # ------------------------------------------------------------------ handlers (pynetdicom threads)

    def on_echo(self, event):
        return dimse.SUCCESS

    def on_find(self, event):
        env = self.envelope(event, C_FIND, event.identifier)
        response = self.run_pipeline(env)
        stream, failure = self.results_of(env, response)
        if failure is not None:
            yield failure, None
            return

        def pending(item):
            # A JSON match is Unicode: give it a character set that encodes it.
            yield dimse.PENDING, item if isinstance(item, Dataset) else charset.declare(Dataset.from_json(item))

        ended = yield from self._relay(event, stream, pending, None)
        if ended and dimse.is_failure(stream.status):
            yield status_dataset(stream.status, stream.error_comment), None

    def on_get(self, event):
        env = self.envelope(event, C_GET, event.identifier)
        enable_file_refs(event.assoc)
        yield from self._retrieve(event, env)

    def on_move(self, event):
        dest = _text(event.move_destination)
        where = self.move_destinations.get(dest)
        if where is None:
            log.warn("dicom_scp {name}: C-MOVE to unknown destination {dest}", name=self.name, dest=dest)
            yield None, None
            return
        # pynetdicom reads this dict only after the sub-operation count is
        # yielded, and opens the association then: _retrieve fills in contexts
        # for the instances the backend has already listed by that time.
        association = {"contexts": net.storage_contexts(),
                       "evt_handlers": net.NODELAY_HANDLERS + [(evt.EVT_CONN_OPEN, _move_association_opened)]}
        yield where[0], where[1], association
        env = self.envelope(event, C_MOVE, event.identifier, move_destination=dest, move_delivery="proxy")
        yield from self._retrieve(event, env, association)

    def _relay(self, event, stream, respond, failure_identifier):
        """Yield ``respond(item)``'s responses for each item of *stream*, honouring
        C-CANCEL and a backend that breaks mid-stream; True if the stream ended."""
        while True:
            item = CANCELLED if event.is_cancelled else None
            if item is None:
                try:
                    item = self._next(event, stream)
                except Exception as e:  # noqa: BLE001 - the backend broke or stalled mid-stream
                    status = dimse.UNABLE_TO_PROCESS_TIMEOUT if isinstance(e, BackendTimeout) \
                        else dimse.UNABLE_TO_PROCESS_BACKEND
                    yield status_dataset(status, str(e)), failure_identifier
                    return False
            if item is CANCELLED:
                self._cancel(stream)
                if event.assoc.is_established:
                    yield dimse.CANCEL, None
                return False
            if item is None:
                return True
            yield from respond(item)

    def _retrieve(self, event, env, move_association=None):
        """The common body of C-GET and C-MOVE: announce the count, then one
        sub-operation per instance as it arrives from the backend."""
        response = self.run_pipeline(env)
        stream, failure = self.results_of(env, response)
        if failure is not None:
            yield 1  # pynetdicom sends a failure status only after a sub-operation count
            yield failure, _failed_list([])
            return
        blockingCallFromThread(self.reactor, stream.when_counted)
        total = blockingCallFromThread(self.reactor, stream.total)
        if move_association is not None:
            pairs = blockingCallFromThread(self.reactor, _pairs_listed, stream)
            move_association["contexts"] = net.storage_contexts(pairs)
        yield total
        sent = 0

        def sub_operation(item):
            nonlocal sent
            if sent >= total:
                item.release()  # pynetdicom ignores sub-operations beyond the count it announced
                return
            sent += 1
            try:
                yield dimse.PENDING, FileRef(item)
            finally:
                item.release()

        if not (yield from self._relay(event, stream, sub_operation, _failed_list([]))):
            return
        if stream.failed or dimse.is_failure(stream.status) or sent < total:
            failed = list(stream.failed_sop_uids)
            status = dimse.WARNING_SUBOPS if sent else (stream.status if dimse.is_failure(stream.status)
                                                      else dimse.OUT_OF_RESOURCES_SUBOPS)
            yield status_dataset(status, stream.error_comment), _failed_list(failed)

    def on_store(self, event):
        """Durable in storage_dir and/or accepted downstream before Success."""
        try:
            instance = read_instance(event.dataset_path, ds=check_complete(event.dataset_path))
        except Exception:  # noqa: BLE001 - any decode failure means a corrupt dataset
            log.warn("dicom_scp {name}: refused an unreadable C-STORE dataset", name=self.name)
            return status_dataset(dimse.STORE_CANNOT_UNDERSTAND, "cannot decode the dataset")
        req = event.request
        uids = (instance.sop_instance_uid, instance.study_instance_uid, instance.series_instance_uid)
        if not all(valid_uid(u) for u in uids):
            return status_dataset(dimse.STORE_CANNOT_UNDERSTAND, "missing or invalid UIDs in the dataset")
        if instance.sop_instance_uid != req.AffectedSOPInstanceUID or \
                instance.sop_class_uid != req.AffectedSOPClassUID:
            return status_dataset(dimse.STORE_DATASET_MISMATCH, "dataset does not match the C-STORE request")
        if self.storage_dir is not None:
            dest = self.storage_dir / instance.study_instance_uid / instance.series_instance_uid / \
                f"{instance.sop_instance_uid}.dcm"
            try:
                durable_copy(instance.path, dest)
            except OSError as e:
                log.error("dicom_scp {name}: cannot store an instance: {error}", name=self.name, error=e.strerror)
                return status_dataset(dimse.STORE_OUT_OF_RESOURCES, "cannot write to storage")
            instance.path = dest
        if not self.forward_store:
            return dimse.SUCCESS
        env = self.envelope(event, C_STORE, None, sop_instance_uid=instance.sop_instance_uid)
        env.context["instance"] = instance
        env.normalized = _header_json(instance.path)
        response = self.run_pipeline(env)
        stream = response.context.get("dicom_results")
        if stream is None:
            status = response.context.get("dimse_status")
            if status is None:
                status = dimse.SUCCESS if response.status < 300 else dimse.PROCESSING_FAILURE
            return status_dataset(status, response.context.get("error_comment"))
        blockingCallFromThread(self.reactor, stream.when_counted)
        return status_dataset(stream.status if stream.status is not None else dimse.PROCESSING_FAILURE,
                              stream.error_comment)


# --------------------------------------------------------------------------- sending files


class FileRef(Dataset):
    """A dataset that stands for a file: pynetdicom's C-GET/C-MOVE service
    only yields ``Dataset``s to C-STORE, so this marker carries the path to
    :func:`enable_file_refs`' ``send_c_store``, which streams it from disk
    unchanged instead of decoding and re-encoding it in memory."""

    def __init__(self, instance: DicomInstance):
        super().__init__()
        self.SOPInstanceUID = instance.sop_instance_uid
        self.SOPClassUID = instance.sop_class_uid
        self._instance = instance


def enable_file_refs(assoc, side=None) -> None:
    """Teach one association's ``send_c_store`` to send :class:`FileRef`s from
    disk; with *side* (:class:`net.SideAssociations`, C-MOVE only: a C-GET has
    no second association), a pair this association did not propose goes
    through a side association to the same destination."""
    if getattr(assoc, "_harmony_file_refs", False):
        return
    original = assoc.send_c_store

    @functools.wraps(original)
    def send_c_store(dataset, *args, **kwargs):
        if isinstance(dataset, FileRef):
            try:
                return net.send_instance(assoc, dataset._instance, side=side, **kwargs)
            except transfer.SyntaxRefused as e:
                # pynetdicom counts an exception as a failed sub-operation; say why.
                log.warn("dicom_scp: C-STORE sub-operation failed: {detail}", detail=str(e))
                raise
        return original(dataset, *args, **kwargs)

    assoc.send_c_store = send_c_store
    assoc._harmony_file_refs = True


def _move_association_opened(event):
    """EVT_CONN_OPEN of a C-MOVE's association to its destination: file refs,
    and side associations that end when it does."""
    assoc = event.assoc
    side = net.SideAssociations(assoc)
    enable_file_refs(assoc, side)
    for name in ("release", "abort"):
        original = getattr(assoc, name)

        def closing(*args, _original=original, **kwargs):
            side.close()
            return _original(*args, **kwargs)
        setattr(assoc, name, closing)


def _pairs_listed(stream) -> list:
    """The distinct (SOP class, transfer syntax) pairs of the instances queued
    in *stream* so far (a local archive lists them all at once), commonest first."""
    counts: dict = {}
    for item in stream.queued():
        if isinstance(item, DicomInstance) and item.sop_class_uid and item.transfer_syntax_uid:
            pair = (item.sop_class_uid, item.transfer_syntax_uid)
            counts[pair] = counts.get(pair, 0) + 1
    return sorted(counts, key=counts.get, reverse=True)


def _failed_list(uids) -> Dataset:
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = list(uids)
    return ds


def _header_json(path) -> dict:
    """The stored dataset without pixel data, as DICOM JSON for middleware to read."""
    ds = dcmread(path, stop_before_pixels=True)
    return ds.to_json_dict(bulk_data_threshold=4096, bulk_data_element_handler=lambda _: "")


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip()
