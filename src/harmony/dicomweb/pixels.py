"""Frames and rendered images from a retrieved instance file.

Frames are cut out of the pixel data as stored whenever the client accepts
that (``transfer-syntax=*`` or the stored syntax): encapsulated frames are
split along their fragments, native frames sliced by size, nothing decoded.
Decoding (pydicom's pixel handlers with the pylibjpeg plug-ins, one frame at
a time: JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE) happens only for rendered media
types or when an uncompressed frame of a compressed instance is asked for.  Everything here is blocking: call it in a thread.
"""

from __future__ import annotations

import io

from pydicom import dcmread
from pydicom.encaps import get_frame
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from harmony.dicom.transfer import can_decompress, name
from harmony.dicomweb.accept import EXPLICIT_VR_LITTLE_ENDIAN, JPEG
from harmony.errors import NotAcceptable, NotFound

THUMBNAIL_SIZE = (128, 128)


def number_of_frames(ds) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _check(frames, count):
    for f in frames:
        if f > count:
            raise NotFound(f"frame {f} does not exist (the instance has {count})")


def native_frame_size(ds) -> int:
    return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8


def extract_frames(path, frames, want_ts: str | None) -> tuple[list[bytes], str]:
    """-> (frame bytes, transfer syntax they are in) for 1-based *frames*."""
    ds = dcmread(path)
    stored = UID(str(ds.file_meta.TransferSyntaxUID))
    count = number_of_frames(ds)
    _check(frames, count)
    as_stored = want_ts in ("*", str(stored)) or (want_ts is None and not stored.is_compressed)
    if as_stored and stored.is_encapsulated:
        return [get_frame(ds.PixelData, f - 1, number_of_frames=count) for f in frames], str(stored)
    native_le = not stored.is_compressed and stored.is_little_endian
    if native_le and (as_stored or want_ts == EXPLICIT_VR_LITTLE_ENDIAN):
        # Native little-endian pixels are the same bytes in Implicit, Explicit or
        # (once inflated) deflated data: slice them; a deflated "frame" is named
        # Explicit VR Little Endian, since frames are never deflated.
        size = native_frame_size(ds)
        data = ds.PixelData
        named = str(stored) if as_stored and stored != DeflatedExplicitVRLittleEndian else EXPLICIT_VR_LITTLE_ENDIAN
        return [bytes(data[(f - 1) * size:f * size]) for f in frames], named
    if want_ts in (None, EXPLICIT_VR_LITTLE_ENDIAN):
        from pydicom.pixels import pixel_array
        if not can_decompress(stored):
            raise NotAcceptable(f"frames are stored as {name(stored)} ({stored}), which this proxy cannot "
                                f"decode; ask with transfer-syntax=* for them as stored")
        out = []
        for f in frames:
            arr = pixel_array(path, index=f - 1)
            out.append(arr.astype(arr.dtype.newbyteorder("<")).tobytes())
        return out, EXPLICIT_VR_LITTLE_ENDIAN
    raise NotAcceptable(f"frames are stored as {stored}; this proxy can serve them as stored (*) "
                        f"or as {EXPLICIT_VR_LITTLE_ENDIAN}, not {want_ts}")


def render(path, frame: int, media_type: str = JPEG, *, thumbnail: bool = False, quality: int = 90) -> bytes:
    """One frame as an 8-bit JPEG or PNG, windowed as the instance says (or by its range)."""
    import numpy as np
    from PIL import Image
    from pydicom.pixels import apply_voi_lut, pixel_array

    header = dcmread(path, stop_before_pixels=True)
    _check([frame], number_of_frames(header))
    stored = header.file_meta.get("TransferSyntaxUID", EXPLICIT_VR_LITTLE_ENDIAN)
    if not can_decompress(stored):
        raise NotAcceptable(f"the instance is stored as {name(stored)} ({stored}), which this proxy cannot "
                            f"render")
    # pydicom reads frames straight from the file, which a deflated one is not.
    arr = pixel_array(dcmread(path) if stored == DeflatedExplicitVRLittleEndian else path, index=frame - 1)
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2"))
    if int(header.get("SamplesPerPixel", 1)) == 1:
        if "WindowCenter" in header or "VOILUTSequence" in header:
            arr = apply_voi_lut(arr, header)
        arr = arr.astype("float64")
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else arr * 0
        if photometric == "MONOCHROME1":
            arr = 255.0 - arr
        image = Image.fromarray(np.clip(arr, 0, 255).astype("uint8"), mode="L")
    else:
        # pixel_array already gives RGB for YBR data (decoded JPEG included):
        # converting again would tint the image.
        if arr.dtype != np.uint8:
            arr = (arr.astype("float64") * 255.0 / max(1.0, float(arr.max()))).astype("uint8")
        image = Image.fromarray(arr, mode="RGB")
    if thumbnail:
        image.thumbnail(THUMBNAIL_SIZE)
    out = io.BytesIO()
    if media_type == JPEG:
        image.save(out, format="JPEG", quality=quality)
    else:
        image.save(out, format="PNG")
    return out.getvalue()


def bulk_value(path, bulk_path: tuple) -> bytes:
    """The raw value at a bulkdata path (``7FE00010``, ``00540016/0/00181072``)."""
    ds = dcmread(path)
    node = ds
    try:
        for i in range(0, len(bulk_path) - 1, 2):
            node = node[int(bulk_path[i], 16)].value[int(bulk_path[i + 1])]
        elem = node[int(bulk_path[-1], 16)]
    except (KeyError, IndexError, TypeError):
        raise NotFound("no such bulk data in the instance") from None
    value = elem.value
    if not isinstance(value, (bytes, bytearray)):
        # Only binary values are ever given BulkDataURIs (see dicomjson).
        raise NotFound("that attribute is not bulk data")
    return bytes(value)
