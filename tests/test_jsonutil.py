"""harmony.jsonutil: JSON from outside is malformed (ValueError), never a crash (RecursionError)."""

from __future__ import annotations

import pytest

from harmony import jsonutil


def test_ordinary_json_loads():
    assert jsonutil.loads(b'{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}


def test_nesting_too_deep_is_a_value_error():
    with pytest.raises(ValueError, match="nested too deeply"):
        jsonutil.loads("[" * 100_000 + "]" * 100_000)


def test_malformed_json_is_still_a_value_error():
    with pytest.raises(ValueError):
        jsonutil.loads(b"{oops")
