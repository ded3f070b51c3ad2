"""Specific Character Set (0008,0005) for datasets Harmony builds itself.

Identifiers and C-FIND answers cross Harmony as DICOM JSON, where text is
Unicode.  When Harmony turns them back into DIMSE datasets - a C-FIND answer
from the local archive, a query a QIDO request or a relayed C-FIND sends to a
PACS - pydicom encodes text in the character set the dataset declares, and one
that declares none gets the default repertoire (ASCII): ``Ωμέγα*`` went out as
``?*`` (a wildcard matching every patient) and a Japanese name came back as
``?????^????``.

The rule, the same on every path: a dataset whose text is all ASCII declares
nothing (or keeps what it declared); one with any other character declares
**ISO_IR 192** (UTF-8), which encodes every character, replacing a declaration
the Unicode text may no longer fit (a Latin-1 query that middleware extended
with Greek).  Datasets Harmony only relays (a PACS's own answers, passed on as
received) keep their own character set and bytes.

On the way in, pydicom decodes each value with the character set its dataset
declares (ISO_IR 100, ISO 2022 IR 87 with its escape sequences, ISO_IR 192...),
so what the index stores and matches is Unicode whatever the modality sent.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

UTF8 = "ISO_IR 192"
#: VRs whose values are text in the dataset's character set (PS3.5 6.1.2.3).
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})


def _is_ascii(value) -> bool:
    if value is None:
        return True
    if isinstance(value, PersonName):
        value = str(value)
    if isinstance(value, str):
        return value.isascii()
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return all(_is_ascii(v) for v in value)
    return True


def has_non_ascii_text(ds: Dataset) -> bool:
    """True when a text element of *ds* (or of its sequences' items) holds a
    character outside ASCII."""
    for elem in ds:
        if elem.VR == "SQ":
            if any(has_non_ascii_text(item) for item in elem.value or ()):
                return True
        elif elem.VR in TEXT_VRS and not _is_ascii(elem.value):
            return True
    return False


def declare(ds: Dataset) -> Dataset:
    """Give *ds* (Unicode text, e.g. from DICOM JSON) a character set that can
    encode it: ISO_IR 192 when it holds non-ASCII text (see the module doc)."""
    if has_non_ascii_text(ds):
        ds.SpecificCharacterSet = UTF8
    return ds


def _json_ascii(value) -> bool:
    if isinstance(value, str):
        return value.isascii()
    if isinstance(value, dict):  # a PN's component groups, or a sequence item
        return all(_json_ascii(v) for v in value.values())
    if isinstance(value, list):
        return all(_json_ascii(v) for v in value)
    return True


def declare_json(doc: dict) -> dict:
    """:func:`declare` for a DICOM JSON (PS3.18 F.2) object: the same
    declaration a DICOM JSON answer gets when it went through a Dataset."""
    for element in doc.values():
        vr = element.get("vr")
        if (vr in TEXT_VRS or vr == "SQ") and not _json_ascii(element.get("Value", ())):
            doc["00080005"] = {"vr": "CS", "Value": [UTF8]}
            break
    return doc


__all__ = ["TEXT_VRS", "UTF8", "declare", "declare_json", "has_non_ascii_text"]
