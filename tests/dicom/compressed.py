"""Compressed test instances, made by DCMTK (``dcmcjpls``, ``dcmcjpeg``,
``dcmcrle``, ``img2dcm``, ``dcmconv``) and pydicom (JPEG 2000 through
pylibjpeg-openjpeg; an MPEG-4 stand-in) from synthetic pydicom data.

Each :class:`Made` says how ``storescu`` proposes its syntax and whether it is
lossless, so tests can check both "passed on as stored" (same bytes) and
"decompressed when refused" (same pixels).
"""

from __future__ import annotations

import io
import subprocess
import uuid
from pathlib import Path

import attr
import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import (JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless,
                         JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, MPEG4HP41, RLELossless,
                         DeflatedExplicitVRLittleEndian, generate_uid)

from tests.dicom_data import make_instance, save, uid
from tests.peers import peer_env, require

VIDEO_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4.1"


@attr.s(auto_attribs=True)
class Made:
    label: str
    path: Path
    syntax: str
    #: storescu's option proposing this syntax (None: no storescu option exists)
    propose: str | None
    lossless: bool
    #: the uncompressed pixels it was made from (None: not an image Harmony can decode)
    pixels: object = None

    @property
    def sop_uid(self) -> str:
        return str(dcmread(self.path, stop_before_pixels=True).SOPInstanceUID)


def new_study_uid() -> str:
    """A fresh study UID short enough for ``.1``-suffixed series UIDs."""
    return uid(7, uuid.uuid4().int % 10 ** 15)


def _dcmtk(tool, *args):
    r = subprocess.run([require(f"/usr/bin/{tool}"), *map(str, args)], capture_output=True, env=peer_env())
    assert r.returncode == 0, (tool, r.stderr)


def _base(folder: Path, label: str, study_uid: str, patient_id: str, **kw):
    ds = make_instance(patient_id=patient_id, study_uid=study_uid, series_uid=study_uid + ".1",
                       sop_uid=generate_uid(), rows=32, cols=32, seed=sum(label.encode()), **kw)
    return ds, save(ds, folder / f"{label}-raw.dcm")


def make_all(folder: Path, study_uid: str, patient_id: str = "TSYNTAX") -> dict[str, Made]:
    """One instance per syntax, all in study *study_uid*."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Made] = {}

    def dcmtk_made(label, tool, options, syntax, propose, lossless):
        ds, raw = _base(folder, label, study_uid, patient_id)
        path = folder / f"{label}.dcm"
        _dcmtk(tool, *options, raw, path)
        out[label] = Made(label, path, str(syntax), propose, lossless, ds.pixel_array)

    dcmtk_made("jpegls", "dcmcjpls", [], JPEGLSLossless, "-xt", True)
    dcmtk_made("jpegls-near", "dcmcjpls", ["+en"], JPEGLSNearLossless, "-xu", False)
    dcmtk_made("jpeg-sv1", "dcmcjpeg", [], JPEGLosslessSV1, "-xs", True)
    dcmtk_made("jpeg-lossless", "dcmcjpeg", ["+el"], JPEGLossless, None, True)
    dcmtk_made("jpeg-extended", "dcmcjpeg", ["+ee"], JPEGExtended12Bit, "-xx", False)
    dcmtk_made("rle", "dcmcrle", [], RLELossless, "-xr", True)
    dcmtk_made("deflated", "dcmconv", ["+td"], DeflatedExplicitVRLittleEndian, "-xd", True)

    # JPEG 2000 (DCMTK 3.6.7 has no encoder): pydicom through pylibjpeg-openjpeg.
    for label, syntax, propose, kwargs in (("j2k-lossless", JPEG2000Lossless, "-xv", {}),
                                           ("j2k", JPEG2000, "-xw", {"j2k_cr": [5]})):
        ds, _ = _base(folder, label, study_uid, patient_id)
        pixels = ds.pixel_array
        ds.compress(syntax, generate_instance_uid=False, **kwargs)
        out[label] = Made(label, save(ds, folder / f"{label}.dcm"), str(syntax), propose, syntax == JPEG2000Lossless,
                          pixels)

    # JPEG baseline, as a secondary capture wraps a camera's JPEG: img2dcm.
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8), mode="L")
    jpg = folder / "camera.jpg"
    image.save(jpg, format="JPEG", quality=95)
    path = folder / "jpeg-baseline.dcm"
    _dcmtk("img2dcm", jpg, path, "-k", f"StudyInstanceUID={study_uid}", "-k", f"PatientID={patient_id}",
           "-k", f"SeriesInstanceUID={study_uid}.2")
    out["jpeg-baseline"] = Made("jpeg-baseline", path, str(JPEGBaseline8Bit), "-xy", False,
                                dcmread(path).pixel_array)

    # Video: Harmony has no decoder, so the bytes can only be passed on (an
    # opaque stand-in for an MPEG-4 stream: no peer here decodes it).
    ds, _ = _base(folder, "mpeg4", study_uid, patient_id)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = VIDEO_PHOTOGRAPHIC
    ds.Modality = "XC"
    ds.SeriesInstanceUID = study_uid + ".3"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_PARTIAL_420", 0
    ds.NumberOfFrames = 1
    ds.PixelData = encapsulate([b"\x00\x00\x00\x01" + bytes(range(256)) * 4])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = MPEG4HP41
    out["mpeg4"] = Made("mpeg4", save(ds, folder / "mpeg4.dcm"), str(MPEG4HP41), "-xn", False, None)
    return out


async def archive_all(gateway, folder: Path, study_uid: str | None = None, orthanc: bool = False) -> dict:
    """:func:`make_all` in a fresh study, filed in the gateway's archive (and
    uploaded to its Orthanc with *orthanc*)."""
    from twisted.internet import threads
    made = await threads.deferToThread(make_all, folder, study_uid or new_study_uid())
    for m in made.values():
        await gateway.store.put_file(m.path)
    if orthanc:
        await threads.deferToThread(gateway.orthanc.upload, [m.path for m in made.values()])
    return made


def study_of(made: dict) -> str:
    return str(dcmread(next(iter(made.values())).path, stop_before_pixels=True).StudyInstanceUID)


def pixel_bytes(path_or_bytes) -> bytes:
    """The Pixel Data value as stored (encapsulated fragments included)."""
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    return bytes(dcmread(src).PixelData)
