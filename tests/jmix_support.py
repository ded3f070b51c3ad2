"""JMIX test data: the shape of the spec's shared sample study, made synthetically.

aurabx/jmix-rs, -js and -php all ship the same 15-file CT study (notes, section 5):
patient Brown^Jane, three CHEST series of five instances, two of which share
the description "CORONAL CHEST" - which catches grouping series by description.
We rebuild that shape with pydicom under a test-only UID root instead of copying
the files, so no third-party data enters the repository.
"""

from __future__ import annotations

import gzip
import shutil
import struct
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

from twisted.internet import reactor

from harmony.backends.base import Backend
from harmony.dicom.results import DicomInstance, ResultStream
from harmony.envelope import ResponseEnvelope
from harmony.jmix.dicom import read_header
from harmony.state import ResponseState
from tests.dicom_data import UID_ROOT, make_instance, save

SAMPLE_STUDY_UID = UID_ROOT + "7133.3280065491876470"
SAMPLE_SERIES = [
    (UID_ROOT + "7133.1734441961856038", 1, "SAGITTAL CHEST"),
    (UID_ROOT + "7133.2369827755580483", 2, "CORONAL CHEST"),
    (UID_ROOT + "7133.1326436931051844", 3, "CORONAL CHEST"),
]


def make_sample_study(folder: Path, study_uid: str = SAMPLE_STUDY_UID, per_series: int = 5,
                      series=None) -> list[Path]:
    """Write the 3-series sample-study shape into *folder*; returns the files."""
    series = series or SAMPLE_SERIES
    paths = []
    for series_uid, number, description in series:
        if study_uid != SAMPLE_STUDY_UID:
            series_uid = f"{study_uid}.{number}"
        for i in range(1, per_series + 1):
            ds = make_instance(patient_id="PID156695", patient_name="Brown^Jane", study_uid=study_uid,
                               series_uid=series_uid, sop_uid=f"{series_uid}.{i}", modality="CT",
                               series_number=number, instance_number=i, study_date="20231117",
                               series_description=description, study_description="CT Pulmonary Angiogram",
                               accession="ACC6736409", seed=number * 10 + i)
            ds.PatientBirthDate = "19690312"
            ds.PatientSex = "M"
            ds.BodyPartExamined = "CHEST"
            paths.append(save(ds, Path(folder) / f"series_{number}" / f"CT.{number}.{i}.dcm"))
    return paths


def write_zip(path: Path, entries: dict, symlinks: dict | None = None) -> Path:
    """A hand-made zip: ``{name: bytes}`` entries (names unchecked, for hostile archives)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, target)
    return path


def zip_of_folder(root: Path, path: Path, top: str = "") -> Path:
    """Zip *root*'s files under an optional top-level folder name."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                zf.write(p, (Path(top) / p.relative_to(root)).as_posix() if top else p.relative_to(root).as_posix())
    return path


# --------------------------------------------------------------------------- a stand-in DICOM backend


class StagedStudyBackend(Backend):
    """A stand-in for a C-GET backend, used only until the ``dicom_scu`` backend
    (being written on the ``dimse`` branch) is merged: it honours the same
    contract - ``dimse_op``/``query_level`` metadata and a DICOM JSON identifier
    in, a :class:`ResultStream` of *owned* :class:`DicomInstance` files copied
    into a staging folder out, delivered on later reactor turns - from a folder
    of synthetic files instead of a PACS.  Every request is recorded in ``calls``.
    """

    calls: list = []

    def __init__(self, name, folder: Path):
        super().__init__(name)
        self.folder = Path(folder)

    @classmethod
    def from_config(cls, name, options, ctx):
        return cls(name, options.path("folder"))

    def send(self, request):
        StagedStudyBackend.calls.append({"metadata": dict(request.metadata), "identifier": request.normalized})
        uid = request.normalized["0020000D"]["Value"][0]
        staging = Path(tempfile.mkdtemp(prefix="staged-", dir=self.folder.parent))   # the test's folder, not /tmp
        matches = [p for p in sorted(self.folder.rglob("*.dcm")) if read_header(p).study_uid == uid]
        stream = ResultStream()

        def deliver(remaining):
            if not remaining:
                stream.finish(0x0000)
                return
            src = remaining[0]
            h = read_header(src)
            dst = staging / f"{h.sop_uid}.dcm"
            shutil.copyfile(src, dst)
            stream.put(DicomInstance(path=dst, sop_instance_uid=h.sop_uid, study_instance_uid=h.study_uid,
                                     series_instance_uid=h.series_uid, size=dst.stat().st_size, owned=True))
            reactor.callLater(0, deliver, remaining[1:])

        reactor.callLater(0, deliver, matches)
        self.staging = staging
        return ResponseEnvelope(200, state=ResponseState(dicom_results=stream))


