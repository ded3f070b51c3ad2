"""Instance files in S3-compatible object storage (``[storage] backend = "s3"``), with a local cache.

Real SeaweedFS (tests/s3.py) and real PostgreSQL.  What is checked:

- an instance is acknowledged once it is fsynced locally and indexed with an
  upload-pending row; the upload follows; the object is byte-identical;
- another node (its own folder, the same database and bucket) serves it by
  fetching it from S3 into its folder; query metadata never touches S3;
- S3 hung (the server SIGSTOPped): ingest goes on and is acknowledged, the
  backlog is counted, a read of a file not yet uploaded elsewhere is a 503,
  and the uploads drain by themselves when S3 answers again;
- kill -9 of a ``twistd`` node with uploads pending (S3 unreachable): the
  restarted node uploads every acknowledged instance.
"""

from __future__ import annotations

from functools import partial

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater

from harmony.storage import blobs as blob_sql
from harmony.storage.blobs import BlobUnavailable, S3Blobs
from harmony.storage.database import PostgresDatabase
from harmony.storage.store import InstanceStore
from tests.peers import free_port
from tests.s3 import ACCESS_KEY, SECRET_KEY
from tests.sf_helpers import HarmonyProcess, PortHold, make_instances, node_config


def blobs_for(s3, prefix, timeout=10.0):
    return S3Blobs(s3.endpoint, s3.bucket, access_key=ACCESS_KEY, secret_key=SECRET_KEY, prefix=prefix,
                   timeout=timeout)


def node(tmp_path, name, dsn, blobs):
    return InstanceStore(tmp_path / name, min_free_bytes=0, database=PostgresDatabase(dsn), node=name, blobs=blobs,
                         upload_interval=0.2)


async def until(predicate, timeout=30.0, what="condition"):
    deadline = reactor.seconds() + timeout
    while not predicate():
        assert reactor.seconds() < deadline, f"{what} not reached in {timeout} s"
        await deferLater(reactor, 0.05, lambda: None)


def keys_under(s3, prefix) -> set:
    return {k[len(prefix):] for k in s3.keys() if k.startswith(prefix)}


@pytest_twisted.ensureDeferred
async def test_upload_after_ack_and_read_from_another_node(s3, postgres, tmp_path):
    prefix = f"{tmp_path.name}/"
    dsn = postgres.new_database()
    files = make_instances(tmp_path / "in", 3, 51, patient_id="BLOBS")
    a = node(tmp_path, "a", dsn, blobs_for(s3, prefix))
    b = node(tmp_path, "b", dsn, blobs_for(s3, prefix))
    try:
        stored = [await a.put_file(f) for f in files]
        rels = {s.path.relative_to(a.instances_dir).as_posix() for s in stored}
        await until(lambda: keys_under(s3, prefix) == rels, what="uploads")
        body = s3.client().get_object(Bucket=s3.bucket, Key=prefix + sorted(rels)[0])["Body"].read()
        assert body == (a.instances_dir / sorted(rels)[0]).read_bytes()
        for _ in range(200):  # the row goes right after the object is put
            if await a.read(lambda c: c.execute("SELECT count(*) FROM blob_uploads").fetchone()[0]) == 0:
                break
            await deferLater(reactor, 0.05, lambda: None)
        else:
            raise AssertionError("upload-pending rows left after the uploads")
        # Node B has none of the files: it fetches them from S3 on first read.
        first = stored[0]
        got = await b.run(b.get_sync, first.sop_instance_uid)
        assert got.path.read_bytes() == first.path.read_bytes()
        assert got.path.parent.parent.parent == b.instances_dir
    finally:
        a.close()
        b.close()


@pytest_twisted.ensureDeferred
async def test_s3_hung_ingest_goes_on_and_uploads_resume(s3, postgres, tmp_path):
    prefix = f"{tmp_path.name}/"
    dsn = postgres.new_database()
    files = make_instances(tmp_path / "in", 4, 52, patient_id="BLOBS")
    a = node(tmp_path, "a", dsn, blobs_for(s3, prefix, timeout=1.0))
    b = node(tmp_path, "b", dsn, blobs_for(s3, prefix, timeout=1.0))
    s3.freeze()
    try:
        stored = [await a.put_file(f) for f in files]  # acknowledged: durable here, upload pending
        assert await a.read(lambda c: c.execute("SELECT count(*) FROM blob_uploads").fetchone()[0]) == 4
        await until(lambda: a.blobs.last_error is not None, what="S3 noticed down")
        from harmony.storage.metrics import StoreForwardCollector
        from prometheus_client import CollectorRegistry, generate_latest
        registry = CollectorRegistry()
        registry.register(StoreForwardCollector([], [a]))
        text = generate_latest(registry).decode()
        assert f'harmony_storage_object_store_up{{object_store="s3 {s3.endpoint}/{s3.bucket}",store="a"}} 0.0' in text
        with pytest.raises(BlobUnavailable) as refused:
            await b.run(b.get_sync, stored[0].sop_instance_uid)
        assert refused.value.status == 503
        s3.thaw()
        await until(lambda: len(keys_under(s3, prefix)) == 4, what="uploads after S3 returned")
        await until(lambda: a.blobs.last_error is None, what="S3 noticed up")
        got = await b.run(b.get_sync, stored[0].sop_instance_uid)
        assert got.path.read_bytes() == stored[0].path.read_bytes()
    finally:
        s3.thaw()
        a.close()
        b.close()


