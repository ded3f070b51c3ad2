"""Synthetic instances carrying every attribute of PS3.15 Table E.1-1 (generated from the table).

Every value is distinctive (it names its tag), so a test can search output bytes for each
original value.  All patient data here is made up.
"""

from __future__ import annotations

import numpy as np
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from harmony.deid import table

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ROOT = "1.2.826.0.1.3680043.9999."
NESTED_NAME = "NESTED^PERSON^SECRET"
PATIENT_ID = "PID-ALPHA-0001"
PATIENT_NAME = "DOE^JOHN^SECRETNAME"
STUDY_DATE = "20190314"


def first_vr(vr: str) -> str:
    return vr.split(" or ")[0]


def value_for(tag: int, vr: str, uid_seed: str = ""):
    vr = first_vr(vr)
    h = f"{tag:08X}"
    return {
        "AE": f"AE{h}", "AS": "045Y", "CS": f"CS{h}", "DA": STUDY_DATE, "DS": "12.5", "DT": "20190314101112",
        "IS": "42", "LO": f"LO-{h}-SECRET", "LT": f"LT-{h}-SECRET about {PATIENT_NAME}", "PN": f"PN{h}^SECRET",
        "SH": f"SH{h}", "ST": f"ST-{h}-SECRET", "TM": "101112", "UC": f"UC-{h}-SECRET", "UT": f"UT-{h}-SECRET",
        "UI": f"{ROOT}{int(h, 16)}{uid_seed}", "UR": f"http://example.org/{h}", "US": 7, "SS": 7, "UL": 7,
        "FL": 1.5, "FD": 1.5, "OB": f"BIN{h}".encode() + b"\0", "OW": f"BIN{h}".encode() + b"\0",
        "UN": f"BIN{h}".encode() + b"\0",
    }[vr]


def nested_item(tag: int, uid_seed: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CT_IMAGE
    item.ReferencedSOPInstanceUID = f"{ROOT}{tag}.7{uid_seed}"
    item.PersonName = NESTED_NAME
    return item


def full_instance(uid_seed: str = "", patient_id: str = PATIENT_ID, patient_name: str = PATIENT_NAME) -> Dataset:
    """A CT image with every table attribute (plus private tags, overlays, curves, file meta)."""
    ds = Dataset()
    for tag, _name, _basic, _opts in table.ATTRIBUTES:
        if tag >> 16 in (0x0000, 0x0002):
            continue  # command and file meta groups do not belong in a dataset
        vr = first_vr(dictionary_VR(tag))
        if vr == "SQ":
            ds.add_new(tag, "SQ", Sequence([nested_item(tag, uid_seed)]))
        else:
            ds.add_new(tag, vr, value_for(tag, vr, uid_seed))
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.StudyDate = STUDY_DATE
    ds.SOPClassUID = CT_IMAGE
    ds.Modality = "CT"
    ds.BurnedInAnnotation = "NO"
    # private attributes: a safe one and an identifying one
    ds.add_new(0x00290010, "LO", "ACME SAFE")
    ds.add_new(0x00291010, "DS", "3.5")
    ds.add_new(0x00291011, "LO", "PRIVATE-SECRET-NAME")
    ds.add_new(0x00091010, "LO", "ACME OTHER")
    ds.add_new(0x00091001 + 0x1000 - 1, "LO", "PRIVATE-SECRET-2")
    # repeating groups: a curve, an overlay with comments
    ds.add_new(0x50003000, "OW", b"CURVEDATA-SECRET")
    ds.add_new(0x60003000, "OW", b"OVERLAY-SECRET..")
    ds.add_new(0x60004000, "LT", "OVERLAY-COMMENT-SECRET")
    ds.add_new(0x60000010, "US", 4)
    # a sequence not in the table that holds table attributes (like a functional group)
    fg = Dataset()
    fg.DerivationImageSequence = Sequence([Dataset()])
    src = Dataset()
    src.ReferencedSOPClassUID = CT_IMAGE
    src.ReferencedSOPInstanceUID = f"{ROOT}55.1{uid_seed}"
    fg.DerivationImageSequence[0].SourceImageSequence = Sequence([src])
    ds.SharedFunctionalGroupsSequence = Sequence([fg])
    add_image(ds, np.arange(16, dtype=np.uint16).reshape(4, 4))
    ds.file_meta.ImplementationClassUID = generate_uid()
    ds.file_meta.SourceApplicationEntityTitle = "SRCAE-SECRET"
    return ds


def add_image(ds: Dataset, pixels) -> Dataset:
    """Monochrome pixel data (a 2-D uint8 or uint16 array) and the file meta of a Part-10 file."""
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def simple_instance(study_uid: str, series_uid: str, sop_uid: str, *, patient_id=PATIENT_ID, modality="CT",
                    sop_class=CT_IMAGE, burned_in=None) -> Dataset:
    """A small valid image for network tests."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.PatientName = patient_id, PATIENT_NAME
    ds.PatientBirthDate = "19610203"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = STUDY_DATE, "101112", "ACC-SECRET-77"
    ds.ReferringPhysicianName = "WHO^REFERRER^SECRET"
    ds.InstitutionName = "SECRET GENERAL HOSPITAL"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "STUDYID-SECRET", 1, 1
    ds.Modality = modality
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    return add_image(ds, np.arange(64, dtype=np.uint8).reshape(8, 8))


IDENTIFYING_STRINGS = ("PID-ALPHA", "SECRET", "DOE^JOHN", "19610203", STUDY_DATE)
