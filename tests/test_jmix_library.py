"""harmony.jmix as a library: known answers, building, round trips, hostile input."""

from __future__ import annotations

import base64
import datetime
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from harmony.jmix import (ArchiveError, AssertionSpec, BuildOptions, DicomInputError, Entity, Limits, VerifyOptions,
                          build_envelope, crypto, discard, extract, open_envelope, pack, pack_zip, validate)
from harmony.jmix.archive import ArchiveTooLarge
from harmony.jmix.hashing import streamed_hash, structured_hash
from harmony.jmix.validate import schema_errors
from tests.dicom_data import make_instance, save
from tests.jmix_support import (SAMPLE_SERIES, SAMPLE_STUDY_UID, crafted_zip, make_sample_study, many_entries_zip,
                                targz_bomb, write_zip, zip_of_folder)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sample")
    make_sample_study(folder)
    return folder


def build(sample, tmp_path, **kw):
    return build_envelope([sample], tmp_path / "work", BuildOptions(**kw))


def assert_schema_valid(root: Path):
    assert schema_errors("manifest", json.loads((root / "manifest.json").read_text())) == []
    assert schema_errors("audit", json.loads((root / "audit.json").read_text())) == []
    if (root / "payload").exists():
        assert schema_errors("metadata", json.loads((root / "payload/metadata.json").read_text())) == []
        assert schema_errors("files", json.loads((root / "payload/files.json").read_text())) == []


# --------------------------------------------------------------------------- known answers (notes 6.3, 8.2)

def vector_payload(tmp_path) -> Path:
    p = tmp_path / "payload"
    (p / "dicom").mkdir(parents=True)
    (p / "files").mkdir()
    (p / "metadata.json").write_bytes(b'{"id":"x"}')
    (p / "dicom/1.2.3.dcm").write_bytes(b"hello\n")
    (p / "dicom/1.2.4.dcm").write_bytes(b"B")
    return p


def test_payload_hash_vectors(tmp_path):
    p = vector_payload(tmp_path)
    assert streamed_hash(p) == "sha256:7902b87274532d234d19c06c3669ba9e584fced9c0a480e4e998aa480567bef7"
    assert structured_hash(p) == "sha256:8b9d59e0f6d2144f46584a58e89a4d8ebf6ad05f8bfc1566dede5d0ea241addb"


# Sender key of aurabx/jmix-php samples/sample-config-with-assertions.json (a 64-byte
# libsodium secret key: seed || public key), and the vector from the notes, section 8.2.
PHP_SENDER_SECRET = ("517zPVq8pdgZbFoWwv3nyl0i2cM9rng5XNisrbfIPDjgsUwXxyky/NdXMEa68HMN2HNix3MHvHgnfgj6dVuC9w==")
VECTOR_MANIFEST = {"id": "6f57f5fa-1cd1-45be-a5c3-fb209be1e0ec", "timestamp": "2025-05-24T06:14:00Z",
                   "sender": {"id": "org:au.gov.health.123456", "name": "Radiology Clinic A",
                              "contact": "imaging@clinica.org.au"}}
VECTOR_FIELDS = ["sender.id", "sender.name", "sender.contact", "id", "timestamp"]
VECTOR_SIGNATURE = "bowhsV0KLyTxq3GzmjBA968PK+rHXYGXLFJ/bLGiGsyYJdOHXjNS517LrVLf7/2rBgRKy0j3lELHZS4w5TdrCQ=="
VECTOR_FINGERPRINT = "SHA256:0b7d67343a73572df80fbf736690e0c8c3cbf2beac3bf497d9f8e38c798bf57e"


