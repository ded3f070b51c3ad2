"""STOW-RS into ``store_forward``: dicomweb-client -> ``dicomweb`` endpoint ->
``dicomweb_bridge`` -> ``store_forward`` -> two targets, both down at first:
a real Orthanc over DIMSE (``dicom_scu``) and another real Orthanc over
DICOMweb (``dicomweb`` backend).  Instances are listed in the STOW
ReferencedSOPSequence once they are durably stored and queued; after a Harmony
restart and the targets coming back, each target holds each of them once."""

from __future__ import annotations

import json

import pydicom
import pytest_twisted
import treq
from twisted.internet import threads

from tests.dicomweb_helpers import client, in_thread, multipart
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.peers import Orthanc
from tests.sf_helpers import PortHold, make_instances, sops_in, stow_forward_toml


def targets_toml(pacs: Orthanc, cloud: Orthanc) -> str:
    return f"""
[backends.pacs]
service = "dicom_scu"
[backends.pacs.options]
aet = "{pacs.aet}"
host = "127.0.0.1"
port = {pacs.dicom_port}
connect_timeout_secs = 2

[backends.cloud]
service = "dicomweb"
[backends.cloud.options]
base_url = "{cloud.dicomweb_url}"
"""


def forward_of(harmony):
    return harmony.service.runtime.backends["sf"].forward


@pytest_twisted.ensureDeferred
async def test_stow_acknowledged_during_outage_is_delivered_once_after_restart(tmp_path):
    pacs, cloud = Orthanc(tmp_path / "pacs"), Orthanc(tmp_path / "cloud")
    holds = [PortHold(pacs.dicom_port), PortHold(cloud.http_port)]  # both targets down
    cfg = write_config(tmp_path / "h", MINIMAL_MAIN + stow_forward_toml(
        '["pacs", "cloud"]', sf_options="backoff_initial_seconds = 30\nmax_attempts = 1000")
        + targets_toml(pacs, cloud))
    files = make_instances(tmp_path / "in", 6, 81, patient_id="STOWSF", series=2)
    expected = sorted(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)
    harmony = await start_harmony(cfg)
    try:
        result = await in_thread(client(harmony.url("/dicomweb")).store_instances,
                                 [pydicom.dcmread(f) for f in files])
        # Listed while no target is reachable: acknowledged after the durable write.
        assert sorted(r.ReferencedSOPInstanceUID for r in result.ReferencedSOPSequence) == expected
        assert "FailedSOPSequence" not in result
        # A part that is not DICOM fails alone, and nothing is queued for it.
        body, ctype = multipart([files[0].read_bytes(), b"not DICOM at all"])
        resp = await treq.post(harmony.url("/dicomweb/studies"), body, headers={"Content-Type": ctype})
        doc = json.loads(await resp.content())
        assert resp.code == 202 and doc["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
        await forward_of(harmony).idle()
        stats = await forward_of(harmony).stats()
        assert stats["pacs"]["pending"] == stats["cloud"]["pending"] == 6
        assert stats["pacs"]["delivered"] == stats["cloud"]["delivered"] == 0
    finally:
        await harmony.stop()

    harmony = await start_harmony(cfg)  # a restart: the queues are read back from disk
    try:
        forward = forward_of(harmony)
        await forward.idle()
        for hold in holds:
            hold.release()
        await threads.deferToThread(pacs.start)
        await threads.deferToThread(cloud.start)
        for target in ("pacs", "cloud"):
            await forward.kick(target)
        await forward.idle()
        stats = await forward.stats()
        for target in ("pacs", "cloud"):
            assert stats[target]["delivered"] == 6 and stats[target]["dead"] == 0, stats
        assert sorted(await threads.deferToThread(sops_in, pacs)) == expected
        assert sorted(await threads.deferToThread(sops_in, cloud)) == expected
    finally:
        await harmony.stop()
        for hold in holds:
            hold.release()
        await threads.deferToThread(pacs.stop)
        await threads.deferToThread(cloud.stop)


@pytest_twisted.ensureDeferred
async def test_stow_into_a_full_store_is_507_and_queues_nothing(tmp_path):
    cfg = write_config(tmp_path / "h", MINIMAL_MAIN + stow_forward_toml('["pacs"]', min_free_mb=10**9) + f"""
[backends.pacs]
service = "dicom_scu"
[backends.pacs.options]
aet = "NOBODY"
host = "127.0.0.1"
port = 9
""")
    files = make_instances(tmp_path / "in", 2, 82, patient_id="STOWFULL")
    harmony = await start_harmony(cfg)
    try:
        body, ctype = multipart([f.read_bytes() for f in files])
        resp = await treq.post(harmony.url("/dicomweb/studies"), body, headers={"Content-Type": ctype})
        doc = json.loads(await resp.content())
        assert resp.code == 507
        assert [e["00081197"]["Value"] for e in doc["00081198"]["Value"]] == [[0xA700], [0xA700]]
        assert "00081199" not in doc
        assert (await forward_of(harmony).stats())["pacs"]["pending"] == 0
    finally:
        await harmony.stop()


def test_stow_parts_left_by_a_crash_are_removed_at_start(tmp_path):
    import os
    import time

    from harmony.middleware.dicomweb_bridge import STALE_PART_SECONDS, remove_stale_parts
    folder = tmp_path / "stow"
    folder.mkdir()
    old, fresh = folder / "part-old", folder / "part-fresh"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    now = time.time()
    os.utime(old, (now - STALE_PART_SECONDS - 10, now - STALE_PART_SECONDS - 10))
    assert remove_stale_parts(folder, now=now) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["part-fresh"]  # maybe a live request's (a reload)
    assert remove_stale_parts(tmp_path / "missing", now=now) == 0
