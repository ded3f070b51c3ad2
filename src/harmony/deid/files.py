"""De-identify one Part-10 file into another: the unit the middleware, the CLI and the bench share.

Why one function: the pixel decision must be taken on the original (its
BurnedInAnnotation, Modality and device), the attributes then replaced, pixels
masked when a rule says so, and the file written with a fresh file meta - in
that order, everywhere.
"""

from __future__ import annotations

from pathlib import Path

import attr
from pydicom import dcmread
from pydicom.dataset import Dataset

from harmony.deid.pixels import MASK, QUARANTINE, CannotMask, PixelPolicy, apply_mask
from harmony.deid.profile import Deidentifier

DEIDENTIFIED, QUARANTINED = "deidentified", "quarantined"


@attr.s(auto_attribs=True)
class Outcome:
    verdict: str
    reason: str | None = None
    path: Path | None = None
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    masked_by: str | None = None
    changes: list | None = None
    #: The de-identified dataset, when asked for (``keep_dataset``), to describe it without re-reading.
    dataset: Dataset | None = None


def deidentify_file(deid: Deidentifier, policy: PixelPolicy | None, src, dst, *, report: bool = False,
                    dry_run: bool = False, keep_dataset: bool = False) -> Outcome:
    """De-identify the Part-10 file *src* into *dst* (not written when quarantined or *dry_run*);
    *dst* may be a function of the de-identified dataset (to name files by their new UIDs)."""
    ds = dcmread(src)
    done = deid.already_done(ds)  # de-identified with this secret before: it passed the pixel policy then
    verdict, reason, rule = (policy.decide(ds) if policy is not None and not done else ("clean", None, None))
    changes: list | None = [] if report else None
    if verdict == QUARANTINE:
        return Outcome(QUARANTINED, reason, sop_class_uid=str(ds.get("SOPClassUID", "")),
                       sop_instance_uid=deid.keys.uid(str(ds.get("SOPInstanceUID", ""))), changes=changes)
    deid.dataset(ds, changes)
    masked_by = None
    if verdict == MASK:
        try:
            apply_mask(ds, rule)
        except CannotMask as e:
            return Outcome(QUARANTINED, f"{reason}; {e}", sop_class_uid=str(ds.get("SOPClassUID", "")),
                           sop_instance_uid=str(ds.get("SOPInstanceUID", "")), changes=changes)
        deid.add_code(ds, "clean_pixel_data")
        masked_by = rule.name
    if callable(dst):
        dst = dst(ds)
    written = None
    if not dry_run:
        if isinstance(dst, (str, Path)):
            written = Path(dst)
            written.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(dst, enforce_file_format=True)  # a path, or a file-like object
    return Outcome(DEIDENTIFIED, reason, written,
                   sop_class_uid=str(ds.get("SOPClassUID", "")), sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                   study_instance_uid=str(ds.get("StudyInstanceUID", "")),
                   series_instance_uid=str(ds.get("SeriesInstanceUID", "")), masked_by=masked_by, changes=changes,
                   dataset=ds if keep_dataset else None)
