"""``dicomweb`` endpoint: PS3.18 QIDO-RS, WADO-RS and STOW-RS under ``path_prefix``.

The endpoint understands the request - route, UIDs, query, Accept - once, and
hands the pipeline a :class:`~harmony.dicomweb.routes.DicomWebRequest` plus the
documented metadata keys (docs/endpoints/dicomweb.md).  It does not answer
anything itself: a ``dicomweb`` backend forwards to a DICOMweb server, a
``dicomweb_bridge`` middleware turns the request into DIMSE.  Bad requests
(bad UIDs, unknown attributes, an unservable Accept, a malformed STOW body)
are refused here, before any backend is bothered.
"""

from __future__ import annotations

from harmony.config.errors import OptionError
from harmony.dicomweb import accept as acc
from harmony.dicomweb import qido
from harmony.dicomweb.accept import parse_media_range
from harmony.dicomweb.baseurl import public_root
from harmony.dicomweb.routes import QIDO, WADO, parse_path
from harmony.endpoints.base import HttpEndpointBase, check_prefix
from harmony.envelope import body_length
from harmony.errors import BadRequest, NotAcceptable, PayloadTooLarge, UnsupportedMediaType
from harmony.web import coding
from harmony.web.urls import check_base_url

DEFAULT_MAX_UPLOAD = 4 * 1024 ** 3
#: RFC 2046 caps a boundary at 70 characters, and ours are 32; deployed clients
#: send longer ones (Orthanc 1.10's STOW-RS client: 73, "<uuid>-<uuid>"), so
#: we read up to this many and refuse only what no client has a reason to send.
MAX_BOUNDARY = 200
_WADO_KIND = {"study": "retrieve", "series": "retrieve", "instance": "retrieve", "metadata": "metadata",
              "frames": "frames", "bulkdata": "bulkdata", "rendered": "rendered", "thumbnail": "rendered"}
_BODY_HEAD = 4096


def stow_boundary(content_type: str | None) -> str:
    """Check a STOW-RS Content-Type and return its boundary.

    Tolerant where PS3.18 clients differ (quoted or bare boundary, extra
    parameters, any order, boundaries longer than RFC 2046's 70 characters up
    to :data:`MAX_BOUNDARY`), strict where it matters: no multipart/related is
    415, a non-DICOM ``type`` is 415, no boundary is 400 (Orthanc accepts that;
    we do not guess where parts begin).
    """
    mtype, params = parse_media_range(content_type or "")
    if mtype != "multipart/related":
        raise UnsupportedMediaType('STOW-RS takes multipart/related; type="application/dicom"')
    ptype = params.get("type", "application/dicom").lower()
    if ptype != "application/dicom":
        raise UnsupportedMediaType(f"STOW-RS part type {ptype!r} is not supported (only application/dicom)")
    boundary = params.get("boundary", "")
    if not 1 <= len(boundary) <= MAX_BOUNDARY:
        raise BadRequest(f"multipart/related body needs a boundary parameter of 1-{MAX_BOUNDARY} characters")
    return boundary


