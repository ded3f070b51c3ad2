"""DIMSE statuses: the one vocabulary every part of Harmony speaks.

A DIMSE status is a 16-bit code whose meaning depends on the service (PS3.4
Annex B for C-STORE, C.4 for C-FIND/C-GET/C-MOVE, PS3.7 Annex C for the
general ones).  Endpoints answer with them, backends read them from PACS
answers, the store and store-and-forward file them, and the DICOMweb bridge
turns them into HTTP statuses and STOW-RS FailureReasons.  Before this module
each of those declared its own constants and its own idea of "failure" and
"transient"; now they all name the codes here, so a rule changes in one place.

pynetdicom's ``status.py`` is the model: named codes, the category of any
code (Success, Pending, Cancel, Warning, Failure), and the questions callers
actually ask (is it a failure? worth a retry? which HTTP status?).
"""

from __future__ import annotations

# ------------------------------------------------------------------ general (PS3.7 C)
SUCCESS = 0x0000
#: PS3.7 C.4: "Warning" (e.g. attribute list error 0x0107, value out of range 0x0116).
WARNING = 0x0001
ATTRIBUTE_LIST_ERROR = 0x0107
ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
REFUSED_NOT_AUTHORISED = 0x0124
RESOURCE_LIMITATION = 0x0213
CANCEL = 0xFE00
PENDING = 0xFF00
#: C-FIND: matches continue, but some optional keys were not supported.
PENDING_WARNING = 0xFF01

# ------------------------------------------------------------------ C-STORE (PS3.4 B.2.3)
STORE_OUT_OF_RESOURCES = 0xA700
#: "Data Set does not match SOP Class" (0xA9xx); also used when the data set's
#: UIDs conflict with the request (a STOW-RS study UID that is not the URL's).
STORE_DATASET_MISMATCH = 0xA900
STORE_CANNOT_UNDERSTAND = 0xC000
STORE_COERCION = 0xB000
STORE_ELEMENTS_DISCARDED = 0xB006
STORE_DATASET_MISMATCH_WARNING = 0xB007

# ------------------------------------------------------------------ query/retrieve (PS3.4 C.4)
OUT_OF_RESOURCES = 0xA700              # C-FIND: refused, out of resources
OUT_OF_RESOURCES_MATCHES = 0xA701      # C-GET/C-MOVE: unable to calculate the number of matches
OUT_OF_RESOURCES_SUBOPS = 0xA702       # C-GET/C-MOVE: unable to perform sub-operations
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_MISMATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
WARNING_SUBOPS = 0xB000                # sub-operations complete, one or more failures or warnings

# ------------------------------------------------------------------ Harmony's own (0xC0xx "unable to process")
#: The backend (a PACS, a DICOMweb server) could not be reached or refused us.
UNABLE_TO_PROCESS_BACKEND = 0xC001
#: The backend did not answer in time.
UNABLE_TO_PROCESS_TIMEOUT = 0xC002
#: The instance is in a transfer syntax the peer refused and Harmony cannot
#: decompress (no codec: MPEG/HEVC video, an unavailable decoder).
UNABLE_TO_PROCESS_TRANSFER_SYNTAX = 0xC003

# ------------------------------------------------------------------ categories
SUCCESS_CATEGORY, PENDING_CATEGORY, CANCEL_CATEGORY = "Success", "Pending", "Cancel"
WARNING_CATEGORY, FAILURE_CATEGORY = "Warning", "Failure"

_WARNINGS = frozenset({WARNING, ATTRIBUTE_LIST_ERROR, ATTRIBUTE_VALUE_OUT_OF_RANGE})

NAMES = {
    SUCCESS: "Success", WARNING: "Warning", ATTRIBUTE_LIST_ERROR: "Attribute list error",
    ATTRIBUTE_VALUE_OUT_OF_RANGE: "Attribute value out of range", PROCESSING_FAILURE: "Processing failure",
    SOP_CLASS_NOT_SUPPORTED: "SOP class not supported", REFUSED_NOT_AUTHORISED: "Refused: not authorised",
    RESOURCE_LIMITATION: "Resource limitation", CANCEL: "Cancel", PENDING: "Pending",
    PENDING_WARNING: "Pending (optional keys not supported)", OUT_OF_RESOURCES: "Refused: out of resources",
    OUT_OF_RESOURCES_MATCHES: "Refused: out of resources (number of matches)",
    OUT_OF_RESOURCES_SUBOPS: "Refused: out of resources (sub-operations)",
    MOVE_DESTINATION_UNKNOWN: "Refused: move destination unknown",
    IDENTIFIER_MISMATCH: "Identifier / data set does not match SOP class",
    UNABLE_TO_PROCESS: "Unable to process / cannot understand",
    WARNING_SUBOPS: "Warning: sub-operations failed / coercion of data elements",
    STORE_ELEMENTS_DISCARDED: "Warning: elements discarded",
    STORE_DATASET_MISMATCH_WARNING: "Warning: data set does not match SOP class",
    UNABLE_TO_PROCESS_BACKEND: "Unable to process: backend unavailable",
    UNABLE_TO_PROCESS_TIMEOUT: "Unable to process: backend timeout",
    UNABLE_TO_PROCESS_TRANSFER_SYNTAX: "Unable to process: transfer syntax not accepted and not convertible",
}