def test_assertion_vector():
    key = crypto.ed25519_private(PHP_SENDER_SECRET)
    assert crypto.canonical_fields(VECTOR_MANIFEST, VECTOR_FIELDS) == (
        b'{"id":"6f57f5fa-1cd1-45be-a5c3-fb209be1e0ec","sender.contact":"imaging@clinica.org.au",'
        b'"sender.id":"org:au.gov.health.123456","sender.name":"Radiology Clinic A","timestamp":"2025-05-24T06:14:00Z"}')
    assertion = crypto.make_assertion(VECTOR_MANIFEST, key, VECTOR_FIELDS)
    assert assertion["signature"] == VECTOR_SIGNATURE
    assert assertion["signing_key"]["fingerprint"] == VECTOR_FINGERPRINT
    manifest = {**VECTOR_MANIFEST, "sender": {**VECTOR_MANIFEST["sender"], "assertion": assertion}}
    # jmix-php writes the fingerprint in upper case: compared case-insensitively.
    assertion["signing_key"]["fingerprint"] = "SHA256:" + VECTOR_FINGERPRINT[7:].upper()
    assert crypto.verify_assertion(manifest, assertion) == VECTOR_FINGERPRINT
    manifest["sender"]["name"] = "Someone Else"
    with pytest.raises(crypto.CryptoError, match="does not verify"):
        crypto.verify_assertion(manifest, assertion)


def test_encryption_known_answer():
    """Self-generated (no reference library produced an encrypted sample): fixed
    X25519 keys and IV, plaintext ``hello\\n``, once per profile's HKDF info.
    Pins the KDF inputs (no salt, info string) and the tag-outside-file layout."""
    recipient = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    ephemeral = X25519PrivateKey.from_private_bytes(bytes(range(33, 65)))
    expected = {b"JMIX-payload-encryption": ("12b33e559b95", "Qi5+YsyoiElsf/lbmTnbpg=="),
                b"JMIX-AES256-GCM": ("26058e654ab6", "6rmuq/TX+xPFYln0nfceLw=="),
                b"JMIX-Payload-Encryption": ("768965936437", "RL3t5XbV1wK6jsvAVLbNMA==")}
    for info, (ct_hex, tag) in expected.items():
        out = io.BytesIO()
        enc = crypto.PayloadEncryptor(out, recipient.public_key(), info, ephemeral=ephemeral, iv=bytes(range(12)))
        enc.write(b"hello\n")
        block = enc.finish()
        assert out.getvalue().hex() == ct_hex
        assert block == {"algorithm": "AES-256-GCM", "iv": "AAECAwQFBgcICQoL", "auth_tag": tag,
                         "ephemeral_public_key": "WGmv9FBUlzLLqu1eXfmzCm2jHLDldCutWtShp2jxpns="}


# --------------------------------------------------------------------------- building

def test_sample_study_envelope(sample, tmp_path):
    result = build(sample, tmp_path)
    root = result.root
    assert_schema_valid(root)
    meta = json.loads((root / "payload/metadata.json").read_text())
    assert meta["id"] == result.envelope_id == json.loads((root / "manifest.json").read_text())["id"]
    assert meta["patient"] == {"id": "PID156695", "name": {"family": "Brown", "given": ["Jane"], "text": "Brown, Jane"},
                               "dob": "1969-03-12", "sex": "M"}
    study = meta["studies"]
    assert study["study_uid"] == SAMPLE_STUDY_UID and study["study_description"] == "CT Pulmonary Angiogram"
    # Three series of five: two share a description but are not merged.
    assert [(s["series_uid"], s["series_number"], s["series_description"], s["instance_count"], s["modality"],
             s["body_part"]) for s in study["series"]] == [
        (uid, n, d, 5, "CT", "CHEST") for uid, n, d in SAMPLE_SERIES]
    dicom = sorted((root / "payload/dicom").iterdir())
    assert len(dicom) == 15
    sources = {p.name: p for p in sample.rglob("*.dcm")}
    for series_uid, number, _ in SAMPLE_SERIES:
        for i in range(1, 6):
            # original bytes, named by SOPInstanceUID
            assert (root / f"payload/dicom/{series_uid}.{i}.dcm").read_bytes() == \
                sources[f"CT.{number}.{i}.dcm"].read_bytes()
    files = json.loads((root / "payload/files.json").read_text())
    assert files[0]["file"] == "metadata.json" and len(files) == 16
    assert all(f["hash"].startswith("sha256:") and len(f["hash"]) == 71 for f in files)
    audit = json.loads((root / "audit.json").read_text())["audit"]
    assert [a["event"] for a in audit] == ["created"] and audit[0]["by"]["id"] == "org:harmony-proxy"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["receiver"] == [{"id": "urn:jmix:receiver:unspecified"}]
    assert manifest["security"]["payload_hash"] == structured_hash(root / "payload")
    assert "patient" not in manifest  # no PII in the manifest
    report = validate(root)
    assert report.ok, report.errors
    assert report.warnings == [] and report.info["payload_hash"] == "structured"


