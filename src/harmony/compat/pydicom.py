"""pydicom's private names Harmony relies on, and why each one.

setup.cfg bounds pydicom (``>=3.0,<4``); tests/compat/test_pydicom.py checks each name.
"""

from __future__ import annotations

# Reads the group 0002 elements after the preamble: the only way to learn where a
# Part-10 file's data set starts without decoding it (pydicom's public readers decode).
from pydicom.filereader import _read_file_meta_info as read_file_meta_info


def dataset_character_set(ds):
    """The Python codecs a decoded data set's text is in (``Dataset._character_set``):
    raw elements are copied as bytes only when it equals the original encoding's."""
    return ds._character_set


__all__ = ["read_file_meta_info", "dataset_character_set"]
