"""DICOM JSON (PS3.18 F.2) <-> pydicom, for identifiers in envelopes.

Identifiers travel through pipelines as DICOM JSON so that middleware
(transforms, filters) can read and edit them without knowing pydicom.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.valuerep import VR

from harmony.dicom.results import LEVELS
from harmony.errors import BadRequest

_KNOWN_VRS = {vr.value for vr in VR}


def identifier_from_json(doc) -> Dataset:
    """A C-FIND/C-GET/C-MOVE identifier from DICOM JSON; BadRequest if malformed."""
    if doc is None:
        return Dataset()
    if not isinstance(doc, dict):
        raise BadRequest("the DICOM identifier must be a DICOM JSON object")
    try:
        ds = Dataset.from_json(doc)
        # Decode every element now: a bad value must fail here, not in a pynetdicom thread.
        for elem in ds.iterall():
            if elem.VR not in _KNOWN_VRS:
                raise ValueError(f"unknown VR {elem.VR!r} for {elem.tag}")
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for bad JSON
        raise BadRequest(f"malformed DICOM JSON identifier: {e}") from None
    return ds


def identifier_to_json(ds: Dataset) -> dict:
    return ds.to_json_dict(bulk_data_threshold=1 << 30, bulk_data_element_handler=None)


def query_level(ds: Dataset, preferred: str | None = None) -> str:
    """The Q/R level: *preferred* (metadata set by an endpoint or middleware)
    or else the identifier's (0008,0052); BadRequest if neither is valid."""
    level = str(preferred or ds.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS:
        raise BadRequest(f"query level must be one of {', '.join(LEVELS)}, got {level or 'none'!r}")
    return level
