"""DICOM UID validation: the only way a UID becomes part of a file path.

A UID (PS3.5 9.1) is at most 64 characters of digits and dots, components
non-empty.  Anything else - ``..``, ``/``, NUL, letters - is refused, so a
hostile SOPInstanceUID can never escape the store's folder.  Leading zeros in
components are tolerated: real modalities send them, and they are path-safe.
"""

from __future__ import annotations

import re

from harmony.storage.errors import InvalidInstance

_UID = re.compile(r"[0-9]+(\.[0-9]+)*\Z")


def is_valid_uid(value) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID.match(value) is not None


def clean_uid(value, what: str = "UID") -> str:
    """*value* as a UID string (DICOM padding stripped), or :class:`InvalidInstance`."""
    if value is None:
        raise InvalidInstance(f"{what} is missing")
    text = str(value).rstrip("\x00 ")
    if not is_valid_uid(text):
        raise InvalidInstance(f"{what} is not a valid DICOM UID")
    return text
