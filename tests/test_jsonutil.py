"""harmony.jsonutil: JSON from outside is malformed (ValueError), never a crash (RecursionError);
JSON text for the index reads back as the standard encoder's and stays ASCII."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harmony import jsonutil


def test_ordinary_json_loads():
    assert jsonutil.loads(b'{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}


def test_nesting_too_deep_is_a_value_error():
    with pytest.raises(ValueError, match="nested too deeply"):
        jsonutil.loads("[" * 100_000 + "]" * 100_000)


def test_malformed_json_is_still_a_value_error():
    with pytest.raises(ValueError):
        jsonutil.loads(b"{oops")


# JSON values as the index stores them: no NaN/Infinity (the metadata writes those as strings).
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@given(_JSON)
def test_stored_text_reads_back_as_the_standard_encoders_and_is_ascii(value):
    text = jsonutil.dumps_stored(value)
    assert text.isascii()
    assert json.loads(text) == json.loads(json.dumps(value, separators=(",", ":")))


def test_stored_text_of_a_dicom_json_document_is_compact_and_equal():
    doc = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Yamada^Tarou"}]},
           "00280010": {"vr": "US", "Value": [512]}, "00181050": {"vr": "DS", "Value": [0.5]}}
    assert jsonutil.dumps_stored(doc) == json.dumps(doc, separators=(",", ":"))


def test_what_orjson_declines_is_made_by_the_standard_encoder():
    """Non-ASCII text (escaped, as the standard encoder does), integers past 64 bits
    (a hostile IS value), keys that are not strings."""
    doc = {"00100010": {"vr": "PN", "Value": [{"Ideographic": "山田^太郎"}]}}
    assert jsonutil.dumps_stored(doc) == json.dumps(doc, separators=(",", ":"))
    assert "\\u5c71" in jsonutil.dumps_stored(doc)
    assert jsonutil.dumps_stored({"a": [2 ** 70]}) == '{"a":[%d]}' % 2 ** 70
    assert jsonutil.dumps_stored({1: "x"}) == '{"1":"x"}'
