"""Reading and validating a received envelope, layer by layer (notes, section 11).

1. archive safety (done while unpacking, :mod:`harmony.jmix.archive`),
2. structure, 3. JSON Schema (the spec's own schemas, unmodified, with format
checking on), 4. consistency, 5. integrity, 6. authenticity.

:func:`validate` never raises for a bad envelope: it returns a :class:`Report`
whose ``errors`` say what failed at which layer, so a CLI can print all of it
and an endpoint can answer 400 with it.  Warnings are what the spec leaves to
the receiver (a count that disagrees with ``instance_count``, say).
"""

from __future__ import annotations

import datetime
import functools
import json
import shutil
import tempfile
import uuid
from importlib import resources
from pathlib import Path

import attr
from jsonschema import Draft202012Validator

from harmony import jsonutil
from harmony.jmix import crypto
from harmony.jmix.archive import ArchiveError, Limits, _Budget, check_name, check_tree, extract, extract_tar
from harmony.jmix.dicom import DicomInputError, read_header
from harmony.jmix.hashing import parse_file_hash, prefixed, sha256_file, streamed_hash, structured_hash
from harmony.jmix.profiles import ENCRYPTED_NAMES, KNOWN_INFOS

ARCHIVE, STRUCTURE, SCHEMA, CONSISTENCY, INTEGRITY, AUTHENTICITY = (
    "archive", "structure", "schema", "consistency", "integrity", "authenticity")
SCHEMA_NAMES = ("manifest", "metadata", "files", "audit")


