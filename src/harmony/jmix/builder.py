"""Build a JMIX envelope folder from the DICOM files of one study.

The order matters and follows the notes (section 4): copy and hash the
instances, write ``metadata.json``, write ``files.json``, compute the payload
hash (it covers ``files.json``), encrypt if asked, then make assertions (they
bind the final payload hash), then serialise the manifest and sign exactly those
bytes with the JWS.  Data is streamed file by file; a study is never in memory.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tarfile
import uuid
from pathlib import Path

import attr

from harmony.jmix import crypto
from harmony.jmix.dicom import DicomInputError, InstanceHeader, build_metadata, read_header
from harmony.jmix.hashing import copy_hashing, payload_hash, prefixed, sha256_file, streamed_hash
from harmony.jmix.profiles import CIPHERTEXT, DEFAULT_PROFILE, PLAINTEXT_TAR, get_profile

SPEC_VERSION = "1.0"
JWS_FILE = "manifest.jws"
DEFAULT_SENDER_ID = "org:harmony-proxy"
#: The schema needs at least one receiver; when nobody is configured we say so
#: explicitly instead of emitting the empty array jmix-rs writes.
UNSPECIFIED_RECEIVER_ID = "urn:jmix:receiver:unspecified"


def utc_now() -> str:
    """``YYYY-MM-DDTHH:MM:SSZ``, whole seconds in UTC, as jmix-rs writes it."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@attr.s(auto_attribs=True, frozen=True)
class Entity:
    id: str
    name: str | None = None
    #: A string, or a ``{"system", "value"}`` ContactPoint.
    contact: object = None

    def to_json(self) -> dict:
        out: dict = {"id": self.id}
        if self.name:
            out["name"] = self.name
        if self.contact:
            out["contact"] = self.contact
        return out

    @classmethod
    def from_json(cls, doc: dict) -> "Entity":
        return cls(doc["id"], doc.get("name"), doc.get("contact"))


@attr.s(auto_attribs=True, frozen=True)
class AssertionSpec:
    """Who signs an entity assertion, and over which manifest fields.

    ``signed_fields=None`` signs the role's ``id`` and ``name`` (when present),
    the envelope ``id``, ``timestamp`` and ``security.payload_hash`` (when
    present), so an assertion binds the payload too.
    """

    key: object
    signed_fields: tuple | None = None
    key_reference: str | None = None
    expires_at: str | None = None


@attr.s(auto_attribs=True)
class BuildOptions:
    sender: Entity = Entity(DEFAULT_SENDER_ID, "Harmony Proxy")
    requester: Entity | None = None
    receivers: list = attr.Factory(lambda: [Entity(UNSPECIFIED_RECEIVER_ID)])
    classification: str | None = "confidential"
    #: ``spec`` (default), ``rs`` (jmix-rs / Aurabox Harmony peers) or ``js``.
    profile: str = DEFAULT_PROFILE
    #: Leave per-file hashes out of files.json and, for an unencrypted payload,
    #: leave ``payload_hash`` out rather than write the schema-invalid
    #: ``sha256:skipped`` jmix-rs does.
    skip_hashing: bool = False
    #: List only ``metadata.json`` in files.json.
    skip_listing: bool = False
    #: X25519 public key of the recipient: encrypts the payload when set.
    recipient_public_key: object = None
    #: Ed25519 private key: writes ``manifest.jws`` when set.
    jws_key: object = None
    #: Role (``sender``, ``requester``, ``receiver.0`` ...) -> AssertionSpec.
    assertions: dict = attr.Factory(dict)
    extensions: dict | None = None
    envelope_id: str | None = None
    timestamp: str | None = None


@attr.s(auto_attribs=True)
class BuildResult:
    envelope_id: str
    root: Path
    study_uid: str
    timestamp: str
    manifest: dict
    instance_count: int
    payload_bytes: int


class BuildError(ValueError):
    pass


def iter_dicom_files(sources):
    """Files from *sources* (files or folders, walked recursively in name order)."""
    for src in sources:
        src = Path(src)
        if src.is_dir():
            for current, dirnames, filenames in os.walk(src):
                dirnames.sort()
                for name in sorted(filenames):
                    p = Path(current) / name
                    if p.is_file() and not p.is_symlink() and not name.startswith("."):
                        yield p
        elif src.is_file():
            yield src
        else:
            raise BuildError(f"{src}: no such file or folder")


def read_headers(sources) -> list[InstanceHeader]:
    """Headers of the distinct instances in *sources* (first file wins per SOPInstanceUID)."""
    seen: dict[str, InstanceHeader] = {}
    for path in iter_dicom_files(sources):
        h = read_header(path)
        seen.setdefault(h.sop_uid, h)
    if not seen:
        raise BuildError("no DICOM files to package")
    return list(seen.values())


