"""JMIX cryptography: payload encryption, the manifest JWS, entity assertions.

Everything is done with the ``cryptography`` package.  Encryption streams: the
payload tar is written through :class:`PayloadEncryptor` chunk by chunk, and
:func:`decrypt_file` writes plaintext to a file that is accepted only after the
GCM tag has verified (streaming GCM releases plaintext before the check).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from harmony import jsonutil
from harmony.jmix.hashing import CHUNK

ALGORITHM = "AES-256-GCM"
IV_BYTES, TAG_BYTES, KEY_BYTES = 12, 16, 32


class CryptoError(ValueError):
    """A key that cannot be loaded, a signature or tag that does not verify."""


# --------------------------------------------------------------------------- keys

def _raw_or_text(data: bytes | str, want: int) -> bytes | None:
    """Raw key bytes from raw bytes, base64/base64url or hex text (jmix-rs key
    files are raw, jmix-php/js pass base64 strings)."""
    if isinstance(data, str):
        data = data.encode("ascii", "replace")
    text = data.strip()
    if len(text) in (2 * want, 4 * want) and all(c in b"0123456789abcdefABCDEF" for c in text):
        return binascii.unhexlify(text)
    if len(data) in (want, 2 * want):
        return data
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            raw = decode(text + b"=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            continue
        if len(raw) in (want, 2 * want):
            return raw
    return None


def _load(data, private: bool, cls_priv, cls_pub, label: str):
    if isinstance(data, (cls_priv, cls_pub)):
        return data
    if isinstance(data, Path):
        data = data.read_bytes()
    raw_bytes = data.encode() if isinstance(data, str) else data
    if b"-----BEGIN" in raw_bytes:
        try:
            key = (serialization.load_pem_private_key(raw_bytes, None) if private
                   else serialization.load_pem_public_key(raw_bytes))
        except ValueError as e:
            raise CryptoError(f"cannot load {label} PEM key: {e}") from None
        if not isinstance(key, cls_priv if private else cls_pub):
            raise CryptoError(f"PEM key is not an {label} key")
        return key
    raw = _raw_or_text(data, KEY_BYTES)
    if raw is None:
        raise CryptoError(f"{label} key must be 32 raw bytes, base64, hex or PEM")
    if len(raw) == 64:
        # A libsodium secret key is seed || public key.
        if not private:
            raise CryptoError(f"{label} public key must be 32 bytes")
        raw = raw[:32]
    return cls_priv.from_private_bytes(raw) if private else cls_pub.from_public_bytes(raw)


def x25519_private(data) -> X25519PrivateKey:
    return _load(data, True, X25519PrivateKey, X25519PublicKey, "X25519")


def x25519_public(data) -> X25519PublicKey:
    if isinstance(data, X25519PrivateKey):
        return data.public_key()
    return _load(data, False, X25519PrivateKey, X25519PublicKey, "X25519")


def ed25519_private(data) -> Ed25519PrivateKey:
    return _load(data, True, Ed25519PrivateKey, Ed25519PublicKey, "Ed25519")


def ed25519_public(data) -> Ed25519PublicKey:
    if isinstance(data, Ed25519PrivateKey):
        return data.public_key()
    return _load(data, False, Ed25519PrivateKey, Ed25519PublicKey, "Ed25519")


def raw_public(key) -> bytes:
    if hasattr(key, "public_key"):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def raw_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def fingerprint(key) -> str:
    """``SHA256:<lowercase hex of sha256(raw public key)>`` as jmix-rs writes it."""
    return "SHA256:" + hashlib.sha256(raw_public(key)).hexdigest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, what: str, length: int | None = None) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise CryptoError(f"{what} is not valid base64") from None
    if length is not None and len(raw) != length:
        raise CryptoError(f"{what} must be {length} bytes, got {len(raw)}")
    return raw


# --------------------------------------------------------------------------- encryption

def derive_key(private: X25519PrivateKey, peer_public: X25519PublicKey, info: bytes) -> bytes:
    # Rust passes no salt, PHP/JS an empty one: HMAC zero-pads, so they are equal.
    shared = private.exchange(peer_public)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


class PayloadEncryptor:
    """A write-only file object: plaintext in, ciphertext to *out*; tracks the
    SHA-256 of both sides so any profile's payload hash is available at the end."""

    def __init__(self, out, recipient_public, info: bytes, *, ephemeral: X25519PrivateKey | None = None,
                 iv: bytes | None = None):
        self._out = out
        self._ephemeral = ephemeral or X25519PrivateKey.generate()
        self.iv = iv if iv is not None else os.urandom(IV_BYTES)
        key = derive_key(self._ephemeral, x25519_public(recipient_public), info)
        self._enc = Cipher(algorithms.AES(key), modes.GCM(self.iv)).encryptor()
        self.plain_sha = hashlib.sha256()
        self.cipher_sha = hashlib.sha256()
        self.tag: bytes | None = None

    def write(self, data: bytes) -> int:
        self.plain_sha.update(data)
        ct = self._enc.update(data)
        self.cipher_sha.update(ct)
        self._out.write(ct)
        return len(data)

    def flush(self):
        pass

    def finish(self) -> dict:
        """Finalise; the manifest's ``security.encryption`` block."""
        tail = self._enc.finalize()
        if tail:
            self.cipher_sha.update(tail)
            self._out.write(tail)
        self.tag = self._enc.tag
        return {"algorithm": ALGORITHM, "ephemeral_public_key": b64(raw_public(self._ephemeral)),
                "iv": b64(self.iv), "auth_tag": b64(self.tag)}


