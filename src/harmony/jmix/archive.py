"""Packing envelopes as zip / tar.gz, and unpacking untrusted ones safely.

Packing puts entries at the archive root (as Aurabox's Harmony does).  Unpacking
is the first validation layer: every entry name is checked before anything is
written (no absolute paths, no ``..``, no backslashes or drive letters), links
and special files are refused, and entry count and uncompressed bytes are
capped - the declared sizes up front and the actual bytes while writing, so a
zip bomb that lies about its sizes is stopped too.  Entries are written by our
own code, never by ``extractall``.

Hostile archives are refused before they cost anything (issue 12, defects 17
and 18): a zip's entry count is read from its end-of-central-directory record
before the central directory itself is parsed (100,000 entries are refused in
microseconds, not after 45 s of creating files), and the central directory's
declared sizes - and the manifest's presence - are checked before a byte is
written.  The unpacked total may not exceed ``max_ratio`` times the archive's
own size (with a floor, ``ratio_floor_bytes``, so small, very compressible
envelopes still open), counted on the actual bytes written and, for tar.gz, on
the decompressed stream itself, so a lying bomb stops at the cap too.
"""

from __future__ import annotations

import gzip
import os
import stat
import struct
import tarfile
import time
import uuid
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Literal

import attr

from harmony.jmix.hashing import CHUNK

ZIP, TAR_GZ = "zip", "tar.gz"
MEDIA_TYPES = {ZIP: "application/zip", TAR_GZ: "application/gzip"}
SUFFIXES = {ZIP: ".zip", TAR_GZ: ".tar.gz"}
#: The tar modes extract_tar reads (tarfile's stubs want the literal mode).
TarReadMode = Literal["r:", "r:gz", "r|", "r|gz"]


class ArchiveError(ValueError):
    """An archive that is malformed or unsafe; the message says which entry and why."""


@attr.s(auto_attribs=True, frozen=True)
class Limits:
    """Caps for unpacking an untrusted archive; defaults sized for real studies.

    A large CT or MR study is a few thousand to ~15,000 instances (thin-slice
    multi-phase CT is the high end) and a few GiB; stored DICOM compresses ~1-3x
    with deflate, ~10x at the very most for padded images.  So 20,000 entries,
    16 GiB, 4 GiB per file and a 100x ratio (above 256 MiB) leave room for every
    real study while a bomb is stopped at a small multiple of its upload.
    """

    max_entries: int = 20_000
    max_total_bytes: int = 16 * 1024 ** 3
    max_file_bytes: int = 4 * 1024 ** 3
    #: Unpacked bytes may be at most this many times the archive's size ...
    max_ratio: int = 100
    #: ... or this many bytes, whichever is more.
    ratio_floor_bytes: int = 256 * 1024 ** 2

    def allowed_total(self, archive_bytes: int) -> int:
        """What an archive of *archive_bytes* may unpack to in all."""
        return min(self.max_total_bytes, max(archive_bytes * self.max_ratio, self.ratio_floor_bytes))


# --------------------------------------------------------------------------- packing

def _entries(root: Path):
    """``(path, arcname)`` for every folder and file below *root*, sorted, folders first."""
    out = []
    for current, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(current).relative_to(root)
        for d in dirnames:
            out.append((Path(current) / d, (rel / d).as_posix() + "/"))
        for f in sorted(filenames):
            p = Path(current) / f
            if p.is_symlink():
                raise ArchiveError(f"refusing to pack symlink {(rel / f).as_posix()}")
            out.append((p, (rel / f).as_posix()))
    # manifest first: a reader streaming the zip sees the manifest before the payload.
    out.sort(key=lambda e: (e[1] != "manifest.json", e[1]))
    return out