def test_rs_profile_uses_streamed_hash(sample, tmp_path):
    result = build(sample, tmp_path, profile="rs")
    assert result.manifest["security"]["payload_hash"] == streamed_hash(result.root / "payload")
    assert validate(result.root).info["payload_hash"] == "streamed"


def test_skip_flags_stay_schema_valid(sample, tmp_path):
    result = build(sample, tmp_path, skip_hashing=True, skip_listing=True)
    assert_schema_valid(result.root)
    assert "payload_hash" not in result.manifest["security"]
    files = json.loads((result.root / "payload/files.json").read_text())
    assert [f["file"] for f in files] == ["metadata.json"] and "hash" not in files[0]
    report = validate(result.root)
    assert report.ok and any("no security.payload_hash" in m for _, m in report.warnings)


def test_mixed_studies_and_bad_uids_are_refused(tmp_path):
    save(make_instance(study_uid="1.2.3", sop_uid="1.2.3.1"), tmp_path / "in/a.dcm")
    save(make_instance(study_uid="1.2.4", sop_uid="1.2.4.1"), tmp_path / "in/b.dcm")
    with pytest.raises(DicomInputError, match="2 studies"):
        build_envelope([tmp_path / "in"], tmp_path / "w")
    bad = make_instance(study_uid="1.2.5")
    bad.SOPInstanceUID = "../../evil"
    save(bad, tmp_path / "bad/x.dcm")
    with pytest.raises(DicomInputError, match="not a valid UID"):
        build_envelope([tmp_path / "bad"], tmp_path / "w2")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk/x.dcm").write_bytes(b"not dicom")
    with pytest.raises(DicomInputError, match="not a readable DICOM"):
        build_envelope([tmp_path / "junk"], tmp_path / "w3")
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_plain_round_trip(sample, tmp_path, fmt):
    result = build(sample, tmp_path)
    archive = pack(result.root, tmp_path / f"e.{fmt}", fmt)
    if fmt == "zip":
        names = zipfile.ZipFile(archive).namelist()
        assert names[0] == "manifest.json" and "payload/dicom/" in names  # entries at the root
    report = open_envelope(archive, tmp_path / "v")
    assert report.ok, report.errors
    assert report.envelope_id == result.envelope_id and report.study_uid == SAMPLE_STUDY_UID
    assert report.info["dicom_instances"] == 15


def test_single_top_folder_layout_is_accepted(sample, tmp_path):
    result = build(sample, tmp_path)
    archive = zip_of_folder(result.root, tmp_path / "top.zip", top=f"{result.envelope_id}.JMIX")
    report = open_envelope(archive, tmp_path / "v")
    assert report.ok, report.errors


