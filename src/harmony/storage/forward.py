"""Store-and-forward delivery: drains the persistent per-target queues.

One :class:`StoreForward` service serves one store and a set of targets, each
a backend reached through its ordinary ``send()``: for a DICOM instance a
C-STORE request envelope (``metadata["dimse_op"] = "C-STORE"``,
``state.dicom.instance`` a :class:`~harmony.dicom.results.DicomInstance` of
the store's file, a Part-10 body for HTTP-family backends); for an HL7 v2
message the message's bytes with its ``hl7.*`` metadata, as the ``mllp``
endpoint made them (the ``mllp`` backend answers 200 for AA, 500 for AE,
422 for AR: delivered, retried, dead).  Per target:

- ``fifo``: strictly in arrival order, one at a time; the head is retried
  until delivered or dead, so nothing overtakes it.
- ``rotate``: up to ``concurrency`` at once, due rows first; a failing
  instance waits out its backoff at the back while the rest flow.

Transient failures (connection refused, timeouts, 5xx, 0xA7xx out of
resources) are retried with exponential backoff and jitter; permanent ones
(4xx, 0xA9xx / 0xCxxx refusals) and ``max_attempts`` exhaustion park the row in
the dead-letter list, from which an operator can replay it.  Time comes from
an injectable ``IReactorTime`` (``task.Clock`` in tests).
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Generator
from typing import Any, Protocol

import attr
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from harmony.dicom import status as dimse
from harmony.dicom.results import C_STORE, ResultStream
from harmony.envelope import RequestEnvelope, new_request_id, read_body
from harmony.errors import HarmonyError
from harmony.log import get_logger
from harmony.state import DicomRequestFacts, RequestState
from harmony.storage import queue as q
from harmony.storage.bodies import FileProducer
from harmony.storage.errors import StorageFailure
from harmony.storage.groupcommit import GroupCommit

log = get_logger("harmony.store_forward")

#: Seconds a claim holds a row without renewal (renewed every third of it).
DEFAULT_LEASE = 60.0
#: Seconds between looks for work on a shared queue with nothing due locally.
DEFAULT_POLL = 5.0

HTTP_TRANSIENT = {408, 425, 429}


class Sender(Protocol):
    """What the queue needs of a backend (harmony.backends.base.Backend, which
    this toolkit may not import): send a request, answer (or Deferred) back."""

    def send(self, request: RequestEnvelope) -> object: ...


@attr.s(auto_attribs=True)
class TargetSettings:
    name: str
    backend: Sender = None
    order: str = q.ROTATE
    max_attempts: int = 10
    backoff_initial: float = 5.0
    backoff_max: float = 600.0
    #: Fraction of each delay that is randomised (0: none; 0.5: 50-100% of the delay).
    jitter: float = 0.5
    concurrency: int = 4
    timeout: float = 120.0

    def backoff(self, attempts: int, rnd: float) -> float:
        delay = min(self.backoff_max, self.backoff_initial * (2 ** max(0, attempts - 1)))
        return delay * (1.0 - self.jitter + self.jitter * rnd)


@attr.s(auto_attribs=True)
class Outcome:
    ok: bool
    permanent: bool = False
    detail: str = ""
    #: The target itself could not be reached (no answer at all): pause the
    #: whole queue rather than try every other instance against it.
    unreachable: bool = False


def dimse_outcome(status: int, comment: str | None = None) -> Outcome:
    text = dimse.describe(status, comment)
    if dimse.is_stored(status):
        return Outcome(True, detail=text)
    return Outcome(False, permanent=not dimse.is_transient(status), detail=text)


def http_outcome(status: int, detail: str = "") -> Outcome:
    text = f"HTTP {status}" + (f": {detail}" if detail else "")
    if 200 <= status < 300:
        return Outcome(True, detail=text)
    transient = status >= 500 or status in HTTP_TRANSIENT
    return Outcome(False, permanent=not transient, detail=text)


def hl7_outcome(code: str, info: object = None) -> Outcome:
    """An HL7 receiver's ACK: AA/CA delivered, AE/CE try again, AR/CR never.
    *info*: the parsed ACK (harmony.hl7.ack.AckInfo), when there is one."""
    detail = f"HL7 {code}"
    error_code = getattr(info, "error_code", "") if info is not None else ""
    if error_code:
        detail += f" (error {error_code})"
    if code in ("AA", "CA"):
        return Outcome(True, detail=detail)
    return Outcome(False, permanent=code in ("AR", "CR"), detail=detail)


@defer.inlineCallbacks
def classify_response(response) -> Generator[defer.Deferred[Any], Any, Outcome]:
    """What a backend's answer to a C-STORE (or an HL7 message) means for the queue."""
    ack_code = response.state.hl7_ack_code
    if ack_code is not None:
        return hl7_outcome(ack_code, response.state.hl7_ack_info)
    status = response.state.dimse_status
    stream = response.state.dicom_results
    if status is None and isinstance(stream, ResultStream):
        yield stream.collect()
        status = stream.status
        if status is not None:
            return dimse_outcome(status, stream.error_comment)
    if status is not None:
        return dimse_outcome(status, response.state.error_comment)
    detail = ""
    if not 200 <= response.status < 300:
        try:
            body = yield read_body(response.body, 4096)
            detail = body.decode("utf-8", "replace")[:500]
        except Exception:  # noqa: BLE001 - an unreadable error body only loses the detail
            detail = ""
    elif not isinstance(response.body, (bytes, bytearray)) and response.body is not None:
        # Drain a streamed success body so the connection is reusable.
        try:
            yield read_body(response.body, None)
        except Exception:  # noqa: BLE001
            pass
    return http_outcome(response.status, detail)


