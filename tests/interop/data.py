"""Synthetic data for the interop suite, made the way a site's data arrives:
compressed by DCMTK's own encoders (``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``,
``img2dcm`` from a JPEG), and patient names in the character sets real
modalities send (UTF-8 Greek, Japanese and German, Latin-1, ISO 2022 JIS).

Everything starts from pydicom-made instances (tests/dicom_data.py); no real
patient appears.  UIDs live under the test root, branch ``.7.``, apart from the
shared corpus.
"""

from __future__ import annotations

from pathlib import Path

import attr
import numpy as np
import pydicom
from PIL import Image

from tests.dicom_data import make_instance, save, uid
from tests.interop.support import dcmtk

#: variant -> (transfer syntax UID it must end up in, how it is made)
COMPRESSED = {
    "explicit": ("1.2.840.10008.1.2.1", None),
    "jpeg_lossless": ("1.2.840.10008.1.2.4.70", ("dcmcjpeg", "+e1")),
    "jpeg_extended": ("1.2.840.10008.1.2.4.51", ("dcmcjpeg", "+ee", "+un")),
    "jpegls": ("1.2.840.10008.1.2.4.80", ("dcmcjpls", "+el")),
    "rle": ("1.2.840.10008.1.2.5", ("dcmcrle",)),
    "jpeg_baseline": ("1.2.840.10008.1.2.4.50", "img2dcm"),
}

#: name -> (SpecificCharacterSet, PatientName, a query prefix that matches only it)
CHARSETS = {
    "greek": ("ISO_IR 192", "Ωμέγα^Άλφα", "Ωμέγα*"),
    # not 山田: the ISO 2022 name's ideographic group is 山田^太郎, and an archive
    # may match a query against every component group
    "japanese": ("ISO_IR 192", "佐藤^花子", "佐藤*"),
    "german": ("ISO_IR 192", "Müller^Jürgen", "Müller*"),
    "latin1": ("ISO_IR 100", "Größe^Jörg", "Größe*"),
    "iso2022": ("\\ISO 2022 IR 87", "Yamada^Tarou=山田^太郎=やまだ^たろう", "Yamada*"),
}

COMPRESSED_PATIENT = "IOPCOMP"
COMPRESSED_STUDY = uid(7, 1)


@attr.s(auto_attribs=True, frozen=True)
class Item:
    path: Path
    name: str
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    transfer_syntax: str
    patient_name: str = ""
    charset: str = ""


def _compressed(folder: Path, n: int, variant: str) -> Item:
    ts, how = COMPRESSED[variant]
    series, sop = uid(7, 1, n), uid(7, 1, n, 1)
    target = folder / f"{variant}.dcm"
    common = dict(patient_id=COMPRESSED_PATIENT, patient_name="INTEROP^COMPRESSED", study_uid=COMPRESSED_STUDY,
                  series_uid=series, sop_uid=sop, series_number=n, series_description=variant.upper(),
                  accession="IOP001", rows=64, cols=64, seed=700 + n)
    if how == "img2dcm":
        # A JPEG file as a camera or scanner would make it, wrapped by img2dcm (Secondary Capture).
        jpeg = folder / f"{variant}.jpg"
        pixels = np.random.default_rng(n).integers(0, 255, size=(64, 64), dtype=np.uint8)
        Image.fromarray(pixels, "L").save(jpeg, quality=90)
        ds = make_instance(**common)
        keys = {"PatientID": ds.PatientID, "PatientName": str(ds.PatientName), "StudyInstanceUID": ds.StudyInstanceUID,
                "SeriesInstanceUID": series, "SOPInstanceUID": sop, "SeriesNumber": str(n), "InstanceNumber": "1",
                "StudyDate": ds.StudyDate, "StudyTime": ds.StudyTime, "AccessionNumber": ds.AccessionNumber,
                "Modality": "OT", "SeriesDescription": ds.SeriesDescription, "StudyID": "1"}
        args = ["-i", "JPEG", jpeg, target]
        for k, v in keys.items():
            args += ["-k", f"{k}={v}"]
        _run("img2dcm", *args)
    else:
        source = save(make_instance(**common), folder / f"{variant}-source.dcm")
        if how is None:
            source.rename(target)
        else:
            _run(how[0], *how[1:], source, target)
            source.unlink()
    got = pydicom.dcmread(target, stop_before_pixels=True)
    assert got.file_meta.TransferSyntaxUID == ts and got.SOPInstanceUID == sop, (variant, got.file_meta)
    return Item(target, variant, COMPRESSED_PATIENT, COMPRESSED_STUDY, series, sop, ts)


def _run(tool, *args):
    r = dcmtk(tool, *args)
    assert r.returncode == 0, (tool, r.stderr.decode(errors="replace"))


def make_compressed(folder: Path) -> dict[str, Item]:
    """One study (patient ``IOPCOMP``), one series per transfer syntax in :data:`COMPRESSED`."""
    folder.mkdir(parents=True, exist_ok=True)
    return {variant: _compressed(folder, n, variant) for n, variant in enumerate(COMPRESSED, start=1)}


def make_charsets(folder: Path) -> dict[str, Item]:
    """One patient, study and instance per character set in :data:`CHARSETS`;
    the study description repeats the name, so study-level queries see it too."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for n, (name, (charset, person, _prefix)) in enumerate(CHARSETS.items(), start=1):
        study, series, sop = uid(7, 2, n), uid(7, 2, n, 1), uid(7, 2, n, 1, 1)
        ds = make_instance(patient_id=f"IOPCS{n}", study_uid=study, series_uid=series, sop_uid=sop,
                           accession=f"IOPCS{n}", seed=800 + n)
        ds.SpecificCharacterSet = charset
        ds.PatientName = person
        ds.StudyDescription = person.split("=")[-1].replace("^", " ")[:64]
        path = save(ds, folder / f"{name}.dcm")  # pydicom encodes each value in the dataset's character set
        check = pydicom.dcmread(path)
        assert str(check.PatientName) == person, (name, check.PatientName)
        out[name] = Item(path, name, ds.PatientID, study, series, sop, "1.2.840.10008.1.2.1", person, charset)
    return out


#: transfer syntax -> the DCMTK tool that decodes it (the reference decoder for pixel comparisons)
DECODERS = {"1.2.840.10008.1.2.4.70": "dcmdjpeg", "1.2.840.10008.1.2.4.51": "dcmdjpeg",
            "1.2.840.10008.1.2.4.50": "dcmdjpeg", "1.2.840.10008.1.2.4.80": "dcmdjpls",
            "1.2.840.10008.1.2.5": "dcmdrle"}


def reference_pixels(item: Item, folder: Path) -> np.ndarray:
    """*item*'s pixels as DCMTK decodes them (pydicom decodes only RLE without extra codecs)."""
    if item.transfer_syntax not in DECODERS:
        return pydicom.dcmread(item.path).pixel_array
    out = Path(folder) / f"{item.name}-decoded.dcm"
    _run(DECODERS[item.transfer_syntax], item.path, out)
    return pydicom.dcmread(out).pixel_array
