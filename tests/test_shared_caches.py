"""The JMIX envelope index and the DICOMweb metadata cache on both databases, and shared by nodes.

On sqlite (one node) and on a real PostgreSQL: what one store object writes,
another on the same database reads (two nodes); the cache's expiry and its
per-bridge namespaces hold.  With real SeaweedFS as the bucket, a JMIX envelope
built on node A is served by node B, whose folder never had it (fetched from
S3), and a second node indexing the same envelope id is refused.
"""

from __future__ import annotations

import json
import uuid
import zipfile

import pytest
from twisted.internet import task

from harmony.dicomweb.cache import MetadataCache
from harmony.jmix.store import DuplicateEnvelope, EnvelopeStore
from harmony.storage.blobs import S3Blobs
from harmony.storage.database import PostgresDatabase, SqliteDatabase
from tests.s3 import ACCESS_KEY, SECRET_KEY


@pytest.fixture
def database_pair(request, index_kind, tmp_path):
    """Two handles on one database, as two nodes would hold (sqlite: one file)."""
    if index_kind == "sqlite":
        made = [SqliteDatabase(tmp_path / "shared.sqlite3"), SqliteDatabase(tmp_path / "shared.sqlite3")]
    else:
        dsn = request.getfixturevalue("postgres").new_database()
        made = [PostgresDatabase(dsn, max_connections=2), PostgresDatabase(dsn, max_connections=2)]
    yield made
    for db in made:
        db.close()


def envelope_root(folder, study_uid="1.2.3.4", when="2026-12-06T10:00:00Z"):
    env_id = str(uuid.uuid4())
    root = folder / env_id
    (root / "payload").mkdir(parents=True)
    (root / "payload" / "a.txt").write_text("synthetic payload")
    (root / "manifest.json").write_text(json.dumps({"id": env_id, "timestamp": when}))
    return env_id, root


def test_metadata_cache_shared_expiring_and_namespaced(database_pair, tmp_path):
    clock = task.Clock()
    clock.advance(1_000_000)
    node_a = MetadataCache(tmp_path / "a", clock, ttl=60, database=database_pair[0], namespace="bridge")
    node_b = MetadataCache(tmp_path / "b", clock, ttl=60, database=database_pair[1], namespace="bridge")
    other = MetadataCache(tmp_path / "c", clock, ttl=60, database=database_pair[1], namespace="other-pacs")
    body = b'[{"00080018": {"vr": "UI", "Value": ["1.2.3"]}}]' + bytes(range(256))
    node_a.put("series-key", body)
    assert node_b.get("series-key") == body  # another node serves it
    assert other.get("series-key") is None  # a bridge to another PACS does not
    clock.advance(59)
    assert node_b.get("series-key") == body
    clock.advance(2)
    assert node_b.get("series-key") is None  # expired for every node
    node_b.put("series-key", b"[]")
    assert node_a.get("series-key") == b"[]"


def test_envelope_index_shared_by_two_stores(database_pair, tmp_path, index_kind):
    # On sqlite two store objects share a file only on one host (a shared folder);
    # on PostgreSQL each has its own folder, which a shared folder (NFS) would make one.
    folder = tmp_path / "jmix"
    a = EnvelopeStore(folder, database=database_pair[0], node="a")
    b = EnvelopeStore(folder, database=database_pair[1], node="b")
    older, root1 = envelope_root(tmp_path / "in", when="2026-12-06T09:00:00Z")
    newer, root2 = envelope_root(tmp_path / "in", when="2026-12-06T10:00:00Z")
    a.add(root1, "1.2.3.4", "built")
    b.add(root2, "1.2.3.4", "uploaded")
    assert [e["id"] for e in a.for_study("1.2.3.4")] == [newer, older]
    assert b.newest_for_study("1.2.3.4") == newer
    assert a.get(newer)["source"] == "uploaded"
    assert b.exists(older) and not b.exists(str(uuid.uuid4()))
    with pytest.raises(DuplicateEnvelope):
        a.add(root2, "1.2.3.4", "uploaded")


def test_envelope_built_on_one_node_served_by_another_from_s3(s3, postgres, tmp_path):
    dsn = postgres.new_database()
    prefix = f"{tmp_path.name}/"

    def bucket():
        return S3Blobs(s3.endpoint, s3.bucket, access_key=ACCESS_KEY, secret_key=SECRET_KEY, prefix=prefix)
    a = EnvelopeStore(tmp_path / "node-a", database=PostgresDatabase(dsn, max_connections=2), blobs=bucket(), node="a")
    b = EnvelopeStore(tmp_path / "node-b", database=PostgresDatabase(dsn, max_connections=2), blobs=bucket(), node="b")
    try:
        env_id, root = envelope_root(tmp_path / "in")
        a.add(root, "1.2.3.4", "built")
        assert {f"jmix/{env_id}/{env_id}.zip", f"jmix/{env_id}/manifest.json"} <= {
            k[len(prefix):] for k in s3.keys() if k.startswith(prefix)}
        assert not (tmp_path / "node-b" / env_id).exists()
        assert b.newest_for_study("1.2.3.4") == env_id
        assert b.get(env_id)["size"] == a.zip_path(env_id).stat().st_size  # fetched into B's folder
        assert b.zip_path(env_id).read_bytes() == a.zip_path(env_id).read_bytes()
        assert json.loads(b.read_manifest(env_id))["id"] == env_id
        assert b.targz_path(env_id).stat().st_size > 0  # made locally from the fetched zip
        with zipfile.ZipFile(b.zip_path(env_id)) as zf:
            assert "payload/a.txt" in zf.namelist()
        with pytest.raises(DuplicateEnvelope):
            b.add(root, "1.2.3.4", "uploaded")  # A indexed that id first
    finally:
        a.close()
        b.close()
