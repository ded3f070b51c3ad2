"""DICOM UID validation for the store: the only way a UID becomes part of a file path.

The rule is Harmony's one UID policy (:mod:`harmony.dicom.uids`): digits and
dots, components non-empty, leading zeros accepted.  Anything else - ``..``,
``/``, NUL, letters - is refused, so a hostile SOPInstanceUID can never escape
the store's folder.  This module only turns a refusal into the store's error.
"""

from __future__ import annotations

from harmony.dicom.uids import RULE, is_uid, strip_padding
from harmony.storage.errors import InvalidInstance

is_valid_uid = is_uid


def clean_uid(value, what: str = "UID") -> str:
    """*value* as a UID string (DICOM padding stripped), or :class:`InvalidInstance`."""
    if value is None:
        raise InvalidInstance(f"{what} is missing")
    text = strip_padding(value)
    if not is_uid(text):
        raise InvalidInstance(f"{what} is not a valid DICOM UID ({RULE})")
    return text