class DicomWebEndpoint(HttpEndpointBase):
    protocol = "dicomweb"
    cors_methods = ("GET", "HEAD", "POST", "DELETE", "OPTIONS")
    #: STOW-RS bodies held in memory skip twisted.web's receive (harmony.web.fast_channel).
    fast_body_methods = frozenset({b"POST"})

    def __init__(self, name, path_prefix="/", *, public_base_url=None, trust_forwarded=True,
                 max_upload_bytes=DEFAULT_MAX_UPLOAD, qido_max_limit=None, empty_search_status=200):
        super().__init__(name, path_prefix)
        self.public_base_url = public_base_url
        self.trust_forwarded = trust_forwarded
        self.max_upload_bytes = max_upload_bytes
        self.qido_max_limit = qido_max_limit
        self.empty_search_status = empty_search_status

    @classmethod
    def from_config(cls, name, options, ctx):
        prefix = check_prefix(options.str("path_prefix", "/"))
        public = options.str("public_base_url", None)
        if public is not None:
            public = check_base_url(public, "public_base_url")
        # 200 with [] by default: Orthanc's DICOMweb client reads 204 as "Bad file
        # format" (docs/endpoints/dicomweb.md has the interop evidence).
        empty = options.int("empty_search_status", 200)
        if empty not in (200, 204):
            raise OptionError("empty_search_status", f"must be 200 or 204, got {empty}")
        return cls(name, prefix, public_base_url=public,
                   trust_forwarded=options.bool("trust_forwarded_headers", True),
                   max_upload_bytes=options.int("max_upload_bytes", DEFAULT_MAX_UPLOAD, minimum=1),
                   qido_max_limit=options.int("qido_max_limit", None, minimum=1),
                   empty_search_status=empty).take_shared_options(options)

    def request_body_limit(self, method, subpath):
        return (self.max_upload_bytes, "max_upload_bytes") if method == "POST" else None  # STOW-RS

    # -- request side
    def envelope(self, request, route):
        env = super().envelope(request, route)
        if self.public_base_url:
            env.state.dicomweb.root = self.public_base_url
        else:
            root = public_root(request, trust_forwarded=self.trust_forwarded)
            env.state.dicomweb.root = root + ("" if route.prefix == "/" else route.prefix)
        if request.method == b"POST" and request.content is not None:
            # The body is already spooled by twisted.web; peek at its start so
            # a non-multipart body is refused before any backend sees it.
            request.content.seek(0)
            env.state.dicomweb.body_head = request.content.read(_BODY_HEAD)
            request.content.seek(0)
        return env

    def pre_process(self, request):
        dw = parse_path(request.method, request.subpath)
        root = request.state.dicomweb.root
        dw.base_url = root + (f"/aets/{dw.aet}/rs" if dw.aet else "")
        md = request.metadata
        if dw.service == QIDO:
            dw.accept, dw.multipart, _ = acc.negotiate("qido", request.header("accept"))
            q, warnings = qido.parse_query(request.query, max_limit=self.qido_max_limit)
            qido.add_path_uids(q, dw.study_uid, dw.series_uid)
            dw.query = q
            request.normalized = q.match
            if q.include_all:
                md["dicomweb.includefield"] = "all"
            elif q.includefield:
                md["dicomweb.includefield"] = ",".join(q.includefield)
            md["dicomweb.fuzzymatching"] = "true" if q.fuzzymatching else "false"
            if q.limit is not None:
                md["dicomweb.limit"] = str(q.limit)
            md["dicomweb.offset"] = str(q.offset)
            if warnings:
                request.state.dicomweb.warnings = warnings
        elif dw.service == WADO:
            kind = _WADO_KIND[dw.resource]
            dw.accept, dw.multipart, dw.transfer_syntax = acc.negotiate(kind, request.header("accept"))
            if kind in ("frames", "bulkdata") and not dw.multipart and len(dw.frames) > 1:
                raise NotAcceptable("several frames need multipart/related; single-part Accept fits one frame")
        else:
            self._check_stow(request, dw)
        md["dicomweb.service"] = dw.service
        md["dicomweb.resource"] = dw.resource
        md["dicomweb.path"] = dw.path
        md["dicomweb.base_url"] = dw.base_url
        md["query_level"] = dw.level
        for key, value in (("dicomweb.study_uid", dw.study_uid), ("dicomweb.series_uid", dw.series_uid),
                           ("dicomweb.instance_uid", dw.instance_uid), ("dicomweb.aet", dw.aet),
                           ("dicomweb.transfer_syntax", dw.transfer_syntax)):
            if value:
                md[key] = value
        if dw.accept:
            md["dicomweb.accept"] = dw.accept
            md["dicomweb.multipart"] = "true" if dw.multipart else "false"
        if dw.frames:
            md["dicomweb.frames"] = ",".join(map(str, dw.frames))
        if dw.bulk_path:
            md["dicomweb.bulk_path"] = "/".join(dw.bulk_path)
        request.state.dicomweb.request = dw
        return request

    def _check_stow(self, request, dw):
        boundary = stow_boundary(request.header("content-type"))
        size = body_length(request.body)
        if size is not None and size > self.max_upload_bytes:
            raise PayloadTooLarge(f"STOW-RS body of {size} bytes exceeds the limit of {self.max_upload_bytes}")
        try:
            body_coding = coding.content_coding(request.headers)
        except coding.UnsupportedCoding as e:
            raise UnsupportedMediaType(str(e)) from None
        head = request.state.dicomweb.body_head
        if head is None and isinstance(request.body, bytes):
            head = request.body[:_BODY_HEAD]
        if head and body_coding:
            try:
                head = coding.decoded_head(head, body_coding, _BODY_HEAD)
            except coding.CodingError as e:
                raise BadRequest(f"STOW-RS request body: {e}") from None
            # Every backend sees the body decoded (streaming, the upload cap
            # counted on decoded bytes): the bridge parses it, and an upstream
            # DICOMweb server need not understand a compressed request.
            coding.decode_request(request, self.max_upload_bytes)
        if not head:
            raise BadRequest("STOW-RS request has an empty body")
        # RFC 2046: an optional preamble, then the first delimiter line.
        delim = b"--" + boundary.encode("latin-1")
        if not (head.startswith(delim) or b"\r\n" + delim in head or b"\n" + delim in head):
            raise BadRequest("STOW-RS body does not start with the boundary given in Content-Type")
        request.metadata["dicomweb.boundary"] = boundary

    # -- response side
    def post_process(self, request, response):
        dw = request.state.dicomweb.request
        if dw is None or dw.service != QIDO:
            return response
        for w in request.state.dicomweb.warnings:
            response.headers.addRawHeader("Warning", w)
        empty = response.status == 204 or (response.status == 200 and isinstance(response.body, bytes)
                                            and response.body.strip() in (b"[]", b""))
        if not empty:
            return response
        if self.empty_search_status == 204:
            response.status, response.body, response.reason = 204, b"", None
            response.headers.removeHeader("Content-Type")
        else:
            response.status, response.body, response.reason = 200, b"[]", None
            response.headers.setRawHeaders("Content-Type", ["application/dicom+json"])
        return response


__all__ = ["DicomWebEndpoint", "stow_boundary"]