# --------------------------------------------------------------------------- hostile archives, made fast

ZEROS_MIB = 1024 * 1024


def _deflated_zeros(mib: int) -> bytes:
    """Raw deflate of *mib* MiB of zeros, made from one compressed MiB repeated.

    After a full flush a deflate stream starts afresh, so the bytes for each
    further MiB of zeros are the same: a 2 GiB bomb costs one MiB of CPU."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(b"\0" * ZEROS_MIB) + c.flush(zlib.Z_FULL_FLUSH)
    return block * mib + c.flush(zlib.Z_FINISH)


def crafted_zip(path: Path, entries: list) -> Path:
    """A zip written byte by byte: ``[(name, data_or_None, declared_size, zero_mib)]``.

    ``zero_mib`` > 0 makes a deflated entry of that many MiB of zeros (declared
    as ``declared_size``, honest when it is ``zero_mib`` MiB); otherwise *data*
    is stored as is.  The CRC of the bomb is not computed (it would cost the
    full inflation): Harmony must refuse it before it ever checks one.
    """
    local, central = bytearray(), bytearray()
    for name, data, declared, zero_mib in entries:
        raw = name.encode()
        data = data.encode() if isinstance(data, str) else data
        if zero_mib:
            body, method, crc = _deflated_zeros(zero_mib), 8, 0
        else:
            body, method, crc = data, 0, zlib.crc32(data)
        offset = len(local)
        local += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(body), declared,
                             len(raw), 0) + raw + body
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(body), declared,
                               len(raw), 0, 0, 0, 0, 0o100644 << 16, offset) + raw
    count = len(entries)
    end = b""
    if count > 0xFFFF:  # ZIP64 end records carry the real count; the classic one says 0xFFFF
        zip64_at = len(local) + len(central)
        end = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(central), len(local))
        end += struct.pack("<4sLQL", b"PK\x06\x07", 0, zip64_at, 1)
        count = 0xFFFF
    end += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(central), len(local), 0)
    path.write_bytes(bytes(local + central + end))
    return path


def many_entries_zip(path: Path, count: int, manifest: bytes) -> Path:
    """A real zip of *count* empty entries plus a manifest (written directly: fast)."""
    manifest = manifest.encode() if isinstance(manifest, str) else manifest
    entries = [("manifest.json", manifest, len(manifest), 0)]
    entries += [(f"payload/{i}", b"", 0, 0) for i in range(count)]
    return crafted_zip(path, entries)


def targz_bomb(path: Path, zero_mib: int, *, declared: int | None = None, pax_mib: int = 0) -> Path:
    """A tar.gz whose single member is *zero_mib* MiB of zeros (gzip members
    concatenated, as gzip allows), optionally behind a PAX header of *pax_mib* MiB."""
    size = zero_mib * ZEROS_MIB if declared is None else declared
    out = bytearray()
    if pax_mib:
        record = b"x" * (pax_mib * ZEROS_MIB)
        pax = tarfile.TarInfo("././@PaxHeader")
        pax.type, pax.size = tarfile.XHDTYPE, len(record)
        out += gzip.compress(pax.tobuf(tarfile.USTAR_FORMAT) + record + b"\0" * (-len(record) % 512))
    info = tarfile.TarInfo("payload/zeros")
    info.size = size
    out += gzip.compress(info.tobuf(tarfile.USTAR_FORMAT))
    one = gzip.compress(b"\0" * ZEROS_MIB)
    out += one * zero_mib
    path.write_bytes(bytes(out))
    return path
