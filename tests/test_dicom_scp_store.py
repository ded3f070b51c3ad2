"""The C-STORE path of ``dicom_scp`` into a store: one parse per instance, and what
a sender hears when the durable write fails.

- The received file is parsed once: validation, the header JSON middleware reads
  (equal to pydicom's ``stop_before_pixels`` reading) and the store's index header
  all come from that parse, handed on with the instance (``DicomInstance.parsed``).
- Into a pipeline whose backends check instances themselves (``local_archive``,
  ``store_forward``) and no middleware, the endpoint does not parse at all: the
  instance is described from the request and the data set's head and the store
  parses and checks it; a file that is corrupt, has invalid UIDs or is not the
  instance the request named is still refused (0xC000, 0xA900) and not kept.
- Into such a pipeline a small data set is received into memory and filed from its
  bytes (nothing staged); one over ``IN_MEMORY_BYTES`` is staged to a file on the
  way in; both are stored whole, as DCMTK ``storescu`` sent them.
- DCMTK ``storescu`` -> ``dicom_scp`` -> ``local_archive`` with the store's index
  commit failing: each instance is answered 0x0110 (Processing Failure), nothing
  is indexed, and instances acknowledged before are untouched (that a failed
  batch fails every caller in it is proven in tests/storage/test_groupcommit.py).
"""

from __future__ import annotations

import pytest_twisted
from pydicom import dcmread
from twisted.internet import defer

from harmony.endpoints.dicom_scp import _read_received
from harmony.storage.errors import StorageFailure
from tests.endpoints.test_dicom_scp_peers import SCP_AET, corrupted, run, store_raw
from tests.harness import start_harmony
from tests.sf_helpers import make_instances
from tests.test_archive_dimse import config


def test_a_received_instance_is_parsed_once_and_its_parse_rides_along(tmp_path):
    [path] = make_instances(tmp_path / "in", 1, 48, patient_id="ONCE")
    ds = dcmread(path, stop_before_pixels=True)
    command = {"AffectedSOPInstanceUID": str(ds.SOPInstanceUID), "AffectedSOPClassUID": str(ds.SOPClassUID)}
    instance, header, refusal = _read_received(path, True, command)
    assert refusal is None
    assert header == ds.to_json_dict(bulk_data_threshold=4096, bulk_data_element_handler=lambda _: "")
    stamp, parsed = instance.parsed
    assert stamp[0] == str(path) and parsed.SOPInstanceUID == ds.SOPInstanceUID
    _, no_header, _ = _read_received(path, False, command)
    assert no_header is None


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


@pytest_twisted.ensureDeferred
async def test_into_the_archive_the_store_alone_parses_and_checks(tmp_path, monkeypatch):
    from twisted.internet import threads

    from harmony.endpoints import dicom_scp

    def no_endpoint_parse(*args):
        raise AssertionError("dicom_scp parsed an instance the store checks")
    monkeypatch.setattr(dicom_scp, "_read_received", no_endpoint_parse)
    cfg, scp_port = config(tmp_path / "h", "archive")
    good = make_instances(tmp_path / "ok", 2, 45, patient_id="NOPARSE")
    bad = tmp_path / "bad"
    bad.mkdir()
    ds = dcmread(good[0])
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1442.45.9"
    ds.file_meta.MediaStorageSOPInstanceUID = dcmread(good[0]).SOPInstanceUID  # what the request will name
    mismatched = bad / "mismatched.dcm"
    ds.save_as(mismatched)
    assert dcmread(mismatched).file_meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID
    corrupt = corrupted(good[1], bad / "corrupt.dcm")
    ds = dcmread(good[1])
    ds.SeriesInstanceUID = "1.2.x"
    invalid = bad / "invalid.dcm"
    ds.save_as(invalid, enforce_file_format=True)
    harmony = await start_harmony(cfg)
    try:
        r = await run("storescu", "-v", "-aec", SCP_AET, "127.0.0.1", scp_port, *good)
        assert r.stderr.count(b"Received Store Response (Success)") == 2, r.stderr
        for path, status in ((mismatched, 0xA900), (corrupt, 0xC000), (invalid, 0xC000)):
            assert await threads.deferToThread(store_raw, scp_port, path) == status, path.name
        store = harmony.service.runtime.backends["archive"].store
        assert (await store.run(store.counts_sync))["instances"] == 2
        endpoint = harmony.service.runtime.endpoints["scp"]
        left = [p for p in endpoint.staging.folder.iterdir() if p.suffix != ".part"]  # spares are .part
        assert left == []
    finally:
        await harmony.stop()


@pytest_twisted.ensureDeferred
async def test_small_data_sets_arrive_in_memory_and_large_ones_are_staged(tmp_path, monkeypatch):
    from harmony.endpoints.dicom_scp import IN_MEMORY_BYTES, ScpServices
    staged = []
    real = ScpServices._staged_file

    def staged_file(self):
        staged.append(True)
        return real(self)
    monkeypatch.setattr(ScpServices, "_staged_file", staged_file)
    cfg, scp_port = config(tmp_path / "h", "archive")
    small = make_instances(tmp_path / "small", 3, 49, patient_id="SPOOL")
    [large] = make_instances(tmp_path / "large", 1, 50, patient_id="SPOOL", size=400)
    assert large.stat().st_size > IN_MEMORY_BYTES > max(f.stat().st_size for f in small)
    harmony = await start_harmony(cfg)
    try:
        r = await run("storescu", "-v", "-aec", SCP_AET, "127.0.0.1", scp_port, *small)
        assert r.stderr.count(b"Received Store Response (Success)") == 3, r.stderr
        assert staged == []   # held in memory, filed from their bytes
        r = await run("storescu", "-v", "-aec", SCP_AET, "127.0.0.1", scp_port, large)
        assert r.stderr.count(b"Received Store Response (Success)") == 1, r.stderr
        assert staged == [True]
        store = harmony.service.runtime.backends["archive"].store
        for sent in small + [large]:
            ds = dcmread(sent)
            stored = await store.run(store.get_sync, str(ds.SOPInstanceUID))
            assert dcmread(stored.path) == ds   # every element, the pixel data included
        assert (await store.run(store.counts_sync))["instances"] == 4
        endpoint = harmony.service.runtime.endpoints["scp"]
        assert [p for p in endpoint.staging.folder.iterdir() if p.suffix != ".part"] == []
    finally:
        await harmony.stop()


def test_only_a_bare_pipeline_into_checking_backends_skips_the_endpoint_parse():
    from types import SimpleNamespace

    from harmony.backends.local_archive import LocalArchiveBackend
    from harmony.backends.store_forward import StoreForwardBackend
    from harmony.endpoints.dicom_scp import DicomScpEndpoint
    endpoint = DicomScpEndpoint("scp", None, local_aet="HARMONY")
    archive = LocalArchiveBackend("archive", None)
    endpoint.pipeline = SimpleNamespace(middleware=[], backends=[archive])
    assert endpoint.checked_downstream() and StoreForwardBackend.checks_received_instances
    endpoint.pipeline = SimpleNamespace(middleware=[object()], backends=[archive])
    assert not endpoint.checked_downstream()
    endpoint.pipeline = SimpleNamespace(middleware=[], backends=[archive, SimpleNamespace(name="relay")])
    assert not endpoint.checked_downstream()
    stored = DicomScpEndpoint("scp", None, local_aet="HARMONY", storage_dir="/tmp/x", forward_store=True)
    stored.pipeline = SimpleNamespace(middleware=[], backends=[archive])
    assert not stored.checked_downstream()