def decrypt_file(src: Path, dst: Path, private_key, encryption: dict, infos) -> bytes:
    """Decrypt *src* into *dst*, trying each HKDF *info*; returns the one that verified.

    *dst* exists only if the tag verified: plaintext is written to a sibling
    temporary file and renamed after ``finalize()`` succeeds.
    """
    if encryption.get("algorithm") != ALGORITHM:
        raise CryptoError(f"unsupported encryption algorithm {encryption.get('algorithm')!r}")
    priv = x25519_private(private_key)
    eph = x25519_public(unb64(encryption.get("ephemeral_public_key", ""), "ephemeral_public_key", 32))
    iv = unb64(encryption.get("iv", ""), "iv")
    tag = unb64(encryption.get("auth_tag", ""), "auth_tag", TAG_BYTES)
    tmp = Path(str(dst) + ".part")
    for info in infos:
        key = derive_key(priv, eph, info)
        dec = Cipher(algorithms.AES(key), modes.GCM(iv, tag)).decryptor()
        try:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                while chunk := fin.read(CHUNK):
                    fout.write(dec.update(chunk))
                fout.write(dec.finalize())
        except InvalidTag:
            continue
        os.replace(tmp, dst)
        return info
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    raise CryptoError("payload did not decrypt: wrong key, or the ciphertext or tag was altered")


# --------------------------------------------------------------------------- JWS

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise CryptoError("JWS part is not base64url") from None


def jws_sign(payload: bytes, private_key) -> str:
    """Compact JWS (EdDSA/Ed25519, attached payload) over exactly *payload*.

    ``kid`` (the key fingerprint) is an extension: the spec names no key, and
    a verifier with several trusted keys can use it to pick one.
    """
    key = ed25519_private(private_key)
    header = {"alg": "EdDSA", "typ": "JWS", "crv": "Ed25519", "kid": fingerprint(key)}
    signing_input = _b64url(json.dumps(header, separators=(",", ":")).encode()) + "." + _b64url(payload)
    return signing_input + "." + _b64url(key.sign(signing_input.encode("ascii")))


