"""``jmix`` endpoint: JMIX envelopes over HTTP under ``{path_prefix}/api/jmix``.

Routes (notes, section 10.4), declared as Klein routes (:class:`JmixRoutes`)::

    GET|HEAD {prefix}/api/jmix/{id}            the envelope: zip, or tar.gz by Accept; 406 otherwise
    GET|HEAD {prefix}/api/jmix/{id}/manifest   manifest.json
    GET|HEAD {prefix}/api/jmix?studyInstanceUid=UID
                                              newest stored envelope of the study, else built from the
                                              backend by the ``jmix_builder`` middleware
    POST     {prefix}/api/jmix                 upload (zip or tar.gz): validated, stored, indexed

Every request runs through the pipeline's middleware (so auth applies to all
routes).  Requests the store can answer - by id, manifest, upload, a study
already stored - go to a built-in store backend in place of the configured
ones; only a study that must be fetched reaches the real backend, whose DICOM
results ``jmix_builder`` turns into an envelope on the way back.
"""

from __future__ import annotations

import shutil
from functools import partial

from klein import Klein
from twisted.internet import defer
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from harmony.config.errors import OptionError
from harmony.endpoints.base import HttpEndpointBase, check_prefix
from harmony.envelope import ResponseEnvelope, body_length, media_type
from harmony.errors import (
    BadRequest,
    ConfigurationFailure,
    Conflict,
    HarmonyError,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from harmony.interfaces import IBackend
from harmony.jmix import crypto
from harmony.jmix.archive import Limits
from harmony.jmix.dicom import valid_uid
from harmony.jmix.store import DuplicateEnvelope, EnvelopeStore, canonical_id, store_option
from harmony.jmix.validate import VerifyOptions, discard, open_envelope
from harmony.jmix.web import (
    JSON,
    TGZ_TYPES,
    ZIP_TYPES,
    HeadBody,
    envelope_response,
    negotiate,
    spool_body,
    study_index_response,
)
from harmony.log import get_logger
from harmony.pipeline import Pipeline
from harmony.web.routes import match

log = get_logger("harmony.jmix")

ROUTE_ENVELOPE, ROUTE_MANIFEST, ROUTE_STUDY, ROUTE_UPLOAD = "envelope", "manifest", "study", "upload"
#: request.metadata keys shared with ``jmix_builder``.
META_ROUTE, META_ID, META_STUDY = "jmix.route", "jmix.id", "jmix.study_uid"


class EnvelopeRejected(BadRequest):
    """An upload that failed validation; the report's findings go in the problem body."""

    def __init__(self, detail: str, report: dict | None = None):
        super().__init__(detail)
        self.report = report


@implementer(IBackend)
class StoreBackend:
    """Answers the routes the store can serve; stands in for the pipeline's backends.
    Built by the endpoint, never named in a config: so not a ``Backend`` plug-in."""

    def __init__(self, endpoint: "JmixEndpoint"):
        self.name = f"{endpoint.name}:store"
        self.endpoint = endpoint

    def send(self, request):
        error = request.state.jmix.error
        if error is not None:
            raise error
        route = request.metadata.get(META_ROUTE)
        ep = self.endpoint
        if route == ROUTE_UPLOAD:
            return ep.upload(request)
        # Index lookups (a PostgreSQL round trip on a cluster) and manifest reads: off the reactor.
        in_thread = partial(ep.store.in_thread, ep.reactor)
        if route == ROUTE_MANIFEST:
            return in_thread(self._manifest, request.metadata[META_ID]).addCallback(self._manifest_response, request)
        fmt = negotiate(request.header("accept"), allow_json=route == ROUTE_STUDY)
        if route == ROUTE_STUDY:
            uid = request.metadata[META_STUDY]
            if fmt == JSON:
                return in_thread(study_index_response, ep.store, uid)
            return in_thread(ep.store.newest_for_study, uid).addCallback(self._newest, uid, fmt, request)
        return envelope_response(ep.store, request.metadata[META_ID], fmt, request.method, ep.reactor)

    def _manifest(self, env_id):
        store = self.endpoint.store
        return store.read_manifest(env_id) if store.get(env_id) else None

    def _manifest_response(self, data, request):
        if data is None:
            raise NotFound(f"JMIX envelope {request.metadata[META_ID]} not found")
        h = Headers({"Content-Type": ["application/json"]})
        return ResponseEnvelope(200, h, HeadBody(len(data)) if request.method == "HEAD" else data)

    def _newest(self, env_id, uid, fmt, request):
        if env_id is None:
            raise NotFound(f"no JMIX envelope for study {uid}")
        return envelope_response(self.endpoint.store, env_id, fmt, request.method, self.endpoint.reactor)


class JmixEndpoint(HttpEndpointBase):
    protocol = "jmix"
    cors_methods = ("GET", "HEAD", "POST", "OPTIONS")

    def __init__(self, name, path_prefix, store: EnvelopeStore, reactor, *, max_upload_bytes: int,
                 limits: Limits, verify: VerifyOptions):
        super().__init__(name, path_prefix)
        self.store = store
        self.reactor = reactor
        self.max_upload_bytes = max_upload_bytes
        self.limits = limits
        self.verify = verify
        self.backend = StoreBackend(self)
        self._store_pipelines: dict[int, Pipeline] = {}

    @classmethod
    def from_config(cls, name, options, ctx):
        prefix = check_prefix(options.str("path_prefix"))
        max_upload = options.int("max_upload_bytes", 4 * 1024 ** 3, minimum=1)
        defaults = Limits()  # sized for real studies: see harmony.jmix.archive.Limits
        limits = Limits(max_entries=options.int("max_entries", defaults.max_entries, minimum=1),
                        max_total_bytes=options.int("max_unpacked_bytes", defaults.max_total_bytes, minimum=1),
                        max_file_bytes=options.int("max_file_bytes", defaults.max_file_bytes, minimum=1),
                        max_ratio=options.int("max_ratio", defaults.max_ratio, minimum=1),
                        ratio_floor_bytes=options.int("ratio_floor_bytes", defaults.ratio_floor_bytes, minimum=0))
        key = None
        if "decryption_key_file" in options:
            path = options.path("decryption_key_file")
            try:
                key = crypto.x25519_private(path.read_bytes())
            except (OSError, crypto.CryptoError) as e:
                raise OptionError("decryption_key_file", f"cannot load X25519 private key {path}: {e}") from None
        jws_keys = []
        for p in options.list("jws_public_key_files", [], of=str):
            path = options.base_dir / p
            try:
                jws_keys.append(crypto.ed25519_public(path.read_bytes()))
            except (OSError, crypto.CryptoError) as e:
                raise OptionError("jws_public_key_files", f"cannot load Ed25519 public key {path}: {e}") from None
        verify = VerifyOptions(private_key=key, jws_keys=jws_keys,
                               trusted_fingerprints=options.list("trusted_fingerprints", None, of=str),
                               verify_assertions=options.bool("verify_assertions", True), limits=limits)
        return cls(name, prefix, store_option(options, ctx), ctx.reactor, max_upload_bytes=max_upload,
                   limits=limits, verify=verify).take_shared_options(options)

    def request_body_limit(self, method, subpath):
        return (self.max_upload_bytes, "max_upload_bytes") if method == "POST" else None  # uploads

    # -- routing
    def _store_pipeline(self, pipeline: Pipeline) -> Pipeline:
        """The configured pipeline's middleware in front of the store backend."""
        shadow = self._store_pipelines.get(id(pipeline))
        if shadow is None:
            shadow = Pipeline(pipeline.name, pipeline.middleware, [self.backend], pipeline.description)
            shadow.observers = pipeline.observers
            self._store_pipelines[id(pipeline)] = shadow
        return shadow

    def classify(self, env) -> None:
        """Set ``jmix.*`` metadata for *env* by the Klein routes below; a bad
        request is kept for the store backend to raise, so auth middleware still
        answers first."""
        path = "/" + "/".join(s for s in env.subpath.split("/") if s)
        try:
            endpoint, args = match(_ROUTES.app.url_map, path, env.method.upper())
            _ROUTES.app.execute_endpoint(endpoint, env, **args)
        except HarmonyError as e:
            if isinstance(e, NotFound):
                e = NotFound(f"no JMIX route {env.path}")
            env.state.jmix.error = e

    def envelope(self, request, route):
        env = getattr(request, "_jmix_envelope", None)
        if env is None:
            env = request._jmix_envelope = super().envelope(request, route)
            self.classify(env)
        return env

    def may_need_backend(self, env) -> bool:
        """Only a study query (not its JSON index) may go to the real backend: when
        the store has no envelope for the study.  Everything else the store answers."""
        if env.metadata.get(META_ROUTE) != ROUTE_STUDY or env.state.jmix.error is not None:
            return False
        try:
            fmt = negotiate(env.header("accept"), allow_json=True)
        except HarmonyError:
            return False
        return fmt != JSON

    def render_http(self, request, route):
        env = self.envelope(request, route)
        # jmix_builder may ask the same backend whether a study exists (see there).
        env.state.jmix.pipeline = route.pipeline
        if not self.may_need_backend(env):
            return super().render_http(request, _RouteWith(route, self._store_pipeline(route.pipeline)))
        gone: list = []
        request.notifyFinish().addErrback(gone.append)
        d = defer.ensureDeferred(self._study_route(env, route))
        d.addCallback(lambda chosen: None if gone else super(JmixEndpoint, self).render_http(request, chosen))
        d.addErrback(self._unexpected, request, env)
        return NOT_DONE_YET

    async def _study_route(self, env, route) -> "_RouteWith":
        """The store's pipeline when it holds an envelope of the study, else the
        configured one, whose jmix_builder builds it.  Whether it holds one is an
        index query (on a cluster a PostgreSQL round trip): asked off the reactor."""
        store_route = _RouteWith(route, self._store_pipeline(route.pipeline))
        try:
            found = await self.store.in_thread(self.reactor, self.store.newest_for_study, env.metadata[META_STUDY])
        except HarmonyError as e:  # the index is unreachable (503): said after the middleware, like any error
            env.state.jmix.error = e
            return store_route
        if found is not None:
            return store_route
        if any(getattr(mw, "builds_jmix", False) for mw in route.pipeline.middleware):
            return _RouteWith(route, route.pipeline)
        env.state.jmix.error = ConfigurationFailure(
            f"endpoint {self.name!r}: its pipeline needs the jmix_builder middleware to build envelopes")
        return store_route

    def error_response(self, error, request):
        response = super().error_response(error, request)
        report = getattr(error, "report", None)
        if report:
            doc = dict(response.normalized)
            doc["errors"] = report["errors"]
            doc["warnings"] = report["warnings"]
            response = ResponseEnvelope.json(response.status, doc, "application/problem+json", response.headers)
        return response

    # -- upload
    @defer.inlineCallbacks
    def upload(self, request):
        ctype = media_type(request.header("content-type"))
        if ctype not in ZIP_TYPES + TGZ_TYPES:
            raise UnsupportedMediaType("upload a JMIX envelope as application/zip or application/gzip (tar.gz)")
        declared = body_length(request.body)
        if declared is not None and declared > self.max_upload_bytes:
            raise PayloadTooLarge(f"upload exceeds {self.max_upload_bytes} bytes")
        work = self.store.new_workdir()
        try:
            yield spool_body(request.body, work / "upload", self.max_upload_bytes)
            stored = yield self.store.in_thread(self.reactor, self._ingest, work)
        finally:
            yield self.store.in_thread(self.reactor, shutil.rmtree, work, True)
        log.info("stored uploaded JMIX envelope {id} ({size} bytes)", id=stored["id"], size=stored["size"])
        h = Headers({"Location": [f"{self.path_prefix.rstrip('/')}/api/jmix/{stored['id']}"]})
        response = ResponseEnvelope.json(201, {"id": stored["id"], "status": "stored"}, headers=h)
        return response

    def _ingest(self, work):
        """Validate and store an upload (worker thread)."""
        report = open_envelope(work / "upload", work / "open", self.verify)
        try:
            if not report.ok:
                first = report.errors[0]
                raise EnvelopeRejected(f"invalid JMIX envelope ({first[0]}): {first[1]}", report.to_json())
            if self.store.exists(report.envelope_id):
                raise Conflict(f"envelope id {report.envelope_id} already exists")
            try:
                return self.store.add(report.root, report.study_uid, "uploaded")
            except DuplicateEnvelope:
                raise Conflict(f"envelope id {report.envelope_id} already exists") from None
        finally:
            discard(report)


class JmixRoutes:
    """The endpoint's routes, on Klein's URL map (werkzeug matching, 404/405
    with Allow).  Handlers only classify the envelope; the pipeline answers."""

    app = Klein()

    @app.route("/api/jmix", methods=["POST"])
    def upload(self, env):
        env.metadata[META_ROUTE] = ROUTE_UPLOAD

    @app.route("/api/jmix", methods=["GET"])
    def study(self, env):
        env.metadata[META_ROUTE] = ROUTE_STUDY
        uid = env.query_value("studyInstanceUid")
        if not uid:
            raise BadRequest("missing studyInstanceUid")
        if not valid_uid(uid):
            raise BadRequest("studyInstanceUid is not a valid DICOM UID")
        env.metadata[META_STUDY] = uid

    @app.route("/api/jmix/<envelope_id>", methods=["GET"])
    def envelope(self, env, envelope_id):
        env.metadata[META_ROUTE] = ROUTE_ENVELOPE
        self._id(env, envelope_id)

    @app.route("/api/jmix/<envelope_id>/manifest", methods=["GET"])
    def manifest(self, env, envelope_id):
        env.metadata[META_ROUTE] = ROUTE_MANIFEST
        self._id(env, envelope_id)

    @staticmethod
    def _id(env, envelope_id):
        if envelope_id == "prime":
            raise NotFound("reserved")
        cid = canonical_id(envelope_id)
        if cid is None:
            raise BadRequest(f"envelope id {envelope_id[:64]!r} is not a UUID")
        env.metadata[META_ID] = cid


_ROUTES = JmixRoutes()


class _RouteWith:
    """A route with another pipeline (the store pipeline) but the same prefix."""

    def __init__(self, route, pipeline):
        self._route = route
        self.pipeline = pipeline

    def __getattr__(self, name):
        return getattr(self._route, name)


__all__ = ["JmixEndpoint", "EnvelopeRejected", "StoreBackend", "META_ROUTE", "META_ID", "META_STUDY"]