@pytest.mark.parametrize("profile", ["spec", "rs", "js"])
def test_encrypted_signed_round_trip(sample, tmp_path, profile):
    recipient = X25519PrivateKey.generate()
    signer = Ed25519PrivateKey.generate()
    result = build(sample, tmp_path, profile=profile, recipient_public_key=recipient.public_key(),
                   jws_key=signer, requester=Entity("org:requester", "Dr Who"),
                   assertions={"sender": AssertionSpec(signer), "requester": AssertionSpec(signer)})
    root = result.root
    assert not (root / "payload").exists()
    enc_name = {"rs": "payload.enc"}.get(profile, "payload.encrypted")
    assert (root / enc_name).is_file()
    assert_schema_valid(root)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["security"]["jws"] == {"jws_file": "manifest.jws"}
    assert "security.payload_hash" in manifest["sender"]["assertion"]["signed_fields"]
    archive = pack_zip(root, tmp_path / "e.zip")
    report = open_envelope(archive, tmp_path / "v", VerifyOptions(private_key=recipient,
                                                                   jws_keys=[signer.public_key()]))
    assert report.ok, report.errors
    assert report.info["decrypted"] is True and report.study_uid == SAMPLE_STUDY_UID
    assert report.info["payload_hash"] == {"spec": "ciphertext", "rs": "plaintext-tar", "js": "streamed"}[profile]
    assert report.info["jws"].startswith("verified") and set(report.info["assertions"]) == {"sender", "requester"}
    assert len(list((report.payload / "dicom").iterdir())) == 15
    discard(report)
    assert not (tmp_path / "v/decrypted").exists()

    wrong = open_envelope(archive, tmp_path / "w", VerifyOptions(private_key=X25519PrivateKey.generate()))
    assert not wrong.ok and wrong.errors[0][0] == "integrity" and "did not decrypt" in wrong.errors[0][1]
    no_key = open_envelope(archive, tmp_path / "n")
    assert no_key.ok and no_key.info["decrypted"] is False
    bad_jws = open_envelope(archive, tmp_path / "j", VerifyOptions(jws_keys=[Ed25519PrivateKey.generate().public_key()]))
    assert ("authenticity", "manifest.jws: JWS signature does not verify with any trusted key") in bad_jws.errors


def test_jws_must_cover_the_final_manifest(sample, tmp_path):
    signer = Ed25519PrivateKey.generate()
    result = build(sample, tmp_path, jws_key=signer)
    manifest = json.loads((result.root / "manifest.json").read_text())
    manifest["sender"]["name"] = "Mallory"
    (result.root / "manifest.json").write_text(json.dumps(manifest))
    report = validate(result.root, VerifyOptions(jws_keys=[signer.public_key()]))
    assert ("authenticity", "manifest.jws is validly signed but not over this manifest.json") in report.errors


def test_expired_assertion_is_an_error(sample, tmp_path):
    signer = Ed25519PrivateKey.generate()
    result = build(sample, tmp_path, assertions={"sender": AssertionSpec(signer, expires_at="2030-01-01T00:00:00Z")})
    assert validate(result.root, VerifyOptions(now=datetime.datetime(2029, 1, 1, tzinfo=datetime.timezone.utc))).ok
    late = validate(result.root, VerifyOptions(now=datetime.datetime(2031, 1, 1, tzinfo=datetime.timezone.utc)))
    assert late.errors == [("authenticity", "sender assertion: assertion expired at 2030-01-01T00:00:00Z")]


def test_tampered_payload_is_reported(sample, tmp_path):
    result = build(sample, tmp_path)
    victim = next((result.root / "payload/dicom").iterdir())
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    report = validate(result.root)
    assert not report.ok
    assert ("consistency", f"dicom/{victim.name}: SHA-256 differs from files.json") in report.errors
    assert ("integrity", "payload_hash does not match the payload under any known algorithm") in report.errors


def test_consistency_warnings(sample, tmp_path):
    result = build(sample, tmp_path)
    meta_path = result.root / "payload/metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["studies"]["series"][0]["instance_count"] = 7
    meta_path.write_text(json.dumps(meta))
    (result.root / "payload/files").mkdir()
    (result.root / "payload/files/report.pdf").write_bytes(b"%PDF")
    report = validate(result.root)
    assert any("instance_count 7, 5 DICOM file(s) found" in m for _, m in report.warnings)
    assert ("consistency", "files/report.pdf is not listed in files.json") in report.errors
    assert any(s == "consistency" and m.startswith("metadata.json: ") for s, m in report.errors)


# --------------------------------------------------------------------------- hostile archives

