"""Interoperability profiles: the choices the JMIX spec leaves open, fixed together.

The three reference libraries agree on the cryptography (X25519, HKDF-SHA256,
AES-256-GCM) but disagree on the HKDF ``info`` string, the encrypted file's
name, the tar entry prefix and what the payload hash covers, so ciphertext from
one does not open with another's settings (notes, section 7.2).  A profile pins
all of those at once so a deployment picks a peer, not five knobs.
"""

from __future__ import annotations

import attr

from harmony.jmix.hashing import STREAMED, STRUCTURED

#: What ``security.payload_hash`` covers when the payload is encrypted.
CIPHERTEXT, PLAINTEXT_TAR, PLAIN_DIRECTORY = "ciphertext", "plaintext-tar", "plain-directory"

ENCRYPTED_NAMES = ("payload.encrypted", "payload.enc")


@attr.s(frozen=True, auto_attribs=True)
class Profile:
    name: str
    #: Payload hash of an unencrypted envelope.
    hash_algorithm: str
    hkdf_info: bytes
    encrypted_name: str
    #: Prefix of entry names in the encrypted tar (jmix-js writes ``payload/...``).
    tar_prefix: str
    #: What the payload hash of an encrypted envelope covers.
    encrypted_hash: str


PROFILES = {
    # The spec text follows jmix-php: structured hash, hash of the ciphertext.
    "spec": Profile("spec", STRUCTURED, b"JMIX-payload-encryption", "payload.encrypted", "", CIPHERTEXT),
    # jmix-rs, and so Aurabox's Harmony proxy.
    "rs": Profile("rs", STREAMED, b"JMIX-AES256-GCM", "payload.enc", "", PLAINTEXT_TAR),
    "js": Profile("js", STREAMED, b"JMIX-Payload-Encryption", "payload.encrypted", "payload/", PLAIN_DIRECTORY),
}
PROFILES["php"] = PROFILES["spec"]

DEFAULT_PROFILE = "spec"

#: Every HKDF info string in use; a decrypting receiver tries each (a wrong one
#: fails the GCM tag, so trying is safe).
KNOWN_INFOS = tuple(dict.fromkeys(p.hkdf_info for p in PROFILES.values()))


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown JMIX profile {name!r} (known: {', '.join(sorted(PROFILES))})") from None