def pack_zip(root: Path, out: Path, *, compress_dicom: bool = False) -> Path:
    """Zip the envelope folder *root* into *out* (written to ``out.part`` then renamed).

    DICOM files are stored by default: most pixel data is already compressed or
    compresses poorly for the CPU it costs, and stored entries serve fastest.
    """
    root, out = Path(root), Path(out)
    tmp = out.with_name(out.name + ".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for path, arcname in _entries(root):
            if arcname.endswith("/"):
                zf.write(path, arcname)
                continue
            stored = arcname.endswith(".dcm") and not compress_dicom or arcname.startswith(
                ("payload.enc", "payload.encrypted"))
            zf.write(path, arcname, compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
    os.replace(tmp, out)
    return out


def pack_targz(root: Path, out: Path, compresslevel: int = 6) -> Path:
    root, out = Path(root), Path(out)
    tmp = out.with_name(out.name + ".part")
    with tarfile.open(tmp, "w:gz", compresslevel=compresslevel, format=tarfile.PAX_FORMAT) as tar:
        for path, arcname in _entries(root):
            info = tar.gettarinfo(str(path), arcname.rstrip("/"))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    os.replace(tmp, out)
    return out


def pack(root: Path, out: Path, fmt: str = ZIP) -> Path:
    if fmt == ZIP:
        return pack_zip(root, out)
    if fmt == TAR_GZ:
        return pack_targz(root, out)
    raise ValueError(f"unknown archive format {fmt!r}")


def zip_to_targz(zip_path: Path, out: Path) -> Path:
    """Re-pack a stored (trusted) zip as tar.gz without unpacking it to disk."""
    # A unique temporary name: two requests may convert the same envelope at once.
    tmp = Path(out).with_name(f"{Path(out).name}.{uuid.uuid4().hex}.part")
    with zipfile.ZipFile(zip_path) as zf, tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for info in zf.infolist():
            ti = tarfile.TarInfo(info.filename.rstrip("/"))
            ti.mtime = int(time.mktime(info.date_time + (0, 0, -1)))
            if info.is_dir():
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(ti)
            else:
                ti.size, ti.mode = info.file_size, 0o644
                with zf.open(info) as f:
                    tar.addfile(ti, f)
    os.replace(tmp, out)
    return Path(out)


# --------------------------------------------------------------------------- unpacking

def check_name(name: str) -> PurePosixPath:
    """The relative path an entry may be written to, or :class:`ArchiveError`."""
    if not name or "\x00" in name:
        raise ArchiveError("entry with an empty or NUL-containing name")
    if "\\" in name:
        raise ArchiveError(f"entry {name!r}: backslashes are not allowed in names")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"entry {name!r}: absolute paths are not allowed")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ArchiveError(f"entry {name!r}: '..' is not allowed")
    if not parts:
        raise ArchiveError(f"entry {name!r} names no path")
    return PurePosixPath(*parts)


def detect_format(path: Path) -> str:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK":
        return ZIP
    if magic[:2] == b"\x1f\x8b":
        return TAR_GZ
    raise ArchiveError("not a zip or gzip-compressed tar archive")


class ArchiveTooLarge(ArchiveError):
    """Too many entries or too many unpacked bytes (a zip bomb, or just too big)."""


class _Budget:
    def __init__(self, limits: Limits, archive_bytes: int | None = None):
        self.limits = limits
        self.entries = 0
        self.total = 0
        self.declared = 0
        #: The unpacked total this archive may reach (the ratio cap needs its size).
        self.allowed = limits.max_total_bytes if archive_bytes is None else limits.allowed_total(archive_bytes)
        self.names: set[str] = set()

    def _too_large(self, what: str) -> ArchiveTooLarge:
        return ArchiveTooLarge(f"{what}: more than {self.allowed} bytes unpacked (the limit is "
                               f"{self.limits.max_ratio}x the archive's size, at least "
                               f"{self.limits.ratio_floor_bytes} and at most {self.limits.max_total_bytes} bytes)")

    def count(self, entries: int):
        if entries > self.limits.max_entries:
            raise ArchiveTooLarge(f"archive has more than {self.limits.max_entries} entries ({entries})")

    def entry(self, rel: PurePosixPath, declared: int):
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise ArchiveTooLarge(f"archive has more than {self.limits.max_entries} entries")
        key = rel.as_posix()
        if key in self.names:
            raise ArchiveError(f"entry {key!r} appears twice")
        self.names.add(key)
        if declared > self.limits.max_file_bytes:
            raise ArchiveTooLarge(f"entry {key!r} is larger than {self.limits.max_file_bytes} bytes")
        self.declared += declared
        if self.declared > self.allowed:
            raise self._too_large("archive declares its entries larger than it may unpack to")

    def copy(self, src, dst: Path, rel: PurePosixPath):
        written = 0
        with open(dst, "xb") as out:
            while chunk := src.read(CHUNK):
                written += len(chunk)
                self.total += len(chunk)
                if written > self.limits.max_file_bytes:
                    raise ArchiveTooLarge(f"entry {rel.as_posix()!r} expands beyond {self.limits.max_file_bytes} bytes")
                if self.total > self.allowed:
                    raise self._too_large(f"archive expands beyond its size limit (at entry {rel.as_posix()!r})")
                out.write(chunk)


#: Stream bytes a tar may spend between two members' data (headers, long-name
#: and PAX records): tarfile reads them into memory whole.
MAX_HEADER_BYTES = 1024 * 1024


class _CountingReader:
    """A decompressed stream that refuses to yield more than *limit* bytes.

    tarfile reads headers (and whole PAX extended headers) into memory before
    a member is seen; counting here bounds that too, not just file data:
    outside a member's data (``copying`` false) at most MAX_HEADER_BYTES.
    """

    def __init__(self, raw, limit: int, budget: _Budget):
        self.raw = raw
        self.limit = limit
        self.budget = budget
        self.read_bytes = 0
        self.copying = False
        self.header_bytes = 0

    def read(self, size=-1):
        want = self.limit - self.read_bytes + 1
        data = self.raw.read(want if size is None or size < 0 else min(size, want))
        self.read_bytes += len(data)
        if self.read_bytes > self.limit:
            raise self.budget._too_large("the decompressed tar stream is too large")
        if not self.copying:
            self.header_bytes += len(data)
            if self.header_bytes > MAX_HEADER_BYTES:
                raise ArchiveTooLarge(f"tar headers larger than {MAX_HEADER_BYTES} bytes between two entries")
        return data


def zip_directory_size(path: Path) -> tuple[int, int]:
    """``(entries, central directory bytes)`` from a zip's end records, without
    parsing the central directory (zipfile would build every entry first)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        tail_len = min(size, 22 + 0xFFFF)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            raise ArchiveError("malformed zip: no end of central directory record")
        _sig, _disk, _cd_disk, _here, entries, cd_size, _cd_offset, _clen = struct.unpack(
            "<4sHHHHIIH", tail[at:at + 22])
        if entries == 0xFFFF or cd_size == 0xFFFFFFFF:
            # ZIP64: a locator just before the classic record points at the real counts.
            loc = tail[at - 20:at] if at >= 20 else b""
            if len(loc) != 20 or loc[:4] != b"PK\x06\x07":
                raise ArchiveError("malformed zip: ZIP64 end of central directory locator missing")
            _sig, _disk, offset, _disks = struct.unpack("<4sIQI", loc)
            if offset > size - 56:
                raise ArchiveError("malformed zip: ZIP64 end of central directory out of range")
            f.seek(offset)
            rec = f.read(56)
            if len(rec) != 56 or rec[:4] != b"PK\x06\x06":
                raise ArchiveError("malformed zip: bad ZIP64 end of central directory record")
            entries, cd_size = struct.unpack("<QQ", rec[32:48])
    return entries, cd_size


#: A central directory record is 46 bytes plus its name and extras; JMIX names are
#: < 200 characters, so 1 KiB per entry is generous.  A directory far larger than
#: its entry count explains is refused before zipfile parses it.
CENTRAL_DIRECTORY_BYTES_PER_ENTRY = 1024


def _has_manifest(names) -> bool:
    """manifest.json at the root or in a single top-level folder (as find_root wants)."""
    tops = {n.split("/", 1)[0] for n in names}
    return "manifest.json" in names or (len(tops) == 1 and f"{next(iter(tops))}/manifest.json" in names)


def _target(dest: Path, rel: PurePosixPath) -> Path:
    target = dest.joinpath(*rel.parts)
    # Belt and braces: the name check already excludes escapes.
    if os.path.commonpath([os.path.abspath(target), os.path.abspath(dest)]) != os.path.abspath(dest):
        raise ArchiveError(f"entry {rel.as_posix()!r} escapes the extraction folder")
    return target


def _extract_zip(path: Path, dest: Path, budget: _Budget):
    entries, cd_size = zip_directory_size(path)
    budget.count(entries)
    if cd_size > budget.limits.max_entries * CENTRAL_DIRECTORY_BYTES_PER_ENTRY:
        raise ArchiveTooLarge(f"zip central directory of {cd_size} bytes is too large for "
                              f"{budget.limits.max_entries} entries")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArchiveError(f"malformed zip: {e}") from None
    with zf:
        infos = zf.infolist()
        budget.count(len(infos))
        for info in infos:
            rel = check_name(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ArchiveError(f"entry {info.filename!r} is a symlink")
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise ArchiveError(f"entry {info.filename!r} is not a regular file or folder")
            if info.flag_bits & 0x1:
                raise ArchiveError(f"entry {info.filename!r} is encrypted (zip encryption is not JMIX)")
            budget.entry(rel, info.file_size)
        if not _has_manifest({check_name(i.filename).as_posix() for i in infos}):
            raise ArchiveError("no manifest.json at the archive root or in a single top-level folder")
        for info in infos:
            rel = check_name(info.filename)
            target = _target(dest, rel)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src:
                    budget.copy(src, target, rel)
            except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError) as e:
                if isinstance(e, FileExistsError):
                    raise ArchiveError(f"entry {info.filename!r} collides with another entry") from None
                raise ArchiveError(f"entry {info.filename!r} is corrupt: {e}") from None


def extract_tar(fileobj_or_path, dest: Path, budget: _Budget, mode: TarReadMode = "r|gz", strip_prefix: str = ""):
    """Extract a tar stream member by member (regular files and folders only)."""
    fileobj = fileobj_or_path if hasattr(fileobj_or_path, "read") else None
    name = None if fileobj is not None else str(fileobj_or_path)
    counter: _CountingReader | None = None
    if mode in ("r:gz", "r|gz") and name is not None:
        # Decompress ourselves, through a counter: headers and PAX records count
        # against the budget too.  (512-byte headers plus the end-of-archive
        # padding are allowed on top of the file data.)
        limit = budget.allowed + (budget.limits.max_entries + 64) * 1024
        fileobj = counter = _CountingReader(gzip.open(name, "rb"), limit, budget)
        name = None
        mode = "r|"
    try:
        with tarfile.open(name, mode, fileobj) as tar:
            for member in tar:
                name = member.name
                if strip_prefix and (name == strip_prefix.rstrip("/") or name.startswith(strip_prefix)):
                    name = name[len(strip_prefix):]
                    if not name:
                        continue
                rel = check_name(name)
                if not (member.isreg() or member.isdir()):
                    raise ArchiveError(f"entry {member.name!r} is a link or special file")
                budget.entry(rel, member.size)
                target = _target(dest, rel)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                if counter is not None:
                    counter.copying = True
                try:
                    budget.copy(src, target, rel)
                except FileExistsError:
                    raise ArchiveError(f"entry {member.name!r} collides with another entry") from None
                finally:
                    if counter is not None:
                        counter.copying, counter.header_bytes = False, 0
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ArchiveError(f"malformed tar archive: {e}") from None
    finally:
        if counter is not None:
            counter.raw.close()


def find_root(dest: Path) -> Path:
    """The envelope root: *dest* itself, or its single top folder, holding manifest.json."""
    if (dest / "manifest.json").is_file():
        return dest
    children = [c for c in dest.iterdir()]
    if len(children) == 1 and children[0].is_dir() and (children[0] / "manifest.json").is_file():
        return children[0]
    raise ArchiveError("no manifest.json at the archive root or in a single top-level folder")


def extract(path: Path, dest: Path, limits: Limits = Limits()) -> Path:
    """Safely unpack the zip or tar.gz at *path* into the new folder *dest*;
    returns the envelope root inside it."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    fmt = detect_format(path)
    budget = _Budget(limits, archive_bytes=os.path.getsize(path))
    if fmt == ZIP:
        _extract_zip(Path(path), dest, budget)
    else:
        extract_tar(Path(path), dest, budget, mode="r:gz")
    return find_root(dest)


def check_tree(root: Path, limits: Limits = Limits()) -> None:
    """Archive-safety rules for an already unpacked folder (CLI ``verify DIR``)."""
    count = 0
    for current, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(current) / name
            count += 1
            if p.is_symlink():
                raise ArchiveError(f"{p.relative_to(root).as_posix()} is a symlink")
            if not (p.is_dir() or p.is_file()):
                raise ArchiveError(f"{p.relative_to(root).as_posix()} is a special file")
    if count > limits.max_entries:
        raise ArchiveError(f"envelope has more than {limits.max_entries} entries")
