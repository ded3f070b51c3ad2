"""Queue management for the management API: data functions, and the Klein
routes that serve them.

The data functions (``overview``, ``dead_letters``, ``retry``, ``purge`` ...)
take the store-and-forward services and plain arguments and return Deferreds
of JSON-ready values, so another queue kind (HL7 message queues) or another
front end can reuse them; :class:`QueueRoutes` only maps HTTP onto them.
Mounted at ``{base}/queues`` behind the management API's authentication (it
has none of its own)::

    GET    /queues                          depth, oldest age, delivering/dead per target
    GET    /queues/{target}/dead            dead letters with last error (?limit=100&after=ID + filters)
    POST   /queues/{target}/retry           replay dead letters (?id=N: just one; filters: those matching)
    POST   /queues/{target}/wake            make pending entries due now (the target is back)
    DELETE /queues/{target}/dead?confirm={target}   purge the dead letters (filters: those matching)
    DELETE /queues/{target}?confirm={target}        purge dead *and pending* entries

Filters (dead letters only): ``study`` (Study Instance UID), ``sop_class``,
``error`` (a substring of the last error), ``since``/``until`` (failure time,
seconds since the epoch).  Purging needs ``confirm`` equal to the target
name: a bare DELETE (a script's typo) must not throw away instances nobody
has received.
"""

from __future__ import annotations

import json

import attr
from klein import Klein
from klein.resource import KleinResource
from twisted.internet import defer

from harmony.envelope import ResponseEnvelope
from harmony.errors import BadRequest, HarmonyError, NotFound
from harmony.log import get_logger
from harmony.storage import nodes
from harmony.storage import queue as q
from harmony.web.problem import problem_response
from harmony.web.routes import apply_response, routing_failure

log = get_logger("harmony.store_forward.admin")


# ------------------------------------------------------------------ filters


@attr.s(auto_attribs=True, frozen=True)
class DeadFilter:
    """Which dead letters a listing, bulk retry or purge applies to."""

    study_uid: str | None = None
    sop_class_uid: str | None = None
    error: str | None = None
    since: float | None = None
    until: float | None = None

    @classmethod
    def from_args(cls, args: dict) -> "DeadFilter":
        return cls(study_uid=args.get("study") or None, sop_class_uid=args.get("sop_class") or None,
                   error=args.get("error") or None, since=_float_arg(args, "since"), until=_float_arg(args, "until"))

    @property
    def empty(self) -> bool:
        return self == DeadFilter()

    def where(self) -> tuple[str, list]:
        """SQL conditions on ``queue q`` (joined with ``instances i`` and ``series s``, ``studies st``)."""
        sql: list[str] = []
        args: list[str | float] = []
        if self.study_uid:
            sql.append("st.study_uid = ?")
            args.append(self.study_uid)
        if self.sop_class_uid:
            sql.append("i.sop_class_uid = ?")
            args.append(self.sop_class_uid)
        if self.error:
            sql.append("instr(lower(coalesce(q.last_error, '')), lower(?)) > 0")
            args.append(self.error)
        if self.since is not None:
            sql.append("q.finished_at >= ?")
            args.append(self.since)
        if self.until is not None:
            sql.append("q.finished_at <= ?")
            args.append(self.until)
        return "".join(" AND " + s for s in sql), args


_DEAD_FROM = ("FROM queue q LEFT JOIN instances i ON q.kind = 'dicom' AND i.sop_uid = q.sop_uid "
              "LEFT JOIN series s ON s.pk = i.series_pk LEFT JOIN studies st ON st.pk = s.study_pk "
              "LEFT JOIN messages m ON q.kind != 'dicom' AND q.sop_uid = 'msg:' || m.id "
              "WHERE q.target = ? AND q.state = 'dead'")


def select_dead(conn, target: str, flt: DeadFilter, limit: int, after_id: int) -> list[dict]:
    """Dead letters of *target* matching *flt* (storage thread)."""
    where, args = flt.where()
    rows = conn.execute(
        "SELECT q.id, q.sop_uid, q.attempts, q.enqueued_at, q.finished_at, q.last_error, i.sop_class_uid, "
        "st.study_uid, q.kind, m.metadata " + _DEAD_FROM + where + " AND q.id > ? ORDER BY q.id LIMIT ?",
        [target, *args, after_id, limit])
    out = []
    for r in rows:
        entry = {"id": r[0], "kind": r[8], "attempts": r[2], "enqueued_at": r[3], "failed_at": r[4],
                 "last_error": r[5]}
        if r[8] == q.DICOM:
            entry.update(sop_instance_uid=r[1], sop_class_uid=r[6], study_instance_uid=r[7])
        else:
            # A message: its kind and header summary (no patient data), as harmony.storage.queue keeps it.
            entry["item"] = r[1]
            entry.update({k: v for k, v in json.loads(r[9] or "{}").items() if k in q.MESSAGE_SUMMARY})
        out.append(entry)
    return out


