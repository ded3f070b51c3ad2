"""``fhir`` endpoint: a FHIR RESTful API under ``path_prefix``.

Every FHIR interaction below the prefix (the bare prefix too: ``GET /fhir``
for paging links, ``POST /fhir`` for batch/transaction) goes through the
pipeline, classified (``metadata['fhir.interaction']`` and friends) so
middleware can decide by interaction rather than by path regex.

Before anything goes upstream the endpoint refuses what no FHIR server could
serve: a URL that is not a FHIR interaction (404), a format other than JSON
or XML (406), and a create/update/transaction body that does not parse or is
not the resource its URL names (400) or is larger than ``max_resource_bytes``
(413).  Every error the proxy makes is an OperationOutcome in
``application/fhir+json``, because that is what FHIR clients read.
"""

from __future__ import annotations


from twisted.internet import defer

from harmony import jsonutil
from harmony.endpoints.base import HttpEndpointBase, check_prefix
from harmony.envelope import media_type, read_body
from harmony.errors import HarmonyError
from harmony.fhir.formats import FHIR_VERSIONS, body_format, negotiate
from harmony.fhir.outcome import outcome_response
from harmony.fhir.rest import RESOURCE_BODY, Interaction, check_resource_body, classify
from harmony.web import coding

DEFAULT_MAX_RESOURCE_BYTES = 16 * 1024 * 1024


class FhirEndpoint(HttpEndpointBase):
    protocol = "fhir"

    def __init__(self, name: str, path_prefix: str = "/fhir", *, fhir_version: str = "R4",
                 max_resource_bytes: int = DEFAULT_MAX_RESOURCE_BYTES):
        super().__init__(name, path_prefix)
        self.fhir_version = fhir_version
        self.version_number = FHIR_VERSIONS[fhir_version]
        self.max_resource_bytes = max_resource_bytes

    @classmethod
    def from_config(cls, name, options, ctx):
        return cls(
            name, check_prefix(options.str("path_prefix", "/fhir")),
            fhir_version=options.str("fhir_version", "R4", choices=tuple(FHIR_VERSIONS)),
            max_resource_bytes=options.int("max_resource_bytes", DEFAULT_MAX_RESOURCE_BYTES,
                                           minimum=1024, maximum=2 ** 40),
        ).take_shared_options(options)

    def request_body_limit(self, method, subpath):
        # create, update, batch/transaction (and a POSTed search form) carry a resource body
        return (self.max_resource_bytes, "max_resource_bytes") if method in ("POST", "PUT") else None

    @defer.inlineCallbacks
    def pre_process(self, request):
        if request.method == "OPTIONS":
            # CORS preflights are for middleware to answer, not a FHIR interaction.
            interaction = Interaction("options")
        else:
            interaction = classify(request.method, request.subpath, bool(request.raw_query))
        request.metadata.update(interaction.metadata())
        request.metadata["fhir.version"] = self.fhir_version
        request.metadata["fhir.base_path"] = self.path_prefix.rstrip("/")
        request.metadata["fhir.format"] = negotiate(
            request.query_value("_format"), request.header("accept"), self.version_number,
            any_accept=interaction.resource_type == "Binary" and interaction.name in ("read", "vread"))
        if interaction.name in RESOURCE_BODY:
            fmt = body_format(request.header("content-type"), self.version_number)
            coding.decode_request(request, self.max_resource_bytes)  # gzip/deflate bodies: read decoded
            body = yield read_body(request.body, self.max_resource_bytes)
            request.body = body
            doc = check_resource_body(interaction, fmt, body)
            if doc is not None:
                request.normalized = doc
        return request

    def post_process(self, request, response):
        # A middleware that answered with RFC 9457 problem JSON itself (rather
        # than raising) still owes a FHIR client an OperationOutcome.
        if media_type(response.header("content-type")) == "application/problem+json" \
                and isinstance(response.body, (bytes, bytearray)):
            try:
                doc = jsonutil.loads(response.body)
                detail = str(doc.get("detail") or doc.get("title") or "")
            except (ValueError, AttributeError):
                detail = ""
            error = HarmonyError(detail or "error", status=response.status)
            error.headers = [(n, v) for n, vs in response.headers.getAllRawHeaders()
                             if n.lower() not in (b"content-type", b"content-length") for v in vs]
            return outcome_response(error, request.request_id)
        return response

    def error_response(self, error: HarmonyError, request):
        return outcome_response(error, request.request_id)