def _write_json(path: Path, doc) -> None:
    with open(path, "x", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _tar_filter(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # Nothing about the sender's machine (user names, ids) leaks into the tar.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _encrypt_payload(payload: Path, out: Path, profile, recipient) -> tuple[dict, str | None, str]:
    """Tar *payload* through the encryptor into *out*; ``(encryption block, hash, plaintext tar sha)``."""
    with open(out, "xb") as f:
        enc = crypto.PayloadEncryptor(f, recipient, profile.hkdf_info)
        # typeshed wants a seekable, readable file for any mode; the stream mode "w|" only writes.
        with tarfile.open(fileobj=enc, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for child in sorted(payload.iterdir()):
                tar.add(child, arcname=profile.tar_prefix + child.name, filter=_tar_filter)
        block = enc.finish()
    return block, prefixed(enc.cipher_sha.hexdigest()), prefixed(enc.plain_sha.hexdigest())


def _entity(manifest: dict, role: str) -> dict:
    """The live entity dict for ``sender``, ``requester`` or ``receiver.N``."""
    head, _, index = role.partition(".")
    node = manifest.get(head)
    if index:
        node = node[int(index)] if isinstance(node, list) and index.isdigit() and int(index) < len(node) else None
    if not isinstance(node, dict) or head not in ("sender", "requester", "receiver"):
        raise BuildError(f"assertion role {role!r} names no entity in the manifest")
    return node


def default_signed_fields(manifest: dict, role: str) -> list[str]:
    entity = _entity(manifest, role)
    fields = [f"{role}.id"] + ([f"{role}.name"] if "name" in entity else [])
    fields += ["id", "timestamp"]
    if "payload_hash" in manifest.get("security", {}):
        fields.append("security.payload_hash")
    return fields


def build_envelope(sources, workdir: Path, options: BuildOptions | None = None,
                   headers: list[InstanceHeader] | None = None) -> BuildResult:
    """Build ``<workdir>/<id>/`` (manifest.json, audit.json, payload/ or the
    encrypted payload file, manifest.jws) from DICOM files or folders."""
    options = options or BuildOptions()
    profile = get_profile(options.profile)
    if not options.receivers:
        raise BuildError("at least one receiver is required (the schema demands it)")
    headers = headers if headers is not None else read_headers(sources)
    env_id = options.envelope_id or str(uuid.uuid4())
    if str(uuid.UUID(env_id)) != env_id:
        raise BuildError(f"envelope id {env_id!r} is not a lower-case hyphenated UUID")
    timestamp = options.timestamp or utc_now()
    metadata = build_metadata(headers, env_id, timestamp, SPEC_VERSION)  # checks one study

    root = Path(workdir) / env_id
    root.mkdir(parents=True)
    try:
        payload = root / "payload"
        (payload / "dicom").mkdir(parents=True)
        known: dict[str, tuple[str, int]] = {}
        total = 0
        for h in headers:
            rel = f"dicom/{h.sop_uid}.dcm"
            known[rel] = copy_hashing(h.path, payload / rel)
            total += known[rel][1]
        _write_json(payload / "metadata.json", metadata)
        known["metadata.json"] = sha256_file(payload / "metadata.json")
        listed = ["metadata.json"] + ([] if options.skip_listing else sorted(k for k in known if k != "metadata.json"))
        files_doc = []
        for rel in listed:
            entry: dict = {"file": rel}
            if not options.skip_hashing:
                entry["hash"] = prefixed(known[rel][0])
            entry["size_bytes"] = known[rel][1]
            files_doc.append(entry)
        _write_json(payload / "files.json", files_doc)

        security: dict = {}
        if options.classification:
            security["classification"] = options.classification
        if options.recipient_public_key is not None:
            plain_dir_hash = None
            if profile.encrypted_hash not in (CIPHERTEXT, PLAINTEXT_TAR) and not options.skip_hashing:
                plain_dir_hash = streamed_hash(payload)
            block, cipher_hash, tar_hash = _encrypt_payload(
                payload, root / profile.encrypted_name, profile, options.recipient_public_key)
            shutil.rmtree(payload)
            # The ciphertext and tar hashes came for free while streaming.
            security["payload_hash"] = {CIPHERTEXT: cipher_hash, PLAINTEXT_TAR: tar_hash}.get(
                profile.encrypted_hash, plain_dir_hash)
            if security["payload_hash"] is None:
                del security["payload_hash"]
            security["encryption"] = block
        elif not options.skip_hashing:
            known["files.json"] = sha256_file(payload / "files.json")
            security["payload_hash"] = payload_hash(payload, profile.hash_algorithm, known)

        manifest: dict = {"version": SPEC_VERSION, "id": env_id, "timestamp": timestamp,
                          "sender": options.sender.to_json()}
        if options.requester is not None:
            manifest["requester"] = options.requester.to_json()
        manifest["receiver"] = [r.to_json() for r in options.receivers]
        if options.jws_key is not None:
            security["jws"] = {"jws_file": JWS_FILE}
        if security:
            manifest["security"] = security
        if options.extensions:
            manifest["extensions"] = options.extensions
        # Assertions last (but before the JWS): they bind the final payload hash.
        signatures = {}
        for role, spec in options.assertions.items():
            fields = list(spec.signed_fields or default_signed_fields(manifest, role))
            signatures[role] = crypto.make_assertion(manifest, spec.key, fields, key_reference=spec.key_reference,
                                                     expires_at=spec.expires_at)
        for role, assertion in signatures.items():
            _entity(manifest, role)["assertion"] = assertion
        manifest_bytes = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        with open(root / "manifest.json", "xb") as f:
            f.write(manifest_bytes)
        if options.jws_key is not None:
            (root / JWS_FILE).write_text(crypto.jws_sign(manifest_bytes, options.jws_key) + "\n")
        by = {"id": options.sender.id}
        if options.sender.name:
            by["name"] = options.sender.name
        _write_json(root / "audit.json", {"audit": [{"event": "created", "by": by, "timestamp": timestamp}]})
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return BuildResult(env_id, root, metadata["studies"]["study_uid"], timestamp, manifest,
                       len(headers), total)


__all__ = ["AssertionSpec", "BuildError", "BuildOptions", "BuildResult", "DicomInputError", "Entity",
           "build_envelope", "iter_dicom_files", "read_headers", "utc_now"]