@functools.lru_cache(maxsize=None)
def schema_validator(name: str) -> Draft202012Validator:
    """A validator for the vendored ``<name>.schema.json`` with format checks on
    (``uuid``, ``date-time`` via rfc3339-validator, ``date``): in 2020-12
    ``format`` is only an annotation unless asked for."""
    text = resources.files("harmony.jmix").joinpath("schemas", f"{name}.schema.json").read_text("utf-8")
    schema = json.loads(text)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def schema_errors(name: str, document) -> list[str]:
    out = []
    for err in sorted(schema_validator(name).iter_errors(document), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        out.append(f"{name}.json {where}: {err.message}")
    return out


def is_uuid(value) -> bool:
    """A hyphenated UUID (the schema's ``uuid`` format; 32 bare hex digits fail)."""
    if not isinstance(value, str) or len(value) != 36:
        return False
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


@attr.s(auto_attribs=True)
class Report:
    errors: list = attr.Factory(list)
    warnings: list = attr.Factory(list)
    #: What was checked and how: ``payload_hash`` algorithm matched, ``decrypted``
    #: with which HKDF info, ``jws`` verified by which key, assertion fingerprints.
    info: dict = attr.Factory(dict)
    manifest: dict | None = None
    metadata: dict | None = None
    #: The envelope folder and, once decrypted, its plaintext payload folder.
    root: Path | None = None
    payload: Path | None = None
    #: ``relative path -> (sha256 hex, size)`` already computed, so the payload
    #: hash does not read every file a second time.
    digests: dict = attr.Factory(dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def envelope_id(self) -> str | None:
        return (self.manifest or {}).get("id")

    @property
    def study_uid(self) -> str | None:
        studies = (self.metadata or {}).get("studies")
        return studies.get("study_uid") if isinstance(studies, dict) else None

    def error(self, stage: str, message: str):
        self.errors.append((stage, message))

    def warn(self, stage: str, message: str):
        self.warnings.append((stage, message))

    def stages_failed(self) -> list[str]:
        return list(dict.fromkeys(s for s, _ in self.errors))

    def to_json(self) -> dict:
        return {"valid": self.ok, "id": self.envelope_id, "study_uid": self.study_uid,
                "errors": [{"stage": s, "message": m} for s, m in self.errors],
                "warnings": [{"stage": s, "message": m} for s, m in self.warnings],
                "info": {k: v for k, v in self.info.items() if k != "workdir"}}


@attr.s(auto_attribs=True)
class VerifyOptions:
    #: X25519 private key of this receiver, to decrypt encrypted payloads.
    private_key: object = None
    #: Ed25519 public keys trusted for ``manifest.jws``.
    jws_keys: list = attr.Factory(list)
    #: When set, assertion keys must have one of these fingerprints.
    trusted_fingerprints: list | None = None
    verify_assertions: bool = True
    #: Read every DICOM header to compare counts and study UIDs (layer 4).
    check_dicom: bool = True
    now: datetime.datetime | None = None
    limits: Limits = Limits()


def _load_json(path: Path, name: str, report: Report, stage: str = STRUCTURE):
    try:
        with open(path, "rb") as f:
            return jsonutil.loads(f.read())
    except FileNotFoundError:
        report.error(stage, f"{name} is missing")
    except (ValueError, UnicodeDecodeError) as e:
        report.error(stage, f"{name} is not valid JSON: {e}")
    return None


def _has_regular_file(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))


def validate(root: Path, options: VerifyOptions | None = None, workdir: Path | None = None) -> Report:
    """Validate the unpacked envelope at *root* (see the module docstring).

    An encrypted payload is decrypted (given a key) into *workdir* (default: a
    sibling temporary folder the caller must remove via :func:`discard`).
    """
    options = options or VerifyOptions()
    root = Path(root)
    report = Report(root=root)
    try:
        check_tree(root, options.limits)
    except ArchiveError as e:
        report.error(ARCHIVE, str(e))
        return report

    # -- 2. structure
    manifest = _load_json(root / "manifest.json", "manifest.json", report)
    if manifest is None:
        return report
    if not isinstance(manifest, dict):
        report.error(STRUCTURE, "manifest.json is not a JSON object")
        return report
    report.manifest = manifest
    if not is_uuid(manifest.get("id")):
        report.error(STRUCTURE, f"manifest id {manifest.get('id')!r} is not a UUID")
    receivers = manifest.get("receiver")
    if not isinstance(receivers, list) or not receivers:
        report.error(STRUCTURE, "manifest receiver must be a non-empty array")
    security = manifest.get("security") if isinstance(manifest.get("security"), dict) else {}
    encryption = security.get("encryption")
    encrypted_files = [root / n for n in ENCRYPTED_NAMES if (root / n).is_file()]
    payload = root / "payload"
    if encryption:
        if not encrypted_files:
            report.error(STRUCTURE, "security.encryption is set but neither payload.encrypted nor payload.enc exists")
        if payload.exists():
            report.error(STRUCTURE, "an encrypted envelope must not also carry a clear payload/ folder")
    elif encrypted_files:
        report.error(STRUCTURE, f"{encrypted_files[0].name} present but manifest has no security.encryption")
    elif not (payload / "metadata.json").is_file():
        report.error(STRUCTURE, "payload/metadata.json is missing")
    if not report.ok:
        return report

    # -- 3. schema (manifest and audit always; payload documents once readable)
    for err in schema_errors("manifest", manifest):
        report.error(SCHEMA, err)
    if (root / "audit.json").exists():
        audit = _load_json(root / "audit.json", "audit.json", report, SCHEMA)
        if audit is not None:
            for err in schema_errors("audit", audit):
                report.error(SCHEMA, err)
            entries = audit.get("audit") if isinstance(audit, dict) else None
            if isinstance(entries, list) and entries and isinstance(entries[0], dict) \
                    and entries[0].get("event") != "created":
                report.warn(CONSISTENCY, "the first audit event is not 'created'")
    else:
        report.warn(STRUCTURE, "audit.json is missing")

    cipher_sha = None
    tar_sha = None
    if encryption:
        cipher_sha = prefixed(sha256_file(encrypted_files[0])[0])
        if options.private_key is None:
            report.info["decrypted"] = False
        else:
            payload, tar_sha = _decrypt(root, encrypted_files[0], encryption, options, report, workdir)
            if payload is None:
                return _integrity(report, security, cipher_sha, None, None)
    report.payload = payload if payload.is_dir() else None

    files_doc = None
    if report.payload is not None:
        if _has_regular_file(payload / "files") and not (payload / "files.json").is_file():
            report.error(STRUCTURE, "payload/files/ holds files but payload/files.json is missing")
        metadata = _load_json(payload / "metadata.json", "payload/metadata.json", report)
        if metadata is not None:
            report.metadata = metadata if isinstance(metadata, dict) else None
            for err in schema_errors("metadata", metadata):
                report.error(SCHEMA, err)
        if (payload / "files.json").is_file():
            files_doc = _load_json(payload / "files.json", "payload/files.json", report)
            if files_doc is not None:
                for err in schema_errors("files", files_doc):
                    report.error(SCHEMA, err)
        if report.ok:
            _consistency(report, payload, files_doc, options)
    _integrity(report, security, cipher_sha, tar_sha, report.payload)
    _authenticity(report, root, manifest, options)
    return report


def _decrypt(root, encrypted: Path, encryption, options, report, workdir):
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=".decrypt-", dir=root.parent))
    work.mkdir(parents=True, exist_ok=True)
    report.info["workdir"] = str(work)
    tar_path = work / "payload.tar"
    # payload.enc is jmix-rs's name: try its info string first.
    infos = sorted(KNOWN_INFOS, key=lambda i: i != b"JMIX-AES256-GCM") if encrypted.name == "payload.enc" \
        else list(KNOWN_INFOS)
    try:
        used = crypto.decrypt_file(encrypted, tar_path, options.private_key, encryption, infos)
    except crypto.CryptoError as e:
        report.error(INTEGRITY, f"decryption failed: {e}")
        return None, None
    report.info["decrypted"] = True
    report.info["hkdf_info"] = used.decode()
    out = work / "payload"
    out.mkdir()
    try:
        extract_tar(tar_path, out, _Budget(options.limits), mode="r:", strip_prefix="payload/")
    except ArchiveError as e:
        report.error(ARCHIVE, f"decrypted payload: {e}")
        return None, None
    tar_sha = prefixed(sha256_file(tar_path)[0])
    tar_path.unlink()
    return out, tar_sha


