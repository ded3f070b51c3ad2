"""The ``jmix`` endpoint and ``jmix_builder`` middleware on real loopback ports.

The DICOM side here is ``tests.jmix_support.StagedStudyBackend``, a stand-in
honouring the dicom_scu result contract (see its docstring for why); the same
path against a real Orthanc is in tests/test_jmix_orthanc.py once dicom_scu lands.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import pytest_twisted
import treq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from twisted.internet import defer

from harmony.jmix import (AssertionSpec, BuildOptions, VerifyOptions, build_envelope, crypto, discard,
                          open_envelope, pack, pack_zip)
from harmony.jmix.store import EnvelopeStore
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.jmix_support import (SAMPLE_SERIES, SAMPLE_STUDY_UID, StagedStudyBackend, crafted_zip, make_sample_study,
                                many_entries_zip, targz_bomb, write_zip,
                                zip_of_folder)
from tests.test_jmix_library import MANIFEST

OTHER_STUDY = "1.2.826.0.1.3680043.10.543.7133.99"
MISSING_STUDY = "1.2.826.0.1.3680043.10.543.7133.404"

PIPES = """
[pipelines.jmix]
networks = ["default"]
endpoints = ["jmix"]
middleware = ["builder"]
backends = ["pacs"]

[endpoints.jmix]
service = "jmix"
[endpoints.jmix.options]
path_prefix = "/jmix"
max_upload_bytes = 3000000
max_unpacked_bytes = 8000000
max_entries = 500
decryption_key_file = "{key}"
jws_public_key_files = ["{jws}"]

[middleware.builder]
type = "jmix_builder"
[middleware.builder.options]
sender = {{ id = "org:test-proxy", name = "Test Proxy" }}
receivers = [{{ id = "org:clinic-b", name = "Clinic B" }}]

[backends.pacs]
service = "staged"
[backends.pacs.options]
folder = "{dicom}"