MANIFEST = json.dumps({"version": "1.0", "id": "0b0f5bde-2c5d-4b5e-9a55-4c8a3bb0c6a1",
                       "timestamp": "2025-01-01T00:00:00Z", "sender": {"id": "x"}, "receiver": [{"id": "y"}]})


@pytest.mark.parametrize("entries,symlinks,message", [
    ({"../evil.txt": b"x", "manifest.json": MANIFEST}, None, "'..' is not allowed"),
    ({"/etc/evil": b"x"}, None, "absolute paths are not allowed"),
    ({"C:/evil": b"x"}, None, "absolute paths are not allowed"),
    ({"payload\\..\\evil": b"x"}, None, "backslashes"),
    ({"manifest.json": MANIFEST}, {"payload": "/etc"}, "is a symlink"),
    ({"readme.txt": b"no manifest here"}, None, "no manifest.json"),
])
def test_unsafe_zips_are_refused(tmp_path, entries, symlinks, message):
    archive = write_zip(tmp_path / "bad.zip", entries, symlinks)
    dest = tmp_path / "out"
    with pytest.raises(ArchiveError, match=message):
        extract(archive, dest)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "etc").exists()


def test_zip_bomb_and_entry_caps(tmp_path):
    bomb = write_zip(tmp_path / "bomb.zip", {"manifest.json": MANIFEST, "payload/big": b"\0" * (4 * 1024 * 1024)})
    assert os.path.getsize(bomb) < 64 * 1024
    with pytest.raises(ArchiveError, match="larger than|size limit|declares more"):
        extract(bomb, tmp_path / "a", Limits(max_total_bytes=1024 * 1024, max_file_bytes=1024 * 1024))
    many = write_zip(tmp_path / "many.zip", {f"f{i}": b"" for i in range(50)})
    with pytest.raises(ArchiveError, match="more than 10 entries"):
        extract(many, tmp_path / "b", Limits(max_entries=10))


def _left_clean(dest: Path) -> int:
    """Bytes written under *dest* (0 when nothing, or nothing at all there)."""
    return sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) if dest.exists() else 0


def test_2gib_zip_bomb_is_refused_from_its_central_directory_before_a_byte_is_written(tmp_path):
    """Issue 12, defect 17: a 2 MiB upload used to be inflated to 2 GiB in staging
    before the 400.  With the default limits it is refused on the sizes its
    central directory declares (2 GiB > 100 x 2 MiB, and > the 256 MiB floor)."""
    bomb = crafted_zip(tmp_path / "bomb.zip", [("manifest.json", MANIFEST, len(MANIFEST.encode()), 0),
                                               ("payload/zeros", None, 2048 * 1024 * 1024, 2048)])
    assert os.path.getsize(bomb) < 3 * 1024 * 1024
    with pytest.raises(ArchiveTooLarge, match="declares its entries larger"):
        extract(bomb, tmp_path / "out")
    assert _left_clean(tmp_path / "out") == 0


def test_zip_bomb_under_the_declared_cap_is_stopped_by_the_ratio_while_streaming(tmp_path):
    """Declared sizes the caps allow, yet a ratio no study has: counting the
    actual bytes stops it at the ratio cap (here 20 x the archive, 1 MiB floor)."""
    bomb = crafted_zip(tmp_path / "bomb.zip", [("manifest.json", MANIFEST, len(MANIFEST.encode()), 0),
                                               ("payload/zeros", None, 64 * 1024 * 1024, 64)])
    limits = Limits(max_ratio=20, ratio_floor_bytes=1024 * 1024)
    with pytest.raises(ArchiveTooLarge):
        extract(bomb, tmp_path / "out", limits)
    assert _left_clean(tmp_path / "out") <= limits.allowed_total(os.path.getsize(bomb))


def test_100000_entries_are_counted_from_the_end_record_before_parsing(tmp_path, monkeypatch):
    """Issue 12, defect 18: 100,000 entries took 12-45 s and +60 MB before the 400.
    The count comes from the end-of-central-directory record: zipfile never
    parses the directory, nothing is written."""
    many = many_entries_zip(tmp_path / "many.zip", 100_000, MANIFEST)
    opened = []
    monkeypatch.setattr(zipfile.ZipFile, "__init__", lambda *a, **k: opened.append(a))  # must not be reached
    with pytest.raises(ArchiveTooLarge, match=r"more than 20000 entries \(100001\)"):
        extract(many, tmp_path / "out")
    assert opened == [] and _left_clean(tmp_path / "out") == 0


