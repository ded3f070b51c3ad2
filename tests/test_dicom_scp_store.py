"""The C-STORE path of ``dicom_scp``: how a received data set is staged, and what
a sender hears when the durable write fails.

- :class:`HeldSink` keeps a small data set in memory (the worker thread that
  validates it writes the staging file, never the reactor) and streams a large
  one to its file as it arrives; either way the file is the same Part-10 bytes
  :class:`PartTenSink` writes, and the size limit holds.
- DCMTK ``storescu`` -> ``dicom_scp`` -> ``local_archive`` with the store's index
  commit failing: each instance is answered 0x0110 (Processing Failure), nothing
  is indexed, and instances acknowledged before are untouched (that a failed
  batch fails every caller in it is proven in tests/storage/test_groupcommit.py).
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer

from harmony.dicom.ul.datasets import PartTenSink
from harmony.dicom.ul.pdu import PDUError
from harmony.endpoints.dicom_scp import HeldDataset, HeldSink, StagingFailed, _read_received
from harmony.storage.errors import StorageFailure
from tests.dicom_data import make_instance, save
from tests.harness import start_harmony
from tests.sf_helpers import make_instances
from tests.test_archive_dimse import config
from tests.test_dicom_scp import SCP_AET, run

COMMAND = {"AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.1.7", "AffectedSOPInstanceUID": "1.2.826.0.1.3680043.10.543.9"}
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def dataset_body(tmp_path, size: int) -> bytes:
    """The data set part (after group 0002) of a synthetic instance with *size* x *size* pixels."""
    ds = make_instance(sop_uid=COMMAND["AffectedSOPInstanceUID"], rows=size, cols=size)
    whole = save(ds, tmp_path / f"src-{size}.dcm").read_bytes()
    group_length = int.from_bytes(whole[140:144], "little")  # (0002,0000) after preamble, DICM, tag, VR, length
    return whole[144 + group_length:]


def feed(sink, body: bytes, fragment: int = 16000):
    for i in range(0, len(body), fragment):
        sink.write(memoryview(body)[i:i + fragment])
    return sink.close()


def reference(tmp_path, body: bytes) -> bytes:
    return feed(PartTenSink(tmp_path / "ref.dcm", COMMAND, EXPLICIT_LE, 1 << 30, source_aet="STORESCU"),
                body).read_bytes()


def test_a_small_data_set_waits_in_memory_for_the_worker(tmp_path):
    body = dataset_body(tmp_path, 32)
    staged = tmp_path / "staged.dcm"
    held = feed(HeldSink(staged, COMMAND, EXPLICIT_LE, 1 << 30, source_aet="STORESCU", hold=64 * 1024), body)
    assert isinstance(held, HeldDataset)
    assert not staged.exists()  # nothing touched the filesystem on the way in
    instance, header = _read_received(held, True)  # the worker's hop: write, then one parse
    assert staged.read_bytes() == reference(tmp_path, body)
    assert instance.sop_instance_uid == COMMAND["AffectedSOPInstanceUID"]
    assert instance.parsed is not None and header["00080018"]["Value"] == [COMMAND["AffectedSOPInstanceUID"]]


def test_a_large_data_set_goes_to_its_file_as_it_arrives(tmp_path):
    body = dataset_body(tmp_path, 256)  # 128 KiB of pixels
    staged = tmp_path / "staged.dcm"
    sink = HeldSink(staged, COMMAND, EXPLICIT_LE, 1 << 30, source_aet="STORESCU", hold=64 * 1024)
    sink.write(body[:32 * 1024])
    assert not staged.exists()
    sink.write(body[32 * 1024:80 * 1024])
    assert staged.exists() and sink.chunks == []  # spilled: memory holds no more than the hold
    sink.write(body[80 * 1024:])
    assert sink.close() == staged
    assert staged.read_bytes() == reference(tmp_path, body)


@pytest.mark.parametrize("hold", [1 << 20, 1024])
def test_the_size_limit_holds_in_memory_and_on_disk(tmp_path, hold):
    staged = tmp_path / "staged.dcm"
    sink = HeldSink(staged, COMMAND, EXPLICIT_LE, 4096, hold=hold)
    sink.write(b"\0" * 4000)
    with pytest.raises(PDUError):
        sink.write(b"\0" * 200)
    sink.abort()
    assert not staged.exists()


def test_a_held_data_set_that_cannot_be_written_is_a_staging_failure(tmp_path):
    held = feed(HeldSink(tmp_path / "gone" / "staged.dcm", COMMAND, EXPLICIT_LE, 1 << 30), b"\0" * 100)
    with pytest.raises(StagingFailed):
        _read_received(held, False)


@pytest_twisted.ensureDeferred
async def test_a_failed_commit_answers_every_instance_of_its_batch_with_a_failure(tmp_path):
    cfg, scp_port = config(tmp_path / "h", "archive")
    make_instances(tmp_path / "ok", 2, 46, patient_id="GCOK")
    make_instances(tmp_path / "fail", 3, 47, patient_id="GCFAIL")
    harmony = await start_harmony(cfg)
    try:
        r = await run("storescu", "-v", "-aec", SCP_AET, "127.0.0.1", scp_port, *sorted((tmp_path / "ok").iterdir()))
        assert r.stderr.count(b"Received Store Response (Success)") == 2, r.stderr
        store = harmony.service.runtime.backends["archive"].store

        def disk_error(fn, *args, **kwargs):
            raise StorageFailure("disk I/O error")
        store.write_sync = disk_error
        # One association each, at once (storescu gives up on an association after a failure).
        answers = await defer.gatherResults([run("storescu", "-v", "-aec", SCP_AET, "127.0.0.1", scp_port, f)
                                             for f in sorted((tmp_path / "fail").iterdir())])
        for r in answers:  # 0x0110 Processing Failure (DCMTK has no name for it on C-STORE)
            assert b"Received Store Response (Unknown Status: 0x110)" in r.stderr, r.stderr
        del store.write_sync
        counts = await store.run(store.counts_sync)
        assert counts["instances"] == 2  # the acknowledged ones, untouched
    finally:
        await harmony.stop()


def test_the_header_json_is_made_only_when_something_may_read_it():
    """A C-STORE's header as DICOM JSON costs ~40 % of an instance's CPU: made for middleware
    and for backends that may read ``request.normalized``, not for the archive alone."""
    from types import SimpleNamespace

    from harmony.backends.local_archive import LocalArchiveBackend
    from harmony.backends.store_forward import StoreForwardBackend
    from harmony.endpoints.dicom_scp import DicomScpEndpoint
    endpoint = DicomScpEndpoint("scp", None, local_aet="HARMONY")
    archive = LocalArchiveBackend("archive", None)
    endpoint.pipeline = SimpleNamespace(middleware=[], backends=[archive])
    assert not endpoint.header_has_readers()
    assert not StoreForwardBackend.reads_store_header
    endpoint.pipeline = SimpleNamespace(middleware=[object()], backends=[archive])
    assert endpoint.header_has_readers()
    endpoint.pipeline = SimpleNamespace(middleware=[], backends=[archive, SimpleNamespace(name="echo")])
    assert endpoint.header_has_readers()
