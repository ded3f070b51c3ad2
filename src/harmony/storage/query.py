"""C-FIND matching (PS3.4 C.2.2.2) over stored attributes, independent of storage.

Attributes are held as DICOM JSON (PS3.18 F.2) dicts, ``tag -> {"vr", "Value"}``,
one per level (patient, study, series, instance).  A query is a pydicom
``Dataset`` identifier; each non-empty key is a matching key, every key is a
return key.  Supported: single value, universal (empty), wildcard (``*``/``?``
on string VRs), UID list (``\\``-separated, for any VR as Orthanc and dcm4chee
do), and range matching for DA/TM/DT (``a-b``, ``-b``, ``a-``).  PN matching is
case-insensitive (Orthanc's default).  Sequence keys are return-only.
"""

from __future__ import annotations

import re
from functools import lru_cache

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.valuerep import VR

from harmony.dicom.rawjson import element_json, finite_json
from harmony.dicom.rawscan import ScannedFile
from harmony.storage.errors import InvalidQuery

PATIENT, STUDY, SERIES, IMAGE = "PATIENT", "STUDY", "SERIES", "IMAGE"
LEVELS = (PATIENT, STUDY, SERIES, IMAGE)
STUDY_ROOT, PATIENT_ROOT = "study", "patient"

#: Attributes kept at each level (PS3.4 C.6.1.1 / C.6.2.1 plus common extras).
LEVEL_KEYWORDS = {
    PATIENT: ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime",
              "PatientSex", "OtherPatientIDs", "OtherPatientNames", "EthnicGroup", "PatientComments",
              "PatientSpeciesDescription", "PatientBreedDescription", "ResponsiblePerson"),
    STUDY: ("StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyInstanceUID",
            "ReferringPhysicianName", "StudyDescription", "PhysiciansOfRecord",
            "NameOfPhysiciansReadingStudy", "AdmittingDiagnosesDescription", "PatientAge", "PatientSize",
            "PatientWeight", "Occupation", "AdditionalPatientHistory", "InstitutionName"),
    SERIES: ("Modality", "SeriesNumber", "SeriesInstanceUID", "SeriesDescription", "SeriesDate", "SeriesTime",
             "BodyPartExamined", "ProtocolName", "PerformedProcedureStepStartDate",
             "PerformedProcedureStepStartTime", "Laterality", "OperatorsName", "PerformingPhysicianName",
             "StationName", "Manufacturer"),
}
#: Attributes the archive computes per level.
COMPUTED = {
    PATIENT: ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances"),
    STUDY: ("ModalitiesInStudy", "SOPClassesInStudy", "NumberOfStudyRelatedSeries",
            "NumberOfStudyRelatedInstances"),
    SERIES: ("NumberOfSeriesRelatedInstances",),
    IMAGE: (),
}
#: Keys never used for matching: they describe the query, not the data.
CONTROL_KEYWORDS = ("QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC", "RetrieveAETitle",
                    "InstanceAvailability")
NON_WILDCARD_VRS = {"DA", "TM", "DT", "UI", "IS", "DS", "SS", "US", "SL", "UL", "SV", "UV", "FL", "FD", "AT"}
RANGE_VRS = {"DA", "TM", "DT"}
BINARY_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}
#: Longest value kept in the index; longer text stays only in the file.
MAX_VALUE_CHARS = 1024


def tag_hex(keyword: str) -> str:
    return f"{tag_for_keyword(keyword):08X}"


LEVEL_TAGS = {lvl: {tag_hex(k) for k in kws + COMPUTED[lvl]} for lvl, kws in LEVEL_KEYWORDS.items()}
LEVEL_TAGS[IMAGE] = set()
#: Tag -> the level (patient, study or series) whose record keeps it.
_LEVEL_OF = {t: lvl for lvl in (PATIENT, STUDY, SERIES) for t in LEVEL_TAGS[lvl]}
CONTROL_TAGS = {tag_hex(k) for k in CONTROL_KEYWORDS}