def test_a_central_directory_larger_than_its_count_explains_is_refused(tmp_path):
    many = many_entries_zip(tmp_path / "many.zip", 3000, MANIFEST)
    raw = bytearray(many.read_bytes())
    eocd = raw.rfind(b"PK\x05\x06")
    raw[eocd + 8:eocd + 12] = (5).to_bytes(2, "little") * 2  # the end record claims 5 entries
    many.write_bytes(bytes(raw))
    with pytest.raises(ArchiveTooLarge, match="central directory"):
        extract(many, tmp_path / "out", Limits(max_entries=10))


def test_targz_bomb_is_refused_on_its_declared_size(tmp_path):
    bomb = targz_bomb(tmp_path / "bomb.tar.gz", 300)
    with pytest.raises(ArchiveTooLarge):
        extract(bomb, tmp_path / "out")
    assert _left_clean(tmp_path / "out") == 0


def test_targz_pax_header_bomb_is_refused_before_tarfile_holds_it(tmp_path):
    """tarfile reads a PAX header into memory whole: 64 MiB of it is refused at 1 MiB."""
    bomb = targz_bomb(tmp_path / "pax.tar.gz", 1, pax_mib=64)
    with pytest.raises(ArchiveTooLarge, match="tar headers larger"):
        extract(bomb, tmp_path / "out")


def test_default_limits_open_a_real_study(tmp_path):
    root = build_envelope(make_sample_study(tmp_path / "study"), tmp_path / "env", BuildOptions()).root
    for fmt in ("zip", "tar.gz"):
        archive = pack(root, tmp_path / f"e.{fmt}", fmt)
        assert (extract(archive, tmp_path / f"out-{fmt}") / "manifest.json").is_file()


def test_zip_that_lies_about_sizes_is_stopped(tmp_path):
    """Declared size small, real data big: reading stops at the declared size and
    the CRC check fails, so the lie never reaches the disk as a whole file."""
    path = write_zip(tmp_path / "liar.zip", {"manifest.json": MANIFEST, "payload/big": b"\0" * (2 * 1024 * 1024)})
    raw = bytearray(path.read_bytes())
    header = raw.find(b"payload/big", raw.find(b"PK\x01\x02")) - 46
    assert raw[header:header + 4] == b"PK\x01\x02"
    raw[header + 24:header + 28] = (10).to_bytes(4, "little")  # central directory: uncompressed size
    path.write_bytes(bytes(raw))
    with pytest.raises(ArchiveError, match="corrupt"):
        extract(path, tmp_path / "out", Limits(max_total_bytes=1024 * 1024))


def test_tar_links_and_traversal_are_refused(tmp_path):
    def tgz(name, members):
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            for info, data in members:
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return path

    def reg(name, data=b"x"):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        return info, data

    link = tarfile.TarInfo("payload")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc"
    hard = tarfile.TarInfo("h")
    hard.type, hard.linkname = tarfile.LNKTYPE, "/etc/passwd"
    for name, members, message in [("t1.tgz", [reg("../x")], "'..'"), ("t2.tgz", [reg("/abs")], "absolute"),
                                   ("t3.tgz", [reg("manifest.json", MANIFEST.encode()), (link, None)], "link"),
                                   ("t4.tgz", [(hard, None)], "link")]:
        with pytest.raises(ArchiveError, match=message):
            extract(tgz(name, members), tmp_path / f"out-{name}")
    assert not (tmp_path / "x").exists()