def count_dead(conn, target: str, flt: DeadFilter) -> int:
    where, args = flt.where()
    return conn.execute("SELECT count(*) " + _DEAD_FROM + where, [target, *args]).fetchone()[0]


def retry_matching(conn, target: str, flt: DeadFilter, now: float) -> int:
    where, args = flt.where()
    return conn.execute(
        "UPDATE queue SET state='pending', attempts=0, next_attempt_at=?, finished_at=NULL "
        "WHERE id IN (SELECT q.id " + _DEAD_FROM + where + ")", [now, target, *args]).rowcount


def purge_matching(conn, target: str, flt: DeadFilter) -> int:
    where, args = flt.where()
    return conn.execute("DELETE FROM queue WHERE id IN (SELECT q.id " + _DEAD_FROM + where + ")",
                        [target, *args]).rowcount


def enqueue_study(conn, study_uid: str, target: str, now: float) -> int:
    """Queue every stored instance of a study for *target* (storage thread)."""
    sops = [r[0] for r in conn.execute(
        "SELECT i.sop_uid FROM instances i JOIN series s ON s.pk = i.series_pk JOIN studies st ON st.pk = s.study_pk "
        "WHERE st.study_uid = ?", (study_uid,))]
    for sop in sops:
        q.enqueue(conn, sop, [target], now)
    return len(sops)


# ------------------------------------------------------------------ data functions


def service_for(services, target: str):
    for svc in services:
        if target in svc.targets:
            return svc
    raise NotFound(f"no store-and-forward target named {target!r}")


def overview(services) -> defer.Deferred:
    # The database down: the last snapshot, and "databases" says why it is stale.
    d = defer.gatherResults([svc.stats().addErrback(lambda f, svc=svc: svc.snapshot) for svc in services])
    shared = next((svc.store for svc in services if getattr(svc.store, "shared", False)), None)
    members = (shared.read(nodes.holders).addErrback(lambda f: None) if shared is not None
               else defer.succeed(None))
    d = defer.gatherResults([d, members])
    return d.addCallback(lambda both: queues_overview(services, both[0], both[1]))


def queues_overview(services, all_stats, members=None) -> dict:
    """``GET /queues``: every target's counts and lease holders (the cluster's
    on a shared queue), this node's view of each store's database and object
    storage, and - on a shared store - the cluster's nodes with their
    heartbeats (``nodes``)."""
    databases = {}
    for svc in services:
        db = getattr(svc.store, "db", None)
        if db is not None:
            error = getattr(db, "last_error", None)
            databases[db.describe()] = {"up": error is None, "error": error, "shared": svc.store.shared}
        blobs = getattr(svc.store, "blobs", None)
        if blobs is not None:
            databases[blobs.describe()] = {"up": blobs.last_error is None, "error": blobs.last_error,
                                           "uploads_pending": svc.store.uploads_pending}
    doc = {"targets": {t: s for stats in all_stats for t, s in sorted(stats.items())}}
    if services:
        doc.update(node=services[0].node, databases=databases)
    if members is not None:
        doc["nodes"] = members
    return doc


def dead_letters(svc, target: str, flt: DeadFilter, limit: int = 100, after_id: int = 0) -> defer.Deferred:
    d = svc.store.read(select_dead, target, flt, limit, after_id)
    d.addCallback(lambda entries: svc.store.read(count_dead, target, flt).addCallback(
        lambda n: {"target": target, "entries": entries, "matching": n}))
    return d


def retry(svc, target: str, row_id: int | None, flt: DeadFilter) -> defer.Deferred:
    if flt.empty:
        d = svc.retry(target, row_id)
    else:
        d = svc.store.write(retry_matching, target, flt, svc.now())
        d.addCallback(lambda n: (svc.drainers[target].resume(), n)[1])
    return d.addCallback(lambda n: {"target": target, "retried": n})


def wake(svc, target: str) -> defer.Deferred:
    return svc.kick(target).addCallback(lambda n: {"target": target, "woken": n})


def purge(svc, target: str, *, include_pending: bool, flt: DeadFilter) -> defer.Deferred:
    if flt.empty:
        d = svc.purge(target, include_pending=include_pending)
    elif include_pending:
        raise BadRequest("filters apply to dead letters only: DELETE .../dead")
    else:
        d = svc.store.write(purge_matching, target, flt)
    return d.addCallback(lambda n: {"target": target, "purged": n})


