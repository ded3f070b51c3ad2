"""QIDO-RS query parameters -> a DICOM JSON identifier and paging controls.

The identifier is plain DICOM JSON (PS3.18 F.2) keyed by 8-hex-digit tags, so
every consumer - the bridge building a C-FIND, a transform middleware, the
``dicomweb`` backend re-building a query - reads one documented form.
"""

from __future__ import annotations

import re
from functools import lru_cache

import attr
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from harmony.dicomweb.uids import is_uid
from harmony.errors import BadRequest

CONTROL_PARAMS = ("includefield", "fuzzymatching", "limit", "offset")
#: Parameters some clients add that carry no matching meaning.
IGNORED_PARAMS = ("_", "callback")
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_DA = re.compile(r"^(\d{8})?$")
_TM = re.compile(r"^(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?$")
_DT = re.compile(r"^(\d{4,14}(\.\d{1,6})?([+-]\d{4})?)?$")
_INT_VRS = ("US", "UL", "SS", "SL", "UV", "SV", "IS")
_FLOAT_VRS = ("FL", "FD", "DS")
_BINARY_VRS = ("OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ")

#: Attributes every result carries at each level (PS3.18 Tables 10.6.3-3/-4/-5);
#: RetrieveURL (00081190) is built by whoever renders the result.
STUDY_KEYS = ("00080020", "00080030", "00080050", "00080056", "00080061", "00080090",
              "00080201", "00100010", "00100020", "00100030", "00100040", "0020000D",
              "00200010", "00201206", "00201208")
SERIES_KEYS = ("00080060", "00080201", "0008103E", "0020000E", "00200011", "00201209",
               "00400244", "00400245")
INSTANCE_KEYS = ("00080016", "00080018", "00080056", "00080201", "00200013", "00280010",
                 "00280011", "00280100", "00280008")
LEVEL_KEYS = {"STUDY": STUDY_KEYS, "SERIES": SERIES_KEYS, "IMAGE": INSTANCE_KEYS}


@attr.s(auto_attribs=True, slots=True)
class QidoQuery:
    #: Matching keys as DICOM JSON (``{"00100020": {"vr": "LO", "Value": ["X"]}}``);
    #: an attribute given with an empty value is present without ``Value``.
    match: dict = attr.Factory(dict)
    #: Extra return keys (8-hex tags, ``.``-joined for sequence paths); ``all``
    #: is :attr:`include_all`.
    includefield: list = attr.Factory(list)
    include_all: bool = False
    fuzzymatching: bool = False
    limit: int | None = None
    offset: int = 0


def resolve_attribute(name: str) -> str:
    """``PatientID`` or ``00100020`` -> ``"00100020"``; 400 for anything else."""
    if _TAG.match(name):
        return name.upper()
    tag = tag_for_keyword(name)
    if tag is None:
        raise BadRequest(f"unknown attribute {name!r} (use a DICOM keyword or 8 hex digits)")
    return f"{tag:08X}"


def attribute_path(name: str) -> list[str]:
    """``ReferencedStudySequence.ReferencedSOPInstanceUID`` -> list of tags."""
    return [resolve_attribute(p) for p in name.split(".")]


@lru_cache(maxsize=1024)
def vr_of(tag: str) -> str:
    try:
        vr = dictionary_VR(int(tag, 16))
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]


def keyword_of(tag: str) -> str:
    return keyword_for_tag(int(tag, 16)) or tag


def _range_ok(pattern, value: str) -> bool:
    """A single value or a ``lo-hi`` range (either end may be open).  DT values
    can carry a ``-0500`` offset, so every ``-`` is tried as the separator."""
    if value and pattern.match(value):
        return True
    for i, ch in enumerate(value):
        if ch == "-":
            lo, hi = value[:i], value[i + 1:]
            if (lo or hi) and pattern.match(lo) and pattern.match(hi):
                return True
    return False


