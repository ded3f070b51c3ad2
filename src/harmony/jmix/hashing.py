"""SHA-256 of files and of a whole payload folder, always in chunks.

JMIX has two incompatible payload-hash constructions in the wild (see the
notes' section 6): the *structured* one that the spec text and jmix-php use, and
the *streamed* one of jmix-rs/jmix-js (and so Aurabox's Harmony).  We produce
either, selected by profile, and a verifier computes both and accepts either.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK = 1024 * 1024

STRUCTURED, STREAMED = "structured", "streamed"
ALGORITHMS = (STRUCTURED, STREAMED)


def sha256_file(path: Path | str) -> tuple[str, int]:
    """``(lowercase hex, size)`` of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def copy_hashing(src: Path | str, dst: Path | str) -> tuple[str, int]:
    """Copy *src* to *dst* byte for byte and hash on the way: one read of the data."""
    h = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(CHUNK):
            h.update(chunk)
            fout.write(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def prefixed(hexdigest: str) -> str:
    return f"sha256:{hexdigest}"


def parse_file_hash(value: str) -> str | None:
    """The hex digest in a files.json ``hash`` (``sha256:<hex>`` or bare 64-hex), else None."""
    v = value.strip()
    if v.lower().startswith("sha256:"):
        v = v[7:]
    if len(v) == 64 and all(c in "0123456789abcdefABCDEF" for c in v):
        return v.lower()
    return None


def walk(root: Path) -> tuple[list[str], list[str]]:
    """Relative ``/``-separated directory and file paths below *root*, unsorted.

    Symlinks are refused: an envelope holding one is never hashed or served.
    """
    dirs, files = [], []
    root = Path(root)
    for current, dirnames, filenames in os.walk(root):
        rel_dir = Path(current).relative_to(root)
        for d in dirnames:
            p = Path(current) / d
            if p.is_symlink():
                raise ValueError(f"symlink in payload: {(rel_dir / d).as_posix()}")
            dirs.append((rel_dir / d).as_posix())
        for name in filenames:
            p = Path(current) / name
            if p.is_symlink() or not p.is_file():
                raise ValueError(f"not a regular file in payload: {(rel_dir / name).as_posix()}")
            files.append((rel_dir / name).as_posix())
    return dirs, files


def _sort_key(rel: str) -> bytes:
    # PHP ksort and Rust's sort on paths agree with plain byte order for the
    # names envelopes hold (UIDs, ASCII); sorting on UTF-8 bytes keeps us exact.
    return rel.encode("utf-8")


def structured_hash(root: Path, known: dict[str, tuple[str, int]] | None = None) -> str:
    """The spec/jmix-php payload hash of the folder *root*.

    One line per entry sorted by relative path: ``dir:<rel>`` for folders and
    ``file:<rel>:<size>:<sha256hex>`` for files, each ending in ``\\n``; the
    result is the SHA-256 of the concatenation.  *known* maps relative paths to
    ``(hex, size)`` already computed while copying, to avoid re-reading them.
    """
    known = known or {}
    dirs, files = walk(root)
    entries = [(d, None) for d in dirs] + [(f, True) for f in files]
    entries.sort(key=lambda e: _sort_key(e[0]))
    h = hashlib.sha256()
    for rel, is_file in entries:
        if is_file is None:
            h.update(f"dir:{rel}\n".encode("utf-8"))
            continue
        digest, size = known.get(rel) or sha256_file(root / rel)
        h.update(f"file:{rel}:{size}:{digest}\n".encode("utf-8"))
    return prefixed(h.hexdigest())


def streamed_hash(root: Path) -> str:
    """The jmix-rs/jmix-js payload hash of the folder *root*.

    Files only, sorted by relative path; for each, the UTF-8 path, one ``\\n``
    and the raw bytes are fed to one SHA-256.
    """
    _, files = walk(root)
    files.sort(key=_sort_key)
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode("utf-8") + b"\n")
        with open(root / rel, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    return prefixed(h.hexdigest())


def payload_hash(root: Path, algorithm: str = STRUCTURED, known=None) -> str:
    if algorithm == STRUCTURED:
        return structured_hash(root, known)
    if algorithm == STREAMED:
        return streamed_hash(root)
    raise ValueError(f"unknown payload hash algorithm {algorithm!r}")
