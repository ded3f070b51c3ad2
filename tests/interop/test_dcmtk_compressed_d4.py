"""Issue 12, defect 4: the router's dicom_scu must send JPEG extended and
JPEG-LS instances in their own syntax (storescu gets CannotUnderstand today,
and a C-MOVE through the router has the PACS transcode them to Explicit VR
Little Endian; Orthanc's C-STORE through the router fails with 0xC001).  Fails until defect 4's fix is merged.
"""

from __future__ import annotations

import pydicom
import pytest

from tests.interop.support import movescu, orthanc_file, storescu, upload
from tests.interop.test_dcmtk_compressed import image_keys
from tests.interop.test_orthanc_dimse import orthanc_store_compressed

WAITING = ["jpeg_extended", "jpegls"]


@pytest.mark.parametrize("variant", WAITING)
def test_dcmtk_compressed_store_through_router_d4(router, compressed, variant):
    item = compressed[variant]
    storescu(router.scp_port, [item.path])
    held = orthanc_file(router.pacs, item.sop_uid)
    assert str(held.file_meta.TransferSyntaxUID) == item.transfer_syntax
    assert held.PixelData == pydicom.dcmread(item.path).PixelData


@pytest.mark.parametrize("variant", WAITING)
def test_dcmtk_compressed_move_through_router_d4(router, compressed, variant, tmp_path):
    item = compressed[variant]
    upload(router.pacs, [item.path])
    [got] = movescu(router.scp_port, image_keys(item), tmp_path, router.movescu_port)
    assert str(got.file_meta.TransferSyntaxUID) == item.transfer_syntax
    assert got.PixelData == pydicom.dcmread(item.path).PixelData


@pytest.mark.parametrize("variant", WAITING)
def test_orthanc_store_compressed_through_router_d4(router, compressed, variant):
    item = compressed[variant]
    held = orthanc_store_compressed(router, item)
    assert str(held.file_meta.TransferSyntaxUID) == item.transfer_syntax
