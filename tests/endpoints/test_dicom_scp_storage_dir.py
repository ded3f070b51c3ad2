"""``dicom_scp`` storing into ``storage_dir`` only (no forwarding), driven by DCMTK ``storescu``.

A small instance is held in memory and handed to the folder's journal whole
(harmony.dicom.ul.datasets.HeldSink, FolderJournal.store); one larger than the
journal takes goes on into a staging file and the classic path; one in a
syntax the raw scanner leaves to pydicom (big endian) is checked by pydicom.
Each must arrive as the very data set sent, under ``<study>/<series>/<sop>.dcm``,
and a clean stop leaves no journal and no temporary file behind.
"""

from __future__ import annotations

import subprocess

import pytest_twisted
from pydicom import dcmread
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from tests.dicom_data import make_instance, save
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.peers import DCMTK, free_port, peer_env

PIPE = """
[pipelines.ingest]
endpoints = ["scp"]
backends = ["unused"]

[backends.unused]
service = "echo"

[endpoints.scp]
service = "dicom_scp"
[endpoints.scp.options]
local_aet = "HARMONY"
bind_addr = "127.0.0.1"
port = {port}
enable_store = true
storage_dir = "{storage}"
forward_store = false
"""


def store_big_endian(port: int, ds) -> int:
    """C-STORE *ds* offering explicit VR big endian only (pynetdicom encodes it so); the status."""
    from pydicom.uid import ExplicitVRBigEndian
    from pynetdicom import AE
    ae = AE(ae_title="STORESCU")
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ae.add_requested_context(ds.SOPClassUID, [ExplicitVRBigEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="HARMONY")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds).Status
    finally:
        assoc.release()


def storescu(port: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run([DCMTK["storescu"], "-v", "-aec", "HARMONY", *map(str, args[:-1]), "127.0.0.1", str(port),
                           str(args[-1])], capture_output=True, env=peer_env())


@pytest_twisted.ensureDeferred
async def test_small_large_and_pydicom_checked_instances_land_as_sent(tmp_path):
    storage = tmp_path / "store"
    port = free_port()
    running = await start_harmony(write_config(tmp_path / "h", MINIMAL_MAIN,
                                               {"ingest": PIPE.format(port=port, storage=storage)}))
    sent = {"small": make_instance(seed=1, sop_uid="1.2.826.0.1.3680043.9.7.1.1"),
            "large": make_instance(seed=2, rows=400, cols=400, sop_uid="1.2.826.0.1.3680043.9.7.1.2"),
            "big-endian": make_instance(seed=3, sop_uid="1.2.826.0.1.3680043.9.7.1.3")}
    try:
        for name, ds in sent.items():
            if name == "big-endian":
                assert await threads.deferToThread(store_big_endian, port, ds) == 0x0000
                continue
            r = await threads.deferToThread(storescu, port, save(ds, tmp_path / f"{name}.dcm"))
            assert b"Received Store Response (Success)" in r.stderr, (name, r.stderr)
        # the same instance again replaces its file
        again = await threads.deferToThread(storescu, port, save(sent["small"], tmp_path / "again.dcm"))
        assert b"Received Store Response (Success)" in again.stderr, again.stderr
    finally:
        await running.stop()
    for name, ds in sent.items():
        stored = storage / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        back = dcmread(stored)
        assert back.SOPInstanceUID == ds.SOPInstanceUID and back.PatientID == ds.PatientID, name
        assert name == "big-endian" or back.PixelData == ds.PixelData, name
        assert back.file_meta.SourceApplicationEntityTitle.strip() == "STORESCU", name   # both senders' AE
    syntax = dcmread(storage / sent["big-endian"].StudyInstanceUID / sent["big-endian"].SeriesInstanceUID /
                     f"{sent['big-endian'].SOPInstanceUID}.dcm").file_meta.TransferSyntaxUID
    assert syntax == "1.2.840.10008.1.2.2"   # the scanner declined it: pydicom's check took it
    assert len(list(storage.rglob("*.dcm"))) == 3
    assert list((storage / ".journal").iterdir()) == []   # every file synced: no log, no temporary file


@pytest_twisted.ensureDeferred
async def test_a_series_over_one_association_is_journaled_by_the_reactors_ring(tmp_path):
    """harmony.compat.uring (this machine kind's kernel offers it): once the series' folder
    and the journal's spare files exist, the reactor writes each instance's journal record
    itself - the instances still land byte for byte, and a clean stop leaves no journal."""
    storage = tmp_path / "store"
    port = free_port()
    running = await start_harmony(write_config(tmp_path / "h", MINIMAL_MAIN,
                                               {"ingest": PIPE.format(port=port, storage=storage)}))
    journal = running.service.runtime.endpoints["scp"].storage_journal
    series = [make_instance(seed=10 + i, study_uid="1.2.826.0.1.3680043.9.7.2",
                            series_uid="1.2.826.0.1.3680043.9.7.2.1", sop_uid=f"1.2.826.0.1.3680043.9.7.2.1.{i}")
              for i in range(40)]
    folder = tmp_path / "series"
    folder.mkdir()
    for i, ds in enumerate(series):
        save(ds, folder / f"{i:02}.dcm")
    try:
        first = await threads.deferToThread(storescu, port, folder / "00.dcm")   # makes the folder
        assert b"Received Store Response (Success)" in first.stderr, first.stderr
        for _ in range(500):   # the flusher's first round makes the spare files
            if len(journal._spare_temps) >= 8:
                break
            await deferLater(reactor, 0.01, lambda: None)
        rest = await threads.deferToThread(
            subprocess.run, [DCMTK["storescu"], "-v", "-aec", "HARMONY", "127.0.0.1", str(port),
                             *map(str, sorted(folder.glob("*.dcm"))[1:])], capture_output=True, env=peer_env())
        assert rest.stderr.count(b"Received Store Response (Success)") == 39, rest.stderr
        assert journal._ring is not None and journal.ring_flushes >= 8   # at least those the spares waited for served
    finally:
        await running.stop()
    for ds in series:
        back = dcmread(storage / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm")
        assert back.SOPInstanceUID == ds.SOPInstanceUID and back.PixelData == ds.PixelData
    assert list((storage / ".journal").iterdir()) == []
