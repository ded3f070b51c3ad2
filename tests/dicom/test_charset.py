"""harmony.dicom.charset: a dataset Harmony builds declares UTF-8 exactly when its text needs it."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from harmony.dicom.charset import UTF8, declare, has_non_ascii_text


def test_ascii_text_declares_nothing_and_keeps_a_declaration():
    ds = Dataset()
    ds.PatientName = "Synthetic^Patient"
    assert not has_non_ascii_text(declare(ds)) and "SpecificCharacterSet" not in ds
    ds.SpecificCharacterSet = "ISO_IR 100"
    assert declare(ds).SpecificCharacterSet == "ISO_IR 100"


def test_non_ascii_text_anywhere_declares_utf8_replacing_what_was_there():
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    item = Dataset()
    item.CodeMeaning = "Ωμέγα"
    ds.ProcedureCodeSequence = Sequence([item])
    assert has_non_ascii_text(ds)
    assert declare(ds).SpecificCharacterSet == UTF8


def test_person_names_and_multi_values_are_looked_into():
    ds = Dataset()
    ds.OtherPatientNames = ["Plain^Name", "山田^太郎"]
    assert has_non_ascii_text(ds)
    numbers = Dataset()
    numbers.Rows = 512  # not text: never a reason to declare
    assert not has_non_ascii_text(numbers)
