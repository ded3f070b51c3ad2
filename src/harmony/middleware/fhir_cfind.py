"""``fhir_cfind``: a FHIR search becomes a C-FIND request.

Puts a FHIR façade in front of a PACS (``fhir`` endpoint -> this ->
``dicom_scu`` backend): the search parameters of ``GET /fhir/ImagingStudy?...``
(or of a ``POST .../_search`` form body) become a DICOM JSON identifier in
``request.normalized``, and ``metadata["dimse_op"] = "C-FIND"`` and
``metadata["query_level"]`` tell the backend what to do.  The answer is shaped
by ``dicom_results_json`` and a ``transform`` (see
etc/examples/fhir-imagingstudy/)::

    [middleware.search]
    type = "fhir_cfind"
    resource = "ImagingStudy"            # the resource type searched (default)
    level = "STUDY"                      # C-FIND query level (default)
    # return_keys = [...]                # attributes asked of the PACS; defaults per level
    [middleware.search.params]           # extra or replaced search parameters
    accession = "AccessionNumber:string"

A parameter maps to ``"Keyword:kind"``; the kinds say how a FHIR value
becomes a DICOM matching key:

- ``reference``: ``Patient/X`` or ``X`` -> ``X`` (``patient``, ``subject``)
- ``uid``: a DICOM UID, ``urn:oid:`` prefix allowed; a comma list becomes a
  UID list match (``_id``)
- ``identifier``: ``urn:oid:UID``, ``urn:dicom:uid|urn:oid:UID`` or
  ``urn:dicom:uid|UID`` (``identifier``); any other system is refused
- ``date``: FHIR date search with prefixes (``eq``, ``ge``, ``gt``, ``le``,
  ``lt``, ``sa``, ``eb``) and partial dates, repeats ANDed, -> a DICOM date
  range (``started``).  DICOM dates carry no time: a time in the value is
  dropped and the day kept, so the match is by day.
- ``token``: ``system|code`` or ``code`` -> code; a comma list becomes a
  multi-value match (``modality``)
- ``string``: the value as is; DICOM wildcards ``*`` ``?`` are refused, so
  a search never matches more than asked.

Unknown parameters are ignored (FHIR's lenient handling) unless the client
sends ``Prefer: handling=strict``; parameters starting with ``_`` that the
response side reads (``_count``, ``_offset``) or that shape formatting are
left alone.  A bad value is a 400, which a FHIR endpoint renders as an
OperationOutcome; another interaction, or another resource type, is a 404;
asking for XML (``_format=xml``) is a 406.

A **read** (``GET /fhir/ImagingStudy/<id>``, where the id is the level's UID:
the Study Instance UID for ImagingStudy) is the search for that one id; on the
way back this middleware takes the one resource out of the Bundle the
transform made (404 when there is none), so the ``fullUrl`` of every entry
resolves through the proxy.
"""

from __future__ import annotations

import calendar
import re
from datetime import date, timedelta

from pydicom.datadict import dictionary_VR, keyword_dict
from twisted.internet import defer

from harmony.config.errors import OptionError
from harmony.dicom.uids import is_uid
from harmony.envelope import ResponseEnvelope, media_type, parse_query, read_body
from harmony.errors import BadRequest, MiddlewareFailed, NotAcceptable, NotFound
from harmony.fhir.formats import FHIR_JSON
from harmony.middleware.base import Middleware

KINDS = ("reference", "uid", "identifier", "date", "token", "string")
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")

#: ImagingStudy search parameters a study-level C-FIND can answer.
IMAGING_STUDY_PARAMS = {
    "patient": "PatientID:reference",
    "subject": "PatientID:reference",
    "_id": "StudyInstanceUID:uid",
    "identifier": "StudyInstanceUID:identifier",
    "started": "StudyDate:date",
    "modality": "ModalitiesInStudy:token",
}