def test_structure_errors(tmp_path):
    root = tmp_path / "env"
    (root / "payload").mkdir(parents=True)
    doc = json.loads(MANIFEST)
    doc["id"] = "0b0f5bde2c5d4b5e9a554c8a3bb0c6a1"  # 32 hex digits: not the uuid format
    doc["receiver"] = []
    (root / "manifest.json").write_text(json.dumps(doc))
    report = validate(root)
    assert ("structure", "manifest id '0b0f5bde2c5d4b5e9a554c8a3bb0c6a1' is not a UUID") in report.errors
    assert ("structure", "manifest receiver must be a non-empty array") in report.errors
    assert ("structure", "payload/metadata.json is missing") in report.errors
    (root / "manifest.json").write_text("{not json")
    assert validate(root).errors[0][1].startswith("manifest.json is not valid JSON")


def test_schema_format_checking_is_on():
    doc = json.loads(MANIFEST)
    doc["timestamp"] = "yesterday"
    doc["id"] = "not-a-uuid"
    errors = schema_errors("manifest", doc)
    assert any("timestamp" in e and "date-time" in e for e in errors)
    assert any(e.startswith("manifest.json id") for e in errors)


def test_vendored_schemas_are_unmodified():
    """Byte-for-byte copies of aurabx/jmix@2b3fe54b schemas/ (CC BY-ND: no derivatives)."""
    import hashlib
    from importlib import resources
    expected = {"audit.schema.json": "1852193081f0a6c30ead1be70878d7124638f9e1c9c9c8d0879d488b2c23ebb9",
                "files.schema.json": "df79d45762ad189ea3d951284e29cda35b15fad14b78e9c0968fdc5c181a286f",
                "manifest.schema.json": "e45fa92d8c0ec1b9bdb1d3de92298aa0b3974419cc8d2bfabe8451e41caf2f25",
                "metadata.schema.json": "a4cdb288db1a2d824141675f6cf55287e86ffe59c22b6693dd26f02d317430a7",
                "licence.md": "d3566c88626bc6a15a62d7a2ed18152ea54cf468da2efe8a48daa4751d4d3a29"}
    folder = resources.files("harmony.jmix").joinpath("schemas")
    for name, digest in expected.items():
        assert hashlib.sha256(folder.joinpath(name).read_bytes()).hexdigest() == digest, name


# --------------------------------------------------------------------------- CLI

def test_cli_build_verify_extract(sample, tmp_path, capsys):
    from harmony.cli import main
    assert main(["jmix", "keygen", "--type", "x25519", str(tmp_path / "rx")]) == 0
    assert main(["jmix", "keygen", "--type", "ed25519", str(tmp_path / "sig")]) == 0
    capsys.readouterr()
    out = tmp_path / "study.zip"
    assert main(["jmix", "build", str(sample), "-o", str(out), "--receiver-id", "org:clinic-b",
                 "--encrypt-to", str(tmp_path / "rx.pub"), "--sign-key", str(tmp_path / "sig.key"),
                 "--assert-key", str(tmp_path / "sig.key")]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["study_uid"] == SAMPLE_STUDY_UID and built["instances"] == 15
    assert main(["jmix", "verify", str(out), "--key", str(tmp_path / "rx.key"),
                 "--jws-key", str(tmp_path / "sig.pub"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["valid"] and report["info"]["jws"].startswith("verified") and "workdir" not in report["info"]
    assert main(["jmix", "extract", str(out), "-o", str(tmp_path / "x"), "--key", str(tmp_path / "rx.key")]) == 0
    capsys.readouterr()
    assert len(list((tmp_path / "x/payload/dicom").iterdir())) == 15
    assert (tmp_path / "x/payload.encrypted").is_file() and (tmp_path / "x/manifest.json").is_file()
    # A wrong key: invalid, exit 1, the reason printed.
    assert main(["jmix", "keygen", "--type", "x25519", str(tmp_path / "other")]) == 0
    capsys.readouterr()
    assert main(["jmix", "verify", str(out), "--key", str(tmp_path / "other.key")]) == 1
    assert "did not decrypt" in capsys.readouterr().out
    key_text = (tmp_path / "rx.key").read_text().strip()
    assert len(base64.b64decode(key_text)) == 32