def levels_for(level: str, model: str = STUDY_ROOT) -> tuple:
    """The levels whose keys a query at *level* may use, top first."""
    if level not in LEVELS:
        raise InvalidQuery(f"unknown query level {level!r}")
    if model == STUDY_ROOT and level == PATIENT:
        raise InvalidQuery("the study root model has no PATIENT level")
    return LEVELS[: LEVELS.index(level) + 1]


def attrs_from_dataset(ds: Dataset) -> dict:
    """Header attributes as DICOM JSON, without binary, private, sequence or huge values.

    Decides from the raw element (tag, VR, length) before touching a value, so
    a value the reader deferred (pixel data, big blobs) is never loaded.
    """
    out = {}
    for tag in list(ds.keys()):
        tag = Tag(tag)
        raw = ds.get_item(tag, keep_deferred=True)
        if not _indexed(tag, getattr(raw, "VR", None), getattr(raw, "length", 0) or 0):
            continue
        js = element_json(raw)  # the common elements without pydicom's conversions (harmony.dicom.rawjson)
        if js is None:
            try:
                js = finite_json(ds[tag].to_json_dict(bulk_data_element_handler=None,
                                                      bulk_data_threshold=MAX_VALUE_CHARS))
            except Exception:  # noqa: BLE001 - a malformed value is skipped, not fatal to ingest
                continue
        if _fits(js):
            out[f"{int(tag):08X}"] = js
    return out


def attrs_from_scan(scan: ScannedFile) -> dict:
    """:func:`attrs_from_dataset` of a file read by :mod:`harmony.dicom.rawscan`, without
    a pydicom Dataset: the same attributes (tests/dicom/test_rawscan.py), or
    :class:`~harmony.dicom.rawscan.ScanDeclined` when only pydicom can tell."""
    out = {}
    keys = _INDEX_KEYS
    longest = 4 * MAX_VALUE_CHARS
    for element in scan.elements:
        said = (element.tag, element.vr)
        key = keys.get(said)
        if key is None:
            key = f"{element.tag:08X}" if _indexed(element.tag, element.vr, 0) else ""
            if len(keys) >= INDEX_KEYS:   # tags are the sender's: never unbounded
                keys.clear()
            keys[said] = key
        if not key or element.length > longest:
            continue
        js = scan.element_json(element)
        if element.length <= ALWAYS_FITS_BYTES or _fits(js):
            out[key] = js
    return out


#: (tag, VR as the file says it) -> its index key (8 hex digits), or "" when never indexed:
#: judged once per tag rather than per element of every instance (with implicit VR a
#: dictionary lookup each; ~40 elements an instance, bench/ingest).  At most INDEX_KEYS.
_INDEX_KEYS: dict[tuple[int, str | None], str] = {}
INDEX_KEYS = 4096
#: A value of at most this many bytes always fits MAX_VALUE_CHARS as DICOM JSON: the widest
#: renderings are 32 one-letter PN values (~700 characters as objects) and FL's repr (~400),
#: tests/dicom/test_rawscan.py; _fits' str() of the value is skipped for them.
ALWAYS_FITS_BYTES = 64


def _indexed(tag: int, vr: str | None, length: int) -> bool:
    """Whether an element may be indexed, judged before its value is read: not private,
    file meta or pixel data, not binary or a sequence, not huge (*vr* ``None``: implicit)."""
    group = tag >> 16
    if group & 1 or group == 0x0002 or group == 0x7FE0:
        return False
    vr = vr or _dictionary_vr(f"{tag:08X}", "UN")
    return not (vr in BINARY_VRS or vr == "SQ" or length > 4 * MAX_VALUE_CHARS)


def _fits(js: dict) -> bool:
    return not ("BulkDataURI" in js or "InlineBinary" in js or len(str(js.get("Value", ""))) > MAX_VALUE_CHARS)


