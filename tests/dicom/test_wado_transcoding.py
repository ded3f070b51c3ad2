"""Issue 12 defect 5: WADO-RS of compressed instances for clients that did not
ask for ``transfer-syntax=*``.

Before: dicomweb-client's default ``retrieve_instance`` (Accept
``multipart/related; type="application/dicom"``) of a JPEG-LS or JPEG lossless
instance got 406 "ask with transfer-syntax=*" (no codec), and once a codec was
there pydicom's ``decompress()`` would have minted a new SOP Instance UID.  Now
instances, frames and rendered images work for every syntax with a decoder,
the same pixels as Orthanc decodes, and video gets a 406 that names its syntax.
"""

from __future__ import annotations

import io

import numpy as np
import pytest_twisted
import requests
from PIL import Image
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from twisted.internet import threads

from tests.dicom.compressed import _dcmtk, archive_all, new_study_uid
from tests.dicomweb_helpers import client, in_thread
from tests.dimse_helpers import parse_multipart

NO_SYNTAX = 'multipart/related; type="application/dicom"'
DECODABLE = ("jpegls", "jpegls-near", "jpeg-sv1", "jpeg-lossless", "jpeg-extended", "jpeg-baseline", "rle",
             "j2k-lossless", "j2k", "deflated")


def _uids(path):
    ds = dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def _get_instance(base, path, accept):
    """One instance by WADO-RS with exactly this Accept header (blocking)."""
    study, series, sop = _uids(path)
    r = requests.get(f"{base}/studies/{study}/series/{series}/instances/{sop}", headers={"Accept": accept},
                     timeout=30)
    assert r.status_code == 200, (path.name, r.status_code, r.text[:300])
    [part] = parse_multipart(r.content, r.headers["Content-Type"])
    return dcmread(io.BytesIO(part))


@pytest_twisted.ensureDeferred
async def test_retrieve_instance_without_transfer_syntax_decompresses(gateway, tmp_path):
    archived = await archive_all(gateway, tmp_path, orthanc=True)
    web = client(gateway.url("/dicomweb"))
    for label in DECODABLE:
        m = archived[label]
        stored = dcmread(m.path)
        # The Accept of issue 12: no transfer-syntax, so PS3.18's default (Explicit VR LE) applies.
        got = await in_thread(_get_instance, gateway.url("/dicomweb"), m.path, NO_SYNTAX)
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, label
        assert got.SOPInstanceUID == m.sop_uid, f"{label}: a new SOP Instance UID was minted"
        assert np.array_equal(got.pixel_array, stored.pixel_array), label
        if m.lossless:
            assert np.array_equal(got.pixel_array, m.pixels), label
        # Orthanc, asked the same, decodes to the same pixels (Orthanc 1.10 has no
        # JPEG 2000 decoder and answers those with 500).
        theirs = None if label.startswith("j2k") else await in_thread(
            _get_instance, gateway.orthanc.dicomweb_url, m.path, NO_SYNTAX)
        if theirs is None:
            pass
        elif m.lossless:
            assert np.array_equal(got.pixel_array, theirs.pixel_array), label
        else:  # lossy decoders (libjpeg here, DCMTK's there) may round the IDCT differently
            diff = np.abs(got.pixel_array.astype(int) - theirs.pixel_array.astype(int))
            assert diff.max() <= 2, (label, diff.max())
        # dicomweb-client: its default (it asks transfer-syntax=*) gets the instance as stored,
        # and naming Explicit VR Little Endian gets it decompressed.
        raw = await in_thread(web.retrieve_instance, *_uids(m.path))
        assert raw.file_meta.TransferSyntaxUID == m.syntax and raw.SOPInstanceUID == m.sop_uid, label
        assert np.array_equal(raw.pixel_array, stored.pixel_array), label
        explicit = await in_thread(web.retrieve_instance, *_uids(m.path),
                                   media_types=[("application/dicom", ExplicitVRLittleEndian)])
        assert explicit.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, label
        assert np.array_equal(explicit.pixel_array, stored.pixel_array), label


@pytest_twisted.ensureDeferred
async def test_frames_and_rendered_for_every_decodable_syntax(gateway, tmp_path):
    archived = await archive_all(gateway, tmp_path, orthanc=True)
    web = client(gateway.url("/dicomweb"))
    for label in DECODABLE:
        m = archived[label]
        stored = dcmread(m.path)
        [frame] = await in_thread(web.retrieve_instance_frames, *_uids(m.path), frame_numbers=[1],
                                  media_types=[("application/octet-stream", ExplicitVRLittleEndian)])
        expected = stored.pixel_array
        assert frame == expected.astype(expected.dtype.newbyteorder("<")).tobytes(), label
        png = await in_thread(web.retrieve_instance_rendered, *_uids(m.path), media_types=("image/png",))
        image = Image.open(io.BytesIO(png))
        assert image.size == (int(stored.Columns), int(stored.Rows)), label


@pytest_twisted.ensureDeferred
async def test_rendered_colour_jpeg_keeps_its_colours(gateway, tmp_path):
    """A YBR_FULL_422 JPEG baseline (as cameras and img2dcm make them) renders
    in its own colours, not converted to RGB twice."""
    jpg, dcm = tmp_path / "red.jpg", tmp_path / "red.dcm"
    Image.new("RGB", (32, 32), (200, 30, 40)).save(jpg, format="JPEG", quality=95)
    study = new_study_uid()
    await threads.deferToThread(_dcmtk, "img2dcm", jpg, dcm, "-k", f"StudyInstanceUID={study}",
                                "-k", f"SeriesInstanceUID={study}.1")
    assert dcmread(dcm).PhotometricInterpretation.startswith("YBR")
    await gateway.store.put_file(dcm)
    png = await in_thread(client(gateway.url("/dicomweb")).retrieve_instance_rendered, *_uids(dcm),
                          media_types=("image/png",))
    r, g, b = Image.open(io.BytesIO(png)).convert("RGB").getpixel((16, 16))
    assert abs(r - 200) < 12 and abs(g - 30) < 12 and abs(b - 40) < 12, (r, g, b)


@pytest_twisted.ensureDeferred
async def test_video_without_transfer_syntax_is_a_406_naming_it(gateway, tmp_path):
    archived = await archive_all(gateway, tmp_path, orthanc=True)
    study, series, sop = _uids(archived["mpeg4"].path)
    url = gateway.url(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}")
    r = await threads.deferToThread(requests.get, url, timeout=30, headers={"Accept": NO_SYNTAX})
    assert r.status_code == 406
    assert "MPEG-4 AVC/H.264" in r.json()["detail"] and "transfer-syntax=*" in r.json()["detail"]
    r = await threads.deferToThread(requests.get, url, timeout=30, headers={
        "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert r.status_code == 200 and b"1.2.840.10008.1.2.4.102" in r.content
