"""Issue 12 defect 4: compressed instances go through every DIMSE sending path
in their own transfer syntax, and are decompressed - or refused with a status
naming the syntax - only when the receiver refuses it.

Before: ``storescu -xt`` of a JPEG-LS CT into ``dicom_scp`` -> ``dicom_scu`` ->
Orthanc failed ("No presentation context for 'CT Image Storage' has been
accepted by the peer with 'JPEG-LS Lossless Image Compression'"), and so did a
C-MOVE of it from the local archive.  Driven by DCMTK (storescu, movescu,
storescp) and a real Orthanc; the instances are made by DCMTK's compressors
(tests/dicom/compressed.py).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import pytest_twisted
from pydicom import dcmread
from twisted.internet import threads

from harmony.dicom import net, transfer
from tests.dicom.compressed import VIDEO_PHOTOGRAPHIC as VIDEO
from tests.dicom.compressed import Made, archive_all, make_all, new_study_uid, pixel_bytes, study_of
from tests.endpoints.test_dicom_scp_peers import run


def orthanc_file(orthanc, sop_uid: str) -> bytes | None:
    found = orthanc.rest("POST", "/tools/find", json.dumps(
        {"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}}).encode())
    return orthanc.rest("GET", f"/instances/{found[0]}/file") if found else None


def assert_as_stored(orthanc, made: Made):
    data = orthanc_file(orthanc, made.sop_uid)
    assert data is not None, f"{made.label}: not in Orthanc"
    got = dcmread(io.BytesIO(data))
    assert got.file_meta.TransferSyntaxUID == made.syntax, made.label
    assert pixel_bytes(data) == pixel_bytes(made.path), f"{made.label}: the bytes changed on the way"


def assert_decompressed(path, made: Made):
    got = dcmread(path)
    assert not got.file_meta.TransferSyntaxUID.is_compressed, made.label
    assert got.SOPInstanceUID == made.sop_uid, f"{made.label}: the SOP Instance UID changed"
    expected = dcmread(made.path).pixel_array  # what the stored (maybe lossy) data decodes to
    assert np.array_equal(got.pixel_array, expected), made.label
    if made.lossless:
        assert np.array_equal(got.pixel_array, made.pixels), made.label


def received_by(files) -> dict:
    """SOP Instance UID -> path, for the files a receiver wrote."""
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}


def test_every_standard_syntax_is_proposed_and_accepted():
    names = {transfer.name(t) for t in net.ALL_SYNTAXES}
    for wanted in ("JPEG Baseline (Process 1)", "JPEG Extended (Process 2 and 4)",
                   "JPEG Lossless, Non-Hierarchical (Process 14)", "JPEG-LS Lossless Image Compression",
                   "JPEG-LS Lossy (Near-Lossless) Image Compression", "JPEG 2000 Image Compression",
                   "RLE Lossless", "Deflated Explicit VR Little Endian", "MPEG2 Main Profile / Main Level",
                   "MPEG-4 AVC/H.264 High Profile / Level 4.1", "HEVC/H.265 Main Profile / Level 5.1",
                   "High-Throughput JPEG 2000 Image Compression (Lossless Only)"):
        assert wanted in names
    contexts = transfer.contexts_for("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.4.80")
    assert [cx.transfer_syntax for cx in contexts] == [["1.2.840.10008.1.2.4.80"], ["1.2.840.10008.1.2.1"],
                                                       ["1.2.840.10008.1.2"]]
    for ts in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.90",
               "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50"):
        assert transfer.can_decompress(ts), ts
    assert not transfer.can_decompress("1.2.840.10008.1.2.4.102")


@pytest_twisted.ensureDeferred
async def test_storescu_through_dicom_scu_keeps_each_syntax(gateway, tmp_path):
    made = await threads.deferToThread(make_all, tmp_path, new_study_uid())
    for m in made.values():
        if m.propose is None:
            continue
        r = await run("storescu", "-v", "-R", m.propose, "-aec", "RELAY", "127.0.0.1", gateway.relay_port, m.path)
        assert b"Received Store Response (Success)" in r.stderr, (m.label, r.stderr)
    for m in made.values():
        if m.propose is not None:
            assert_as_stored(gateway.orthanc, m)


@pytest_twisted.ensureDeferred
async def test_refused_syntax_is_decompressed_or_named(gateway, tmp_path):
    """storescp accepts uncompressed data only: what Harmony can decode arrives
    decompressed (same UIDs, same pixels); video fails with 0xC003 naming it."""
    made = await threads.deferToThread(make_all, tmp_path, new_study_uid())
    for m in made.values():
        if m.propose is None:
            continue
        verbosity = "-d" if m.label == "mpeg4" else "-v"  # -d shows the response's status and comment
        r = await run("storescu", verbosity, "-R", m.propose, "-aec", "PLAIN", "127.0.0.1", gateway.plain_port, m.path)
        if m.label == "mpeg4":
            assert b"DIMSE Status                  : 0xc003" in r.stderr, r.stderr
            assert b"ErrorComment" in r.stderr and b"1.2.840.10008.1.2.4.102 refused by the peer" in r.stderr
        else:
            assert b"Received Store Response (Success)" in r.stderr, (m.label, r.stderr)
    received = received_by(gateway.storescp.files())
    for m in made.values():
        if m.propose is None or m.label == "mpeg4":
            continue
        assert m.sop_uid in received, m.label
        if m.label == "deflated":
            assert np.array_equal(dcmread(received[m.sop_uid]).pixel_array, m.pixels)
        else:
            assert_decompressed(received[m.sop_uid], m)
    assert made["mpeg4"].sop_uid not in received


@pytest_twisted.ensureDeferred
async def test_c_move_from_the_archive_keeps_each_syntax(gateway, tmp_path):
    made = await archive_all(gateway, tmp_path)
    study = study_of(made)
    await threads.deferToThread(gateway.orthanc.rest, "POST", "/modalities/harmony/move", json.dumps(
        {"Level": "Study", "Resources": [{"StudyInstanceUID": study}], "TargetAet": "ORTHANC",
         "Synchronous": True}).encode())
    for m in made.values():
        assert_as_stored(gateway.orthanc, m)


@pytest_twisted.ensureDeferred
async def test_c_move_to_an_uncompressed_only_destination_decompresses(gateway, tmp_path):
    made = await archive_all(gateway, tmp_path)
    study = study_of(made)
    r = await run("movescu", "-v", "-S", "-aec", "HARMONY", "-aem", "MOVESCP", "-k", "QueryRetrieveLevel=STUDY",
                  "-k", f"StudyInstanceUID={study}", "127.0.0.1", gateway.archive_port)
    # Every instance but the video arrives; the video is the one failed sub-operation.
    assert b"Received Final Move Response (Warning: SubOperationsCompleteOneOrMoreFailures)" in r.stderr, r.stderr
    received = received_by(gateway.movescp.files())
    for m in made.values():
        if m.label == "mpeg4":
            assert m.sop_uid not in received
        elif m.label == "deflated":
            assert np.array_equal(dcmread(received[m.sop_uid]).pixel_array, m.pixels)
        else:
            assert_decompressed(received[m.sop_uid], m)


@pytest_twisted.ensureDeferred
async def test_c_get_decompresses_what_the_requestor_did_not_propose(gateway, tmp_path):
    """getscu proposes uncompressed storage only: a C-GET of compressed instances
    from the archive gets them decompressed, UIDs and pixels intact."""
    made = await archive_all(gateway, tmp_path / "made")
    out = tmp_path / "got"
    out.mkdir()
    r = await run("getscu", "-v", "-S", "-aec", "HARMONY", "-od", out, "-k", "QueryRetrieveLevel=SERIES",
                  "-k", f"StudyInstanceUID={study_of(made)}", "-k", f"SeriesInstanceUID={study_of(made)}.1",
                  "127.0.0.1", gateway.archive_port)
    # Series .1 holds the nine CT images (the JPEG baseline SC and the video are series .2 and .3).
    assert b"Number of Completed Suboperations : 9" in r.stderr, r.stderr
    assert b"Number of Failed Suboperations    : 0" in r.stderr, r.stderr
    received = received_by(out.iterdir())
    for label in ("jpegls", "jpeg-sv1", "rle", "j2k-lossless"):
        assert_decompressed(received[made[label].sop_uid], made[label])


def test_learned_pairs_fit_in_128_contexts():
    ct, video = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.77.1.4.1"
    pairs = [(ct, str(t)) for t in transfer.COMPRESSED] + [(video, "1.2.840.10008.1.2.4.102")]
    contexts = net.requestor_contexts(pairs)
    assert len(contexts) == net.MAX_CONTEXTS
    offered = {(str(cx.abstract_syntax), str(ts)) for cx in contexts for ts in cx.transfer_syntax}
    assert all(pair in offered for pair in pairs)
    assert (video, "1.2.840.10008.1.2.1") in offered  # the class's fall-back comes with it
    assert len(net.storage_contexts(pairs)) <= net.MAX_CONTEXTS


def test_a_refusal_names_the_syntax(tmp_path):
    from harmony.dicom.ul import storage
    made = make_all(tmp_path, new_study_uid())
    raw = storage.transcode(made["jpegls"].path, "1.2.840.10008.1.2.1")  # decompressed, re-encoded
    assert len(raw) > 32 * 32 * 2
    with pytest.raises(Exception):
        storage.transcode(made["mpeg4"].path, "1.2.840.10008.1.2.1")  # no decoder for video
    refused = transfer.SyntaxRefused(VIDEO, made["mpeg4"].syntax, ["1.2.840.10008.1.2.1"])
    assert "MPEG-4 AVC/H.264" in str(refused) and refused.status == 0xC003
    instance = type("I", (), {"transfer_syntax_uid": made["mpeg4"].syntax})()
    comment = storage.comment_for(0xC003, instance)
    assert comment.startswith("1.2.840.10008.1.2.4.102") and len(comment) <= 64
