"""Synthetic DICOM test data, made with pydicom (no real patient ever appears).

``make_corpus(folder)`` writes a small archive: several patients, studies with
several series, a multi-frame instance and an RLE-compressed one, so tests and
benchmarks exercise the shapes real PACS traffic has.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import attr
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         MRImageStorage, RLELossless, SecondaryCaptureImageStorage, generate_uid)

UID_ROOT = "1.2.826.0.1.3680043.10.543."  # a test-only root; UIDs derived from it are stable


def uid(*parts) -> str:
    return UID_ROOT + ".".join(str(p) for p in parts)


@attr.s(auto_attribs=True)
class Instance:
    path: Path
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    modality: str


def make_instance(*, patient_id="PAT001", patient_name="TEST^ALPHA", study_uid=None, series_uid=None,
                  sop_uid=None, modality="CT", series_number=1, instance_number=1, rows=16, cols=16,
                  frames=1, study_date="20240102", series_description="AXIAL", study_description="CHEST",
                  accession="ACC001", transfer_syntax=ExplicitVRLittleEndian, seed=0) -> Dataset:
    sop_class = {"CT": CTImageStorage, "MR": MRImageStorage}.get(modality, SecondaryCaptureImageStorage)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = UID_ROOT + "99"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.SeriesDate = study_date
    ds.AccessionNumber = accession
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed)
    shape = (frames, rows, cols) if frames > 1 else (rows, cols)
    pixels = rng.integers(0, 4096, size=shape, dtype=np.uint16)
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    if transfer_syntax == RLELossless:
        ds.compress(RLELossless, pixels, generate_instance_uid=False)  # keep the planned, stable UID
    elif transfer_syntax == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_corpus(folder: Path) -> list[Instance]:
    """Three patients, four studies, nine series, 22 instances (one multi-frame,
    one RLE-compressed); all UIDs are stable across runs."""
    folder = Path(folder)
    plan = [
        # patient, name, study#, date, [(modality, description, n_instances, special)]
        ("PAT001", "TEST^ALPHA", 1, "20240102", [("CT", "AXIAL", 3, None), ("CT", "CORONAL", 2, None),
                                                 ("CT", "AXIAL", 2, None)]),
        ("PAT001", "TEST^ALPHA", 2, "20240315", [("MR", "T1", 2, "multiframe"), ("MR", "T2", 2, None)]),
        ("PAT002", "TEST^BRAVO", 3, "20231111", [("CT", "HEAD", 3, "rle"), ("CT", "NECK", 2, None)]),
        ("PAT003", "TEST^CHARLIE", 4, "20220707", [("OT", "SCREEN", 3, None), ("OT", "REPORT", 3, None)]),
    ]
    out = []
    for pid, name, study_no, date, series in plan:
        study_uid = uid(1, study_no)
        for s_no, (modality, desc, count, special) in enumerate(series, start=1):
            series_uid = uid(1, study_no, s_no)
            for i in range(1, count + 1):
                sop = uid(1, study_no, s_no, i)
                kwargs = {}
                if special == "multiframe" and i == 1:
                    kwargs["frames"] = 4
                if special == "rle" and i == 1:
                    kwargs["transfer_syntax"] = RLELossless
                ds = make_instance(patient_id=pid, patient_name=name, study_uid=study_uid,
                                   series_uid=series_uid, sop_uid=sop, modality=modality,
                                   series_number=s_no, instance_number=i, study_date=date,
                                   series_description=desc, accession=f"ACC{study_no:03d}",
                                   seed=study_no * 100 + s_no * 10 + i, **kwargs)
                path = save(ds, folder / pid / study_uid / series_uid / f"{sop}.dcm")
                out.append(Instance(path, pid, study_uid, series_uid, sop, str(ds.SOPClassUID), modality))
    return out
