"""Property: whatever mix of table attributes an instance carries, at any depth of sequences, no value the
basic profile removes or replaces survives in the written file (hypothesis, in memory)."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from harmony.deid import Deidentifier, Keyring, Profile, ProfileOptions
from harmony.deid import table
from tests.deid.synthetic import CT_IMAGE, add_image

TEXT_TAGS = [t for t, *_ in table.ATTRIBUTES
             if t >> 16 not in (0, 2) and dictionary_VR(t) in ("LO", "SH", "PN", "LT", "ST", "UT", "UC")]
SEQ_TAGS = [t for t, *_ in table.ATTRIBUTES if t >> 16 not in (0, 2) and dictionary_VR(t) == "SQ"]
DEID = Deidentifier(Profile(ProfileOptions()), Keyring(b"property-secret-0123456789"))

marker = st.integers(min_value=10**7, max_value=10**8 - 1).map(lambda n: f"Q{n}")
attributes = st.lists(st.tuples(st.sampled_from(TEXT_TAGS), marker), min_size=1, max_size=12,
                      unique_by=lambda p: p[0])


def build(top, nested, seq_tag) -> Dataset:
    ds = Dataset()
    for tag, value in top:
        ds.add_new(tag, dictionary_VR(tag), value)
    if nested:
        item = Dataset()
        for tag, value in nested:
            item.add_new(tag, dictionary_VR(tag), value)
        ds.add_new(seq_tag, "SQ", Sequence([item]))
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, "1.2.826.0.1.3680043.9999.5.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.9999.5", "1.2.826.0.1.3680043.9999.5.0"
    return add_image(ds, np.zeros((2, 2), dtype=np.uint8))


@settings(max_examples=60, deadline=None)
@given(top=attributes, nested=st.lists(st.tuples(st.sampled_from(TEXT_TAGS), marker), max_size=6,
                                       unique_by=lambda p: p[0]),
       seq_tag=st.sampled_from(SEQ_TAGS))
def test_no_removed_or_replaced_value_survives(top, nested, seq_tag):
    ds = build(top, nested, seq_tag)
    DEID.dataset(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    for _tag, value in top + nested:
        assert value.encode() not in raw