def discard(report: Report) -> None:
    """Remove the decryption work folder :func:`validate` made, if any."""
    work = report.info.pop("workdir", None)
    if work:
        shutil.rmtree(work, ignore_errors=True)


def _safe_rel(payload: Path, rel) -> Path | None:
    if not isinstance(rel, str):
        return None
    try:
        return payload.joinpath(*check_name(rel).parts)
    except ArchiveError:
        return None


def _consistency(report: Report, payload: Path, files_doc, options: VerifyOptions):
    manifest, metadata = report.manifest, report.metadata or {}
    if metadata.get("id") != manifest.get("id"):
        report.warn(CONSISTENCY, "metadata.id differs from manifest.id")
    listed = set()
    for entry in files_doc or []:
        rel = entry.get("file")
        path = _safe_rel(payload, rel)
        if path is None:
            report.error(CONSISTENCY, f"files.json entry {rel!r} is not a safe relative path")
            continue
        listed.add(Path(rel).as_posix())
        if not path.is_file():
            report.error(CONSISTENCY, f"files.json lists {rel!r}, which is missing")
            continue
        need_hash = entry.get("hash") is not None
        if need_hash or "size_bytes" in entry:
            if need_hash:
                digest, size = report.digests[Path(rel).as_posix()] = sha256_file(path)
            else:
                digest, size = None, path.stat().st_size
            if "size_bytes" in entry and entry["size_bytes"] != size:
                report.error(CONSISTENCY, f"{rel}: size {size} differs from files.json ({entry['size_bytes']})")
            if need_hash:
                expected = parse_file_hash(str(entry["hash"]))
                if expected is None:
                    report.warn(CONSISTENCY, f"{rel}: files.json hash is not SHA-256; not checked")
                elif expected != digest:
                    report.error(CONSISTENCY, f"{rel}: SHA-256 differs from files.json")
    files_dir = payload / "files"
    if files_dir.is_dir():
        for p in sorted(files_dir.rglob("*")):
            rel = p.relative_to(payload).as_posix()
            if p.is_file() and rel not in listed:
                report.error(CONSISTENCY, f"{rel} is not listed in files.json")
    report_file = (metadata.get("report") or {}).get("file") if isinstance(metadata.get("report"), dict) else None
    if report_file is not None:
        path = _safe_rel(payload, report_file)
        if path is None or not path.is_file():
            report.error(CONSISTENCY, f"metadata report.file {report_file!r} does not exist in the payload")
    if options.check_dicom:
        _dicom_consistency(report, payload, metadata)


def _dicom_consistency(report: Report, payload: Path, metadata: dict):
    dicom = payload / "dicom"
    if not dicom.is_dir():
        return
    studies = metadata.get("studies") if isinstance(metadata.get("studies"), dict) else {}
    study_uid = studies.get("study_uid")
    counts: dict[str, set] = {}
    other_study = 0
    for p in sorted(dicom.rglob("*")):
        if not p.is_file():
            continue
        try:
            h = read_header(p)
        except DicomInputError as e:
            report.warn(CONSISTENCY, f"{p.relative_to(payload).as_posix()}: {e}")
            continue
        counts.setdefault(h.series_uid, set()).add(h.sop_uid)
        if study_uid and h.study_uid != study_uid:
            other_study += 1
    if other_study:
        report.warn(CONSISTENCY, f"{other_study} DICOM file(s) carry another StudyInstanceUID than metadata")
    for s in studies.get("series") or []:
        if not isinstance(s, dict):
            continue
        found = len(counts.get(s.get("series_uid"), ()))
        if "instance_count" in s and s["instance_count"] != found:
            report.warn(CONSISTENCY, f"series {s.get('series_uid')}: instance_count {s['instance_count']}, "
                                     f"{found} DICOM file(s) found")
    listed = {s.get("series_uid") for s in studies.get("series") or [] if isinstance(s, dict)}
    for uid in sorted(set(counts) - listed):
        report.warn(CONSISTENCY, f"series {uid} has DICOM files but no metadata entry")
    report.info["dicom_instances"] = sum(len(v) for v in counts.values())


