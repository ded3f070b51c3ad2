"""UID and AE-title checks for anything that arrives in a URL.

UIDs follow Harmony's one policy (:mod:`harmony.dicom.uids`: digits and dots,
leading zeros accepted), so checking them also rules out every path-traversal
trick (``..``, ``%2F``, backslashes) for code that later turns UIDs into file
names or upstream URLs.  Here a bad one becomes a 400.
"""

from __future__ import annotations

import re

from harmony.dicom.uids import RULE, is_uid
from harmony.errors import BadRequest

_AET = re.compile(r"^[A-Za-z0-9_.\-]{1,16}$")


def check_uid(value: str, what: str = "UID") -> str:
    if not is_uid(value):
        raise BadRequest(f"{what} is not a valid DICOM UID ({RULE})")
    return value


def check_aet(value: str) -> str:
    """AE titles in ``/aets/{aet}/rs`` URLs: a conservative subset of PS3.5's
    AE VR (no spaces or backslashes), so they are safe in paths and logs."""
    if not _AET.match(value) or set(value) == {"."}:
        raise BadRequest("AE title in the URL must be 1-16 characters of A-Z, a-z, 0-9, '_', '-', '.'")
    return value