def classify_failure(failure: Failure) -> Outcome:
    err = failure.value
    if isinstance(err, HarmonyError):
        status = getattr(err, "dimse_status", None)
        if status is not None and err.status < 500:
            return dimse_outcome(status, err.detail)
        outcome = http_outcome(err.status, err.detail)
        outcome.unreachable = err.status >= 500
        return outcome
    if isinstance(err, defer.TimeoutError) or isinstance(err, defer.CancelledError):
        return Outcome(False, detail="timed out", unreachable=True)
    return Outcome(False, detail=f"{type(err).__name__}: {err}"[:500], unreachable=True)


def message_request(kind: str, body: bytes, metadata: str, target: str, attempt: int) -> RequestEnvelope:
    """The envelope a target backend gets for one queued message."""
    md = {k: v for k, v in json.loads(metadata or "{}").items() if isinstance(v, str)}
    md.update({"protocol": kind, "request_id": new_request_id(), "store_forward.target": target,
               "store_forward.attempt": str(attempt)})
    return RequestEnvelope(method="POST", path="/", subpath="/", body=body, metadata=md,
                           headers=Headers({b"content-type": [MESSAGE_TYPES.get(kind, b"application/octet-stream")]}))


#: Content-Type of a queued message's body, by kind.
MESSAGE_TYPES = {q.HL7V2: b"x-application/hl7-v2+er7"}


def delivery_request(instance, target: str, attempt: int) -> RequestEnvelope:
    """The C-STORE envelope a target backend gets for one queued instance."""
    headers = Headers({b"content-type": [b"application/dicom"]})
    return RequestEnvelope(
        method="POST", path="/", subpath="/", headers=headers,
        body=FileProducer(instance.path),
        metadata={"protocol": "store_forward", "dimse_op": C_STORE, "request_id": new_request_id(),
                  "sop_class_uid": instance.sop_class_uid, "sop_instance_uid": instance.sop_instance_uid,
                  "store_forward.target": target, "store_forward.attempt": str(attempt)},
        state=RequestState(dicom=DicomRequestFacts(instance=instance)))


