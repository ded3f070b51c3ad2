"""Packing envelopes as zip / tar.gz, and unpacking untrusted ones safely.

Packing puts entries at the archive root (as Aurabox's Harmony does).  Unpacking
is the first validation layer: every entry name is checked before anything is
written (no absolute paths, no ``..``, no backslashes or drive letters), links
and special files are refused, and entry count and uncompressed bytes are
capped - the declared sizes up front and the actual bytes while writing, so a
zip bomb that lies about its sizes is stopped too.  Entries are written by our
own code, never by ``extractall``.
"""

from __future__ import annotations

import os
import stat
import tarfile
import time
import uuid
import zipfile
from pathlib import Path, PurePosixPath

import attr

from harmony.jmix.hashing import CHUNK

ZIP, TAR_GZ = "zip", "tar.gz"
MEDIA_TYPES = {ZIP: "application/zip", TAR_GZ: "application/gzip"}
SUFFIXES = {ZIP: ".zip", TAR_GZ: ".tar.gz"}


class ArchiveError(ValueError):
    """An archive that is malformed or unsafe; the message says which entry and why."""


@attr.s(auto_attribs=True, frozen=True)
class Limits:
    max_entries: int = 200_000
    max_total_bytes: int = 64 * 1024 ** 3
    max_file_bytes: int = 8 * 1024 ** 3


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


class _Budget:
    def __init__(self, limits: Limits):
        self.limits = limits
        self.entries = 0
        self.total = 0
        self.names: set[str] = set()

    def entry(self, rel: PurePosixPath, declared: int):
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise ArchiveError(f"archive has more than {self.limits.max_entries} entries")
        key = rel.as_posix()
        if key in self.names:
            raise ArchiveError(f"entry {key!r} appears twice")
        self.names.add(key)
        if declared > self.limits.max_file_bytes:
            raise ArchiveError(f"entry {key!r} is larger than {self.limits.max_file_bytes} bytes")

    def copy(self, src, dst: Path, rel: PurePosixPath):
        written = 0
        with open(dst, "xb") as out:
            while chunk := src.read(CHUNK):
                written += len(chunk)
                self.total += len(chunk)
                if written > self.limits.max_file_bytes or self.total > self.limits.max_total_bytes:
                    raise ArchiveError(f"archive expands beyond its size limit (at entry {rel.as_posix()!r})")
                out.write(chunk)


def _target(dest: Path, rel: PurePosixPath) -> Path:
    target = dest.joinpath(*rel.parts)
    # Belt and braces: the name check already excludes escapes.
    if os.path.commonpath([os.path.abspath(target), os.path.abspath(dest)]) != os.path.abspath(dest):
        raise ArchiveError(f"entry {rel.as_posix()!r} escapes the extraction folder")
    return target


def _extract_zip(path: Path, dest: Path, budget: _Budget):
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArchiveError(f"malformed zip: {e}") from None
    with zf:
        infos = zf.infolist()
        declared = 0
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
            declared += info.file_size
            if declared > budget.limits.max_total_bytes:
                raise ArchiveError(f"archive declares more than {budget.limits.max_total_bytes} bytes")
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


def extract_tar(fileobj_or_path, dest: Path, budget: _Budget, mode: str = "r|gz", strip_prefix: str = ""):
    """Extract a tar stream member by member (regular files and folders only)."""
    kwargs = {"fileobj": fileobj_or_path} if hasattr(fileobj_or_path, "read") else {"name": str(fileobj_or_path)}
    try:
        with tarfile.open(mode=mode, **kwargs) as tar:
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
                try:
                    budget.copy(src, target, rel)
                except FileExistsError:
                    raise ArchiveError(f"entry {member.name!r} collides with another entry") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArchiveError(f"malformed tar archive: {e}") from None


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
    budget = _Budget(limits)
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
