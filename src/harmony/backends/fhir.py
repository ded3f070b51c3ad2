"""``fhir`` backend: the http backend, FHIR-aware.

On the way up it sends FHIR defaults (``Accept: application/fhir+json`` when
the client expressed no preference, a ``Content-Type`` on bodies) and an
optional credential of its own; the query string goes byte for byte, so
repeated, modified (``name:exact``), chained and ``_include`` parameters keep
their exact form and order.

On the way down it rewrites the upstream's absolute URLs to the proxy's base:
``Location`` and ``Content-Location`` headers, and in JSON and XML bodies
``Bundle.link[].url`` (so paging works through the proxy),
``Bundle.entry[].fullUrl``, ``entry[].response.location`` and
``CapabilityStatement.implementation.url``.  The body rewrite is a stream
(:mod:`harmony.fhir.rewrite`, :mod:`harmony.fhir.rewrite_xml`): a 50 MB
searchset is never held whole.  The
proxy's base is ``public_base_url`` when configured, else built from
``X-Forwarded-Proto``/``-Host``/``-Port`` and ``Host`` (some clients send
``Host`` without the port, hence the option).

A response that is not FHIR at all (a load balancer's HTML error page) is
turned into a 502 OperationOutcome that says what came back.
"""

from __future__ import annotations

import builtins
import re

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

from harmony.backends.http import HttpBackend, check_base_url
from harmony.backends.streams import ResponseBodyProducer, _Relay
from harmony.config.errors import OptionError
from harmony.envelope import ResponseEnvelope, header, media_type
from harmony.errors import BackendUnavailable
from harmony.fhir.formats import FHIR_JSON, FHIR_XML, JSON_TYPES, XML_TYPES, family
from harmony.fhir.outcome import with_issue
from harmony.fhir.rewrite import JsonUrlRewriter, UrlMap
from harmony.fhir.rewrite_xml import XmlUrlRewriter
from harmony.web import coding
from harmony.web.headers import end_to_end

#: Content types a FHIR server legitimately answers with (bulk data's NDJSON included).
FHIR_RESPONSE_TYPES = JSON_TYPES | XML_TYPES | {"application/fhir+ndjson", "application/ndjson"}
_HOST = re.compile(r"^(?:[A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?$")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


class _Discard(Protocol):
    """Read and drop a body, so its connection can go back to the pool."""

    def dataReceived(self, data):
        pass


class _RewritingRelay(_Relay):
    """Decodes (when the upstream compressed anyway) and rewrites as bytes arrive."""

    def __init__(self, consumer, finished, rewriter, decoder=None):
        super().__init__(consumer, finished)
        self.rewriter = rewriter
        self.decoder = decoder

    def _fail(self, error: Exception):
        if not self.finished.called:
            self.finished.errback(with_issue(BackendUnavailable(f"the FHIR server's body: {error}"), "transient"))
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data):
        self.progress()
        if self.finished.called:
            return
        try:
            pieces = self.decoder.decode(data) if self.decoder is not None else [data]
        except ValueError as e:
            self._fail(e)
            return
        for piece in pieces:
            out = self.rewriter.feed(piece)
            if out:
                self.consumer.write(out)

    def connectionLost(self, reason):
        if not self.finished.called and reason.check(ResponseDone, PotentialDataLoss):
            try:
                pieces = self.decoder.finish() if self.decoder is not None else []
            except ValueError as e:
                self._fail(e)
                return
            out = b"".join(self.rewriter.feed(p) for p in pieces) + self.rewriter.close()
            if out:
                self.consumer.write(out)
        super().connectionLost(reason)


class RewritingBodyProducer(ResponseBodyProducer):
    """An upstream body with its FHIR URLs rewritten on the fly (a JSON or XML
    rewriter: ``feed``/``close``); its length changes, so it goes out chunked."""

    passthrough = False  # rewritten here: compressed for the client when it asks

    def __init__(self, response, rewriter, decoder=None, **kwargs):
        super().__init__(response, **kwargs)
        self.length = UNKNOWN_LENGTH
        self.rewriter = rewriter
        self.decoder = decoder

    def startProducing(self, consumer):
        finished = defer.Deferred()
        self._relay = self._watched(_RewritingRelay(consumer, finished, self.rewriter, self.decoder))
        self.response.deliverBody(self._relay)
        return finished


def _first(value: str | None) -> str:
    return value.split(",", 1)[0].strip() if value else ""


def request_origin(request, trust_forwarded: bool = True) -> str | None:
    """``scheme://host[:port]`` a client used to reach the proxy, for a
    RequestEnvelope: ``Forwarded``/``X-Forwarded-*`` when trusted, else the
    request's own scheme and ``Host``; None when no sane host is known."""
    proto, host, port = request.scheme, request.host, ""
    if trust_forwarded:
        fwd = _forwarded(request.header("forwarded"))
        xf_proto = (_first(request.header("x-forwarded-proto")) or fwd.get("proto", "")).lower()
        if xf_proto in _DEFAULT_PORTS:
            proto = xf_proto
        xf_host = _first(request.header("x-forwarded-host")) or fwd.get("host", "")
        if xf_host and _HOST.match(xf_host):
            host = xf_host
        port = _first(request.header("x-forwarded-port"))
    if not host or not _HOST.match(host):
        return None
    if port.isdigit() and not host.endswith("]") and ":" not in host and port != _DEFAULT_PORTS[proto]:
        host = f"{host}:{port}"
    return f"{proto}://{host}"


