"""Issue 12, defect 5: JPEG-family instances are decompressed for clients
that take only uncompressed syntaxes - getscu's default, dicomweb-client
asking for ``application/dicom`` without a transfer syntax (PS3.18's default:
Explicit VR Little Endian), Orthanc's WADO-RS retrieve.  Before the fix getscu
received nothing and WADO-RS answered 406.  Pixels are compared with DCMTK's
own decoders.
"""

from __future__ import annotations

import pytest

from tests.dicomweb_helpers import client
from tests.interop.support import clear, orthanc_file, orthanc_ok, storescu
from tests.interop.test_dcmtk_compressed import assert_same_pixels, get_and_compare

JPEG_FAMILY = ["jpeg_lossless", "jpeg_extended", "jpegls", "jpeg_baseline"]
#: getscu of these arrived empty before the fix (JPEG baseline decoded with Pillow already)
UNDECODED = ["jpeg_lossless", "jpeg_extended", "jpegls"]


@pytest.mark.parametrize("prefer", [False, True])
@pytest.mark.parametrize("variant", UNDECODED)
def test_dcmtk_get_decompressed_from_archive(variant, prefer, archive, compressed, tmp_path):
    """getscu taking only uncompressed syntaxes, or preferring the stored one
    (Harmony answers uncompressed either way: test_dcmtk_compressed.py)."""
    item = compressed[variant]
    get_and_compare(archive, item, tmp_path, prefer=item.transfer_syntax if prefer else None)


@pytest.mark.parametrize("variant", JPEG_FAMILY)
def test_dicomweb_client_retrieve_uncompressed(archive, compressed, variant, tmp_path):
    """dicomweb-client asking for ``application/dicom`` with no transfer-syntax
    parameter: PS3.18's default, Explicit VR Little Endian (406 before the fix)."""
    item = compressed[variant]
    storescu(archive.scp_port, [item.path])
    got = client(archive.web_url).retrieve_instance(item.study_uid, item.series_uid, item.sop_uid,
                                                    media_types=("application/dicom",))
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert_same_pixels(got, item, tmp_path)


def test_orthanc_wado_retrieve_compressed(archive, compressed, tmp_path):
    """Orthanc's WADO-RS client retrieves the whole compressed study from the archive."""
    storescu(archive.scp_port, [c.path for c in compressed.values()])
    clear(archive.client)
    study = next(iter(compressed.values())).study_uid
    job = orthanc_ok(archive.client, "POST", "/dicom-web/servers/harmony/retrieve", {"Resources": [{"Study": study}]})
    assert int(job["ReceivedInstancesCount"]) == len(compressed), job
    for item in compressed.values():
        assert_same_pixels(orthanc_file(archive.client, item.sop_uid), item, tmp_path)