class StoreForward(Service):
    def __init__(self, store, targets: list[TargetSettings], *, clock=None, rnd=random.random,
                 delivered_retention: float | None = 86400.0, dead_retention: float | None = None,
                 delete_after_delivery: bool = False, housekeeping_interval: float = 60.0,
                 wall_clock=None, stats_interval: float = 5.0, lease: float = DEFAULT_LEASE,
                 poll_interval: float | None = None):
        self.store = store
        self.targets = {t.name: t for t in targets}
        if clock is None:
            clock = store.reactor
        self.clock = clock
        #: Seconds since the epoch for queue timestamps; follows ``clock`` when
        #: it is a test clock so backoff and retention are testable.
        self.now = wall_clock or (clock.seconds if isinstance(clock, task.Clock) else time.time)
        self.rnd = rnd
        self.delivered_retention = delivered_retention
        self.dead_retention = dead_retention
        self.delete_after_delivery = delete_after_delivery
        self.housekeeping_interval = housekeeping_interval
        #: This node's name on its leases, and how long a lease lasts unrenewed:
        #: a node that dies (or loses the database) mid-delivery gives its rows
        #: back to the other nodes when its leases run out.
        self.node = getattr(store, "node", "")
        self.lease = lease
        #: On a shared queue other nodes enqueue too: look for work this often
        #: even with no local wake-up (None: only on wake-ups and due times).
        self.poll_interval = poll_interval if poll_interval is not None else (
            DEFAULT_POLL if getattr(store, "shared", False) else None)
        #: Rows whose lease this node lost to another (a redelivery follows).
        self.leases_lost = 0
        #: Queue table health (PostgreSQL dead row versions), refreshed with the stats.
        self.table_health: dict = {}
        self.drainers = {name: _Drainer(self, t) for name, t in self.targets.items()}
        #: Last per-target stats (what metrics and dashboards read without touching sqlite).
        self.snapshot: dict = {}
        #: (target, outcome) -> attempts; outcome is delivered, retry or dead.
        self.attempts: Counter = Counter()
        self.stats_interval = stats_interval
        self._housekeeping = None
        self._stats_loop = None
        self._renew_loop = None
        self._pruning: defer.Deferred = defer.succeed(None)
        self._ready: defer.Deferred | None = None
        #: Start-up recovery has run: only then may rows be claimed.  A claim
        #: before it (an ingest's wake-up while the recovery transaction still
        #: waits its turn on a loaded machine) would have its 'delivering' row
        #: put back to pending by the recovery and delivered a second time.
        self.recovered = False
        #: A delivery is marked delivered in one transaction with every other delivery
        #: that ended while the previous mark was committing (group commit, as ingest
        #: does): on PostgreSQL that commit's round trip was half a drain's waiting.
        #: The row stays 'delivering' until its batch commits, so a crash before
        #: then delivers it again (at least once), never loses it.
        self.settles = GroupCommit(self.store.run, self._settle_batch)

    # -- lifecycle
    def startService(self):
        super().startService()
        # Alone on its sqlite file, every interrupted delivery is this node's;
        # on a shared queue only the rows leased under its own name are.
        node = self.node if getattr(self.store, "shared", False) else None
        self._ready = self.store.bookkeep(q.recover, self.now(), list(self.targets), node)

        def recovered(n):
            if not self.running:
                return  # stopped before recovery finished
            self.recovered = True
            if n:
                log.info("store_forward: {n} interrupted deliveries queued again", n=n)
            self._housekeeping = task.LoopingCall(self.housekeeping)
            self._housekeeping.clock = self.clock
            self._housekeeping.start(self.housekeeping_interval, now=True).addErrback(
                lambda f: log.failure("store_forward housekeeping stopped", f))
            self._stats_loop = task.LoopingCall(self._refresh_stats)
            self._stats_loop.clock = self.clock
            self._stats_loop.start(self.stats_interval, now=False)
            self._renew_loop = task.LoopingCall(self._renew_leases)
            self._renew_loop.clock = self.clock
            self._renew_loop.start(self.lease / 3.0, now=False)
            self.wake()

        self._ready.addCallback(recovered)
        self._ready.addErrback(lambda f: log.failure("store_forward could not start", f))
        return self._ready

    def stopService(self):
        super().stopService()
        self.recovered = False  # a restart of the service recovers again first
        for loop in (self._housekeeping, self._stats_loop, self._renew_loop):
            if loop is not None and loop.running:
                loop.stop()
        waiting = []
        for d in self.drainers.values():
            waiting.extend(d.stop())
        return defer.DeferredList(waiting)

    def ready(self) -> defer.Deferred:
        """Fires once start-up recovery is done (tests)."""
        d: defer.Deferred[None] = defer.Deferred()

        def recovered(result):
            d.callback(None)
            return result

        self._ready.addBoth(recovered)
        return d

    def wake(self, target: str | None = None) -> None:
        """New work may be due: claim it now rather than at the next timer."""
        if not self.running:
            return
        for name, drainer in self.drainers.items():
            if target is None or name == target:
                drainer.wake()

    def idle(self) -> defer.Deferred:
        """Fires once start-up recovery is done and no target has a claim or
        delivery in flight (tests, benchmarks)."""
        d = self.ready() if self._ready is not None else defer.succeed(None)
        return d.addCallback(lambda _: defer.DeferredList([dr.idle() for dr in self.drainers.values()]))

    # -- management
    def stats(self) -> defer.Deferred:
        """Per target: entries per state, oldest age, lease holders (node ->
        rows in delivery, the whole cluster's on a shared queue) and any pause."""
        def read(conn, now):
            return q.stats(conn, now), q.table_health(conn)

        def refreshed(result):
            s, health = result
            s = {name: v for name, v in s.items() if name in self.targets}
            for name in self.targets:
                s.setdefault(name, q.empty_stats())
            self.snapshot = s
            self.table_health = health
            return s
        return self.store.read(read, self.now()).addCallback(refreshed)

    def _renew_leases(self):
        """Heartbeat: extend this node's leases on the rows it is delivering,
        and give back the ones it holds but no longer delivers."""
        ids = [row_id for drainer in self.drainers.values() for row_id in (*drainer.in_flight, *drainer.settling)]
        now = self.now()
        # Rows this node claimed but is not delivering (their outcome could not
        # be recorded) go back at once; a claim of the last moments may not be
        # in flight yet, hence the grace.
        d = self.store.bookkeep(q.renew, ids, self.node, now + self.lease, now, self.lease / 3.0)
        return d.addErrback(lambda f: log.warn("store_forward: cannot renew leases ({error}); other nodes take "
                                               "the rows over when they expire", error=f.getErrorMessage()))

    def _refresh_stats(self):
        return self.stats().addErrback(lambda f: log.failure("store_forward stats failed", f))

    def dead(self, target: str, limit: int = 100, after_id: int = 0) -> defer.Deferred:
        return self.store.read(q.dead_entries, target, limit, after_id)

    def retry(self, target: str, row_id: int | None = None) -> defer.Deferred:
        d = self.store.write(q.retry_dead, target, self.now(), row_id)

        def done(n):
            self.drainers[target].resume()
            return n
        return d.addCallback(done)

    def kick(self, target: str) -> defer.Deferred:
        """Make every pending entry due now (the target is back: stop waiting out backoffs)."""
        def make_due(conn, now):
            q.unpause(conn, target)
            return q.make_due(conn, target, now)
        d = self.store.write(make_due, self.now())

        def done(n):
            self.drainers[target].resume()
            return n
        return d.addCallback(done)

    def purge(self, target: str, include_pending: bool = False) -> defer.Deferred:
        states = (q.DEAD, q.PENDING) if include_pending else (q.DEAD,)
        return self.store.write(q.purge, target, states)

    def housekeeping(self) -> defer.Deferred:
        """Apply retention.  Runs one at a time in this node: on a shared queue
        a pruner that finds another one at work skips its round, which must
        mean another node, never this node's own previous round."""
        self._pruning = self._pruning.addBoth(lambda _: self._prune())
        d: defer.Deferred = defer.Deferred()

        def pruned(result):
            d.callback(result)
            return result

        self._pruning.addBoth(pruned)
        return d

    def _prune(self) -> defer.Deferred:
        now = self.now()
        delivered_before = now - self.delivered_retention if self.delivered_retention else None
        dead_before = now - self.dead_retention if self.dead_retention else None
        d = self.store.bookkeep(q.expire, delivered_before, dead_before)
        d.addCallback(lambda _: self.stats() if self.running else None)  # stopped meanwhile: the store may be closed
        d.addErrback(lambda f: log.failure("store_forward housekeeping failed", f))
        return d

    # -- delivery bookkeeping (called by drainers)
    def _settle_batch(self, row_ids: list[int]) -> list[bool]:
        """(Storage thread.) Mark the deliveries that ended together as delivered, in one transaction."""
        return self.store.bookkeep_sync(q.delivered_many, row_ids, self.now(), self.node)

    def record(self, settings: TargetSettings, row_id: int, sop_uid: str, attempts: int, outcome: Outcome):
        now = self.now()
        if outcome.ok:
            # Settled with the other deliveries that ended meanwhile (one transaction: see __init__).
            d = self.settles.submit(row_id)
            d.addCallback(lambda recorded: recorded or self._lease_lost(settings, row_id))
            result = "delivered"
            if self.delete_after_delivery and not sop_uid.startswith(q.MESSAGE_PREFIX):
                d.addCallback(lambda _: self.store.run(self._forget_if_done, sop_uid))
        else:
            if outcome.permanent or attempts >= settings.max_attempts:
                retry_at = None
            else:
                retry_at = now + settings.backoff(attempts, self.rnd())
            d = self.store.bookkeep(q.failed, row_id, outcome.detail or "failed", now, retry_at=retry_at,
                                    node=self.node)
            d.addCallback(lambda recorded: recorded or self._lease_lost(settings, row_id))
            result = "dead" if retry_at is None else "retry"
            if retry_at is None:
                log.warn("store_forward {target}: instance parked in the dead-letter list after {attempts} "
                         "attempt(s): {detail}", target=settings.name, attempts=attempts, detail=outcome.detail)
        self.attempts[(settings.name, result)] += 1
        return d

    def _lease_lost(self, settings: TargetSettings, row_id: int):
        """Our lease ran out mid-delivery and another node took the row: its
        outcome counts, ours is dropped (the target may get the instance twice,
        which a DICOM target takes as the same SOP Instance)."""
        self.leases_lost += 1
        log.warn("store_forward {target}: a lease expired before its delivery was recorded (another node "
                 "delivers it again)", target=settings.name)

    def _forget_if_done(self, sop_uid: str):
        if self.store.read_sync(q.fully_delivered, sop_uid):
            self.store.delete_sync(sop_uid)


