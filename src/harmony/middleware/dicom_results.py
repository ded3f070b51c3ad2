"""``dicom_results_json``: C-FIND results as one JSON document, paged.

A DICOM backend answers C-FIND with a :class:`~harmony.dicom.results.ResultStream`
(``response.state.dicom_results``).  HTTP clients that want DICOM JSON can
take the backend's body as it is; a *transform* that reshapes the results into
another document (a FHIR searchset Bundle) needs them whole, with the total
and paging links a search answer carries.  This middleware, on the response
side, collects the matches and writes::

    {"total": 3,                       # every match (absent when truncated)
     "offset": 0, "count": 2,          # this page
     "origin": "https://proxy:8443",   # how the client reached the proxy
     "base_url": "https://proxy:8443/fhir",   # the endpoint's public base
     "links": {"self": "...", "next": "...", "previous": "..."},
     "matches": [{DICOM JSON}, ...]}

as ``application/json`` (also in ``response.normalized``), for a
``transform`` placed left of it in the pipeline to shape::

    [middleware.results]
    type = "dicom_results_json"
    count_param = "_count"      # page size parameter (FHIR's)
    offset_param = "_offset"    # first match of the page
    default_count = 100         # page size when the client names none
    max_count = 1000            # larger _count values are lowered to this
    max_matches = 10000         # stop the C-FIND (C-CANCEL) past this many
    public_base_url = ""        # else from X-Forwarded-* / Host
    trust_forwarded_headers = true

Links are absolute (``origin`` + the request's path) with the client's own
parameters kept in order and only the offset replaced.  A DIMSE failure
becomes the proxy error it means (a PACS refusing the query -> 502, a
malformed identifier -> 400, ...), so every endpoint renders it in its own
dialect; a failure after some matches is a 502 as well, since a partial page
would be a wrong answer.
"""

from __future__ import annotations

from urllib.parse import urlencode

from twisted.internet import defer

from harmony.dicom.dicomjson import identifier_to_json
from harmony.dicom.render import next_or_give_up
from harmony.dicom.status import is_failure, of_response
from harmony.envelope import ResponseEnvelope
from harmony.errors import BackendUnavailable, BadRequest, HarmonyError
from harmony.middleware.base import Middleware
from harmony.web.urls import check_base_url, request_origin


class DicomResultsJson(Middleware):
    def __init__(self, name, *, count_param="_count", offset_param="_offset", default_count=100,
                 max_count=1000, max_matches=10000, public_base_url=None, trust_forwarded=True):
        super().__init__(name)
        self.count_param = count_param
        self.offset_param = offset_param
        self.default_count = default_count
        self.max_count = max_count
        self.max_matches = max_matches
        self.public_base_url = public_base_url
        self.trust_forwarded = trust_forwarded

    @classmethod
    def from_config(cls, name, options, ctx):
        base = options.str("public_base_url", "") or None
        if base is not None:
            base = check_base_url(base, "public_base_url").rstrip("/")
        return cls(
            name,
            count_param=options.str("count_param", "_count"),
            offset_param=options.str("offset_param", "_offset"),
            default_count=options.int("default_count", 100, minimum=0, maximum=100000),
            max_count=options.int("max_count", 1000, minimum=1, maximum=100000),
            max_matches=options.int("max_matches", 10000, minimum=1, maximum=10_000_000),
            public_base_url=base,
            trust_forwarded=options.bool("trust_forwarded_headers", True),
        )

    # ------------------------------------------------------------------ paging

    def _int_param(self, request, key, default):
        value = request.query_value(key)
        if value is None or value == "":
            return default
        if not (value.isascii() and value.isdigit() and len(value) <= 18):  # int() refuses 4,301+ digits: a 500
            raise BadRequest(f"{key} must be a non-negative integer of at most 18 digits, got {value[:40]!r}")
        return int(value)

    def page(self, request) -> tuple[int, int]:
        count = min(self._int_param(request, self.count_param, self.default_count), self.max_count)
        return self._int_param(request, self.offset_param, 0), count

    def origin(self, request) -> str:
        if self.public_base_url:
            return self.public_base_url
        return request_origin(request, self.trust_forwarded) or f"{request.scheme}://localhost"

    def _link(self, origin, request, offset, count) -> str:
        pairs = [(k, v) for k, v in request.query if k not in (self.offset_param, self.count_param)]
        pairs += [(self.count_param, str(count)), (self.offset_param, str(offset))]
        return f"{origin}{request.path}?{urlencode(pairs)}"

    # ------------------------------------------------------------------ results

    @defer.inlineCallbacks
    def _collect(self, stream):
        matches = []
        while True:
            # The client leaving mid-query cancels the C-FIND: the target counts a client abort.
            item = yield next_or_give_up(stream)
            if item is None:
                return matches, False
            matches.append(item if isinstance(item, dict) else identifier_to_json(item))
            if len(matches) >= self.max_matches:
                # Enough: a C-CANCEL stops the PACS; the rest is dropped.
                stream.cancel()
                return matches, True

    def _failed(self, request, response, status):
        """The HarmonyError a backend's non-2xx DIMSE answer means (from its typed status)."""
        detail = f"the PACS answered with HTTP status {response.status}"
        if status is not None:
            detail = f"the PACS answered {request.metadata.get('dimse_op', 'the query')} with status 0x{status:04X}"
            stream = response.state.dicom_results
            comment = (stream.error_comment if stream is not None else None) or response.state.error_comment
            if comment:
                detail += f" ({comment})"
        return HarmonyError(detail, status=response.status if response.status >= 400 else 502)

    @defer.inlineCallbacks
    def on_response(self, request, response):
        stream = response.state.dicom_results
        if not 200 <= response.status < 300:
            status = of_response(response)
            if stream is not None or status is not None:
                raise self._failed(request, response, status)
            return response
        if stream is None:
            return response
        offset, count = self.page(request)
        matches, truncated = yield self._collect(stream)
        if is_failure(stream.status) and not stream.cancelled:
            raise BackendUnavailable(f"the PACS failed the query part way (status 0x{stream.status or 0:04X})")
        origin = self.origin(request)
        base_path = request.metadata.get("fhir.base_path")
        if base_path is None:
            base_path = request.path[:len(request.path) - len(request.subpath)].rstrip("/")
        page = matches[offset:offset + count]
        links = {"self": self._link(origin, request, offset, count)}
        if offset + count < len(matches) and count:
            links["next"] = self._link(origin, request, offset + count, count)
        if offset > 0 and count:
            links["previous"] = self._link(origin, request, max(0, offset - count), count)
        doc = {"offset": offset, "count": len(page), "origin": origin, "base_url": origin + base_path,
               "links": links, "matches": page}
        if not truncated:
            doc["total"] = len(matches)
        out = ResponseEnvelope.json(200, doc)
        out.metadata.update(response.metadata)
        out.metadata["dicom.matches"] = str(len(matches))
        return out