def split_levels(attrs: dict) -> dict:
    """Instance attributes split into the patient, study and series records, each
    in the order of *attrs*.  One pass over *attrs* (a level's ~15 tags out of an
    instance's ~50): three filtering passes were ~3 % of an ingest's CPU (bench/ingest)."""
    levels: dict = {PATIENT: {}, STUDY: {}, SERIES: {}}
    level_of = _LEVEL_OF
    for t, v in attrs.items():
        lvl = level_of.get(t)
        if lvl is not None:
            levels[lvl][t] = v
    return levels


def text_values(element: dict | None) -> list[str]:
    """The values of a DICOM JSON element as strings.  A PN gives each of its
    component groups (alphabetic, ideographic, phonetic) and, when it has more
    than one, the whole ``A=I=P`` form: ``山田*`` finds ``Yamada^Tarou=山田^太郎``."""
    if not element:
        return []
    out = []
    for v in element.get("Value", []) or []:
        if isinstance(v, dict):
            groups = [v.get(k, "") or "" for k in ("Alphabetic", "Ideographic", "Phonetic")]
            present = [g for g in groups if g]
            if len(present) > 1:
                out.append("=".join(groups).rstrip("="))
            out.extend(present or [""])
            continue
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        out.append(str(v))
    return out


@lru_cache(maxsize=512)
def _wildcard(pattern: str, ignore_case: bool):
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(regex + r"\Z", re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL)


def _range_match(value: str, lo: str, hi: str) -> bool:
    value = value.replace(":", "")
    lo, hi = lo.replace(":", "").strip(), hi.replace(":", "").strip()
    if lo and value[: len(lo)] < lo:
        return False
    if hi and value[: len(hi)] > hi:
        return False
    return True


def value_matches(vr: str, query: str, stored: list[str]) -> bool:
    """Does one query value match any of the stored values?"""
    query = query.strip() if vr != "PN" else query.strip(" ")
    if vr in RANGE_VRS and "-" in query:
        lo, _, hi = query.partition("-")
        return any(_range_match(s, lo, hi) for s in stored if s)
    if vr in ("IS", "DS"):
        try:
            q = float(query)
            return any(s.strip() and float(s) == q for s in stored)
        except ValueError:
            return False
    if vr not in NON_WILDCARD_VRS and ("*" in query or "?" in query):
        rx = _wildcard(query, vr == "PN")
        return any(rx.match(s) for s in stored)
    if vr == "PN":
        return any(s.strip().lower() == query.lower() for s in stored)
    if vr in ("TM",):
        return any(_range_match(s, query, query) for s in stored)
    return any(s.strip() == query for s in stored)


def query_keys(identifier: Dataset | dict, level: str, model: str = STUDY_ROOT) -> list:
    """The identifier's keys as ``(tag_hex, vr, [values])``; values empty = return key only.

    *identifier* is a Dataset, or DICOM JSON: a plain one (see :func:`plain_json_elements`)
    is read as it is, any other through ``Dataset.from_json``, with the same keys either way.
    Keys of levels below *level* are ignored for matching (PS3.4 C.4.1.1.3):
    dcmtk and Orthanc do the same.
    """
    allowed_levels = levels_for(level, model)
    if isinstance(identifier, dict):
        elements = plain_json_elements(identifier)
        if elements is None:
            elements = _dataset_elements(Dataset.from_json(identifier))
    else:
        elements = _dataset_elements(identifier)
    keys: list[tuple[str, str, list[str]]] = []
    for th, vr, values in elements:
        if th in CONTROL_TAGS or th.startswith("0002"):
            continue
        if vr == "SQ" or vr in BINARY_VRS:
            keys.append((th, vr, []))
            continue
        if values and level != IMAGE and not any(th in LEVEL_TAGS[lvl] for lvl in allowed_levels):
            values = []  # a lower-level key: return-only, never filters
        keys.append((th, vr, values))
    return keys


