"""Datasets as DICOM JSON (PS3.18 F.2) for QIDO results and WADO metadata.

Large binary values are never inlined: they become ``BulkDataURI``s that
point at this proxy's WADO-RS bulkdata resource for the same instance, with
the element's path in the URI so nested values are addressable too.  Files
are read with deferred values, so pixel data is not loaded to describe it.
"""

from __future__ import annotations

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement

from harmony import jsonutil
from harmony.dicom.rawjson import element_json, finite_json
from harmony.dicom.rawscan import UNDEFINED, ScannedFile
from harmony.dicom.ul.datasets import received_json

BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
BULK_THRESHOLD = 1024
_NO_BULK = 1 << 62
UNDEFINED_LENGTH = UNDEFINED
#: Pixel data (and float/double pixel data) are always bulk data in metadata,
#: whatever their size: viewers fetch them through frames/bulkdata.
ALWAYS_BULK = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


def _vr(raw, tag) -> str:
    vr = getattr(raw, "VR", None)
    if vr:
        return str(vr)
    try:
        return dictionary_VR(tag).split(" or ")[-1]
    except KeyError:
        return "UN"


def dataset_to_json(ds, bulk_base: str | None = None, *, threshold: int = BULK_THRESHOLD, _path=()) -> dict:
    """DICOM JSON for *ds*; binary values longer than *threshold* become
    ``{bulk_base}/bulkdata/{tag}[/{item}/{tag}...]`` (inlined when no base)."""
    out: dict[str, dict] = {}
    for tag in ds.keys():
        if tag.group == 0x0002 or tag.element == 0x0000:  # file meta and group lengths stay out
            continue
        # A deferred value (pixel data) is judged by its length, never loaded
        # to be described; one whose VR the file does not say is read as before.
        raw = ds.get_item(tag, keep_deferred=True)
        if isinstance(raw, RawDataElement) and raw.value is None and not getattr(raw, "VR", None):
            raw = ds.get_item(tag)
        key = f"{tag:08X}"
        vr = _vr(raw, tag)
        length = getattr(raw, "length", None) if isinstance(raw, RawDataElement) else None
        if bulk_base and vr in BULK_VRS:
            if length is None:
                value = ds[tag].value
                length = len(value) if isinstance(value, (bytes, bytearray)) else 0
            if _is_bulk(tag, vr, length, threshold):
                out[key] = {"vr": vr, "BulkDataURI": bulk_base + "/bulkdata/" + "/".join(_path + (key,))}
                continue
        attr = element_json(raw)  # the common elements without pydicom's conversions (harmony.dicom.rawjson)
        if attr is None:
            elem = ds[tag]
            if elem.VR == "SQ":
                items = [dataset_to_json(item, bulk_base, threshold=threshold, _path=_path + (key, str(i)))
                         for i, item in enumerate(elem.value)]
                out[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
                continue
            attr = finite_json(elem.to_json_dict(None, _NO_BULK))
        out[key] = _bare_uids(vr, attr)
    return out


def _is_bulk(tag: int, vr: str, length: int, threshold: int) -> bool:
    """A binary value given as a BulkDataURI (with a base to point at), never inline."""
    return vr in BULK_VRS and (length > threshold or length == UNDEFINED_LENGTH or tag in ALWAYS_BULK)


def _bare_uids(vr: str, attr: dict) -> dict:
    if vr == "UI" and attr.get("Value"):
        # DIMSE peers may pad UIDs with NUL; DICOM JSON carries them bare.
        attr["Value"] = [v.rstrip("\0 ") if isinstance(v, str) else v for v in attr["Value"]]
    return attr


def scan_to_json(scan: ScannedFile, bulk_base: str | None = None, *, threshold: int = BULK_THRESHOLD,
                 _elements=None, _path=()) -> dict:
    """:func:`dataset_to_json` of a file read by :mod:`harmony.dicom.rawscan`, without
    a pydicom Dataset: the same JSON (tests/dicom/test_rawscan.py), or
    :class:`~harmony.dicom.rawscan.ScanDeclined` when only pydicom can tell."""
    out: dict[str, dict] = {}
    for element in scan.elements if _elements is None else _elements:
        tag = element.tag
        if tag >> 16 == 0x0002 or not tag & 0xFFFF:
            continue
        key = f"{tag:08X}"
        vr = element.vr or _vr(None, tag)
        if bulk_base and _is_bulk(tag, vr, element.length, threshold):
            out[key] = {"vr": vr, "BulkDataURI": bulk_base + "/bulkdata/" + "/".join(_path + (key,))}
            continue
        if element.items is not None:
            items = [scan_to_json(scan, bulk_base, threshold=threshold, _elements=item, _path=_path + (key, str(i)))
                     for i, item in enumerate(element.items)]
            out[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
            continue
        out[key] = scan.element_json(element)   # UIDs already bare (rawjson strips them)
    return out


def instance_metadata(path, bulk_base: str, threshold: int = BULK_THRESHOLD) -> dict:
    """WADO-RS metadata of one Part-10 file (blocking: call in a thread)."""
    ds = dcmread(path, defer_size=threshold)
    return dataset_to_json(ds, bulk_base, threshold=threshold)


def stored_metadata(ds, bulk_base: str) -> str:
    """An instance's WADO-RS metadata as compact JSON text, to keep beside it
    in an archive's index: serving metadata then concatenates stored text
    instead of parsing every file (bench/archive).  *ds* is the instance as
    read at ingest (values deferred or not: the same answer either way), or
    its :class:`~harmony.dicom.rawscan.ScannedFile`."""
    doc = scan_to_json(ds, bulk_base) if isinstance(ds, ScannedFile) else dataset_to_json(ds, bulk_base)
    return jsonutil.dumps_stored(doc)


_DIMSE_ONLY = ("00080052", "00080054")  # QueryRetrieveLevel, RetrieveAETitle


def find_result_to_json(ds) -> dict:
    """A C-FIND match as DICOM JSON, trailing UID padding trimmed and the
    QueryRetrieveLevel / RetrieveAETitle (DIMSE details) left out.  A match still
    in the bytes the PACS sent, of the common shape, is read straight from them
    (:func:`harmony.dicom.ul.datasets.identifier_json`): pydicom's decode and
    ``to_json_dict`` were a fifth of a QIDO-RS answer's CPU through the bridge."""
    fast = received_json(ds)
    if fast is not None:
        return find_result_json(fast)
    out = dataset_to_json(ds, None)
    for key in _DIMSE_ONLY:
        out.pop(key, None)
    return out


def find_result_json(doc: dict) -> dict:
    """:func:`find_result_to_json` for a match a backend gave as DICOM JSON
    already (harmony.dicom.results, ``RESULTS_AS``): a new dict, *doc* untouched."""
    out = {}
    for key, attr in doc.items():
        if key in _DIMSE_ONLY:
            continue
        if attr.get("vr") == "UI" and attr.get("Value"):
            attr = {**attr, "Value": [v.rstrip("\0 ") if isinstance(v, str) else v for v in attr["Value"]]}
        out[key] = attr
    return out
