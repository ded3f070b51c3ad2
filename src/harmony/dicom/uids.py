"""The one UID policy: what Harmony accepts as a DICOM UID, everywhere.

UIDs arrive from modalities (C-STORE), from URLs (DICOMweb, FHIR), from
uploads (STOW-RS, JMIX) and end up in file paths and upstream URLs.  Five
regexes with two rules used to decide; an instance a CT scanner sent with a
``1.2.840.0113...`` UID was filed by the store yet refused by ``dicom_scp``
and the DICOMweb routes.  Now every one of them asks this module.

The rule (documented in docs/architecture.md and the endpoint pages):

- 1 to 64 characters;
- digits and dots only, not starting or ending with a dot, no empty component
  (``1..2``);
- **leading zeros in a component are accepted on input** (PS3.5 9.1 forbids
  them, but real modalities send them and refusing their studies helps nobody);
  Harmony never makes such UIDs itself and never rewrites received ones;
- trailing DICOM padding (NUL or space) is stripped before checking.

Because only digits and single dots pass, a UID that passes is path-safe: it
can never be ``..``, contain a separator or a NUL, or be empty, so it may be
used as a file or folder name and a URL segment as is.
"""

from __future__ import annotations

import re

MAX_LENGTH = 64
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*\Z")


def is_uid(value) -> bool:
    """True when *value* (a ``str``) is a UID under the policy above, unpadded."""
    return isinstance(value, str) and 0 < len(value) <= MAX_LENGTH and _UID.match(value) is not None


def strip_padding(value) -> str:
    """The UID text without DICOM's trailing NUL/space padding (``None`` -> ``""``)."""
    if value is None:
        return ""
    return str(value).rstrip("\x00 ")


def clean(value) -> str | None:
    """*value* with padding stripped if it then is a valid UID, else ``None``."""
    text = strip_padding(value)
    return text if is_uid(text) else None


RULE = "1-64 characters of digits and dots, no empty component (leading zeros are accepted)"

__all__ = ["MAX_LENGTH", "RULE", "clean", "is_uid", "strip_padding"]