class _Drainer:
    """The delivery loop of one target."""

    def __init__(self, service: StoreForward, settings: TargetSettings):
        self.svc = service
        self.settings = settings
        self.in_flight: dict[int, defer.Deferred] = {}
        #: Delivered rows whose mark is still being committed (see _deliver).
        self.settling: dict[int, defer.Deferred] = {}
        self.claiming = False
        self.again = False
        self.timer = None
        self.stopped = False
        #: While the target is unreachable: no claims before this time.
        self.paused_until: float | None = None
        self.unreachable_streak = 0
        #: Bumped by resume(): failures of attempts started before it do not pause again.
        self.epoch = 0
        self._idle_waiters: list[defer.Deferred] = []

    @property
    def capacity(self) -> int:
        return 1 if self.settings.order == q.FIFO else self.settings.concurrency

    def wake(self):
        if self.stopped or not self.svc.recovered:
            return  # (start-up recovery wakes every drainer once it has run)
        if self.paused_until is not None:
            if self.svc.now() < self.paused_until:
                self._schedule(self.paused_until)
                return
            self.paused_until = None
        if self.claiming:
            self.again = True
            return
        free = self.capacity - len(self.in_flight)
        if free <= 0:
            return
        self.claiming = True
        d = self.svc.store.bookkeep(q.claim, self.settings.name, self.settings.order, free, self.svc.now(),
                                    node=self.svc.node, lease=self.svc.lease)
        d.addCallbacks(self._claimed, self._claim_failed)

    def _claim_failed(self, failure):
        self.claiming = False
        log.failure("store_forward {target}: cannot read the queue", failure, target=self.settings.name)
        self._schedule(self.svc.now() + 5.0)
        self._maybe_idle()

    def _claimed(self, result):
        self.claiming = False
        rows, next_due = result
        for row_id, item, attempts in rows:
            d = self._deliver(row_id, item, attempts)
            if not d.called:
                self.in_flight[row_id] = d
        if self.again or (rows and len(self.in_flight) < self.capacity):
            self.again = False
            self.wake()
        elif not rows and (next_due is not None or self.svc.poll_interval):
            poll = self.svc.now() + self.svc.poll_interval if self.svc.poll_interval else None
            self._schedule(min(t for t in (next_due, poll) if t is not None))
        self._maybe_idle()

    def _schedule(self, due: float):
        delay = max(0.0, due - self.svc.now())
        if self.timer is not None and self.timer.active():
            if self.timer.getTime() <= self.svc.clock.seconds() + delay:
                return
            self.timer.cancel()
        self.timer = self.svc.clock.callLater(delay, self._timer_fired)

    def _timer_fired(self):
        self.timer = None
        self.wake()

    @defer.inlineCallbacks
    def _deliver(self, row_id: int, sop_uid: str, attempts: int):
        settings = self.settings
        epoch = self.epoch
        kind = "message" if sop_uid.startswith(q.MESSAGE_PREFIX) else "instance"
        try:
            request = None
            outcome = None
            if kind == "instance":
                try:
                    instance = yield self.svc.store.run(self.svc.store.get_sync, sop_uid)
                except StorageFailure as e:
                    # Not readable now (its file still to come from S3, the database
                    # away): a transient failure of this instance, retried with backoff.
                    instance, outcome = None, Outcome(False, detail=e.detail)
                if instance is not None:
                    request = delivery_request(instance, settings.name, attempts)
            else:
                message = yield self.svc.store.read(q.load_message, sop_uid)
                if message is not None:
                    request = message_request(message[0], message[1], message[2], settings.name, attempts)
            if outcome is not None:
                pass
            elif request is None:
                outcome = Outcome(False, permanent=True, detail=f"the {kind} is no longer in the store")
            else:
                try:
                    d = defer.maybeDeferred(settings.backend.send, request)
                    d.addTimeout(settings.timeout, self.svc.clock)
                    response = yield d
                    outcome = yield classify_response(response)
                except Exception:  # noqa: BLE001 - every failure is classified, none escapes
                    outcome = classify_failure(Failure())
            if self.stopped:
                return  # shutting down: left 'delivering', recovered and sent again at start-up
            if epoch == self.epoch:
                yield self._note_reachability(outcome)
            recorded = self.svc.record(settings, row_id, sop_uid, attempts, outcome)
            if outcome.ok and settings.order == q.ROTATE:
                # The target has it: the slot is free for the next item while the mark
                # commits with the others (the row stays 'delivering', leased to us, until
                # then; lost with a crash, it is delivered again).  A fifo head waits for
                # its mark: the next one may not be claimed before it.
                self.settling[row_id] = recorded
                recorded.addBoth(self._settled, row_id)
            else:
                yield recorded
        except Exception:  # noqa: BLE001 - the row stays 'delivering' and is recovered at restart
            log.failure("store_forward {target}: bookkeeping failed", target=settings.name)
        finally:
            self.in_flight.pop(row_id, None)
            self.wake()
            self._maybe_idle()

    def _settled(self, result, row_id: int):
        self.settling.pop(row_id, None)
        if isinstance(result, Failure):
            # The row stays 'delivering' under our lease: the heartbeat gives it back
            # (a row claimed but no longer delivered) and it goes out again.
            log.failure("store_forward {target}: bookkeeping failed", result, target=self.settings.name)
        self._maybe_idle()

    def _note_reachability(self, outcome: Outcome):
        """Pause the target's queue while it is unreachable - in the database,
        so every node sharing the queue pauses (three nodes must not hammer a
        dead PACS three times) - and lift the pause on the next answer."""
        store, name = self.svc.store, self.settings.name
        if outcome.unreachable:
            self.unreachable_streak += 1
            pause = self.settings.backoff(self.unreachable_streak, self.svc.rnd())
            self.paused_until = self.svc.now() + pause
            return store.bookkeep(q.pause, name, self.paused_until, self.svc.node, outcome.detail, self.svc.now()
                                  ).addErrback(lambda f: None)  # the local pause holds anyway
        had_pause = self.unreachable_streak > 0
        self.unreachable_streak = 0
        self.paused_until = None
        if had_pause:
            return store.bookkeep(q.unpause, name).addErrback(lambda f: None)
        return None

    def resume(self):
        """An operator says the target is back: stop pausing and try now."""
        self.epoch += 1
        self.unreachable_streak = 0
        self.paused_until = None
        self.wake()

    def stop(self) -> list:
        """Stop claiming and cut deliveries in flight short: a slow target must
        not hold up shutdown, and an interrupted delivery is simply sent again."""
        self.stopped = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        waiting = list(self.in_flight.values())
        for d in waiting:
            d.cancel()
        # Marks already on their way are let finish: the deliveries happened.
        return [d.addErrback(lambda f: None) for d in waiting + list(self.settling.values())]

    def idle(self) -> defer.Deferred:
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        self._maybe_idle()
        return d

    def _maybe_idle(self):
        if not self.claiming and not self.in_flight and not self.settling:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)