def json_value(tag: str, vr: str, raw: str) -> dict:
    """One query value as a DICOM JSON attribute; 400 when it cannot match."""
    keyword = keyword_of(tag)
    if raw == "":
        return {"vr": vr}
    if vr in _BINARY_VRS:
        raise BadRequest(f"{keyword} ({vr}) cannot be used as a matching key")
    if vr == "UI":
        uids = raw.split(",") if "," in raw else raw.split("\\")
        if not all(is_uid(u) for u in uids):
            raise BadRequest(f"{keyword}: UID list must hold valid UIDs (no wildcards)")
        return {"vr": vr, "Value": uids}
    if vr == "DA" and not _range_ok(_DA, raw):
        raise BadRequest(f"{keyword}: expected YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    if vr == "TM" and not _range_ok(_TM, raw):
        raise BadRequest(f"{keyword}: expected HHMMSS[.FFFFFF] or a range of them")
    if vr == "DT" and not _range_ok(_DT, raw):
        raise BadRequest(f"{keyword}: expected a DICOM DateTime or a range of them")
    if vr in _INT_VRS + _FLOAT_VRS:
        try:
            number = int(raw) if vr in _INT_VRS else float(raw)
        except ValueError:
            raise BadRequest(f"{keyword}: expected a number, got {raw!r}") from None
        return {"vr": vr, "Value": [number]}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": raw}]}
    return {"vr": vr, "Value": [raw]}


def _put(match: dict, path: list[str], value_text: str, repeated: set):
    node = match
    for tag in path[:-1]:
        entry = node.setdefault(tag, {"vr": "SQ", "Value": [{}]})
        if vr_of(tag) != "SQ":
            raise BadRequest(f"{keyword_of(tag)} is not a sequence")
        node = entry["Value"][0]
    leaf = path[-1]
    vr = vr_of(leaf)
    value = json_value(leaf, vr, value_text)
    key = ".".join(path)
    if leaf in node:
        # Repeating a UID key is the other spelling of a UID list.
        if vr == "UI" and key in repeated and "Value" in value and "Value" in node[leaf]:
            node[leaf]["Value"].extend(value["Value"])
            return
        raise BadRequest(f"{keyword_of(leaf)} is given more than once")
    repeated.add(key)
    node[leaf] = value


#: ``limit``/``offset``: ASCII digits, at most 18 of them.  ``str.isdigit`` admits
#: superscripts that ``int`` refuses, and ``int`` refuses 4,301 digits or more
#: (Python's int-string limit): either used to surface as a 500.
_COUNT = re.compile(r"^[0-9]{1,18}$")


def _int_param(name: str, text: str, minimum: int) -> int:
    if not _COUNT.match(text) or int(text) < minimum:
        shown = text if len(text) <= 40 else text[:40] + f"... ({len(text)} characters)"
        raise BadRequest(f"{name} must be an integer of at least {minimum} and at most 18 digits, got {shown!r}")
    return int(text)


def parse_query(pairs: list, *, max_limit: int | None = None) -> tuple[QidoQuery, list[str]]:
    """Parse QIDO query pairs; returns the query and warnings (e.g. a clamped
    limit) that PS3.18 says go back to the client in a ``Warning`` header."""
    q = QidoQuery()
    warnings = []
    seen_controls: set = set()
    repeated: set = set()
    for name, value in pairs:
        if name in IGNORED_PARAMS:
            continue
        if name == "includefield":
            for item in value.split(","):
                item = item.strip()
                if item == "all":
                    q.include_all = True
                elif item:
                    tag = ".".join(attribute_path(item))
                    if tag not in q.includefield:
                        q.includefield.append(tag)
            continue
        if name in CONTROL_PARAMS:
            if name in seen_controls:
                raise BadRequest(f"{name} is given more than once")
            seen_controls.add(name)
            if name == "fuzzymatching":
                if value not in ("true", "false"):
                    raise BadRequest("fuzzymatching must be true or false")
                q.fuzzymatching = value == "true"
            elif name == "limit":
                q.limit = _int_param("limit", value, 1)
            else:
                q.offset = _int_param("offset", value, 0)
            continue
        _put(q.match, attribute_path(name), value, repeated)
    if max_limit is not None and (q.limit is None or q.limit > max_limit):
        if q.limit is not None:
            warnings.append(f'299 harmony "limit {q.limit} exceeds the maximum {max_limit}; '
                            f'results are limited to {max_limit}"')
        q.limit = max_limit
    return q, warnings


def add_path_uids(q: QidoQuery, study: str | None, series: str | None) -> None:
    """UIDs in the resource path are matching keys too (and win over any in the query)."""
    if study:
        q.match["0020000D"] = {"vr": "UI", "Value": [study]}
    if series:
        q.match["0020000E"] = {"vr": "UI", "Value": [series]}


def return_keys(level: str, q: QidoQuery, *, study_in_path: bool = False, series_in_path: bool = False) -> list[str]:
    """Tags a C-FIND must ask for: the level's required ones, its parents'
    (PS3.18 requires them when the search spans studies; viewers rely on them
    and Orthanc's plugin always sends them, so they are always asked for),
    plus ``includefield``."""
    keys = list(LEVEL_KEYS[level])
    if level == "SERIES":
        keys = list(STUDY_KEYS) + keys
    if level == "IMAGE":
        keys = list(STUDY_KEYS) + list(SERIES_KEYS) + keys
    keys = list(dict.fromkeys(keys))
    for k in q.includefield:
        if "." not in k and k not in keys:
            keys.append(k)
    return keys


def _flatten(match: dict, prefix: str = ""):
    for tag, attr_ in match.items():
        key = prefix + tag
        if attr_.get("vr") == "SQ" and attr_.get("Value"):
            yield from _flatten(attr_["Value"][0], key + ".")
            continue
        values = attr_.get("Value")
        if not values:
            yield key, ""
        elif attr_.get("vr") == "UI":
            yield key, ",".join(values)
        elif attr_.get("vr") == "PN":
            v = values[0]
            yield key, v.get("Alphabetic", "") if isinstance(v, dict) else str(v)
        else:
            yield key, str(values[0])


def to_query_pairs(match: dict, q: QidoQuery | None = None, *, skip=()) -> list[tuple[str, str]]:
    """The inverse of :func:`parse_query`: DICOM JSON matching keys (and the
    query's controls) as QIDO parameters keyed by tag, for an upstream request."""
    pairs = [(k, v) for k, v in _flatten(match) if k not in skip]
    if q is not None:
        if q.include_all:
            pairs.append(("includefield", "all"))
        pairs.extend(("includefield", t) for t in q.includefield)
        if q.fuzzymatching:
            pairs.append(("fuzzymatching", "true"))
        if q.limit is not None:
            pairs.append(("limit", str(q.limit)))
        if q.offset:
            pairs.append(("offset", str(q.offset)))
    return pairs
