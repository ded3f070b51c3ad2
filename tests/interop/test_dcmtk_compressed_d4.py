"""Issue 12, defect 4: the router's dicom_scu must send JPEG extended and
JPEG-LS instances in their own syntax (storescu gets CannotUnderstand today,
and a C-MOVE through the router has the PACS transcode them to Explicit VR
Little Endian; Orthanc's C-STORE through the router fails with 0xC001, and
its STOW-RS through the bridge with a plugin error).  Fails until defect 4's
fix is merged.
"""

from __future__ import annotations

import pytest

from tests.interop.support import orthanc_file
from tests.interop.test_dcmtk_compressed import move_through_router, store_through_router
from tests.interop.test_orthanc_dicomweb_stow import stow
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


def test_orthanc_stow_compressed_through_bridge_d4(router, compressed):
    """Orthanc's STOW-RS through the bridge: each instance reaches the PACS in its own transfer syntax."""
    stow(router, [c.path for c in compressed.values()])
    for c in compressed.values():
        assert str(orthanc_file(router.pacs, c.sop_uid).file_meta.TransferSyntaxUID) == c.transfer_syntax, c.name