def s3_options(endpoint, bucket, prefix, credentials) -> str:
    return (f's3_endpoint = "{endpoint}"\ns3_bucket = "{bucket}"\ns3_prefix = "{prefix}"\n'
            f's3_credentials_file = "{credentials}"\n')


@pytest_twisted.ensureDeferred
async def test_kill_9_with_uploads_pending_loses_nothing(s3, postgres, tmp_path):
    prefix = f"{tmp_path.name}/"
    dsn = postgres.new_database()
    files = make_instances(tmp_path / "in", 8, 53, patient_id="BLOBS")
    credentials = tmp_path / "s3-credentials"
    credentials.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
    down = PortHold()  # S3 unreachable while the first process runs
    port = free_port()
    harmony = HarmonyProcess(tmp_path / "node", ports=[port])
    harmony.folder.mkdir()
    # the queue's target ("pacs") is never up: its rows just wait
    config = partial(node_config, port, node="k", path="store", dsn=dsn, targets={"pacs": down.port}, backend="s3")
    harmony.config.write_text(config(storage=s3_options(f"http://127.0.0.1:{down.port}", s3.bucket, prefix,
                                                        credentials)))
    try:
        harmony.start()
        acknowledged = 0
        for f in files:
            r = await treq.post(f"http://127.0.0.1:{port}/ingest", data=f.read_bytes(),
                                headers={"Content-Type": "application/dicom"})
            answer = await r.content()
            assert r.code == 200, answer
            acknowledged += 1
        harmony.kill()  # SIGKILL: nothing uploaded, nothing flushed beyond what was acknowledged
        assert keys_under(s3, prefix) == set()
        harmony.config.write_text(config(storage=s3_options(s3.endpoint, s3.bucket, prefix, credentials)))
        harmony.start()
        await until(lambda: len(keys_under(s3, prefix)) == acknowledged, 60, "uploads after the restart")
    finally:
        harmony.stop()
        down.release()


@pytest_twisted.ensureDeferred
async def test_local_cache_is_bounded_and_never_evicts_a_file_not_uploaded(s3, postgres, tmp_path):
    """s3_cache_max_mb: least recently used uploaded files go first, down to the low-water mark;
    files still to upload stay however old (S3 down); an evicted file is fetched again on use;
    metrics count it."""
    import os
    import time

    from prometheus_client import CollectorRegistry, generate_latest

    from harmony.storage.metrics import StoreForwardCollector
    prefix = f"{tmp_path.name}/"
    dsn = postgres.new_database()
    files = make_instances(tmp_path / "in", 8, 54, patient_id="CACHE")
    size = files[0].stat().st_size
    assert all(f.stat().st_size == size for f in files)
    a = InstanceStore(tmp_path / "a", min_free_bytes=0, database=PostgresDatabase(dsn), node="a",
                      blobs=blobs_for(s3, prefix, timeout=1.0), upload_interval=0.2, cache_max_bytes=10**12)
    try:
        a.cache.clock = lambda: time.time() + 3600  # every file past the grace (all are committed here)
        stored = [await a.put_file(f) for f in files[:6]]
        await until(lambda: len(keys_under(s3, prefix)) == 6, what="uploads")
        await until(lambda: a.uploads_pending == 0, what="upload rows settled")
        for n, s in enumerate(stored):  # used long ago, in order...
            os.utime(s.path, (1000 + n, 1000 + n))
        for s in stored[:2]:  # ...but these two were read just now
            await a.run(a.get_sync, s.sop_instance_uid)
        s3.freeze()  # two more arrive while S3 is away: their only copy is here, and the oldest
        held = [await a.put_file(f) for f in files[6:]]
        for s in held:
            os.utime(s.path, (10, 10))
        a.cache.max_bytes = 4 * size + size // 2  # low water: 4.05 files' worth
        a.cache.bytes = None  # a size check is due
        await until(lambda: a.cache.evicted_files > 0, what="eviction")
        on_disk = {p.name for p in a.instances_dir.rglob("*.dcm")}
        assert {s.path.name for s in held} <= on_disk, "a file not yet uploaded was evicted"
        assert on_disk == {s.path.name for s in stored[:2] + held}  # least recently used went first
        assert a.cache.evicted_files == 4 and a.cache.bytes == 4 * size
        registry = CollectorRegistry()
        registry.register(StoreForwardCollector([], [a]))
        text = generate_latest(registry).decode()
        assert 'harmony_storage_cache_evicted_files_total{store="a"} 4.0' in text
        assert f'harmony_storage_cache_bytes{{store="a"}} {float(4 * size)}' in text
        assert 'harmony_storage_node_info{node="a",store="a"} 1.0' in text
        s3.thaw()
        await until(lambda: len(keys_under(s3, prefix)) == 8, what="uploads after S3 returned")
        got = await a.run(a.get_sync, stored[2].sop_instance_uid)  # evicted: fetched again
        assert got.path.read_bytes() == files[2].read_bytes()
    finally:
        s3.thaw()
        a.close()