def _dataset_elements(identifier: Dataset):
    for elem in identifier:
        vr = elem.VR
        yield f"{int(elem.tag):08X}", vr, [] if vr == "SQ" or vr in BINARY_VRS else _query_values(elem)


#: VRs whose DICOM JSON value is the text itself: no person-name groups, numbers, bulk data or items.
PLAIN_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
#: Every VR a DICOM JSON element may name (PS3.18 F.2.3).
DICOM_VRS = frozenset(vr.value for vr in VR if " " not in vr.value)
_TAG_KEY = re.compile(r"[0-9A-F]{8}")
#: Tag keys :func:`plain_json_elements` has found well formed: a query names the same
#: dozen tags every time, and the regex per key was a third of the function (bench/archive).
_TAGS_SEEN: set[str] = set()


def _tag_key(th) -> bool:
    if type(th) is not str or not _TAG_KEY.fullmatch(th):
        return False
    if len(_TAGS_SEEN) < 4096:
        _TAGS_SEEN.add(th)
    return True


def plain_json_elements(doc: dict) -> list | None:
    """A DICOM JSON identifier's ``(tag_hex, vr, [values])`` in tag order, read
    without pydicom when every element is a return key (no value) or text
    (:data:`PLAIN_TEXT_VRS`) given as strings; None when any needs pydicom's reading. A DICOMweb query is nearly
    always plain, and ``Dataset.from_json`` was a tenth of a study search's
    reactor time (bench/archive). The values are what :func:`_query_values`
    makes of the Dataset: one value splits at backslashes, UIDs lose padding
    spaces, empty values drop out (tests/storage/test_query.py compares both)."""
    out: list[tuple[str, str, list[str]]] = []
    for th, elem in doc.items():
        if type(elem) is not dict or (th not in _TAGS_SEEN and not _tag_key(th)):
            return None
        vr = elem.get("vr")
        value = elem.get("Value", [])
        if len(elem) > 1 + ("Value" in elem) or type(value) is not list:
            return None
        if not value and vr in DICOM_VRS:  # a return key: no value to read, whatever its VR
            out.append((th, vr, []))
            continue
        if vr not in PLAIN_TEXT_VRS:
            return None
        if not all(type(v) is str for v in value):
            return None
        parts = value[0].split("\\") if len(value) == 1 else value
        if vr == "UI":
            parts = [p.strip(" ") for p in parts]
        out.append((th, vr, [p for p in parts if p != ""]))
    out.sort()
    return out


def _query_values(elem) -> list[str]:
    v = elem.value
    if v is None or v == "":
        return []
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return [str(x) for x in v if str(x) != ""]
    text = str(v)
    return [x for x in text.split("\\") if x != ""] if text else []


def record_matches(keys: list, record: dict) -> bool:
    """*record*: tag_hex -> DICOM JSON element (all levels merged)."""
    for th, vr, values in keys:
        if not values:
            continue
        stored = text_values(record.get(th))
        if not stored:
            return False
        if not any(value_matches(vr, q, stored) for q in values):
            return False
    return True


def response_json(keys: list, record: dict, level: str) -> dict:
    """The C-FIND response identifier, as DICOM JSON: every requested key, with
    the stored value or empty, plus QueryRetrieveLevel.  *record* holds only
    the query level and those above it, so lower-level keys come back empty."""
    out = {}
    for th, vr, _values in keys:
        found = record.get(th)
        out[th] = found if found is not None else {"vr": _dictionary_vr(th, vr) if vr == "UN" else vr}
    out[tag_hex("QueryRetrieveLevel")] = {"vr": "CS", "Value": [level]}
    return out


def _dictionary_vr(th: str, fallback: str) -> str:
    try:
        return dictionary_VR(Tag(int(th, 16)))
    except KeyError:
        return fallback


def keyword(th: str) -> str:
    return keyword_for_tag(Tag(int(th, 16))) or th
