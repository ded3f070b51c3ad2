"""``transform``: a JOLT chain over JSON bodies, on the way in and/or out.

    [middleware.to_fhir]
    type = "transform"
    spec_path = "patient_to_fhir.json"   # relative to [proxy] transforms_path
    apply = "right"                      # "left" | "right" | "both"
    fail_on_error = true
    inject_context = false
    content_type = "application/fhir+json"   # optional: what the output is

The spec is read and compiled once, when the configuration is built; a bad
spec file is a configuration error naming the file.

On the request side the body sent upstream (and ``normalized``) is rewritten;
on the response side the body the client gets, with Content-Length fixed.
gzip/deflate bodies are inflated (within ``max_body_bytes``, counted on the
decoded bytes too) and written back plain; a request body in another coding is
415.  When responses are transformed, the upstream is asked for
``Accept-Encoding: identity``; the transformed body is compressed for clients
that accept gzip by the response writer (:mod:`harmony.web.coding`).
Only JSON bodies (by Content-Type) are transformed; other bodies, empty ones
and non-2xx responses (an upstream's error document has another shape) pass
untouched.  A JSON body that does not parse, or a spec that fails on it, is an
error when ``fail_on_error`` (400 for a client's request body, 500 otherwise)
and passes untouched when not.

``inject_context = true`` puts the request under ``_context`` in the input
(method, path, subpath, query, headers, metadata; plus status on the response
side) and also hands it to ``modify-*`` specs as JOLT's context (``^path``).
``_context`` is removed from the output if the spec left it there.
``content_type``, when set, replaces the Content-Type of every body the spec
rewrote (a transform may turn one kind of JSON into another: DICOM JSON into
a FHIR Bundle).  A request whose body is not JSON but that carries a JSON
view in ``normalized`` (an HL7 v2 message from the ``mllp`` endpoint) has
the view transformed; with ``content_type`` set, the output becomes the body.
Credentials (Authorization, Cookie) are never exposed to a spec.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, threads

from harmony.config.errors import OptionError
from harmony.envelope import body_length, is_json_type
from harmony.errors import MiddlewareFailed
from harmony.log import get_logger
from harmony.middleware.base import Middleware
from harmony.middleware.bodies import SKIP, direction_options, dump_json, max_body_option, read_json, replace_body
from harmony.transform import SpecInvalid, TransformFailed, load_spec

log = get_logger("harmony.middleware.transform")

CONTEXT_KEY = "_context"
HIDDEN_HEADERS = {b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"}


def spec_option(options, ctx, key="spec_path"):
    """Load the spec named by *key* (relative to ``transforms_path``); a bad
    file is an OptionError whose message names it."""
    raw = Path(options.str(key)).expanduser()
    path = raw if raw.is_absolute() else ctx.transforms_path / raw
    try:
        return load_spec(path)
    except SpecInvalid as e:
        raise OptionError(key, str(e)) from None


def _multi(pairs) -> dict:
    """Pairs -> {key: value} with repeated keys as lists (what a spec author expects)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            out[k] = out[k] + [v] if isinstance(out[k], list) else [out[k], v]
        else:
            out[k] = v
    return out


def request_context(request, response=None) -> dict:
    headers = [(name.decode("latin-1").lower(), value.decode("latin-1"))
               for name, values in request.headers.getAllRawHeaders()
               if name.lower() not in HIDDEN_HEADERS for value in values]
    context = {
        "method": request.method,
        "path": request.path,
        "subpath": request.subpath,
        "query": _multi(request.query),
        "headers": _multi(headers),
        "metadata": dict(request.metadata),
    }
    if response is not None:
        context["status"] = response.status
    return context


class SpecMiddleware(Middleware):
    """What ``transform`` and ``metadata_transform`` share: a spec loaded at
    start-up, the directions it applies in, and ``fail_on_error``."""

    default_apply = "right"

    def __init__(self, name, spec, *, on_request=False, on_response=True, fail_on_error=True):
        super().__init__(name)
        self.spec = spec
        self.requests = on_request
        self.responses = on_response
        self.fail_on_error = fail_on_error

    @classmethod
    def from_config(cls, name, options, ctx):
        spec = spec_option(options, ctx)
        left, right = direction_options(options, cls.default_apply)
        return cls(name, spec, on_request=left, on_response=right,
                   fail_on_error=options.bool("fail_on_error", True), **cls.more_options(options, ctx))

    @classmethod
    def more_options(cls, options, ctx) -> dict:
        """Type-specific keyword arguments read from *options*."""
        return {}


