"""``store_forward`` backend: acknowledge after the durable write, deliver later.

Put it behind a C-STORE (``dicom_scp``) or STOW-RS endpoint, or an ``mllp``
endpoint for HL7 v2.  Each instance (or message) is written to the durable
store and queued for every backend in ``forward_to`` in one transaction; only
then does the pipeline answer (so the DIMSE endpoint answers Success, the
STOW endpoint lists the instance as stored, the MLLP endpoint sends AA).
HL7 feeds are order-sensitive: give their targets ``order = "fifo"``.  A
:class:`~harmony.storage.forward.StoreForward` service, started with Harmony,
delivers from the persistent queues through each target backend's ``send()``.

    [backends.ingest]
    service = "store_forward"
    forward_to = ["pacs", "cloud"]     # names of other [backends.*]
    order = "rotate"                   # or "fifo"
    max_attempts = 10
    backoff_initial_seconds = 5
    backoff_max_seconds = 600
    jitter = 0.5
    concurrency = 4                    # rotate only; fifo sends one at a time
    timeout_seconds = 120
    delivered_retention_hours = 24     # queue history kept for operators
    dead_retention_days = 0            # 0: dead letters stay until replayed or purged
    delete_after_delivery = false      # true: a pure relay, files go once every target has them
    lease_seconds = 60                 # a claim unrenewed this long goes to another node (a dead node's work)
    poll_seconds = 5                   # shared queue ([storage] index = "postgresql"): look for work this often
    # path = "spool"                   # default: [storage.options] path
    [backends.ingest.options.per_target.pacs]
    order = "fifo"
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from harmony.backends.base import Backend
from harmony.backends.local_archive import ingest, ingest_batch
from harmony.config.errors import OptionError
from harmony.config.options import Options
from harmony.dicom import status as dimse
from harmony.dicom.results import C_STORE
from harmony.envelope import ResponseEnvelope, read_body
from harmony.errors import BadRequest
from harmony.interfaces import IBatchBackend
from harmony.storage import queue as q
from harmony.storage.config import store_from_context
from harmony.storage.forward import DEFAULT_LEASE, DEFAULT_POLL, StoreForward, TargetSettings
from harmony.storage.store import release_store

#: A queued message is held in the index database: v2 messages are kilobytes.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def target_settings(name: str, opts: Options, defaults: TargetSettings | None = None) -> TargetSettings:
    d = defaults or TargetSettings(name)
    return TargetSettings(
        name=name,
        order=opts.str("order", d.order, choices=(q.FIFO, q.ROTATE)),
        max_attempts=opts.int("max_attempts", d.max_attempts, minimum=1, maximum=1_000_000),
        backoff_initial=opts.number("backoff_initial_seconds", d.backoff_initial, minimum=0.001),
        backoff_max=opts.number("backoff_max_seconds", d.backoff_max, minimum=0.001),
        jitter=_fraction(opts, "jitter", d.jitter),
        concurrency=opts.int("concurrency", d.concurrency, minimum=1, maximum=256),
        timeout=opts.number("timeout_seconds", d.timeout, minimum=0.001),
    )


def _fraction(opts: Options, key: str, default: float) -> float:
    value = opts.number(key, default, minimum=0)
    if value > 1:
        raise OptionError(key, f"must be between 0 and 1, got {value}")
    return value


@implementer(IBatchBackend)
class StoreForwardBackend(Backend):
    #: Like local_archive's: a C-STORE's ``request.normalized`` is never read (the file is queued).
    reads_store_header = False
    #: The store parses and checks every received instance before filing it
    #: (dicom_scp then skips its own parse: DicomInstance.unchecked).
    checks_received_instances = True

    def __init__(self, name: str, store, targets: list[TargetSettings], **service_options):
        super().__init__(name)
        self.store = store
        self.forward = StoreForward(store, targets, **service_options)
        self.forward.setName(f"store_forward:{name}")

    @property
    def service(self):
        """The delivery service Harmony starts and stops with itself."""
        return self.forward

    @property
    def target_names(self) -> list[str]:
        return list(self.forward.targets)

    @classmethod
    def from_config(cls, name, options, ctx):
        names = options.list("forward_to", of=str)  # Options.list's default "of" is shadowed by Options.str
        if not names:
            raise OptionError("forward_to", "must name at least one backend to deliver to")
        for n in names:
            if n == name:
                raise OptionError("forward_to", "cannot forward to itself")
            if n not in ctx.config.backends:
                raise OptionError("forward_to", f"names unknown backend {n!r}")
        defaults = target_settings("*", options)
        per_target = options.table("per_target", {})
        unknown = sorted(set(per_target) - set(names))
        if unknown:
            raise OptionError("per_target", f"names backend(s) not in forward_to: {', '.join(unknown)}")
        targets = []
        for n in names:
            sub = Options(per_target.get(n, {}))
            try:
                targets.append(target_settings(n, sub, defaults))
            except OptionError as e:
                raise OptionError(f"per_target.{n}.{e.key}", e.message) from None
            extra = sorted(set(sub.raw) - sub.used)
            if extra:
                raise OptionError(f"per_target.{n}", f"unknown option(s): {', '.join(extra)}")
        delivered_h = options.number("delivered_retention_hours", 24, minimum=0)
        dead_days = options.number("dead_retention_days", 0, minimum=0)
        delete_after = options.bool("delete_after_delivery", False)
        lease = options.number("lease_seconds", DEFAULT_LEASE, minimum=0.5)
        poll = options.number("poll_seconds", DEFAULT_POLL, minimum=0.05) if "poll_seconds" in options \
            else None
        store = store_from_context(ctx, options)
        return cls(name, store, targets, delivered_retention=delivered_h * 3600 or None,
                   dead_retention=dead_days * 86400 or None, delete_after_delivery=delete_after, lease=lease,
                   poll_interval=poll)

    def bind_backends(self, backends: dict) -> None:
        """Called by the runtime once every backend is built: resolve ``forward_to``."""
        for t in self.forward.targets.values():
            backend = backends.get(t.name)
            if backend is None:
                raise OptionError("forward_to", f"backend {t.name!r} could not be built")
            t.backend = backend

    @defer.inlineCallbacks
    def queue_message(self, request):
        """Keep an HL7 v2 message (bytes as received, ``hl7.*`` metadata) and queue it."""
        body = yield read_body(request.body, MAX_MESSAGE_BYTES)
        if not body:
            raise BadRequest("an empty message cannot be queued")
        metadata = json.dumps({k: v for k, v in request.metadata.items() if k.startswith("hl7.")})
        message_id = yield self.store.write(q.enqueue_message, q.HL7V2, body, metadata, self.target_names,
                                            self.forward.now())
        self.forward.wake()
        return ResponseEnvelope.json(200, {"queued": q.message_key(message_id), "queued_for": self.target_names})

    def close(self):
        if self.store is not None:
            store, self.store = self.store, None
            release_store(store)

    @defer.inlineCallbacks
    def send(self, request):
        if request.metadata.get("protocol") == q.HL7V2:
            return (yield self.queue_message(request))
        op = request.metadata.get("dimse_op", C_STORE)
        if op != C_STORE:
            raise BadRequest(f"store_forward accepts C-STORE only, not {op}")
        stored = yield ingest(self.store, request, enqueue=self.target_names, now=self.forward.now())
        self.forward.wake()
        return self._stored(stored)

    def send_batch(self, requests):
        """Several C-STOREs (one STOW-RS upload) stored and queued as one group: one commit for all."""
        for request in requests:
            op = request.metadata.get("dimse_op", C_STORE)
            if request.metadata.get("protocol") == q.HL7V2 or op != C_STORE:
                return defer.fail(BadRequest(f"store_forward batches C-STOREs only, not {op}"))

        def stored(outcomes):
            self.forward.wake()
            return [o if isinstance(o, Failure) else self._stored(o) for o in outcomes]
        return ingest_batch(self.store, requests, enqueue=self.target_names, now=self.forward.now()).addCallback(
            stored)

    def _stored(self, stored) -> ResponseEnvelope:
        response = ResponseEnvelope.json(200, {"stored": stored.sop_instance_uid,
                                               "sop_class_uid": stored.sop_class_uid,
                                               "queued_for": self.target_names})
        dimse.record(response, dimse.SUCCESS)
        response.state.stored_instance = stored
        return response
