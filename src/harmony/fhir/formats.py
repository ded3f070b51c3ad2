"""FHIR media types, ``_format`` and content negotiation (FHIR http.html#mime).

The proxy does not convert between JSON and XML: it checks that a client asks
for something a FHIR server can give (JSON or XML, the legacy
``application/json+fhir`` spelling included) and leaves the choice to the
upstream, which sees ``_format`` and ``Accept`` as the client sent them.
"""

from __future__ import annotations

from harmony.errors import NotAcceptable, UnsupportedMediaType
from harmony.fhir.outcome import with_issue

FHIR_JSON = "application/fhir+json"
FHIR_XML = "application/fhir+xml"

JSON_TYPES = frozenset({"application/fhir+json", "application/json+fhir", "application/json", "text/json"})
XML_TYPES = frozenset({"application/fhir+xml", "application/xml+fhir", "application/xml", "text/xml"})
#: Also acceptable in ``Accept`` (bulk data answers NDJSON), as JSON.
ACCEPT_JSON_EXTRA = frozenset({"application/fhir+ndjson", "application/ndjson", "*/*", "application/*"})
#: ``_format`` shorthands (FHIR allows ``json``, ``xml`` and full media types).
SHORT = {"json": "json", "xml": "xml"}

#: fhir_version option -> the ``fhirVersion`` MIME parameter value (http.html#version-parameter).
FHIR_VERSIONS = {"R4": "4.0", "R4B": "4.3", "R5": "5.0"}


def family(media: str) -> str | None:
    """``'json'``, ``'xml'`` or None for a media type (parameters ignored)."""
    mt = media.split(";", 1)[0].strip().lower()
    if mt in JSON_TYPES:
        return "json"
    if mt in XML_TYPES:
        return "xml"
    return None


def _params(media: str) -> dict[str, str]:
    out = {}
    for part in media.split(";")[1:]:
        k, _, v = part.partition("=")
        out[k.strip().lower()] = v.strip().strip('"')
    return out


def _check_version(media: str, version: str, error_cls, what: str):
    wanted = _params(media).get("fhirversion")
    if wanted and wanted != version and not version.startswith(wanted + "."):
        raise with_issue(error_cls(f"{what} asks for FHIR version {wanted}; this endpoint serves {version}"),
                         "not-supported")


def negotiate(format_param: str | None, accept: str | None, version: str, *, any_accept: bool = False) -> str:
    """The format the client wants (``'json'`` or ``'xml'``), or NotAcceptable.

    ``_format`` wins over ``Accept`` (FHIR says so); no preference means JSON.
    *any_accept* lets any ``Accept`` through (a Binary read may ask for the
    binary's own type, ``application/pdf``).
    """
    if format_param is not None:
        # An unencoded '+' in a query string decodes to a space; no media type has one.
        format_param = format_param.strip().replace(" ", "+")
        fam = SHORT.get(format_param.strip().lower()) or family(format_param)
        if fam is None:
            raise with_issue(NotAcceptable(f"_format {format_param!r} is not supported; use json or xml "
                                           f"({FHIR_JSON}, {FHIR_XML})"), "not-supported")
        _check_version(format_param, version, NotAcceptable, "_format")
        return fam
    if not accept:
        return "json"
    best, best_q = None, 0.0
    for media in accept.split(","):
        media = media.strip()
        if not media:
            continue
        try:
            q = float(_params(media).get("q", "1"))
        except ValueError:
            q = 0.0
        mt = media.split(";", 1)[0].strip().lower()
        fam = family(mt) or ("json" if mt in ACCEPT_JSON_EXTRA else None)
        if fam is None or q <= 0:
            continue
        _check_version(media, version, NotAcceptable, "Accept")
        if q > best_q:
            best, best_q = fam, q
    if best is None and any_accept:
        return "json"
    if best is None:
        raise with_issue(NotAcceptable(f"Accept {accept!r} names no FHIR format; use {FHIR_JSON} or {FHIR_XML}"),
                         "not-supported")
    return best


def body_format(content_type: str | None, version: str) -> str:
    """The format of a request body from its Content-Type (none means JSON)."""
    if not content_type:
        return "json"
    fam = family(content_type)
    if fam is None:
        raise with_issue(UnsupportedMediaType(
            f"Content-Type {content_type!r} is not a FHIR format; send {FHIR_JSON} or {FHIR_XML}"), "not-supported")
    _check_version(content_type, version, UnsupportedMediaType, "Content-Type")
    return fam