def category(status: int | None) -> str:
    """The PS3.4 category of *status*; an absent status (no answer) is a failure."""
    if status is None:
        return FAILURE_CATEGORY
    if status == SUCCESS:
        return SUCCESS_CATEGORY
    if status in (PENDING, PENDING_WARNING):
        return PENDING_CATEGORY
    if status == CANCEL:
        return CANCEL_CATEGORY
    if status in _WARNINGS or 0xB000 <= status <= 0xBFFF:
        return WARNING_CATEGORY
    return FAILURE_CATEGORY


def name(status: int | None) -> str:
    if status is None:
        return "no status"
    return NAMES.get(status, f"{category(status)} 0x{status:04X}")


def describe(status: int | None, comment: str | None = None) -> str:
    """``DIMSE status 0xC000: comment``, as logs and problem bodies show it."""
    head = "no DIMSE status" if status is None else f"DIMSE status 0x{status:04X}"
    return head + (f": {comment}" if comment else "")


def is_pending(status: int | None) -> bool:
    return status in (PENDING, PENDING_WARNING)


def is_failure(status: int | None) -> bool:
    """True for failure statuses (not success, warning, pending or cancel)."""
    return category(status) == FAILURE_CATEGORY


def is_stored(status: int | None) -> bool:
    """A C-STORE status meaning the peer kept the instance (success or a warning)."""
    return category(status) in (SUCCESS_CATEGORY, WARNING_CATEGORY)


def is_out_of_resources(status: int | None) -> bool:
    return status is not None and 0xA700 <= status <= 0xA7FF


def is_transient(status: int | None) -> bool:
    """A failure worth retrying later: the peer was busy or full, not the data wrong."""
    return status is not None and (is_out_of_resources(status) or status in (
        PROCESSING_FAILURE, RESOURCE_LIMITATION, UNABLE_TO_PROCESS_BACKEND, UNABLE_TO_PROCESS_TIMEOUT))


def is_unavailable(status: int | None) -> bool:
    """A failure that says nothing about the request: the peer was down, busy or full."""
    return is_transient(status)


def http_status_for(status: int | None) -> int:
    """The HTTP status a DIMSE final status becomes for HTTP clients."""
    if status is None:
        return 502
    if not is_failure(status):
        return 200
    if status == IDENTIFIER_MISMATCH or status == MOVE_DESTINATION_UNKNOWN:
        return 400
    if status == REFUSED_NOT_AUTHORISED:
        return 403
    if status == UNABLE_TO_PROCESS_TIMEOUT:
        return 504
    return 502  # the PACS failed (0xC000 "unable to process" included): a gateway error


#: The response metadata key users read the status under (``0x0000`` form): a
#: view written by :func:`record`, never read back by Harmony's own code.
METADATA_KEY = "dimse_status"


def label(status: int | None) -> str:
    """``0xC000``, or ``""`` for no status: the metadata view and metric label form."""
    return "" if status is None else f"0x{status:04X}"


def of_response(response) -> int | None:
    """The DIMSE status of an answer: its result stream's (``dicom_scu``, the
    DICOMweb backends), else ``response.state.dimse_status`` (an answer without
    a stream: ``store_forward``, ``local_archive``, an error rendered for DIMSE).
    The one way Harmony's code reads a status off a response."""
    stream = response.state.dicom_results
    if stream is not None and stream.status is not None:
        return stream.status
    return response.state.dimse_status


def record(response, status: int | None, comment: str | None = None):
    """Give *response* its DIMSE status: the typed field, and the metadata view users address."""
    response.state.dimse_status = status
    response.state.error_comment = comment
    response.metadata[METADATA_KEY] = label(status)
    return response


__all__ = [n for n in dir() if n.isupper() or n in (
    "category", "name", "describe", "is_pending", "is_failure", "is_stored", "is_out_of_resources", "is_transient",
    "is_unavailable", "http_status_for", "label", "of_response", "record")]
