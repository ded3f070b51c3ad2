"""DCMTK clients with compressed transfer syntaxes (made by dcmcjpeg, dcmcjpls,
dcmcrle and img2dcm) through Harmony's DIMSE paths.

Here: storescu into the default archive in each syntax (kept as sent: read
back with dicomweb-client, ``transfer-syntax=*``), findscu finding it, and
getscu of the RLE instance for a client that takes only uncompressed syntaxes
(pixels as DCMTK decodes them).  Through the router
every syntax is forwarded as sent (defect 4: JPEG extended and JPEG-LS got
CannotUnderstand, or were transcoded by the PACS for a C-MOVE).
Decompression for clients that want uncompressed data: test_decompression.py.

A C-GET requestor that prefers a compressed syntax (getscu ``+xr``, ``+xy``)
gets Explicit VR Little Endian with the same pixels: Harmony accepts each
storage context in its own order, uncompressed first, because one context
carries every instance of its class and Harmony cannot encode to a compressed
syntax an instance stored otherwise (docs/interop.md, "Limits").
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from tests.dicomweb_helpers import client
from tests.interop.data import COMPRESSED, reference_pixels
from tests.interop.support import findscu, getscu, movescu, orthanc_file, storescu, upload



LOSSY = {"jpeg_extended", "jpeg_baseline"}


def assert_same_pixels(got, item, folder):
    """*got*'s pixels are *item*'s as DCMTK decodes them: exactly for lossless
    syntaxes, within a few grey levels for lossy ones (decoders round differently)."""
    want = reference_pixels(item, folder).astype(np.int32)
    have = got.pixel_array.astype(np.int32)
    assert have.shape == want.shape
    assert np.abs(have - want).max() <= (4 if item.name in LOSSY else 0), item.name


def get_and_compare(stack, item, folder, *, prefer=None):
    """getscu of *item* from *stack* (stored there first): one instance arrives,
    its pixels the original's."""
    if stack.pacs is not None:
        upload(stack.pacs, [item.path])
    else:
        storescu(stack.scp_port, [item.path])
    [got] = getscu(stack.scp_port, image_keys(item), folder / "got", prefer=prefer)
    assert_same_pixels(got, item, folder)
    return got


def image_keys(item) -> dict:
    return {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": item.study_uid,
            "SeriesInstanceUID": item.series_uid, "SOPInstanceUID": item.sop_uid}


@pytest.mark.parametrize("variant", list(COMPRESSED))
def test_dcmtk_compressed_store_into_archive(archive, compressed, variant, tmp_path):
    item = compressed[variant]
    storescu(archive.scp_port, [item.path])
    answers, final = findscu(archive.scp_port, "IMAGE", {"StudyInstanceUID": item.study_uid,
                                                         "SeriesInstanceUID": item.series_uid, "SOPInstanceUID": None},
                             tmp_path / "find")
    assert "Success" in final and [a.SOPInstanceUID for a in answers] == [item.sop_uid]
    stored = client(archive.web_url).retrieve_instance(item.study_uid, item.series_uid, item.sop_uid,
                                                       media_types=[("application/dicom", "*")])
    assert str(stored.file_meta.TransferSyntaxUID) == item.transfer_syntax
    assert stored.PixelData == pydicom.dcmread(item.path).PixelData


@pytest.mark.parametrize("shape", ["archive", "router"])
@pytest.mark.parametrize("variant", ["explicit", "rle"])
def test_dcmtk_get_uncompressed(shape, variant, request, compressed, tmp_path):
    got = get_and_compare(request.getfixturevalue(shape), compressed[variant], tmp_path)
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"


@pytest.mark.parametrize("shape", ["archive", "router"])
@pytest.mark.parametrize("variant", ["rle", "jpeg_baseline"])
def test_dcmtk_get_preferring_compressed(shape, variant, request, compressed, tmp_path):
    item = compressed[variant]
    get_and_compare(request.getfixturevalue(shape), item, tmp_path, prefer=item.transfer_syntax)


def assert_unchanged(got, item):
    assert str(got.file_meta.TransferSyntaxUID) == item.transfer_syntax
    assert got.PixelData == pydicom.dcmread(item.path).PixelData


def store_through_router(router, item):
    """storescu -> dicom_scp -> dicom_scu -> Orthanc: the PACS holds the instance in the syntax sent."""
    storescu(router.scp_port, [item.path])
    assert_unchanged(orthanc_file(router.pacs, item.sop_uid), item)


def move_through_router(router, item, folder):
    """movescu (accepting every syntax) -> Harmony -> C-GET from the PACS -> C-STORE to movescu: unchanged."""
    upload(router.pacs, [item.path])
    [got] = movescu(router.scp_port, image_keys(item), folder, router.movescu_port)
    assert_unchanged(got, item)


@pytest.mark.parametrize("variant", list(COMPRESSED))
def test_dcmtk_compressed_store_through_router(router, compressed, variant):
    store_through_router(router, compressed[variant])


@pytest.mark.parametrize("variant", list(COMPRESSED))
def test_dcmtk_compressed_move_through_router(router, compressed, variant, tmp_path):
    move_through_router(router, compressed[variant], tmp_path)
