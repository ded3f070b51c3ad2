"""Keyed pseudonyms: the same input and secret always give the same output.

Why keyed hashing rather than a mapping table: two Harmony nodes, a restarted
node, or a node a year later, holding the same secret, replace the same
original UID, date or Patient ID identically - so studies de-identified apart
still link up, and references inside sequences stay consistent - with no
shared state to keep, back up or leak.  Without the secret the originals
cannot be recovered or confirmed by guessing (HMAC-SHA-256, not a bare hash,
so a dictionary of likely Patient IDs is useless to an attacker).

Every derivation uses its own domain label, so a UID and a Patient ID that
happen to be equal strings never give related pseudonyms.
"""

from __future__ import annotations

import base64
import csv
import datetime
import hashlib
import hmac
import os
import secrets
from pathlib import Path

MIN_SECRET_BYTES = 16


class KeyError_(ValueError):
    """The secret file is missing, unreadable or too short (message names the file)."""


def generate_secret_file(path: Path) -> Path:
    """Write a new random secret (64 hex characters) readable by the owner only."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


def read_secret(path: Path) -> bytes:
    path = Path(path)
    try:
        data = path.read_bytes().strip()
    except OSError as e:
        raise KeyError_(f"{path}: cannot read the de-identification secret ({e.strerror})") from None
    if len(data) < MIN_SECRET_BYTES:
        raise KeyError_(f"{path}: the de-identification secret must be at least {MIN_SECRET_BYTES} bytes")
    return data


class Keyring:
    """The derivations of one secret."""

    def __init__(self, secret: bytes, *, date_shift_max_days: int = 3650):
        if len(secret) < MIN_SECRET_BYTES:
            raise KeyError_(f"the de-identification secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        self.date_shift_max_days = max(1, int(date_shift_max_days))
        self._uids: dict[str, str] = {}

    def digest(self, domain: str, value: str) -> bytes:
        return hmac.new(self._secret, domain.encode() + b"\0" + value.encode("utf-8", "surrogateescape"),
                        hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """``2.25.`` + a version-8 (custom) UUID: PS3.5 B.2 form, at most 44 characters.  Its 122 free
        bits are 90 bits of the keyed hash of the original and a 32-bit keyed check of those, so
        :meth:`is_ours_uid` recognises Harmony's own pseudonyms (and never hashes them twice)."""
        cached = self._uids.get(original)
        if cached is not None:
            return cached
        h = int.from_bytes(self.digest("uid", original)[:12], "big") >> 6  # 90 bits
        payload = (h << 32) | self._uid_check(h)
        value = ((payload >> 74) << 80) | (0x8 << 76) | (((payload >> 62) & 0xFFF) << 64) | (0b10 << 62) \
            | (payload & ((1 << 62) - 1))
        new = "2.25." + str(value)
        if len(self._uids) > 200_000:  # a bound for long-running processes; recomputing is cheap
            self._uids.clear()
        self._uids[original] = new
        return new

    def _uid_check(self, h: int) -> int:
        return int.from_bytes(self.digest("uid-check", str(h))[:4], "big")

    def is_ours_uid(self, uid: str) -> bool:
        """True for a UID this secret made (a random UID passes by chance once in 2**32)."""
        if not isinstance(uid, str) or not uid.startswith("2.25.") or not uid[5:].isdigit():
            return False
        value = int(uid[5:])
        if value >> 128 or (value >> 76) & 0xF != 0x8 or (value >> 62) & 0b11 != 0b10:
            return False
        payload = ((value >> 80) << 74) | (((value >> 64) & 0xFFF) << 62) | (value & ((1 << 62) - 1))
        return payload & 0xFFFFFFFF == self._uid_check(payload >> 32)

    def token(self, domain: str, value: str, length: int = 16) -> str:
        """A short upper-case base32 token (no padding), e.g. for pseudonymous IDs."""
        return base64.b32encode(self.digest(domain, value)).decode("ascii").rstrip("=")[:length]

    def patient_pseudonym(self, patient_key: str) -> str:
        """``PAT`` + 16 base32 characters of the keyed hash + a 4-character keyed check (23 in all)."""
        body = self.token("patient", patient_key, 16)
        return "PAT" + body + self.token("patient-check", body, 4)

    def is_ours_patient(self, value: str) -> bool:
        value = str(value or "").strip()
        return len(value) == 23 and value.startswith("PAT") and \
            self.token("patient-check", value[3:19], 4) == value[19:]

    def date_shift(self, patient_key: str) -> datetime.timedelta:
        """The per-patient shift: 1 to ``date_shift_max_days`` days into the past (whole days, so
        times of day and intervals between a patient's events are kept)."""
        n = int.from_bytes(self.digest("date", patient_key)[:8], "big")
        return datetime.timedelta(days=-(1 + n % self.date_shift_max_days))


class LookupTable:
    """A project's own pseudonyms: CSV with a header naming ``PatientID`` and ``Pseudonym``
    (optionally ``PseudonymName``).  Loaded once; the file names the offending line on error."""

    def __init__(self, rows: dict[str, tuple[str, str | None]], path: Path | None = None):
        self.rows = rows
        self.path = path

    @classmethod
    def load(cls, path: Path) -> "LookupTable":
        path = Path(path)
        rows: dict[str, tuple[str, str | None]] = {}
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                fields = set(reader.fieldnames or ())
                if not {"PatientID", "Pseudonym"} <= fields:
                    raise ValueError(f"{path}: the header must name PatientID and Pseudonym columns")
                for n, row in enumerate(reader, start=2):
                    pid, pseudo = (row.get("PatientID") or "").strip(), (row.get("Pseudonym") or "").strip()
                    if not pid or not pseudo or len(pseudo) > 64:
                        raise ValueError(f"{path}:{n}: needs a PatientID and a Pseudonym of at most 64 characters")
                    rows[pid] = (pseudo, (row.get("PseudonymName") or "").strip() or None)
        except OSError as e:
            raise ValueError(f"{path}: cannot read the lookup table ({e.strerror})") from None
        return cls(rows, path)

    def get(self, patient_id: str):
        return self.rows.get(patient_id)

    def is_pseudonym(self, value: str) -> bool:
        if not hasattr(self, "_pseudonyms"):
            self._pseudonyms = {p for p, _ in self.rows.values()}
        return str(value or "").strip() in self._pseudonyms