def jws_verify(token: str, public_keys) -> tuple[bytes, str]:
    """Verify a compact EdDSA JWS against any of *public_keys*; ``(payload, fingerprint)``."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise CryptoError("JWS is not in compact form (three dot-separated parts)")
    try:
        header = jsonutil.loads(_unb64url(parts[0]))
    except ValueError:
        raise CryptoError("JWS header is not JSON") from None
    if not isinstance(header, dict) or header.get("alg") != "EdDSA":
        raise CryptoError(f"JWS alg must be EdDSA, got {header.get('alg') if isinstance(header, dict) else header!r}")
    signature = _unb64url(parts[2])
    signing_input = (parts[0] + "." + parts[1]).encode("ascii")
    for pk in public_keys:
        pub = ed25519_public(pk)
        try:
            pub.verify(signature, signing_input)
        except InvalidSignature:
            continue
        return _unb64url(parts[1]), fingerprint(pub)
    raise CryptoError("JWS signature does not verify with any trusted key")


# --------------------------------------------------------------------------- assertions

_MISSING = object()


def resolve_field(manifest: dict, path: str):
    """Value of a jmix-rs style dot-path (``sender.id``, ``receiver.0.name``,
    ``security.payload_hash``; ``manifest.id`` aliases ``id``) in *manifest*."""
    if path == "manifest.id":
        path = "id"
    node = manifest
    for seg in path.split("."):
        if seg == "assertion":
            raise CryptoError(f"signed field {path!r} reaches into an assertion")
        if isinstance(node, dict) and seg in node:
            node = node[seg]
        elif isinstance(node, list) and seg.isdigit() and int(seg) < len(node):
            node = node[int(seg)]
        else:
            raise CryptoError(f"signed field {path!r} does not resolve in the manifest")
    return _without_assertions(node)


def _without_assertions(node):
    # An assertion cannot sign itself: whole-entity fields are signed without it.
    if isinstance(node, dict):
        return {k: _without_assertions(v) for k, v in node.items() if k != "assertion"}
    if isinstance(node, list):
        return [_without_assertions(v) for v in node]
    return node


def canonical_fields(manifest: dict, signed_fields) -> bytes:
    """The bytes an assertion signs: ``{field: value}`` with sorted keys, compact
    separators and no escaping of non-ASCII (what jmix-rs and jmix-php sign)."""
    values = {f: resolve_field(manifest, f) for f in signed_fields}
    return json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def make_assertion(manifest: dict, private_key, signed_fields, *, key_reference: str | None = None,
                   expires_at: str | None = None) -> dict:
    key = ed25519_private(private_key)
    assertion = {
        "signing_key": {"alg": "Ed25519", "public_key": b64(raw_public(key)), "fingerprint": fingerprint(key)},
        "signed_fields": list(signed_fields),
        "signature": b64(key.sign(canonical_fields(manifest, signed_fields))),
    }
    if key_reference:
        assertion["key_reference"] = key_reference
    if expires_at:
        assertion["expires_at"] = expires_at
    return assertion


def verify_assertion(manifest: dict, assertion: dict, *, now: datetime.datetime | None = None,
                     trusted_fingerprints=None) -> str:
    """Check one assertion; returns its fingerprint or raises :class:`CryptoError`.

    The embedded key must match its fingerprint (compared case-insensitively:
    jmix-php writes upper-case hex) and, when *trusted_fingerprints* is given,
    be one of them; the signature must cover the named fields; and an
    ``expires_at`` in the past fails.
    """
    sk = assertion.get("signing_key") or {}
    if sk.get("alg") != "Ed25519":
        raise CryptoError(f"assertion alg must be Ed25519, got {sk.get('alg')!r}")
    pub = ed25519_public(unb64(sk.get("public_key", ""), "assertion public_key", 32))
    fp = fingerprint(pub)
    if str(sk.get("fingerprint", "")).lower() != fp.lower():
        raise CryptoError("assertion fingerprint does not match its public key")
    if trusted_fingerprints is not None and fp.lower() not in {t.lower() for t in trusted_fingerprints}:
        raise CryptoError(f"assertion key {fp} is not trusted")
    signature = unb64(assertion.get("signature", ""), "assertion signature", 64)
    try:
        pub.verify(signature, canonical_fields(manifest, assertion.get("signed_fields") or []))
    except InvalidSignature:
        raise CryptoError("assertion signature does not verify") from None
    expires = assertion.get("expires_at")
    if expires:
        when = parse_time(expires)
        if when <= (now or datetime.datetime.now(datetime.timezone.utc)):
            raise CryptoError(f"assertion expired at {expires}")
    return fp


def parse_time(text: str) -> datetime.datetime:
    t = text.strip()
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    value = datetime.datetime.fromisoformat(t)
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value
