"""The fixed PS3.18 resource paths, parsed into a :class:`DicomWebRequest`.

A small router of our own rather than Klein: the route table is closed (the
standard fixes it), every UID segment must be validated the same way, and the
result has to be a plain value that middleware and backends can read.
"""

from __future__ import annotations

import re
from typing import TypedDict

import attr

from harmony.dicomweb.uids import check_aet, check_uid
from harmony.errors import BadRequest, MethodNotAllowed, NotFound

QIDO, WADO, STOW = "qido", "wado", "stow"
STUDY, SERIES, IMAGE = "STUDY", "SERIES", "IMAGE"
#: WADO-RS resources below a study/series/instance (or frame list).
RETRIEVE_SUFFIXES = ("metadata", "rendered", "thumbnail")
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_INDEX = re.compile(r"^(0|[1-9][0-9]{0,8})$")
_FRAME = re.compile(r"^[1-9][0-9]{0,8}$")


class _InstanceIds(TypedDict):
    """An instance's three UIDs, passed on as DicomWebRequest keywords."""

    study_uid: str
    series_uid: str
    instance_uid: str


@attr.s(auto_attribs=True, slots=True)
class DicomWebRequest:
    """One DICOMweb request, as the endpoint understood it.

    ``resource`` is, for QIDO, the kind of result (``studies``, ``series``,
    ``instances``); for WADO, ``study``/``series``/``instance`` (retrieve),
    ``metadata``, ``frames``, ``bulkdata``, ``rendered`` or ``thumbnail``;
    for STOW, ``studies``.  ``level`` is the DIMSE query/retrieve level.
    """

    service: str
    resource: str
    level: str
    #: The DICOMweb path below the service root (``/aets/{aet}/rs`` removed).
    path: str
    study_uid: str | None = None
    series_uid: str | None = None
    instance_uid: str | None = None
    frames: tuple = ()
    #: For bulkdata: alternating tag ("7FE00010") and item index ("0") segments.
    bulk_path: tuple = ()
    aet: str | None = None
    #: Negotiated response media type and its parameters (``transfer-syntax``).
    accept: str = ""
    #: True when the answer is ``multipart/related; type="<accept>"``.
    multipart: bool = False
    #: Requested ``transfer-syntax`` (a UID, or ``*`` for as stored); None when
    #: the client named none (PS3.18's default then applies).
    transfer_syntax: str | None = None
    #: QIDO only: see :class:`harmony.dicomweb.qido.QidoQuery`.
    query: object = None
    #: Absolute URL of the DICOMweb service root as the client sees it.
    base_url: str = ""


def split(path: str) -> list[str]:
    return [s for s in path.split("/") if s]


def parse_path(method: str, subpath: str) -> DicomWebRequest:
    """Map ``method`` + path below the endpoint prefix to a request, or raise
    404 (no such resource), 405 (wrong method) or 400 (bad UID/frame list)."""
    segs = split(subpath)
    aet = None
    if segs[:1] == ["aets"]:
        if len(segs) < 3 or segs[2] != "rs":
            raise NotFound("per-AE resources live under /aets/{aet}/rs/")
        aet = check_aet(segs[1])
        segs = segs[3:]
    req = _parse(method, segs)
    req.aet = aet
    req.path = "/" + "/".join(segs)
    return req


def _allow(method: str, allowed: tuple):
    if method == "HEAD" and "GET" in allowed:
        return
    if method not in allowed:
        raise MethodNotAllowed(f"{method} is not allowed here (allowed: {', '.join(allowed)})",
                               headers=[("Allow", ", ".join(allowed))])