[backend_types.staged]
module = "tests.jmix_support:StagedStudyBackend"
"""


@pytest.fixture(scope="module")
def dicom(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pacs")
    make_sample_study(folder / "sample")
    return folder


@pytest.fixture(scope="module")
def other_study(tmp_path_factory):
    """A second study that is never in the backend: reaches the proxy only by upload."""
    folder = tmp_path_factory.mktemp("other")
    make_sample_study(folder, study_uid=OTHER_STUDY, per_series=2)
    return folder


@pytest.fixture(scope="module")
def keys():
    return {"recipient": X25519PrivateKey.generate(), "signer": Ed25519PrivateKey.generate()}


async def started(tmp_path, dicom, keys, dsn: str = ""):
    """Harmony with the jmix pipeline, its store under *tmp_path*, indexed in PostgreSQL at *dsn* if given."""
    (tmp_path / "rx.key").write_text(crypto.b64(crypto.raw_private(keys["recipient"])))
    (tmp_path / "sig.pub").write_text(crypto.b64(crypto.raw_public(keys["signer"])))
    index, options = ('index = "postgresql"\n', f'dsn = "{dsn}"\n') if dsn else ("", "")
    main = MINIMAL_MAIN + (f'\n[storage]\nbackend = "filesystem"\n{index}[storage.options]\n'
                           f'path = "{tmp_path / "var"}"\n{options}')
    path = write_config(tmp_path / "cfg", main, {"p": PIPES.format(dicom=dicom, key=tmp_path / "rx.key",
                                                                  jws=tmp_path / "sig.pub")})
    StagedStudyBackend.calls.clear()
    running = await start_harmony(path)
    running.store_dir = tmp_path / "var" / "jmix"
    return running


async def stopped(running):
    await running.stop()
    EnvelopeStore.open(running.store_dir).close()


@pytest.fixture
def harmony(tmp_path, dicom, keys):
    running = pytest_twisted.blockon(defer.ensureDeferred(started(tmp_path, dicom, keys)))
    yield running
    pytest_twisted.blockon(defer.ensureDeferred(stopped(running)))


async def fetch(url, method="GET", **kw):
    resp = await treq.request(method, url, **kw)
    return resp, await resp.content()


def problem(body: bytes) -> dict:
    doc = json.loads(body)
    assert {"type", "title", "status", "detail"} <= set(doc)
    return doc


def verify_zip(data: bytes, tmp_path: Path, name: str, **options):
    path = tmp_path / f"{name}.zip"
    path.write_bytes(data)
    report = open_envelope(path, tmp_path / f"{name}-open", VerifyOptions(**options))
    assert report.ok, report.errors
    return report


@pytest_twisted.ensureDeferred
async def test_study_is_built_from_backend_then_served_from_store(harmony, tmp_path):
    url = harmony.url(f"/jmix/api/jmix?studyInstanceUid={SAMPLE_STUDY_UID}")
    resp, body = await fetch(url)
    assert resp.code == 200, body
    assert resp.headers.getRawHeaders("content-type") == ["application/zip"]
    env_id = resp.headers.getRawHeaders("x-jmix-envelope-id")[0]
    assert resp.headers.getRawHeaders("content-disposition") == [f'attachment; filename="{env_id}.zip"']
    # The backend got a study-level C-GET with the identifier as DICOM JSON.
    [call] = StagedStudyBackend.calls
    assert call["metadata"]["dimse_op"] == "C-GET" and call["metadata"]["query_level"] == "STUDY"
    assert call["identifier"]["0020000D"] == {"vr": "UI", "Value": [SAMPLE_STUDY_UID]}
    report = verify_zip(body, tmp_path, "built")
    assert report.envelope_id == env_id and report.study_uid == SAMPLE_STUDY_UID
    series = report.metadata["studies"]["series"]
    assert [(s["series_uid"], s["instance_count"]) for s in series] == [(uid, 5) for uid, _, _ in SAMPLE_SERIES]
    assert report.manifest["sender"] == {"id": "org:test-proxy", "name": "Test Proxy"}
    assert report.manifest["receiver"] == [{"id": "org:clinic-b", "name": "Clinic B"}]
    # Staged files were released and the build folder removed.
    staging = [b for b in harmony.service.runtime.backends.values()][0].staging
    assert list(staging.iterdir()) == []
    assert list((harmony.store_dir / ".staging").iterdir()) == []

    resp2, body2 = await fetch(url)
    assert resp2.code == 200 and body2 == body
    assert len(StagedStudyBackend.calls) == 1  # cached: the backend was not asked again


@pytest_twisted.ensureDeferred
async def test_routes_by_id(harmony, tmp_path):
    resp, body = await fetch(harmony.url(f"/jmix/api/jmix?studyInstanceUid={SAMPLE_STUDY_UID}"))
    env_id = resp.headers.getRawHeaders("x-jmix-envelope-id")[0]
    base = harmony.url(f"/jmix/api/jmix/{env_id}")

    resp, got = await fetch(base)
    assert resp.code == 200 and got == body
    resp, head = await fetch(base, "HEAD")
    assert resp.code == 200 and head == b""
    assert resp.headers.getRawHeaders("content-length") == [str(len(body))]

    resp, manifest = await fetch(base + "/manifest")
    assert resp.code == 200 and resp.headers.getRawHeaders("content-type") == ["application/json"]
    assert json.loads(manifest)["id"] == env_id
    resp, head = await fetch(base + "/manifest", "HEAD")
    assert resp.code == 200 and head == b""
    assert resp.headers.getRawHeaders("content-length") == [str(len(manifest))]

    resp, tgz = await fetch(base, headers={"Accept": ["application/gzip"]})
    assert resp.code == 200 and resp.headers.getRawHeaders("content-type") == ["application/gzip"]
    assert resp.headers.getRawHeaders("content-disposition") == [f'attachment; filename="{env_id}.tar.gz"']
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        names = tar.getnames()
    assert "manifest.json" in names and len([n for n in names if n.startswith("payload/dicom/")]) == 15
    (tmp_path / "dl.tar.gz").write_bytes(tgz)
    assert open_envelope(tmp_path / "dl.tar.gz", tmp_path / "tgz").ok

    resp, _ = await fetch(base, headers={"Accept": ["application/zip;q=0.5, application/gzip;q=0.9"]})
    assert resp.headers.getRawHeaders("content-type") == ["application/gzip"]
    resp, _ = await fetch(base, headers={"Accept": ["*/*"]})
    assert resp.headers.getRawHeaders("content-type") == ["application/zip"]
    resp, body = await fetch(base, headers={"Accept": ["text/html"]})
    assert resp.code == 406 and problem(body)["status"] == 406

    resp, body = await fetch(harmony.url("/jmix/api/jmix/not-a-uuid"))
    assert resp.code == 400 and "not a UUID" in problem(body)["detail"]
    resp, body = await fetch(harmony.url("/jmix/api/jmix/..%2F..%2Fetc%2Fpasswd"))
    assert resp.code in (400, 404)
    resp, body = await fetch(harmony.url("/jmix/api/jmix/0b0f5bde-2c5d-4b5e-9a55-4c8a3bb0c6a1"))
    assert resp.code == 404
    resp, body = await fetch(harmony.url("/jmix/api/jmix/0b0f5bde-2c5d-4b5e-9a55-4c8a3bb0c6a1/manifest"))
    assert resp.code == 404
    resp, body = await fetch(harmony.url("/jmix/api/jmix"))
    assert resp.code == 400 and problem(body)["detail"] == "missing studyInstanceUid"
    resp, body = await fetch(harmony.url("/jmix/api/jmix?studyInstanceUid=../../x"))
    assert resp.code == 400
    resp, body = await fetch(harmony.url("/jmix/api/other"))
    assert resp.code == 404
    resp, body = await fetch(base, "DELETE")
    assert resp.code == 405 and resp.headers.getRawHeaders("allow") == ["GET, HEAD"]

    resp, body = await fetch(harmony.url(f"/jmix/api/jmix?studyInstanceUid={SAMPLE_STUDY_UID}"),
                             headers={"Accept": ["application/json"]})
    assert resp.code == 200
    assert [e["id"] for e in json.loads(body)["jmixEnvelopes"]] == [env_id]
    assert len(StagedStudyBackend.calls) == 1


@pytest_twisted.ensureDeferred
async def test_unknown_study_is_404(harmony):
    resp, body = await fetch(harmony.url(f"/jmix/api/jmix?studyInstanceUid={MISSING_STUDY}"))
    assert resp.code == 404 and MISSING_STUDY in problem(body)["detail"]
    assert len(StagedStudyBackend.calls) == 1
    assert list(EnvelopeStore.open(harmony.store_dir).for_study(MISSING_STUDY)) == []


async def upload(harmony, data: bytes, ctype="application/zip"):
    return await fetch(harmony.url("/jmix/api/jmix"), "POST", data=data, headers={"Content-Type": [ctype]})


@pytest_twisted.ensureDeferred
async def test_upload_round_trips_and_is_indexed_like_built(harmony, other_study, keys, tmp_path):
    """build -> zip -> upload -> download -> verify: plain, encrypted and signed."""
    variants = {
        "plain": BuildOptions(),
        "encrypted": BuildOptions(recipient_public_key=keys["recipient"].public_key(), profile="rs"),
        "signed": BuildOptions(jws_key=keys["signer"], assertions={"sender": AssertionSpec(keys["signer"])},
                               timestamp="2099-01-01T00:00:00Z"),
    }
    ids = {}
    for name, options in variants.items():
        result = build_envelope([other_study], tmp_path / name, options)
        archive = pack_zip(result.root, tmp_path / f"{name}.zip")
        resp, body = await upload(harmony, archive.read_bytes())
        assert resp.code == 201, body
        assert json.loads(body) == {"id": result.envelope_id, "status": "stored"}
        assert resp.headers.getRawHeaders("location") == [f"/jmix/api/jmix/{result.envelope_id}"]
        ids[name] = result.envelope_id

        resp, got = await fetch(harmony.url(f"/jmix/api/jmix/{result.envelope_id}"))
        assert resp.code == 200
        report = verify_zip(got, tmp_path, f"dl-{name}", private_key=keys["recipient"],
                            jws_keys=[keys["signer"].public_key()])
        assert report.envelope_id == result.envelope_id and report.study_uid == OTHER_STUDY
        if name == "signed":
            assert report.info["jws"].startswith("verified") and "sender" in report.info["assertions"]
        if name == "encrypted":
            assert report.info["decrypted"] is True
        discard(report)

        resp, _ = await upload(harmony, archive.read_bytes())
        assert resp.code == 409

    # Indexed by study like built ones (the encrypted one through its decrypted metadata):
    # the newest by manifest timestamp is served, without asking the backend.
    store = EnvelopeStore.open(harmony.store_dir)
    assert {e["id"] for e in store.for_study(OTHER_STUDY)} == set(ids.values())
    resp, _ = await fetch(harmony.url(f"/jmix/api/jmix?studyInstanceUid={OTHER_STUDY}"))
    assert resp.code == 200 and resp.headers.getRawHeaders("x-jmix-envelope-id") == [ids["signed"]]
    assert StagedStudyBackend.calls == []


@pytest_twisted.ensureDeferred
async def test_upload_tar_gz_with_top_folder(harmony, other_study, tmp_path):
    result = build_envelope([other_study], tmp_path / "w", BuildOptions())
    archive = pack(result.root, tmp_path / "e.tar.gz", "tar.gz")
    resp, body = await upload(harmony, archive.read_bytes(), "application/gzip")
    assert resp.code == 201, body
    result2 = build_envelope([other_study], tmp_path / "w2", BuildOptions())
    archive2 = zip_of_folder(result2.root, tmp_path / "top.zip", top=f"{result2.envelope_id}.JMIX")
    resp, body = await upload(harmony, archive2.read_bytes())
    assert resp.code == 201, body


@pytest_twisted.ensureDeferred
async def test_bad_uploads_are_clear_4xx_and_write_nothing(harmony, other_study, keys, tmp_path):
    store_before = sorted(p.name for p in harmony.store_dir.iterdir())
    outside = tmp_path / "evil.txt"

    resp, body = await upload(harmony, b"PK\x03\x04", "text/plain")
    assert resp.code == 415 and problem(body)["status"] == 415
    resp, body = await upload(harmony, b"\0" * 3_100_000)
    assert resp.code == 413
    resp, body = await upload(harmony, b"this is not a zip at all")
    assert resp.code == 400 and "archive" in problem(body)["detail"]

    hostile = {
        "slip": write_zip(tmp_path / "slip.zip", {"manifest.json": MANIFEST, f"../../../../..{outside}": b"x"}),
        "absolute": write_zip(tmp_path / "abs.zip", {"manifest.json": MANIFEST, str(outside): b"x"}),
        "symlink": write_zip(tmp_path / "link.zip", {"manifest.json": MANIFEST}, {"payload": "/etc"}),
        "no-manifest": write_zip(tmp_path / "none.zip", {"payload/metadata.json": b"{}"}),
        "bomb": write_zip(tmp_path / "bomb.zip", {"manifest.json": MANIFEST, "payload/a": b"\0" * 5_000_000,
                                                  "payload/b": b"\0" * 5_000_000}),
        "many-entries": write_zip(tmp_path / "many.zip", {"manifest.json": MANIFEST,
                                                          **{f"payload/{i}": b"" for i in range(600)}}),
        "bad-id": write_zip(tmp_path / "badid.zip", {"manifest.json": MANIFEST.replace(
            "0b0f5bde-2c5d-4b5e-9a55-4c8a3bb0c6a1", "../../etc"), "payload/metadata.json": b"{}"}),
    }
    assert hostile["bomb"].stat().st_size < 100_000  # small on the wire, 10 MB unpacked
    for name, archive in hostile.items():
        resp, body = await upload(harmony, archive.read_bytes())
        assert resp.code == 400, (name, body)
        assert problem(body)["errors"][0]["stage"] == ("structure" if name == "bad-id" else "archive"), (name, body)
        if name in ("bomb", "many-entries"):
            assert ("bytes" if name == "bomb" else "entries") in problem(body)["detail"], body

    # Tampered payload: hash mismatch reported, upload refused.
    result = build_envelope([other_study], tmp_path / "t", BuildOptions())
    victim = next((result.root / "payload/dicom").iterdir())
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    resp, body = await upload(harmony, pack_zip(result.root, tmp_path / "tampered.zip").read_bytes())
    doc = problem(body)
    assert resp.code == 400
    assert {"stage": "integrity",
            "message": "payload_hash does not match the payload under any known algorithm"} in doc["errors"]

    # Encrypted for someone else: our key cannot open it.
    result = build_envelope([other_study], tmp_path / "k", BuildOptions(
        recipient_public_key=X25519PrivateKey.generate().public_key()))
    resp, body = await upload(harmony, pack_zip(result.root, tmp_path / "wrongkey.zip").read_bytes())
    assert resp.code == 400 and "did not decrypt" in problem(body)["detail"]

    assert sorted(p.name for p in harmony.store_dir.iterdir()) == store_before
    assert list((harmony.store_dir / ".staging").iterdir()) == []
    assert not outside.exists() and not (Path("/") / outside.name).exists()
    assert EnvelopeStore.open(harmony.store_dir).for_study(OTHER_STUDY) == []


@pytest_twisted.ensureDeferred
async def test_zip_and_targz_bombs_are_refused_with_a_problem_body_and_staging_left_clean(harmony, tmp_path):
    """Issue 12, defect 17: a 2 MiB upload inflating to 2 GiB; defect 18: more
    entries than the cap.  Each is refused with a problem body naming the cap
    before anything is unpacked, and the staging folder is left empty."""
    store_before = sorted(p.name for p in harmony.store_dir.iterdir())
    zip_bomb = crafted_zip(tmp_path / "bomb.zip", [("manifest.json", MANIFEST, len(MANIFEST.encode()), 0),
                                                   ("payload/zeros", None, 2048 * 1024 * 1024, 2048)])
    tgz_bomb = targz_bomb(tmp_path / "bomb.tar.gz", 2048, declared=2048 * 1024 * 1024)
    many = many_entries_zip(tmp_path / "many.zip", 5000, MANIFEST)  # the fixture caps entries at 500
    for archive, ctype, says in ((zip_bomb, "application/zip", "bytes unpacked"),
                                 (tgz_bomb, "application/gzip", "bytes unpacked"),
                                 (many, "application/zip", "more than 500 entries (5001)")):
        assert archive.stat().st_size < 3_000_000  # under max_upload_bytes: the archive limits must act
        resp, body = await upload(harmony, archive.read_bytes(), ctype)
        assert resp.code == 400, (archive.name, body)
        assert resp.headers.getRawHeaders("content-type") == ["application/problem+json"]
        doc = problem(body)
        assert doc["errors"][0]["stage"] == "archive" and says in doc["detail"], (archive.name, doc)
        assert list((harmony.store_dir / ".staging").iterdir()) == []
    assert sorted(p.name for p in harmony.store_dir.iterdir()) == store_before


@pytest_twisted.ensureDeferred
async def test_pipeline_without_builder_says_so(tmp_path, dicom):
    """A study that must be built, in a pipeline lacking jmix_builder: a 500 naming it."""
    pipes = PIPES.split("[middleware.builder]")[0].replace('middleware = ["builder"]\n', "")
    pipes = pipes.replace('decryption_key_file = "{key}"\njws_public_key_files = ["{jws}"]\n', "")
    pipes += '[backends.pacs]\nservice = "staged"\n[backends.pacs.options]\nfolder = "{dicom}"\n' \
             '[backend_types.staged]\nmodule = "tests.jmix_support:StagedStudyBackend"\n'
    main = MINIMAL_MAIN + f'\n[storage.options]\npath = "{tmp_path / "var"}"\n'
    running = await start_harmony(write_config(tmp_path / "cfg", main, {"p": pipes.format(dicom=dicom)}))
    try:
        resp, body = await fetch(running.url(f"/jmix/api/jmix?studyInstanceUid={SAMPLE_STUDY_UID}"))
        assert resp.code == 500 and "needs the jmix_builder middleware" in problem(body)["detail"]
    finally:
        await running.stop()
        EnvelopeStore.open(tmp_path / "var" / "jmix").close()


@pytest.mark.parametrize("index", ["sqlite", "postgresql"])
@pytest_twisted.ensureDeferred
async def test_no_store_query_runs_on_the_reactor_thread(request, index, tmp_path, dicom, keys, monkeypatch):
    """Every index query of the store - above all "does this study have an envelope",
    asked before the pipeline is chosen, a PostgreSQL round trip on a cluster - runs
    in a thread, never on the reactor: checked on every route, on both indexes."""
    from twisted.python.threadable import isInIOThread
    on_reactor: list[str] = []
    asked: list[str] = []
    query = EnvelopeStore._query

    def recorded(self, sql, args=()):
        (on_reactor if isInIOThread() else asked).append(sql)
        return query(self, sql, args)

    monkeypatch.setattr(EnvelopeStore, "_query", recorded)
    dsn = request.getfixturevalue("postgres").new_database() if index == "postgresql" else ""
    running = await started(tmp_path, dicom, keys, dsn)
    try:
        study = running.url(f"/jmix/api/jmix?studyInstanceUid={SAMPLE_STUDY_UID}")
        resp, _ = await fetch(study)                                     # no envelope yet: built
        assert resp.code == 200
        env_id = resp.headers.getRawHeaders("x-jmix-envelope-id")[0]
        resp, _ = await fetch(study)                                     # stored: from the store
        assert resp.code == 200 and len(StagedStudyBackend.calls) == 1
        resp, _ = await fetch(study, headers={"Accept": ["application/json"]})
        assert resp.code == 200
        for path in (f"/jmix/api/jmix/{env_id}", f"/jmix/api/jmix/{env_id}/manifest"):
            resp, _ = await fetch(running.url(path))
            assert resp.code == 200
        resp, _ = await fetch(running.url(f"/jmix/api/jmix?studyInstanceUid={MISSING_STUDY}"))
        assert resp.code == 404
    finally:
        await stopped(running)
    assert len(asked) >= 6
    assert on_reactor == []


@pytest_twisted.ensureDeferred
async def test_an_unreachable_index_is_a_503_after_the_middleware(harmony, monkeypatch):
    """The "has this study an envelope" lookup failing (PostgreSQL away) answers 503
    with Retry-After and a problem body; the backend is not asked to build."""
    from harmony.storage.errors import DatabaseUnavailable

    def unreachable(self, study_uid):
        raise DatabaseUnavailable("the cluster database cannot be reached")

    monkeypatch.setattr(EnvelopeStore, "newest_for_study", unreachable)
    resp, body = await fetch(harmony.url(f"/jmix/api/jmix?studyInstanceUid={SAMPLE_STUDY_UID}"))
    assert resp.code == 503 and resp.headers.getRawHeaders("retry-after") == ["5"]
    assert "cannot be reached" in problem(body)["detail"]
    assert StagedStudyBackend.calls == []