def send_study(services, study_uid: str, target: str) -> defer.Deferred:
    """Queue a stored study for a store-and-forward target (the console's "send to target")."""
    svc = service_for(services, target)
    d = svc.store.write(enqueue_study, study_uid, target, svc.now())

    def queued(n):
        if n == 0:
            raise NotFound(f"study {study_uid} is not in {target!r}'s store")
        svc.drainers[target].resume()
        return {"target": target, "study_instance_uid": study_uid, "queued": n}
    return d.addCallback(queued)


def forward_services(runtime) -> list:
    """Every store_forward backend's delivery service in a runtime."""
    return [b.forward for b in runtime.backends.values() if hasattr(b, "forward")]


# ------------------------------------------------------------------ routes


def json_reply(request, d: defer.Deferred, audit=None) -> defer.Deferred:
    """Render a Deferred JSON document as 200, a HarmonyError as problem+json."""

    def failed(f):
        if not f.check(HarmonyError):
            log.failure("queue management request failed", f)
        error = f.value if f.check(HarmonyError) else HarmonyError("the queue request failed")
        return problem_response(error)

    d.addCallbacks(lambda doc: ResponseEnvelope.json(200, doc), failed)
    return d.addCallback(lambda response: apply_response(request, response))


class QueueRoutes:
    """Klein routes over the data functions.  *services_of* is called per
    request, so a reload's new backends are what it manages; *reply* renders a
    Deferred document (and records the operator action named by ``audit``):
    the management API passes its own, which also writes the audit log."""

    app = Klein()

    def __init__(self, services_of, reply=json_reply):
        self.services_of = services_of
        self.reply = reply

    @property
    def services(self):
        return self.services_of()

    @app.handle_errors(Exception)
    def failed(self, request, failure):
        """Routing misses (werkzeug's 404/405) and errors raised by a route, as problem+json."""
        return self.reply(request, defer.fail(routing_failure(request, failure)))

    @app.route("/", methods=["GET"])
    def list_queues(self, request):
        return self.reply(request, overview(self.services))

    @app.route("/<target>/dead", methods=["GET"])
    def dead(self, request, target):
        args = query_args(request)
        return self.reply(request, defer.maybeDeferred(
            lambda: dead_letters(service_for(self.services, target), target, DeadFilter.from_args(args),
                                 _int_arg(args, "limit", 100, 1, 10_000), _int_arg(args, "after", 0, 0, None))))

    @app.route("/<target>/retry", methods=["POST"])
    def retry(self, request, target):
        args = query_args(request)
        return self.reply(request, defer.maybeDeferred(
            lambda: retry(service_for(self.services, target), target, _int_arg(args, "id", None, 1, None),
                          DeadFilter.from_args(args))), audit=("queue.retry", target, args))

    @app.route("/<target>/wake", methods=["POST"])
    def wake(self, request, target):
        return self.reply(request, defer.maybeDeferred(lambda: wake(service_for(self.services, target), target)),
                          audit=("queue.wake", target, {}))

    @app.route("/<target>/dead", methods=["DELETE"])
    def purge_dead(self, request, target):
        return self._purge(request, target, include_pending=False)

    @app.route("/<target>", methods=["DELETE"])
    def purge_all(self, request, target):
        return self._purge(request, target, include_pending=True)

    def _purge(self, request, target, include_pending):
        args = query_args(request)

        def go():
            svc = service_for(self.services, target)
            if args.get("confirm") != target:
                raise BadRequest(f"purging needs ?confirm={target}")
            return purge(svc, target, include_pending=include_pending, flt=DeadFilter.from_args(args))
        return self.reply(request, defer.maybeDeferred(go),
                          audit=("queue.purge" + ("" if include_pending else ".dead"), target, args))


class QueuesResource(KleinResource):
    """The queue routes as a stand-alone twisted.web resource (no authentication)."""

    def __init__(self, services):
        services = list(services)
        super().__init__(QueueRoutes(lambda: services).app)


def queues_resource(runtime) -> QueuesResource:
    """The resource for every store_forward backend of a runtime."""
    return QueuesResource(forward_services(runtime))


def query_args(request) -> dict:
    return {k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace") for k, v in request.args.items() if v}


def _int_arg(args: dict, key: str, default, minimum, maximum):
    if key not in args:
        return default
    try:
        value = int(args[key])
    except ValueError:
        raise BadRequest(f"{key} must be an integer") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise BadRequest(f"{key} is out of range")
    return value


def _float_arg(args: dict, key: str):
    if not args.get(key):
        return None
    try:
        return float(args[key])
    except ValueError:
        raise BadRequest(f"{key} must be a number (seconds since the epoch)") from None
