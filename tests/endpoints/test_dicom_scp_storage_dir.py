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
from twisted.internet import threads

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
