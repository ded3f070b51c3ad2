"""``json_extractor``: parse a JSON body into the envelope's ``normalized`` view.

Later middleware and backends (routing on a field, a FHIR or DICOMweb
backend) then read ``normalized`` instead of each re-parsing the body.  Only
bodies whose Content-Type is JSON (``application/json``, ``*+json``) are
parsed.  With ``strict = true`` invalid JSON is the client's error (400, with
the position of the fault); otherwise the body passes on untouched and
``normalized`` stays empty.  ``apply`` may add the response side.
"""

from __future__ import annotations

from twisted.internet import defer

from harmony.middleware.base import Middleware
from harmony.middleware.bodies import SKIP, direction_options, max_body_option, read_json


class JsonExtractor(Middleware):
    def __init__(self, name, *, strict=False, on_request=True, on_response=False,
                 max_body_bytes=16 * 1024 * 1024):
        super().__init__(name)
        self.strict = strict
        self.requests = on_request
        self.responses = on_response
        self.max_body_bytes = max_body_bytes

    @classmethod
    def from_config(cls, name, options, ctx):
        left, right = direction_options(options)
        return cls(name, strict=options.bool("strict", False), on_request=left, on_response=right,
                   max_body_bytes=max_body_option(options))

    @defer.inlineCallbacks
    def _extract(self, envelope, client_side: bool):
        if envelope.normalized is not None:
            return envelope
        document = yield read_json(envelope, self.max_body_bytes, fail=self.strict, client_side=client_side,
                                   who=f"json_extractor {self.name!r}")
        if document is not SKIP:
            envelope.normalized = document
        return envelope

    def on_request(self, request):
        if not self.requests:
            return request
        return self._extract(request, client_side=True)

    def on_response(self, request, response):
        if not self.responses:
            return response
        return self._extract(response, client_side=False)
