"""``dicomweb`` backend: forwards DICOMweb requests to an upstream DICOMweb server.

Bodies stream both ways (a STOW upload goes up as a producer, a WADO multipart
answer comes back as one).  The only bodies read whole are DICOM JSON answers
(QIDO results, metadata, STOW responses), because their RetrieveURLs and
BulkDataURIs must be rewritten to this proxy's address; a cap bounds them,
counted on decoded bytes.

Content codings: for requests whose answer is read (everything but a WADO-RS
retrieve of instances, frames, bulk data or renderings) the upstream is asked
for ``Accept-Encoding: identity`` - between proxy and PACS compression costs
more CPU than the LAN time it saves, and the rewritten body is compressed for
the client anyway (:mod:`harmony.web.coding`).  A gzip or deflate answer is
still decoded (servers may ignore the request); a coding we cannot undo is a
502.  A retrieve answer passes through untouched, its Content-Encoding with it.

Behind a ``dicomweb`` endpoint the request's parsed form is used: the path
comes from the parsed resource (so ``/aets/{aet}/rs`` picks the target whose
``aet`` matches), and a QIDO query is rebuilt from ``request.normalized`` so
middleware edits to the matching keys reach the upstream.
"""

from __future__ import annotations

import base64
import json
from urllib.parse import quote, urlencode

from twisted.internet import defer
from twisted.web.http_headers import Headers

from harmony import jsonutil
from harmony.backends.http import HttpBackend, check_base_url, forwarded_headers
from harmony.config.errors import OptionError
from harmony.dicomweb import qido
from harmony.dicomweb.rewrite import UrlRewriter
from harmony.dicomweb.routes import WADO
from harmony.envelope import as_producer, is_json_type, read_body
from harmony.errors import BackendUnavailable, NotFound, PayloadTooLarge
from harmony.targets import TargetPool
from harmony.web import coding

JSON_LIMIT = 256 * 1024 * 1024


