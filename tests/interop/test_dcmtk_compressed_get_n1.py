"""A defect found by this suite (not in issue 12's list; reported to the lead):
a C-GET requestor that prefers a compressed syntax (getscu ``+xs``, ``+xt``,
``+xr``...: DCMTK proposes ``[preferred, Explicit LE, Big Endian, Implicit
LE]`` in one context per storage class) gets Explicit VR Little Endian,
because Harmony's dicom_scp accepts in its own order (uncompressed first,
pynetdicom's acceptor rule) instead of the requestor's.  Instances stored
compressed are then decompressed for a client that asked for them as stored -
or, for JPEG families without a decoder, not delivered at all.  The requestor
should get the instance in the syntax it stored in when it proposed it.
"""

from __future__ import annotations

import pydicom
import pytest

from tests.interop.data import COMPRESSED
from tests.interop.support import getscu, storescu, upload
from tests.interop.test_dcmtk_compressed import image_keys

VARIANTS = [v for v in COMPRESSED if v != "explicit"]


@pytest.mark.parametrize("shape", ["archive", "router"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_dcmtk_get_in_preferred_syntax_n1(shape, variant, request, compressed, tmp_path):
    stack = request.getfixturevalue(shape)
    item = compressed[variant]
    if stack.pacs is not None:
        upload(stack.pacs, [item.path])
    else:
        storescu(stack.scp_port, [item.path])
    [got] = getscu(stack.scp_port, image_keys(item), tmp_path, prefer=item.transfer_syntax)
    assert str(got.file_meta.TransferSyntaxUID) == item.transfer_syntax
    assert got.PixelData == pydicom.dcmread(item.path).PixelData
