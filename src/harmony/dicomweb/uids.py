"""UID and AE-title checks for anything that arrives in a URL.

A UID is digits and dots and nothing else (PS3.5 9.1), so checking the grammar
also rules out every path-traversal trick (``..``, ``%2F``, backslashes) for
code that later turns UIDs into file names or upstream URLs.
"""

from __future__ import annotations

import re

from harmony.errors import BadRequest

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_AET = re.compile(r"^[A-Za-z0-9_.\-]{1,16}$")


def is_uid(value: str) -> bool:
    return len(value) <= 64 and bool(_UID.match(value))


def check_uid(value: str, what: str = "UID") -> str:
    if not is_uid(value):
        raise BadRequest(f"{what} is not a valid DICOM UID (digits and dots, at most 64 characters)")
    return value


def check_aet(value: str) -> str:
    """AE titles in ``/aets/{aet}/rs`` URLs: a conservative subset of PS3.5's
    AE VR (no spaces or backslashes), so they are safe in paths and logs."""
    if not _AET.match(value) or set(value) == {"."}:
        raise BadRequest("AE title in the URL must be 1-16 characters of A-Z, a-z, 0-9, '_', '-', '.'")
    return value