def _parse(method: str, segs: list[str]) -> DicomWebRequest:
    n = len(segs)
    if n == 0:
        raise NotFound("no DICOMweb resource at the service root")
    head = segs[0]
    if head in ("series", "instances") and n == 1:
        _allow(method, ("GET",))
        return DicomWebRequest(QIDO, head, SERIES if head == "series" else IMAGE, "")
    if head != "studies":
        raise NotFound(f"unknown DICOMweb resource {head!r}")
    if n == 1:
        if method == "POST":
            return DicomWebRequest(STOW, "studies", STUDY, "")
        _allow(method, ("GET", "POST"))
        return DicomWebRequest(QIDO, "studies", STUDY, "")
    study = check_uid(segs[1], "StudyInstanceUID")
    if n == 2:
        if method == "POST":
            return DicomWebRequest(STOW, "studies", STUDY, "", study_uid=study)
        _allow(method, ("GET", "POST"))
        return DicomWebRequest(WADO, "study", STUDY, "", study_uid=study)
    _allow(method, ("GET",))
    if n == 3 and segs[2] in ("series", "instances"):
        level = SERIES if segs[2] == "series" else IMAGE
        return DicomWebRequest(QIDO, segs[2], level, "", study_uid=study)
    if n == 3 and segs[2] in RETRIEVE_SUFFIXES:
        return DicomWebRequest(WADO, segs[2], STUDY, "", study_uid=study)
    if segs[2] != "series" or n < 4:
        raise NotFound("unknown resource below the study")
    series = check_uid(segs[3], "SeriesInstanceUID")
    if n == 4:
        return DicomWebRequest(WADO, "series", SERIES, "", study_uid=study, series_uid=series)
    if n == 5 and segs[4] == "instances":
        return DicomWebRequest(QIDO, "instances", IMAGE, "", study_uid=study, series_uid=series)
    if n == 5 and segs[4] in RETRIEVE_SUFFIXES:
        return DicomWebRequest(WADO, segs[4], SERIES, "", study_uid=study, series_uid=series)
    if segs[4] != "instances" or n < 6:
        raise NotFound("unknown resource below the series")
    sop = check_uid(segs[5], "SOPInstanceUID")
    ids = _InstanceIds(study_uid=study, series_uid=series, instance_uid=sop)
    if n == 6:
        return DicomWebRequest(WADO, "instance", IMAGE, "", **ids)
    if n == 7 and segs[6] in RETRIEVE_SUFFIXES:
        return DicomWebRequest(WADO, segs[6], IMAGE, "", **ids)
    if segs[6] == "frames" and n in (8, 9):
        frames = parse_frame_list(segs[7])
        if n == 8:
            return DicomWebRequest(WADO, "frames", IMAGE, "", frames=frames, **ids)
        if segs[8] in ("rendered", "thumbnail"):
            return DicomWebRequest(WADO, segs[8], IMAGE, "", frames=frames, **ids)
    if segs[6] == "bulkdata" and n >= 8:
        return DicomWebRequest(WADO, "bulkdata", IMAGE, "", bulk_path=parse_bulk_path(segs[7:]), **ids)
    raise NotFound("unknown resource below the instance")


def parse_frame_list(text: str) -> tuple:
    parts = text.split(",")
    if not all(_FRAME.match(p) for p in parts):
        raise BadRequest("frame list must be comma-separated frame numbers starting at 1")
    return tuple(int(p) for p in parts)


def parse_bulk_path(segs: list[str]) -> tuple:
    """``7FE00010`` or ``00540016/0/00181072``: tags, with an item index after
    each sequence tag.  Anything else is refused (these become file lookups)."""
    if len(segs) % 2 == 0:
        raise BadRequest("bulkdata path must end with a tag")
    out = []
    for i, s in enumerate(segs):
        ok = _TAG.match(s) if i % 2 == 0 else _INDEX.match(s)
        if not ok:
            raise BadRequest("bulkdata path must alternate 8-hex-digit tags and item numbers")
        out.append(s.upper())
    return tuple(out)


def resource_path(study: str | None = None, series: str | None = None, instance: str | None = None) -> str:
    """``/studies/S[/series/R[/instances/I]]``: the RetrieveURL path of an entity."""
    path = f"/studies/{study}"
    if series:
        path += f"/series/{series}"
        if instance:
            path += f"/instances/{instance}"
    return path
