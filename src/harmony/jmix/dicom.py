"""From DICOM headers to ``payload/metadata.json`` (notes, section 5).

Only headers are read (``stop_before_pixels``); the instance bytes are copied
unchanged by the builder.  Series are grouped by SeriesInstanceUID alone - not
by modality (the jmix-rs bug) nor by description - so two series that share a
description stay two entries.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import attr
import pydicom
from pydicom.errors import InvalidDicomError

from harmony.dicom.uids import is_uid

_HEADER_TAGS = ["PatientID", "PatientName", "PatientBirthDate", "PatientSex", "IssuerOfPatientID",
                "StudyInstanceUID", "StudyDescription", "SeriesInstanceUID", "SeriesNumber",
                "SeriesDescription", "Modality", "BodyPartExamined", "SOPInstanceUID", "SOPClassUID"]


class DicomInputError(ValueError):
    """An input file that is not DICOM, lacks a required UID, or is of another study."""


def valid_uid(value: str) -> bool:
    """A DICOM UID under Harmony's one policy (:mod:`harmony.dicom.uids`).

    SOPInstanceUIDs become file names, so this check is also what keeps a
    hostile UID such as ``../x`` out of the filesystem.
    """
    return is_uid(value)


@attr.s(auto_attribs=True)
class InstanceHeader:
    path: Path
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    issuer: str
    study_uid: str
    study_description: str
    series_uid: str
    series_number: int | None
    series_description: str
    modality: str
    body_part: str
    sop_uid: str


def _text(ds, keyword) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0] if value else ""
    return str(value).strip().rstrip("\x00").strip()


def read_header(path: Path) -> InstanceHeader:
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, OSError, ValueError, EOFError) as e:
        raise DicomInputError(f"{path.name}: not a readable DICOM file ({e})") from None
    try:
        number = int(ds.get("SeriesNumber")) if ds.get("SeriesNumber") not in (None, "") else None
    except (TypeError, ValueError):
        number = None
    header = InstanceHeader(
        path=path, patient_id=_text(ds, "PatientID"), patient_name=_text(ds, "PatientName"),
        birth_date=_text(ds, "PatientBirthDate"), sex=_text(ds, "PatientSex"),
        issuer=_text(ds, "IssuerOfPatientID"),
        study_uid=_text(ds, "StudyInstanceUID"), study_description=_text(ds, "StudyDescription"),
        series_uid=_text(ds, "SeriesInstanceUID"), series_number=number,
        series_description=_text(ds, "SeriesDescription"), modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"), sop_uid=_text(ds, "SOPInstanceUID"))
    for what, value in (("StudyInstanceUID", header.study_uid), ("SeriesInstanceUID", header.series_uid),
                        ("SOPInstanceUID", header.sop_uid)):
        if not valid_uid(value):
            raise DicomInputError(f"{path.name}: {what} {value!r} is missing or not a valid UID")
    return header


def human_name(pn: str) -> dict | None:
    """PN ``Family^Given^Middle^Prefix^Suffix`` as a FHIR-style HumanName."""
    if not pn:
        return None
    alphabetic = pn.split("=", 1)[0]
    parts = (alphabetic.split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    out: dict = {}
    if family:
        out["family"] = family
    givens = [g for g in (given, *middle.split()) if g]
    if givens:
        out["given"] = givens
    if prefix:
        out["prefix"] = prefix
    if suffix:
        out["suffix"] = suffix
    text = ", ".join(p for p in (family, " ".join(givens)) if p)
    if text:
        out["text"] = text
    return out or None


def iso_date(da: str) -> str | None:
    """DA ``YYYYMMDD`` as ``YYYY-MM-DD``; None unless exactly eight digits."""
    if len(da) == 8 and da.isdigit():
        return f"{da[:4]}-{da[4:6]}-{da[6:]}"
    return None


def identifier_system(issuer: str) -> str:
    if issuer.startswith(("urn:", "http://", "https://")):
        return issuer
    return "urn:local:" + quote(issuer, safe="")


def build_metadata(headers: list[InstanceHeader], envelope_id: str, timestamp: str, version: str = "1.0") -> dict:
    """``metadata.json`` for one study's instances (all must share the study)."""
    if not headers:
        raise DicomInputError("no DICOM instances")
    first = headers[0]
    studies = {h.study_uid for h in headers}
    if len(studies) > 1:
        raise DicomInputError(f"instances belong to {len(studies)} studies; a JMIX envelope holds one")
    patient: dict = {"id": first.patient_id or "unknown"}
    name = human_name(first.patient_name)
    if name:
        patient["name"] = name
    dob = iso_date(first.birth_date)
    if dob:
        patient["dob"] = dob
    if first.sex in ("M", "F", "O"):
        patient["sex"] = first.sex
    if first.patient_id and first.issuer:
        patient["identifiers"] = [{"system": identifier_system(first.issuer), "value": first.patient_id}]

    series: dict[str, dict] = {}
    sops: dict[str, set] = {}
    for h in headers:
        entry = series.get(h.series_uid)
        if entry is None:
            entry = {"series_uid": h.series_uid, "modality": h.modality or "UNKNOWN"}
            if h.body_part:
                entry["body_part"] = h.body_part
            if h.series_number is not None:
                entry["series_number"] = h.series_number
            if h.series_description:
                entry["series_description"] = h.series_description
            series[h.series_uid] = entry
            sops[h.series_uid] = set()
        sops[h.series_uid].add(h.sop_uid)
    for uid, entry in series.items():
        entry["instance_count"] = len(sops[uid])
    ordered = sorted(series.values(), key=lambda s: (s.get("series_number") is None,
                                                     s.get("series_number") or 0, s["series_uid"]))
    study: dict = {"study_uid": first.study_uid}
    description = next((h.study_description for h in headers if h.study_description), "")
    if description:
        study["study_description"] = description
    study["series"] = ordered
    return {"version": version, "id": envelope_id, "timestamp": timestamp, "patient": patient, "studies": study}
