"""The management API and operator console, as Klein routes below ``{base}``.

    GET  {base}/info       version, start time, uptime, config path, runtime versions
    GET  {base}/pipelines  pipelines as configured
    GET  {base}/routes     HTTP routes per network and self-listening (DIMSE) endpoints
    GET  {base}/targets    per backend: strategy and per target health, circuit, in-flight, last error
    GET  {base}/metrics    Prometheus text exposition
    ...  {base}/queues     store-and-forward queues (harmony.storage.admin, mounted as a Klein branch)
    POST {base}/reload     re-read and apply the configuration (see harmony.management.reload)
    GET  {base}/traffic    request/DIMSE rates, latency percentiles, errors per pipeline (console charts)
    GET  {base}/config     the running configuration, secrets redacted; POST {base}/config/check
    ...  {base}/archive    the local archive: patients -> studies -> series -> instances, thumbnails, send
    GET  {base}/audit      operator actions (who, what, when)
    ...  {base}/session    the console's login (token -> session cookie), CSRF token, logout
    GET  {base}/ui/        the console's static assets (harmony.management.console)

Klein routes these (the issue's "Klein for HTTP variants"); the proxy's hot
path stays on bare twisted.web (bench/routing measures why).  Every call but
the console's assets and login needs ``Authorization: Bearer <token>``
(compared in constant time) or a console session cookie; with a session,
every state-changing call also needs the session's CSRF token in
``X-CSRF-Token``.  Unauthenticated only on loopback by explicit choice.
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from urllib.parse import unquote_to_bytes

import twisted
from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet import defer, threads
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

import harmony
from harmony.envelope import ResponseEnvelope
from harmony.errors import (AuthenticationFailed, BadRequest, Conflict, Forbidden, HarmonyError, NotFound,
                            PayloadTooLarge)
from harmony.log import get_logger
from harmony.management import archive, configview, console
from harmony.management.console import SECURITY_HEADERS, console_state
from harmony.storage.admin import QueueRoutes, forward_services, query_args, send_study
from harmony.web.bridge import write_response
from harmony.web.problem import problem_response
from harmony.web.routes import apply_response, routing_failure

log = get_logger("harmony.management")

#: Largest request body the API reads (a configuration file to check, a login form).
MAX_BODY = 1024 * 1024


class ReloadFailed(HarmonyError):
    status, title, code = 422, "Reload Failed", "reload-failed"


class AdminApi:
    """Serves the API below a prefix; mountable as a route on a network's site
    (``render_http``) or as the root of its own listener (:class:`AdminResource`)."""

    name = "management"
    transport = "http"
    app = Klein()

    def __init__(self, service):
        self.service = service
        self.state = console_state(service)
        self.queue_routes = QueueRoutes(lambda: forward_services(self.service.runtime), self.reply)
        self._resource = None

    def render_http(self, request, route):
        return self.render_admin(request, route.prefix)

    # -- dispatch: authentication here, routing in Klein

    def render_admin(self, request, prefix: str):
        raw = request.path
        if not raw.startswith(prefix.encode()):
            raw = prefix.encode()
        for name, value in SECURITY_HEADERS:
            request.setHeader(name, value)
        try:
            sub = raw[len(prefix.encode()):].decode("utf-8")
            segments = [unquote_to_bytes(s).decode("utf-8") for s in sub.split("/")]
        except UnicodeDecodeError:
            write_response(request, problem_response(BadRequest("the path is not UTF-8")))
            return NOT_DONE_YET
        sub = "/".join(segments)
        if not sub.startswith("/ui/") and sub != "/ui":
            sub = sub.rstrip("/") or "/"  # /info/ is /info, as before Klein
        if sub == "/queues":
            sub = "/queues/"  # the queue routes' root
        request.prepath = [s.encode() for s in prefix.strip("/").split("/")]
        request.postpath = [s.encode() for s in sub[1:].split("/")] if sub != "/" else []
        request.harmony_operator = None
        try:
            request.harmony_operator = self._authenticate(request, sub)
        except HarmonyError as error:
            if isinstance(error, (AuthenticationFailed, Forbidden)):
                log.warn("management API: rejected {kind} {method} {path} from {client}",
                         kind="unauthenticated" if isinstance(error, AuthenticationFailed) else "CSRF-less",
                         method=request.method.decode("ascii", "replace"), path=request.path.decode("utf-8", "replace"),
                         client=_client(request))
            write_response(request, problem_response(error, instance=request.path.decode("utf-8", "replace")))
            return NOT_DONE_YET
        if self._resource is None:
            self._resource = self.app.resource()
        return self._resource.render(request)

    def _authenticate(self, request, sub: str) -> str | None:
        """Who is calling (for the audit log), or raise 401/403."""
        if sub == "/ui" or sub.startswith("/ui/") or (sub == "/session" and request.method == b"POST"):
            return None  # public: the console's assets and its login
        token = self.service.management_settings.token
        bearer = console.bearer_ok(request, token)
        if bearer:
            return f"bearer token from {_client(request)}"
        session = self.state.sessions.from_request(request)
        if session is not None:
            if request.method not in (b"GET", b"HEAD") and not session.csrf_ok(request):
                raise Forbidden("this call needs the session's CSRF token in X-CSRF-Token")
            request.harmony_session = session
            return session.who
        if token is None:
            return f"unauthenticated from {_client(request)}"
        raise AuthenticationFailed("a valid bearer token or console session is required",
                                   headers=[(b"WWW-Authenticate", b'Bearer realm="harmony-management"')])

    def reply(self, request, result, audit=None, status=200) -> defer.Deferred:
        """Render *result* (a document, a ResponseEnvelope, or a Deferred of
        either) and record *audit* = (action, subject, details) with its outcome."""
        d = defer.maybeDeferred(lambda: result) if not isinstance(result, defer.Deferred) else result

        def rendered(value):
            if isinstance(value, ResponseEnvelope):
                return value
            return ResponseEnvelope.json(status, value)

        def failed(f):
            if not f.check(HarmonyError):
                log.failure("management API failed on {path}", f, path=request.path.decode("utf-8", "replace"))
            error = f.value if f.check(HarmonyError) else HarmonyError("management API failure")
            return problem_response(error, instance=request.path.decode("utf-8", "replace"))

        d.addCallbacks(rendered, failed)
        if audit is not None:
            d.addCallback(self._audited, request, audit)
        return d.addCallback(lambda response: apply_response(request, response))

    def _audited(self, response, request, audit):
        action, subject, details = audit
        self.state.audit.record(getattr(request, "harmony_operator", None) or "?", action, subject,
                                {k: v for k, v in (details or {}).items() if k not in ("token",)}, response.status)
        return response

    @app.handle_errors(Exception)
    def failed(self, request, failure):
        """Routing misses (werkzeug's 404/405) and errors raised by a route, as problem+json."""
        return self.reply(request, defer.fail(routing_failure(request, failure)))

    # -- the API

    @app.route("/info", methods=["GET"])
    def info(self, request):
        svc = self.service
        cfg = svc.runtime.config
        return self.reply(request, {
            "name": "harmony", "version": harmony.__version__, "proxy_id": cfg.proxy.id,
            "started_at": datetime.datetime.fromtimestamp(svc.started_at, datetime.timezone.utc).isoformat(),
            "uptime_seconds": round(time.time() - svc.started_at, 3),
            "config_path": str(cfg.path),
            "python_version": platform.python_version(), "twisted_version": twisted.__version__,
            "reload": svc.last_reload,
        })

    @app.route("/pipelines", methods=["GET"])
    def pipelines(self, request):
        cfg = self.service.runtime.config
        return self.reply(request, {"pipelines": [
            {"name": p.name, "description": p.description, "networks": p.networks, "endpoints": p.endpoints,
             "middleware": p.middleware, "backends": p.backends} for p in cfg.pipelines.values()]})

    @app.route("/backends", methods=["GET"])
    def backends(self, request):
        """Per backend: type, its targets (pool) and the backends it queues for (store_forward)."""
        runtime = self.service.runtime
        out = []
        for name, backend in runtime.backends.items():
            pool = getattr(backend, "target_pool", None)
            cfg = runtime.config.backends.get(name)
            out.append({"name": name, "type": cfg.type if cfg is not None else None,
                        "targets": [t.name for t in pool.targets] if pool is not None else [],
                        "forwards_to": list(getattr(backend, "target_names", None) or [])})
        return self.reply(request, {"backends": out})

    @app.route("/routes", methods=["GET"])
    def routes(self, request):
        from harmony.cli import route_table

        svc = self.service
        rows = route_table(svc.runtime)
        for row in rows:
            net = svc.networks.get(row["network"])
            row["port"] = net.port.getHost().port if net is not None and net.port is not None else None
        return self.reply(request, {"routes": rows, "management": svc.management_description()})

    @app.route("/targets", methods=["GET"])
    def targets(self, request):
        latency = self.state.traffic.backend_latency(self.service.metrics)
        backends = []
        for pool in self.service.target_pools():
            snap = pool.snapshot()
            snap["latency"] = latency.get(pool.backend)
            backends.append(snap)
        return self.reply(request, {"backends": backends})

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request):
        response = ResponseEnvelope(200, body=self.service.metrics.text())
        response.headers.setRawHeaders(b"content-type", [CONTENT_TYPE_LATEST.encode()])
        return self.reply(request, response)

    @app.route("/deidentify", methods=["GET"])
    def deidentify(self, request):
        """Each deidentify middleware's counters and quarantined instances (reasons and pseudonymous UIDs only)."""
        from harmony.middleware.deidentify import quarantine_report

        try:
            limit = max(1, min(1000, int((request.args.get(b"limit") or [b"100"])[0])))
        except ValueError:
            limit = 100
        runtime = self.service.runtime
        return self.reply(request, threads.deferToThread(lambda: {"deidentify": quarantine_report(runtime, limit)}))

    @app.route("/queues/", branch=True)
    def queues(self, request):
        """Store-and-forward queues: the queue admin's own Klein routes."""
        return self.queue_routes.app.resource()

    @app.route("/reload", methods=["POST"])
    def reload(self, request):
        return self.reply(request, self._reload(), audit=("config.reload", str(self.service.runtime.config.path), {}))

    async def _reload(self):
        result = await self.service.reload()
        if result["ok"]:
            return result
        response = problem_response(ReloadFailed("the configuration was not applied; the previous one keeps "
                                                 "running: " + "; ".join(result["errors"])))
        doc = json.loads(response.body)
        doc["errors"] = result["errors"]
        return ResponseEnvelope.json(422, doc, "application/problem+json")

    # -- console data

    @app.route("/traffic", methods=["GET"])
    def traffic(self, request):
        return self.reply(request, self.state.traffic.sample(self.service.metrics))

    @app.route("/config", methods=["GET"])
    def config(self, request):
        return self.reply(request, configview.running(self.service.runtime.config))

    @app.route("/config/check", methods=["POST"])
    def config_check(self, request):
        text = _body(request).decode("utf-8", "replace")
        if self.state.checking:
            raise Conflict("a configuration check is already running: try again when it has finished")
        self.state.checking = True
        d = defer.ensureDeferred(configview.check(self.service.runtime.config, text))

        def done(result):
            self.state.checking = False
            return result
        d.addBoth(done)
        return self.reply(request, d, audit=("config.check", str(self.service.runtime.config.path), {}))

    @app.route("/audit", methods=["GET"])
    def audit(self, request):
        args = query_args(request)
        try:
            limit = min(max(int(args.get("limit", 200)), 1), 5000)
        except ValueError:
            raise BadRequest("limit must be an integer") from None
        return self.reply(request, {"entries": self.state.audit.recent(limit)})

    @app.route("/archive/stores", methods=["GET"])
    def archive_stores(self, request):
        return self.reply(request, {"stores": archive.describe(self.service.runtime),
                                    "targets": sorted(t for s in forward_services(self.service.runtime)
                                                      for t in s.targets)})

    @app.route("/archive/<store>/patients", methods=["GET"])
    def archive_patients(self, request, store):
        args = query_args(request)
        return self.reply(request, archive.patients(self._store(store), args.get("q", ""), _limit(args)))

    @app.route("/archive/<store>/patients/<int:patient>/studies", methods=["GET"])
    def archive_studies(self, request, store, patient):
        return self.reply(request, archive.studies(self._store(store), patient))

    @app.route("/archive/<store>/studies/<study>/series", methods=["GET"])
    def archive_series(self, request, store, study):
        return self.reply(request, archive.series(self._store(store), study))

    @app.route("/archive/<store>/series/<series>/instances", methods=["GET"])
    def archive_instances(self, request, store, series):
        return self.reply(request, archive.instances(self._store(store), series))

    @app.route("/archive/<store>/instances/<sop>/thumbnail", methods=["GET"])
    def archive_thumbnail(self, request, store, sop):
        return self.reply(request, archive.thumbnail(self._store(store), sop))

    @app.route("/archive/<store>/studies/<study>/send", methods=["POST"])
    def archive_send(self, request, store, study):
        target = query_args(request).get("target", "")
        d = defer.maybeDeferred(send_study, forward_services(self.service.runtime), study, target)
        return self.reply(request, d, audit=("archive.send", study, {"target": target}))

    def _store(self, name):
        store = archive.stores(self.service.runtime).get(name)
        if store is None:
            raise NotFound(f"no archive named {name!r}")
        return store

    # -- the console: session and assets

    @app.route("/session", methods=["POST"])
    def login(self, request):
        token = self.service.management_settings.token
        client = _client(request)
        if self.state.login_failures.blocked(client):
            return self.reply(request, defer.fail(HarmonyError(
                "too many failed logins from this address: wait a minute", status=429)))
        body = _body(request)
        given = console.token_from_login(body)
        if token is not None and not console.token_matches(given, token):
            log.warn("console: failed login from {client}", client=client)
            self.state.login_failures.failed(client)
            self.state.audit.record(f"login attempt from {client}", "session.login", "", {}, 401)
            return self.reply(request, defer.fail(AuthenticationFailed("wrong token")))
        session = self.state.sessions.create(request, _client(request), console.operator_from_login(body))
        request.harmony_operator = session.who
        console.set_cookie(request, session, self._cookie_path())
        return self.reply(request, session.describe(), audit=("session.login", "", {}))

    @app.route("/session", methods=["GET"])
    def whoami(self, request):
        session = getattr(request, "harmony_session", None)
        if session is None:
            return self.reply(request, {"who": request.harmony_operator, "csrf": None, "expires_at": None})
        return self.reply(request, session.describe())

    @app.route("/session", methods=["DELETE"])
    def logout(self, request):
        session = getattr(request, "harmony_session", None)
        if session is not None:
            self.state.sessions.drop(session)
        console.clear_cookie(request, self._cookie_path())
        return self.reply(request, {"logged_out": session is not None}, audit=("session.logout", "", {}))

    @app.route("/ui", methods=["GET"])
    def ui_root(self, request):
        request.setResponseCode(308)
        request.setHeader(b"location", (self._cookie_path() + "/ui/").encode())
        return b""

    @app.route("/ui/", methods=["GET"], defaults={"asset": "index.html"})
    @app.route("/ui/<path:asset>", methods=["GET"])
    def ui(self, request, asset):
        return self.reply(request, console.asset(asset))

    def _cookie_path(self) -> str:
        return self.service.management_settings.base_path  # mounted on a network: the route's prefix too


class AdminResource(Resource):
    """The root of the management API's own listener."""

    isLeaf = True

    def __init__(self, api: AdminApi):
        super().__init__()
        self.api = api

    def render(self, request):
        return self.api.render_admin(request, self.api.service.management_settings.base_path)


def _client(request) -> str:
    return getattr(request.getClientAddress(), "host", "?")


def _limit(args) -> int:
    try:
        return min(max(int(args.get("limit", 100)), 1), 1000)
    except ValueError:
        raise BadRequest("limit must be an integer") from None


def _body(request) -> bytes:
    content = request.content
    content.seek(0)
    data = content.read(MAX_BODY + 1)
    if len(data) > MAX_BODY:
        raise PayloadTooLarge(f"the body exceeds {MAX_BODY} bytes")
    return data