class DicomWebBackend(HttpBackend):
    def __init__(self, name, base_urls, reactor, *, aets=None, auth_header=None, json_limit=JSON_LIMIT,
                 staging_dir=None, **kw):
        super().__init__(name, base_urls, reactor, **kw)
        from harmony.backends.dicomweb_dimse import DimseOverDicomWeb
        from harmony.dicom.files import Staging
        #: DIMSE requests (a dicom_scp endpoint in front) are answered through DICOMweb.
        self.dimse = DimseOverDicomWeb(self, Staging(staging_dir or "dicomweb-staging"))
        #: AE title -> base URL, for /aets/{aet}/rs requests.
        self.aets = dict(aets or {})
        self.auth_header = auth_header
        self.json_limit = json_limit

    @classmethod
    def from_config(cls, name, options, ctx):
        aets = {}
        implicit = {"url": check_base_url(options.str("base_url"))} if "base_url" in options else None
        for t in ctx.targets():
            if "url" not in t:
                raise OptionError("targets", f"target {t['name']!r} needs a 'url'")
            aets[str(t.get("aet", t["name"]))] = check_base_url(t["url"], f"targets.{t['name']}.url")
        if implicit is None and not aets:
            raise OptionError("base_url", "is required (or name targets with a 'url')")
        # The same pool as the http backend's: strategy, health checks, circuit, retries.
        pool = TargetPool.from_options(name, options, ctx, kind="url", implicit=implicit, check_url=check_base_url)
        auth = None
        token = options.secret("bearer_token", default=None)
        user = options.str("username", None)
        if token:
            auth = f"Bearer {token}"
        elif user is not None:
            password = options.secret("password", default="")
            auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        header = options.str("auth_header", None)
        if header:
            auth = header  # a literal Authorization value, e.g. from a vault-rendered file
        staging = options.path("staging_dir", None) or (ctx.storage_path / "dicomweb-staging" / name)
        return cls(name, [t.url for t in pool.targets], ctx.reactor, aets=aets, auth_header=auth,
                   staging_dir=staging, target_pool=pool,
                   timeout=options.number("timeout_secs", 60.0, minimum=0.001),
                   connect_timeout=options.number("connect_timeout_secs", None, minimum=0.001),
                   max_connections=options.int("max_connections_per_host", 64, minimum=1, maximum=10000),
                   json_limit=options.int("max_json_bytes", JSON_LIMIT, minimum=1024))

    def pick_base_url(self, request) -> str:
        aet = request.metadata.get("dicomweb.aet")
        if aet:
            try:
                return self.aets[aet]
            except KeyError:
                raise NotFound(f"no DICOMweb target for AE title {aet!r}") from None
        return self.base_urls[0]

    def prepare_headers(self, request) -> Headers:
        headers = forwarded_headers(request, drop=(b"host", b"content-length", b"authorization"))
        if self.auth_header:
            headers.setRawHeaders(b"authorization", [self.auth_header.encode("latin-1")])
        dw = request.state.dicomweb.request
        if dw is None or dw.service != WADO or dw.resource == "metadata":
            headers.setRawHeaders(b"accept-encoding", [b"identity"])  # the answer is read and rewritten
        return headers

    def decoded_body(self, response, limit: int | None):
        """An upstream ``IResponse``'s body as a producer with its content coding
        undone (capped at *limit* decoded bytes)."""
        return _decoded(self.body_producer(response), response.headers, limit, "a body")

    def upstream_target(self, request) -> tuple[str, bytes]:
        dw = request.state.dicomweb.request
        if dw is None:
            return request.subpath, request.raw_query
        if dw.service == "qido" and isinstance(request.normalized, dict):
            # Rebuilt with as little percent-encoding as a query allows: some
            # servers (Orthanc 1.10) do not decode it, so a client's "%2A"
            # would never act as a wildcard there.
            skip = {t for t, v in (("0020000D", dw.study_uid), ("0020000E", dw.series_uid)) if v}
            pairs = qido.to_query_pairs(request.normalized, dw.query, skip=skip)
            return dw.path, urlencode(pairs, safe="*?,^:-._~", quote_via=quote).encode("ascii")
        return dw.path, request.raw_query

    def public_base(self, request) -> str:
        base = request.metadata.get("dicomweb.base_url")
        if base:
            return base
        prefix = request.path[: len(request.path) - len(request.subpath)] if request.subpath else request.path
        return f"{request.scheme}://{request.host}{prefix}"

    def send(self, request):
        if request.metadata.get("dimse_op") and request.state.dicomweb.request is None:
            return self.dimse.send(request)
        if request.metadata.get("dicomweb.aet"):
            # /aets/{aet}/rs names its PACS: no other target may answer for it.
            return self._send_to(self.pick_base_url(request), {}, request)
        # Like every HTTP-family backend: the pool's strategy picks a target, broken ones are
        # skipped (health, circuit), idempotent requests are retried on the next one.
        return self.target_pool.call(request, lambda target: self._send_to(target.url, target.headers, request))

    def _send_to(self, base, target_headers, request):
        path, query = self.upstream_target(request)
        url = base.encode("utf-8") + path.encode("utf-8") + (b"?" + query if query else b"")
        headers = self.prepare_headers(request)
        for hname, value in target_headers.items():
            headers.setRawHeaders(hname, [value])
        d = self.request(request.method.encode("ascii"), url, headers, as_producer(request.body))
        d.addCallback(lambda response: self.build_response(request, response))
        d.addCallback(self._rewrite, UrlRewriter(base, self.public_base(request)))
        return d

    @defer.inlineCallbacks
    def _rewrite(self, response, rewriter):
        for name in ("location", "content-location"):
            values = response.headers.getRawHeaders(name)
            if values:
                response.headers.setRawHeaders(name, [rewriter.url(v) for v in values])
        if not is_json_type(response.header("content-type")) or response.status == 204:
            return response
        try:
            body = yield read_body(_decoded(response.body, response.headers, self.json_limit, "DICOM JSON"),
                                   self.json_limit)
        except PayloadTooLarge:
            # The upstream's answer, not the client's request: a gateway error.
            raise BackendUnavailable(f"upstream DICOM JSON exceeds {self.json_limit} bytes (max_json_bytes)") from None
        response.headers.removeHeader(b"content-encoding")
        response.headers.removeHeader(b"content-length")
        if body.strip():
            try:
                doc = jsonutil.loads(body)
            except ValueError:
                raise BackendUnavailable("upstream answered malformed DICOM JSON") from None
            doc = rewriter.dicom_json(doc)
            body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            response.normalized = doc
        response.body = body
        return response


class _Ignore:
    def write(self, data):
        pass


def _decoded(body, headers, limit: int | None, what: str):
    """*body* (an upstream producer) with the coding *headers* declare undone,
    capped at *limit* decoded bytes; 502 for a coding we cannot undo (the
    connection is dropped rather than read) or bytes that are not what the
    coding says."""
    try:
        body_coding = coding.content_coding(headers)
    except coding.UnsupportedCoding as e:
        if not isinstance(body, (bytes, bytearray)):  # a stream: drop it unread
            body.startProducing(_Ignore()).addErrback(lambda _: None)
            body.stopProducing()
        raise BackendUnavailable(f"upstream answered {what} with {e}") from None
    return coding.decoded_body(body, body_coding, limit, BackendUnavailable, f"upstream {what}")
