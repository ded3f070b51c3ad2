"""JMIX test data: the shape of the spec's shared sample study, made synthetically.

aurabx/jmix-rs, -js and -php all ship the same 15-file CT study (notes, section 5):
patient Brown^Jane, three CHEST series of five instances, two of which share
the description "CORONAL CHEST" - which catches grouping series by description.
We rebuild that shape with pydicom under a test-only UID root instead of copying
the files, so no third-party data enters the repository.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

from twisted.internet import reactor

from harmony.backends.base import Backend
from harmony.dicom.results import DicomInstance, ResultStream
from harmony.envelope import ResponseEnvelope
from harmony.jmix.dicom import read_header
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
        staging = Path(tempfile.mkdtemp(prefix="staged-"))
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
        return ResponseEnvelope(200, context={"dicom_results": stream})