def _forwarded(value: str | None) -> dict[str, str]:
    """The first element of an RFC 7239 ``Forwarded`` header, as a dict."""
    out: dict[str, str] = {}
    for pair in _first(value).split(";"):
        k, sep, v = pair.partition("=")
        if sep:
            out[k.strip().lower()] = v.strip().strip('"')
    return out


class FhirBackend(HttpBackend):
    public_base_url: str | None = None
    upstream_aliases: tuple = ()
    trust_forwarded = True
    rewrite_urls = True
    auth_header: tuple | None = None

    @classmethod
    def from_config(cls, name, options, ctx):
        backend = super().from_config(name, options, ctx)
        if "public_base_url" in options:
            backend.public_base_url = check_base_url(options.str("public_base_url"), "public_base_url")
        backend.upstream_aliases = tuple(check_base_url(u, "upstream_base_urls")
                                         # of= given: Options.list's default is shadowed by Options.str
                                         for u in options.list("upstream_base_urls", [], of=builtins.str))
        backend.trust_forwarded = options.bool("trust_forwarded_headers", True)
        backend.rewrite_urls = options.bool("rewrite_urls", True)
        hname = options.str("auth_header_name", "Authorization")
        if not re.match(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$", hname):
            raise OptionError("auth_header_name", f"is not a valid header name: {hname!r}")
        value = options.secret("auth_header_value", default=None)
        if value is not None:
            if not value or not value.isprintable() or not value.isascii():
                raise OptionError("auth_header_value", "must be one line of printable ASCII")
            backend.auth_header = (hname.encode("ascii"), value.encode("ascii"))
        return backend

    # ------------------------------------------------------------------ upstream

    def prepare_headers(self, request):
        headers = super().prepare_headers(request)
        accept = request.header("accept")
        if not accept or accept.strip() == "*/*":
            wanted = FHIR_XML if request.metadata.get("fhir.format") == "xml" else FHIR_JSON
            headers.setRawHeaders(b"accept", [wanted.encode()])
        has_body = request.body not in (None, b"")
        if has_body and not headers.hasHeader(b"content-type"):
            headers.setRawHeaders(b"content-type", [FHIR_JSON.encode()])
        if self.rewrite_urls:
            # The body is rewritten as it streams: ask for it plain (no
            # Accept-Encoding at all would mean "any coding", RFC 9110 12.5.3).
            # gzip and deflate are still undone if the server compresses anyway,
            # and the rewritten body is compressed for a client that asks.
            headers.setRawHeaders(b"accept-encoding", [b"identity"])
        if self.auth_header is not None:
            headers.setRawHeaders(self.auth_header[0], [self.auth_header[1]])
        return headers

    # ------------------------------------------------------------------ proxy base

    def proxy_base(self, request) -> str | None:
        """The URL clients reach this FHIR base at, or None when unknowable."""
        if self.public_base_url:
            return self.public_base_url
        origin = request_origin(request, self.trust_forwarded)
        if origin is None:
            return None
        base_path = request.metadata.get("fhir.base_path")
        if base_path is None:
            base_path = request.path[:len(request.path) - len(request.subpath)].rstrip("/")
        return f"{origin}{base_path}"

    def url_map(self, request) -> UrlMap | None:
        if not self.rewrite_urls:
            return None
        base = self.proxy_base(request)
        if base is None:
            return None
        return UrlMap(list(self.base_urls) + list(self.upstream_aliases), base)

    # ------------------------------------------------------------------ downstream

    def build_response(self, request, response) -> ResponseEnvelope:
        ctype = header(response.headers, "content-type")
        if not self._is_fhir(request, response, ctype):
            response.deliverBody(_Discard())
            what = f"content type {media_type(ctype)!r}" if ctype else "no content type"
            raise with_issue(BackendUnavailable(
                f"the FHIR server answered {response.code} with {what}, not a FHIR resource"), "transient")
        headers = end_to_end(response.headers)
        mapper = self.url_map(request)
        body = self.body_producer(response)
        if mapper is not None:
            for name in (b"location", b"content-location"):
                values = headers.getRawHeaders(name)
                if values:
                    new = mapper(values[0].decode("utf-8", "replace"))
                    if new is not None:
                        headers.setRawHeaders(name, [new.encode("utf-8")])
            try:
                body_coding = coding.content_coding(response.headers)
            except coding.UnsupportedCoding:
                body_coding = None  # one we cannot undo: the body passes as it came, unrewritten
            rewriter = {"json": JsonUrlRewriter, "xml": XmlUrlRewriter}.get(family(ctype or ""))
            if rewriter is not None and body_coding is not None and response.length != 0:
                body = RewritingBodyProducer(response, rewriter(mapper),
                                             coding.Decoder(body_coding) if body_coding else None,
                                             idle_timeout=self.timeout, clock=self.reactor)
                headers.removeHeader(b"content-length")
                headers.removeHeader(b"content-encoding")
        return ResponseEnvelope(status=response.code, reason=response.phrase, headers=headers, body=body,
                                metadata={"upstream_status": str(response.code)})

    @staticmethod
    def _is_fhir(request, response, ctype) -> bool:
        if response.code in (204, 304) or response.length == 0 or request.method == "HEAD":
            return True
        if media_type(ctype) in FHIR_RESPONSE_TYPES:
            return True
        # A Binary read may answer in the binary's own type, an operation in any.
        meta = request.metadata
        if meta.get("fhir.operation"):
            return bool(ctype)
        return bool(ctype) and meta.get("fhir.resource_type") == "Binary" \
            and meta.get("fhir.interaction") in ("read", "vread")
