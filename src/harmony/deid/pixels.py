"""Burned-in identity in pixel data: which instances may carry it, and masking by rule.

Why: the attribute table cannot see text written into the image itself - the
patient's name across an ultrasound frame, a scanned request form as a secondary
capture.  Such instances are held back (quarantined) unless the operator says
otherwise, or a CTP-style rule for the device says which rectangles hold the
text, in which case those rectangles are blacked out and the instance goes on
with BurnedInAnnotation NO and the Clean Pixel Data code.
"""

from __future__ import annotations

import re

import attr
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

#: SOP classes whose images commonly carry burned-in text: secondary capture (single and
#: multi-frame) and ultrasound (single, multi-frame, and their retired forms).
SUSPECT_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4",
    "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.6.2", "1.2.840.10008.5.1.4.1.1.3.1",
    "1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.3",
})
SUSPECT_MODALITIES = frozenset({"US", "SC", "OT", "XC", "DOC"})
CLEAN, MASK, QUARANTINE, FORWARD = "clean", "mask", "quarantine", "forward"


class PixelPolicyError(ValueError):
    def __init__(self, key, message):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


@attr.s(frozen=True, auto_attribs=True)
class MaskRule:
    """Blank these rectangles (x, y, width, height in pixels) on images from matching devices.
    Empty match fields match anything; ``manufacturer``/``model`` are regular expressions."""

    name: str
    rectangles: tuple
    manufacturer: str = ""
    model: str = ""
    modality: str = ""
    rows: int = 0
    columns: int = 0

    @classmethod
    def from_dict(cls, index: int, d: dict) -> "MaskRule":
        key = f"mask_rules[{index}]"
        if not isinstance(d, dict):
            raise PixelPolicyError(key, "must be a table")
        rects = d.get("rectangles")
        if not isinstance(rects, list) or not rects or not all(
                isinstance(r, list) and len(r) == 4 and all(isinstance(v, int) and v >= 0 for v in r) for r in rects):
            raise PixelPolicyError(f"{key}.rectangles", "must be a list of [x, y, width, height] in whole pixels")
        for field in ("manufacturer", "model"):
            try:
                re.compile(str(d.get(field, "")))
            except re.error as e:
                raise PixelPolicyError(f"{key}.{field}", f"not a regular expression: {e}") from None
        unknown = set(d) - {"name", "rectangles", "manufacturer", "model", "modality", "rows", "columns"}
        if unknown:
            raise PixelPolicyError(key, f"unknown key(s): {', '.join(sorted(unknown))}")
        return cls(name=str(d.get("name", f"rule{index}")), rectangles=tuple(tuple(r) for r in rects),
                   manufacturer=str(d.get("manufacturer", "")), model=str(d.get("model", "")),
                   modality=str(d.get("modality", "")).upper(), rows=int(d.get("rows", 0)),
                   columns=int(d.get("columns", 0)))

    def matches(self, ds: Dataset) -> bool:
        if self.modality and str(ds.get("Modality", "")).upper() != self.modality:
            return False
        if self.rows and int(ds.get("Rows", 0) or 0) != self.rows:
            return False
        if self.columns and int(ds.get("Columns", 0) or 0) != self.columns:
            return False
        if self.manufacturer and not re.search(self.manufacturer, str(ds.get("Manufacturer", "")), re.IGNORECASE):
            return False
        if self.model and not re.search(self.model, str(ds.get("ManufacturerModelName", "")), re.IGNORECASE):
            return False
        return True


@attr.s(frozen=True, auto_attribs=True)
class PixelPolicy:
    """``suspect``: what happens to an instance that may carry burned-in identity and
    that no mask rule covers - ``quarantine`` (default) or ``forward``."""

    suspect: str = QUARANTINE
    modalities: frozenset = SUSPECT_MODALITIES
    sop_classes: frozenset = SUSPECT_SOP_CLASSES
    #: Believe a device's BurnedInAnnotation NO for suspect modalities (off: some devices lie).
    trust_burned_in_no: bool = False
    rules: tuple = ()

    def reason(self, ds: Dataset) -> str | None:
        """Why *ds* may carry identity in its pixels, or None."""
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            return None
        burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
        if burned == "YES":
            return "BurnedInAnnotation YES"
        if burned == "NO" and self.trust_burned_in_no:
            return None
        modality = str(ds.get("Modality", "") or "").strip().upper()
        if modality in self.modalities:
            return f"modality {modality}"
        if str(ds.get("SOPClassUID", "")) in self.sop_classes:
            return "SOP class " + str(ds.get("SOPClassUID"))
        return None

    def decide(self, ds: Dataset):
        """(verdict, reason, rule): CLEAN, MASK (with the rule), QUARANTINE or FORWARD."""
        why = self.reason(ds)
        if why is None:
            return CLEAN, None, None
        for rule in self.rules:
            if rule.matches(ds):
                return MASK, why, rule
        return (FORWARD if self.suspect == FORWARD else QUARANTINE), why, None


class CannotMask(ValueError):
    pass


def apply_mask(ds: Dataset, rule: MaskRule) -> None:
    """Black out the rule's rectangles in every frame (decoding compressed data, which
    is then stored uncompressed)."""
    try:
        arr = ds.pixel_array.copy()
    except Exception as e:  # noqa: BLE001 - no decoder, corrupt data: the instance cannot be cleaned
        raise CannotMask(f"cannot decode the pixel data: {e}") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    view = arr if frames > 1 else arr[None, ...]
    for x, y, w, h in rule.rectangles:
        if samples > 1:
            view[:, y:y + h, x:x + w, :] = 0
        else:
            view[:, y:y + h, x:x + w] = 0
    meta = ds.file_meta
    if meta.TransferSyntaxUID.is_compressed:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if samples > 1:
            ds.PhotometricInterpretation = "RGB"  # pydicom converts YCbCr to RGB when decoding
            ds.PlanarConfiguration = 0
    ds.PixelData = arr.tobytes()
    ds["PixelData"].VR = "OB" if int(ds.BitsAllocated) <= 8 else "OW"
    ds.BurnedInAnnotation = "NO"
