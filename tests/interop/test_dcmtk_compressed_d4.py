"""Issue 12, defect 4: the router's dicom_scu must send JPEG extended and
JPEG-LS instances in their own syntax (storescu gets CannotUnderstand today,
and a C-MOVE through the router has the PACS transcode them to Explicit VR
Little Endian; Orthanc's C-STORE through the router fails with 0xC001).  Fails until defect 4's fix is merged.
"""

from __future__ import annotations

import pytest

from tests.interop.test_dcmtk_compressed import move_through_router, store_through_router
from tests.interop.test_orthanc_dimse import orthanc_store_compressed

WAITING = ["jpeg_extended", "jpegls"]


@pytest.mark.parametrize("variant", WAITING)
def test_dcmtk_compressed_store_through_router_d4(router, compressed, variant):
    store_through_router(router, compressed[variant])


@pytest.mark.parametrize("variant", WAITING)
def test_dcmtk_compressed_move_through_router_d4(router, compressed, variant, tmp_path):
    move_through_router(router, compressed[variant], tmp_path)


@pytest.mark.parametrize("variant", WAITING)
def test_orthanc_store_compressed_through_router_d4(router, compressed, variant):
    item = compressed[variant]
    held = orthanc_store_compressed(router, item)
    assert str(held.file_meta.TransferSyntaxUID) == item.transfer_syntax
