"""Queue management over HTTP: a twisted.web resource for the management API.

Mount it at ``/admin/queues`` (behind the management API's token check - it
has no authentication of its own)::

    GET    /admin/queues                        depth, oldest age, delivering/dead per target
    GET    /admin/queues/{target}/dead          dead letters with last error (?limit=100&after=ID)
    POST   /admin/queues/{target}/retry         replay every dead letter (?id=N: just one)
    POST   /admin/queues/{target}/wake          make pending entries due now (the target is back)
    DELETE /admin/queues/{target}/dead?confirm={target}   purge the dead letters
    DELETE /admin/queues/{target}?confirm={target}        purge dead *and pending* entries

Purging needs ``confirm`` equal to the target name: a bare DELETE (a script's
typo) must not throw away instances nobody has received.
"""

from __future__ import annotations

import json

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from harmony.errors import BadRequest, HarmonyError, MethodNotAllowed, NotFound
from harmony.log import get_logger
from harmony.web.problem import problem_response

log = get_logger("harmony.store_forward.admin")


class QueuesResource(Resource):
    isLeaf = True

    def __init__(self, services):
        super().__init__()
        self.services = list(services)

    def _service_for(self, target: str):
        for svc in self.services:
            if target in svc.targets:
                return svc
        raise NotFound(f"no store-and-forward target named {target!r}")

    def render(self, request):
        segments = [s.decode("utf-8", "replace") for s in request.postpath if s]
        method = request.method.decode("ascii", "replace")
        try:
            d = self._dispatch(method, segments, request)
        except HarmonyError as e:
            return self._write_error(request, e)

        def ok(doc):
            self._write(request, 200, doc)

        def failed(f):
            if f.check(HarmonyError):
                self._write_error(request, f.value, finish=True)
            else:
                log.failure("queue management request failed", f)
                self._write_error(request, HarmonyError("the queue request failed"), finish=True)

        d.addCallbacks(ok, failed)
        return NOT_DONE_YET

    def _dispatch(self, method, segments, request):
        from twisted.internet import defer
        args = {k.decode(): v[0].decode("utf-8", "replace") for k, v in request.args.items()}
        if not segments:
            if method != "GET":
                raise MethodNotAllowed("use GET")
            # The database down: the last snapshot, and "databases" says why it is stale.
            return defer.gatherResults([svc.stats().addErrback(lambda f, svc=svc: svc.snapshot)
                                        for svc in self.services]).addCallback(
                lambda all_stats: queues_overview(self.services, all_stats))
        target = segments[0]
        svc = self._service_for(target)
        rest = segments[1:]
        if rest == ["dead"] and method == "GET":
            limit = _int_arg(args, "limit", 100, 1, 10_000)
            after = _int_arg(args, "after", 0, 0, None)
            return svc.dead(target, limit, after).addCallback(lambda e: {"target": target, "entries": e})
        if rest == ["retry"] and method == "POST":
            row_id = _int_arg(args, "id", None, 1, None)
            return svc.retry(target, row_id).addCallback(lambda n: {"target": target, "retried": n})
        if rest == ["wake"] and method == "POST":
            return svc.kick(target).addCallback(lambda n: {"target": target, "woken": n})
        if rest in (["dead"], []) and method == "DELETE":
            if args.get("confirm") != target:
                raise BadRequest(f"purging needs ?confirm={target}")
            return svc.purge(target, include_pending=not rest).addCallback(
                lambda n: {"target": target, "purged": n})
        if rest in (["dead"], ["retry"], ["wake"], []):
            raise MethodNotAllowed(f"{method} is not allowed here")
        raise NotFound("unknown queue resource")

    def _write(self, request, status, doc, content_type=b"application/json"):
        body = json.dumps(doc, separators=(",", ":")).encode()
        request.setResponseCode(status)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"content-length", str(len(body)).encode())
        request.write(body)
        request.finish()

    def _write_error(self, request, error, finish=False):
        response = problem_response(error)
        request.setResponseCode(response.status)
        request.setHeader(b"content-type", b"application/problem+json")
        if finish:
            request.write(response.body)
            request.finish()
            return None
        return response.body


def queues_overview(services, all_stats) -> dict:
    """``GET /queues``: every target's counts and lease holders (the cluster's
    on a shared queue), and this node's view of each store's database."""
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
    return doc


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


def queues_resource(runtime) -> QueuesResource:
    """The resource for every store_forward backend of a runtime."""
    return QueuesResource(b.forward for b in runtime.backends.values() if hasattr(b, "forward"))