class Transform(SpecMiddleware):
    #: Bodies above this size are transformed on the reactor's thread pool:
    #: a JOLT chain costs ~10x a json round trip, so a multi-MB document done
    #: inline would stall every other connection for a noticeable while.
    OFFLOAD_BYTES = 64 * 1024

    def __init__(self, name, spec, *, inject_context=False, max_body_bytes=16 * 1024 * 1024,
                 reactor=None, content_type=None, **kwargs):
        super().__init__(name, spec, **kwargs)
        self.inject_context = inject_context
        self.content_type = content_type
        self.max_body_bytes = max_body_bytes
        self.reactor = reactor
        #: How many documents went to the thread pool (for tests and metrics).
        self.offloaded = 0

    @classmethod
    def more_options(cls, options, ctx) -> dict:
        return {"inject_context": options.bool("inject_context", False),
                "max_body_bytes": max_body_option(options), "reactor": ctx.reactor,
                "content_type": options.str("content_type", "") or None}

    def _run_to_bytes(self, document, context) -> tuple:
        output = self.run(document, context)
        return output, dump_json(output)

    def _transform(self, document, context, size: int):
        if self.reactor is None or size <= self.OFFLOAD_BYTES:
            return defer.maybeDeferred(self._run_to_bytes, document, context)
        # Safe off the reactor: the spec is compiled once and keeps no state per
        # call, and *document* belongs to this request alone.
        self.offloaded += 1
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                         self._run_to_bytes, document, context)

    def run(self, document, context=None):
        """The spec over one document (with the context injected when asked)."""
        if context is not None and isinstance(document, dict):
            document = {**document, CONTEXT_KEY: context}
        output = self.spec.apply(document, context)
        if context is not None and isinstance(output, dict):
            output.pop(CONTEXT_KEY, None)
        return output

    @defer.inlineCallbacks
    def _rewrite(self, envelope, context, client_side: bool):
        """Transform one envelope's JSON body in place.

        A client's own bad body is the client's error (400/413); anything
        wrong with an upstream's body, or with the spec, is ours (500).
        An envelope with no body but a ``normalized`` view (a DIMSE C-FIND
        identifier as DICOM JSON, say) has that view transformed instead, and
        so has one whose body is not JSON but which carries a JSON view (an
        HL7 v2 message): there, with ``content_type`` set, the output also
        becomes the body (v2 in, FHIR JSON out to an HTTP backend).
        """
        empty = body_length(envelope.body) == 0
        view_only = envelope.normalized is not None and (
            empty or not is_json_type(envelope.header("content-type")))
        if view_only:
            document, size = envelope.normalized, 0
        else:
            document = yield read_json(envelope, self.max_body_bytes, fail=self.fail_on_error,
                                       client_side=client_side, who=f"transform {self.name!r}")
            if document is SKIP:
                return envelope
            size = len(envelope.body)
        try:
            output, data = yield self._transform(document, context, size)
        except TransformFailed as e:
            # The engine's message may quote the document (patient data): debug only.
            log.warn("transform {name} failed on a document (details at debug level)", name=self.name)
            log.debug("transform {name} failure: {error}", name=self.name, error=str(e))
            if self.fail_on_error:
                raise MiddlewareFailed(f"transform {self.name!r} failed on this document") from None
            return envelope
        if not view_only:
            envelope.headers.removeHeader(b"content-encoding")  # what we write back is plain JSON
            replace_body(envelope, data)
            if self.content_type:
                envelope.headers.setRawHeaders(b"content-type", [self.content_type.encode("latin-1")])
        elif not empty and self.content_type:
            envelope.headers.removeHeader(b"content-encoding")
            envelope.headers.setRawHeaders(b"content-type", [self.content_type.encode("latin-1")])
            replace_body(envelope, data)
        envelope.normalized = output
        return envelope

    def on_request(self, request):
        if self.responses:
            # The response body must be read to be rewritten: ask for it plain
            # (no Accept-Encoding would mean "any coding", RFC 9110 12.5.3); gzip
            # and deflate are still undone if an upstream sends them anyway, and
            # the response writer compresses the result for a client that asks.
            request.headers.setRawHeaders(b"accept-encoding", [b"identity"])
        if not self.requests:
            return request
        context = request_context(request) if self.inject_context else None
        return self._rewrite(request, context, client_side=True)

    def on_response(self, request, response):
        if not self.responses or not 200 <= response.status < 300:
            return response
        context = request_context(request, response) if self.inject_context else None
        return self._rewrite(response, context, client_side=False)