#: What to ask the PACS for at each level (empty keys = return this attribute).
RETURN_KEYS = {
    "PATIENT": ["PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                "NumberOfPatientRelatedStudies"],
    "STUDY": ["StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyTime",
              "StudyDescription", "AccessionNumber", "ModalitiesInStudy",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"],
    "SERIES": ["StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
               "SeriesDescription", "NumberOfSeriesRelatedInstances"],
    "IMAGE": ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
              "InstanceNumber"],
}

#: Parameters that never become matching keys: paging, read by the response
#: side, and FHIR's formatting/result parameters.
PASSIVE = {"_count", "_offset", "_getpagesoffset", "_format", "_pretty", "_summary",
           "_elements", "_total", "_sort"}

DATE = re.compile(r"^(?P<prefix>eq|ne|gt|lt|ge|le|sa|eb|ap)?"
                  r"(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})(?:T[0-9:.]+(?:Z|[+-]\d{2}:\d{2})?)?)?)?$")
DICOM_UID_SYSTEM = "urn:dicom:uid"
#: A read's id is this key's value, at each level.
ID_KEY = {"PATIENT": ("PatientID", "string"), "STUDY": ("StudyInstanceUID", "uid"),
          "SERIES": ("SeriesInstanceUID", "uid"), "IMAGE": ("SOPInstanceUID", "uid")}
DATE_MIN, DATE_MAX = date(1, 1, 1), date(9999, 12, 31)


def _mapping(param: str, spec: str) -> tuple[str, str]:
    keyword, _, kind = spec.partition(":")
    kind = kind or "string"
    if keyword not in keyword_dict:
        raise OptionError(f"params.{param}", f"{keyword!r} is not a DICOM keyword")
    if kind not in KINDS:
        raise OptionError(f"params.{param}", f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return keyword, kind


def _uid(param: str, value: str) -> str:
    value = value.strip()
    if value.startswith("urn:oid:"):
        value = value[len("urn:oid:"):]
    if not is_uid(value):
        raise BadRequest(f"{param}: {value!r} is not a DICOM UID")
    return value


def _identifier(param: str, value: str) -> str:
    system, bar, code = value.partition("|")
    if not bar:
        system, code = "", value
    if system not in ("", DICOM_UID_SYSTEM) or (not system and not code.startswith("urn:oid:")):
        raise BadRequest(f"{param}: only DICOM study UIDs are searchable here "
                         f"(urn:oid:UID or {DICOM_UID_SYSTEM}|UID)")
    return _uid(param, code)


def _plain(param: str, value: str) -> str:
    if not value or any(c in value for c in "*?\\"):
        raise BadRequest(f"{param}: {value!r} is not a value this search can match")
    if len(value) > 64:
        raise BadRequest(f"{param}: value too long")
    return value


def _token(param: str, value: str) -> str:
    return _plain(param, value.rpartition("|")[2])


def _reference(param: str, value: str) -> str:
    if "/" in value:
        rtype, _, rid = value.rpartition("/")
        if rtype.rsplit("/", 1)[-1] != "Patient":
            raise BadRequest(f"{param}: only Patient references can be searched, got {value!r}")
        value = rid
    return _plain(param, value)


def _day_range(param: str, value: str) -> tuple[date, date]:
    """A FHIR date search value -> the inclusive range of days it admits."""
    m = DATE.match(value)
    if not m:
        raise BadRequest(f"{param}: {value!r} is not a FHIR date search value")
    prefix = m.group("prefix") or "eq"
    y, mo, d = int(m.group("y")), m.group("m"), m.group("d")
    try:
        if d:
            first = last = date(y, int(mo), int(d))
        elif mo:
            first = date(y, int(mo), 1)
            last = date(y, int(mo), calendar.monthrange(y, int(mo))[1])
        else:
            first, last = date(y, 1, 1), date(y, 12, 31)
    except ValueError:
        raise BadRequest(f"{param}: {value!r} is not a valid date") from None
    if prefix == "eq":
        return first, last
    if prefix == "ge":
        return first, DATE_MAX
    if prefix in ("gt", "sa"):
        # A time in the value is dropped: "after this day" would lose matches
        # later the same day, so a dated gt keeps its own day.
        start = first if "T" in value else last + timedelta(days=1)
        return start, DATE_MAX
    if prefix == "le":
        return DATE_MIN, last
    if prefix in ("lt", "eb"):
        end = last if "T" in value else first - timedelta(days=1)
        return DATE_MIN, end
    raise BadRequest(f"{param}: the {prefix!r} prefix cannot be searched by C-FIND")


def _da(d: date) -> str:
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"


def _date_match(param: str, values: list[str]) -> str:
    lo, hi = DATE_MIN, DATE_MAX
    for value in values:
        if "," in value:
            raise BadRequest(f"{param}: a list of dates (OR) cannot be searched by C-FIND")
        a, b = _day_range(param, value)
        lo, hi = max(lo, a), min(hi, b)
    if lo > hi:
        raise BadRequest(f"{param}: the date range is empty")
    if lo == hi:
        return _da(lo)
    return ("" if lo == DATE_MIN else _da(lo)) + "-" + ("" if hi == DATE_MAX else _da(hi))


CONVERT = {"reference": _reference, "uid": _uid, "identifier": _identifier, "token": _token, "string": _plain}


class FhirCFind(Middleware):
    def __init__(self, name, *, resource="ImagingStudy", level="STUDY", params=None, return_keys=None):
        super().__init__(name)
        self.resource = resource
        self.level = level
        self.params = dict(params if params is not None else IMAGING_STUDY_PARAMS)
        self.mapped = {p: _mapping(p, spec) for p, spec in self.params.items()}
        self.return_keys = list(return_keys if return_keys is not None else RETURN_KEYS[level])

    @classmethod
    def from_config(cls, name, options, ctx):
        resource = options.str("resource", "ImagingStudy")
        level = options.str("level", "STUDY", choices=LEVELS)
        params = dict(IMAGING_STUDY_PARAMS) if resource == "ImagingStudy" else {}
        extra = options.table("params", {})
        for key, value in extra.items():
            if not isinstance(value, str):
                raise OptionError(f"params.{key}", "must be a string \"Keyword:kind\"")
            params[key] = value
        keys = options.list("return_keys", RETURN_KEYS[level])
        for k in keys:
            if k not in keyword_dict:
                raise OptionError("return_keys", f"{k!r} is not a DICOM keyword")
        return cls(name, resource=resource, level=level, params=params, return_keys=keys)

    async def _search_params(self, request) -> list[tuple[str, str]]:
        pairs = list(request.query)
        if request.method == "POST":
            if media_type(request.header("content-type")) != "application/x-www-form-urlencoded":
                raise BadRequest("a POST search needs an application/x-www-form-urlencoded body")
            body = await read_body(request.body, 64 * 1024)
            request.body = b""
            pairs += parse_query(body)
        return pairs

    def identifier(self, pairs, strict: bool = False, *, read_id: str | None = None) -> dict:
        """Search pairs (or the id of a read) -> the C-FIND identifier as DICOM JSON."""
        values: dict[str, list[str]] = {}
        for key, value in pairs:
            values.setdefault(key, []).append(value)
        #: keyword -> "" (a return key) or the values to match
        keys: dict[str, str | list[str]] = {k: "" for k in self.return_keys}
        if read_id is not None:
            keyword, kind = ID_KEY[self.level]
            keys[keyword] = [CONVERT[kind]("id", read_id)]
        for param, vals in values.items():
            name, _, modifier = param.partition(":")
            if name in PASSIVE:
                continue
            if name not in self.mapped:
                if strict:
                    raise BadRequest(f"search parameter {name!r} is not supported here")
                continue
            if modifier:
                raise BadRequest(f"{param}: modifiers are not supported by this search")
            keyword, kind = self.mapped[name]
            if kind == "date":
                keys[keyword] = _date_match(name, vals)
                continue
            if len(vals) > 1:
                raise BadRequest(f"{name}: repeating a parameter (AND) cannot be searched by C-FIND")
            items = [CONVERT[kind](name, v) for v in vals[0].split(",")]
            if len(items) > 1 and kind not in ("uid", "token", "identifier"):
                raise BadRequest(f"{name}: a list of values (OR) cannot be searched by C-FIND")
            if keyword in keys and keys[keyword] and keys[keyword] != items:
                raise BadRequest(f"{name}: conflicts with another parameter on {keyword}")
            keys[keyword] = items
        doc: dict[str, dict[str, str | list[str]]] = {"00080052": {"vr": "CS", "Value": [self.level]}}
        for keyword, value in keys.items():
            tag = f"{keyword_dict[keyword]:08X}"
            element: dict[str, str | list[str]] = {"vr": dictionary_VR(keyword)}
            if value:
                element["Value"] = value if isinstance(value, list) else [value]
            doc[tag] = element
        return doc

    def on_request(self, request):
        return defer.ensureDeferred(self._on_request(request))

    async def _on_request(self, request):
        md = request.metadata
        interaction = md.get("fhir.interaction")
        if interaction is not None and (interaction not in ("search-type", "read")
                                        or md.get("fhir.resource_type") != self.resource):
            raise NotFound(f"only {self.resource} search and read are served here")
        if md.get("fhir.format") == "xml":
            # The answer is made by a JSON transform; there is no XML to give.
            raise NotAcceptable("this search answers in application/fhir+json only")
        if interaction == "read":
            # A read is the search for that one id; on_response unwraps the Bundle.
            request.state.fhir_read_id = md.get("fhir.id", "")
            request.normalized = self.identifier([], read_id=request.state.fhir_read_id)
        else:
            strict = "handling=strict" in (request.header("prefer") or "").replace(" ", "").lower()
            pairs = await self._search_params(request)
            request.normalized = self.identifier(pairs, strict)
        md["dimse_op"] = "C-FIND"
        md["query_level"] = self.level
        return request

    def on_response(self, request, response):
        rid = request.state.fhir_read_id
        if rid is None or not 200 <= response.status < 300:
            return response
        bundle = response.normalized
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise MiddlewareFailed(f"fhir_cfind {self.name!r}: a read needs the answer shaped into a Bundle")
        entries = bundle.get("entry") or []
        if not entries:
            raise NotFound(f"{self.resource}/{rid} is not known")
        out = ResponseEnvelope.json(200, entries[0].get("resource"), FHIR_JSON)
        out.metadata.update(response.metadata)
        return out