def _integrity(report: Report, security: dict, cipher_sha, tar_sha, payload: Path | None) -> Report:
    expected = security.get("payload_hash")
    if not expected:
        report.warn(INTEGRITY, "manifest has no security.payload_hash; payload integrity not checked")
        return report
    expected = str(expected).lower()
    candidates = []
    if cipher_sha:
        candidates.append(("ciphertext", lambda: cipher_sha))
    if tar_sha:
        candidates.append(("plaintext-tar", lambda: tar_sha))
    if payload is not None:
        candidates.append(("structured", lambda: structured_hash(payload, report.digests)))
        candidates.append(("streamed", lambda: streamed_hash(payload)))
    if not candidates:
        report.info["payload_hash"] = "unchecked (encrypted, no key)"
        return report
    for name, compute in candidates:
        try:
            value = compute()
        except ValueError as e:
            report.error(INTEGRITY, f"cannot hash payload: {e}")
            return report
        if value == expected:
            report.info["payload_hash"] = name
            return report
    if cipher_sha and payload is None and not tar_sha:
        # Only the ciphertext form is checkable without the key.
        report.info["payload_hash"] = "unchecked (encrypted, no key; not a ciphertext hash)"
        return report
    report.error(INTEGRITY, "payload_hash does not match the payload under any known algorithm")
    return report


def _authenticity(report: Report, root: Path, manifest: dict, options: VerifyOptions):
    security = manifest.get("security") if isinstance(manifest.get("security"), dict) else {}
    jws_ref = (security.get("jws") or {}).get("jws_file") if isinstance(security.get("jws"), dict) else None
    jws_path = None
    if jws_ref:
        jws_path = _safe_rel(root, jws_ref)
        if jws_path is None or not jws_path.is_file():
            report.error(AUTHENTICITY, f"security.jws names {jws_ref!r}, which is missing")
            jws_path = None
    elif (root / "manifest.jws").is_file():
        jws_path = root / "manifest.jws"
    if jws_path is not None:
        if not options.jws_keys:
            report.info["jws"] = "present, not verified (no trusted key given)"
        else:
            try:
                signed, fp = crypto.jws_verify(jws_path.read_text("ascii", "replace"), options.jws_keys)
            except crypto.CryptoError as e:
                report.error(AUTHENTICITY, f"manifest.jws: {e}")
            else:
                raw = (root / "manifest.json").read_bytes()
                try:
                    same = signed == raw or jsonutil.loads(signed) == manifest
                except ValueError:
                    same = False
                if same:
                    report.info["jws"] = f"verified ({fp})"
                else:
                    report.error(AUTHENTICITY, "manifest.jws is validly signed but not over this manifest.json")
    if not options.verify_assertions:
        return
    roles = [("sender", manifest.get("sender")), ("requester", manifest.get("requester"))]
    roles += [(f"receiver.{i}", r) for i, r in enumerate(manifest.get("receiver") or [])]
    verified = {}
    for role, entity in roles:
        if not isinstance(entity, dict) or "assertion" not in entity:
            continue
        try:
            verified[role] = crypto.verify_assertion(manifest, entity["assertion"], now=options.now,
                                                     trusted_fingerprints=options.trusted_fingerprints)
        except (crypto.CryptoError, AttributeError, TypeError) as e:
            report.error(AUTHENTICITY, f"{role} assertion: {e}")
    if verified:
        report.info["assertions"] = verified


def open_envelope(path: Path, workdir: Path, options: VerifyOptions | None = None) -> Report:
    """Unpack (if an archive) and validate *path* into *workdir*; one call for
    "is this upload acceptable".  Archive-safety failures come back as errors."""
    options = options or VerifyOptions()
    path = Path(path)
    if path.is_dir():
        return validate(path, options)
    try:
        root = extract(path, Path(workdir) / "envelope", options.limits)
    except ArchiveError as e:
        report = Report()
        report.error(ARCHIVE, str(e))
        return report
    return validate(root, options, workdir=Path(workdir) / "decrypted")

