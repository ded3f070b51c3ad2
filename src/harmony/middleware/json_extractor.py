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

from harmony.envelope import is_json_type
from harmony.errors import BadRequest, MiddlewareFailed, PayloadTooLarge
from harmony.log import get_logger
from harmony.middleware.base import Middleware
from harmony.middleware.bodies import (content_coding, decode_content, direction_options, max_body_option,
                                       read_whole, too_big)
from harmony.transform import parse_json_text

log = get_logger("harmony.middleware.json_extractor")


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
        if envelope.normalized is not None or not is_json_type(envelope.header("content-type")):
            return envelope
        limit = f"JSON body exceeds {self.max_body_bytes} bytes (json_extractor {self.name!r})"
        if too_big(envelope, self.max_body_bytes):
            if not self.strict:
                return envelope
            raise PayloadTooLarge(limit) if client_side else MiddlewareFailed(limit)
        try:
            data = yield read_whole(envelope, self.max_body_bytes)
        except PayloadTooLarge:
            raise (PayloadTooLarge(limit) if client_side else MiddlewareFailed(limit)) from None
        if not data.strip():
            return envelope
        try:
            envelope.normalized = parse_json_text(
                decode_content(data, content_coding(envelope), self.max_body_bytes), "body")
        except ValueError as e:
            if self.strict:
                raise (BadRequest(str(e)) if client_side else MiddlewareFailed(f"upstream {e}")) from None
            log.debug("{name}: body is not valid JSON, left as it is", name=self.name)
        return envelope

    def on_request(self, request):
        if not self.requests:
            return request
        return self._extract(request, client_side=True)

    def on_response(self, request, response):
        if not self.responses:
            return response
        return self._extract(response, client_side=False)
