"""The management API: a small read-mostly JSON API plus Prometheus text.

    GET  {base}/info       version, start time, uptime, config path, runtime versions
    GET  {base}/pipelines  pipelines as configured
    GET  {base}/routes     HTTP routes per network and self-listening (DIMSE) endpoints
    GET  {base}/targets    per backend: strategy and per target health, circuit, in-flight, last error
    GET  {base}/metrics    Prometheus text exposition
    ...  {base}/queues     store-and-forward queues (see harmony.storage.admin)
    POST {base}/reload     re-read and apply the configuration (see harmony.management.reload)

Every call needs ``Authorization: Bearer <token>`` (compared in constant time)
unless the API runs unauthenticated on loopback by explicit choice.
"""

from __future__ import annotations

import datetime
import hmac
import platform
import time

import twisted
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

import harmony
from harmony.envelope import ResponseEnvelope
from harmony.errors import AuthenticationFailed, HarmonyError, MethodNotAllowed, NotFound
from harmony.log import get_logger
from harmony.web.bridge import write_response
from harmony.web.problem import problem_response

log = get_logger("harmony.management")


class ReloadFailed(HarmonyError):
    status, title, code = 422, "Reload Failed", "reload-failed"


class AdminApi:
    """Serves the API below a prefix; mountable as a route on a network's site
    (``render_http``) or as the root of its own listener (:class:`AdminResource`)."""

    name = "management"
    transport = "http"

    def __init__(self, service):
        self.service = service

    def render_http(self, request, route):
        return self.render_admin(request, route.prefix)

    # -- dispatch

    def render_admin(self, request, prefix: str):
        path = request.path.decode("utf-8", "replace")
        sub = path[len(prefix):] if path.startswith(prefix) else path
        sub = sub.rstrip("/") or "/"
        settings = self.service.management_settings
        if settings.token is not None and not self._authorised(request, settings.token):
            log.warn("management API: rejected unauthenticated {method} {path} from {client}",
                     method=request.method.decode("ascii", "replace"), path=path,
                     client=getattr(request.getClientAddress(), "host", "?"))
            error = AuthenticationFailed("a valid bearer token is required",
                                         headers=[(b"WWW-Authenticate", b'Bearer realm="harmony-management"')])
            return self._send(request, problem_response(error, instance=path))
        if sub == "/queues" or sub.startswith("/queues/"):
            return self.queues(request, prefix)
        handlers = {"/info": self.info, "/pipelines": self.pipelines, "/routes": self.routes,
                    "/targets": self.targets, "/metrics": self.metrics, "/reload": self.reload}
        handler = handlers.get(sub)
        if handler is None:
            return self._send(request, problem_response(NotFound(f"no management resource {sub}"), instance=path))
        wanted = b"POST" if handler == self.reload else b"GET"
        if request.method not in (wanted, b"HEAD") or (request.method == b"HEAD" and wanted == b"POST"):
            error = MethodNotAllowed(f"{sub} takes {wanted.decode()}", headers=[(b"Allow", wanted)])
            return self._send(request, problem_response(error, instance=path))
        d = defer.maybeDeferred(handler)
        d.addCallback(lambda response: write_response(request, response))
        d.addErrback(self._failed, request, path)
        return NOT_DONE_YET

    @staticmethod
    def _authorised(request, token: str) -> bool:
        value = request.getHeader(b"authorization") or b""
        scheme, _, given = value.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(given.strip(), token.encode("utf-8"))

    def _send(self, request, response):
        write_response(request, response)
        return NOT_DONE_YET

    def _failed(self, failure, request, path):
        log.failure("management API failed on {path}", failure, path=path)
        if not request.finished:
            write_response(request, problem_response(HarmonyError("management API failure"), instance=path))

    # -- resources

    def info(self):
        svc = self.service
        cfg = svc.runtime.config
        return ResponseEnvelope.json(200, {
            "name": "harmony", "version": harmony.__version__, "proxy_id": cfg.proxy.id,
            "started_at": datetime.datetime.fromtimestamp(svc.started_at, datetime.timezone.utc).isoformat(),
            "uptime_seconds": round(time.time() - svc.started_at, 3),
            "config_path": str(cfg.path),
            "python_version": platform.python_version(), "twisted_version": twisted.__version__,
            "reload": svc.last_reload,
        })

    def pipelines(self):
        cfg = self.service.runtime.config
        return ResponseEnvelope.json(200, {"pipelines": [
            {"name": p.name, "description": p.description, "networks": p.networks, "endpoints": p.endpoints,
             "middleware": p.middleware, "backends": p.backends} for p in cfg.pipelines.values()]})

    def routes(self):
        from harmony.runtime import route_table

        svc = self.service
        rows = route_table(svc.runtime)
        for row in rows:
            net = svc.networks.get(row["network"])
            row["port"] = net.port.getHost().port if net is not None and net.port is not None else None
        return ResponseEnvelope.json(200, {"routes": rows, "management": svc.management_description()})

    def targets(self):
        return ResponseEnvelope.json(200, {"backends": [p.snapshot() for p in self.service.target_pools()]})

    def queues(self, request, prefix: str):
        """Store-and-forward queues (harmony.storage.admin): GET overview, dead
        letters, retry, wake, purge with confirmation.  Built per request from
        the live runtime, so a reload's new backends are what it manages."""
        from harmony.storage.admin import queues_resource

        segments = request.path[len(prefix.encode()):].split(b"/")  # b"", b"queues", target, ...
        request.postpath = [s for s in segments[2:] if s]
        result = queues_resource(self.service.runtime).render(request)
        if result is not NOT_DONE_YET:  # an error it answered at once
            request.write(result)
            request.finish()
        return NOT_DONE_YET

    def metrics(self):
        response = ResponseEnvelope(200, body=self.service.metrics.text())
        response.headers.setRawHeaders(b"content-type", [CONTENT_TYPE_LATEST.encode()])
        return response

    @defer.inlineCallbacks
    def reload(self):
        result = yield self.service.reload()
        if result["ok"]:
            return ResponseEnvelope.json(200, result)
        response = problem_response(ReloadFailed("the configuration was not applied; the previous one keeps "
                                                 "running: " + "; ".join(result["errors"])))
        import json
        doc = json.loads(response.body)
        doc["errors"] = result["errors"]
        return ResponseEnvelope.json(422, doc, "application/problem+json")


class AdminResource(Resource):
    """The root of the management API's own listener."""

    isLeaf = True

    def __init__(self, api: AdminApi):
        super().__init__()
        self.api = api

    def render(self, request):
        return self.api.render_admin(request, self.api.service.management_settings.base_path)
