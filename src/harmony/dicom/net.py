"""DICOM network vocabulary shared by the DIMSE endpoint and the SCU backend.

What lives here is what both sides of an association need: the presentation
contexts Harmony proposes and accepts, the query/retrieve model table and the
AE title check.  Associations themselves are carried by Harmony's own engine
(:mod:`harmony.dicom.ul`), which sets TCP_NODELAY, frames PDUs and does TLS
(:mod:`harmony.dicom.ul.tls`); pynetdicom supplies the PDU and presentation
classes and its service-class tables.  DIMSE statuses live in
:mod:`harmony.dicom.status`.
"""

from __future__ import annotations

import logging

from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import StoragePresentationContexts, build_context, build_role
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from harmony.config.errors import OptionError
from harmony.dicom import transfer
from harmony.dicom.results import C_FIND, C_GET, C_MOVE
from harmony.log import get_logger


class _ToTwistedLogger(logging.Handler):
    """pynetdicom reports trouble (a PDU or presentation context it cannot
    decode or build) only through stdlib logging, where nothing listens under
    twistd: pass warnings and errors on to Harmony's structured log."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.log = get_logger("harmony.pynetdicom")

    def emit(self, record):
        try:
            level = "error" if record.levelno >= logging.ERROR else "warn"
            getattr(self.log, level)("pynetdicom: {message}", message=record.getMessage())
        except Exception:  # noqa: BLE001 - logging must never break a DIMSE thread
            pass


_pynetdicom_logger = logging.getLogger("pynetdicom")
if not any(isinstance(h, _ToTwistedLogger) for h in _pynetdicom_logger.handlers):
    _pynetdicom_logger.addHandler(_ToTwistedLogger())
    if _pynetdicom_logger.level == logging.NOTSET or _pynetdicom_logger.level > logging.WARNING:
        _pynetdicom_logger.setLevel(logging.WARNING)

UNCOMPRESSED = transfer.UNCOMPRESSED
#: Every standard storage transfer syntax: what Harmony's storage SCPs accept.
ALL_SYNTAXES = transfer.STORAGE

#: query model -> operation -> SOP Class
QUERY_MODELS = {
    "study": {C_FIND: StudyRootQueryRetrieveInformationModelFind,
              C_GET: StudyRootQueryRetrieveInformationModelGet,
              C_MOVE: StudyRootQueryRetrieveInformationModelMove},
    "patient": {C_FIND: PatientRootQueryRetrieveInformationModelFind,
                C_GET: PatientRootQueryRetrieveInformationModelGet,
                C_MOVE: PatientRootQueryRetrieveInformationModelMove},
}
#: SOP Class UID -> (model, operation), for the SCP side
MODEL_OF = {str(uid): (model, op) for model, ops in QUERY_MODELS.items() for op, uid in ops.items()}

def check_aet(options, key: str, default=None) -> str:
    """An AE title option: 1-16 ASCII characters, no backslash (PS3.5 AE)."""
    value = options.str(key) if default is None else options.str(key, default)
    if not 0 < len(value.strip()) <= 16 or not value.isascii() or "\\" in value:
        raise OptionError(key, f"must be an AE title of 1-16 ASCII characters, got {value!r}")
    return value.strip()


# --------------------------------------------------------------------------- contexts

#: Image classes that get one presentation context per common compressed
#: transfer syntax, so a PACS can send compressed instances as stored (each
#: context negotiates exactly one syntax, and a C-GET sub-operation or a chunked
#: C-STORE needs an exact match to pass bytes through unchanged).  Other
#: (class, syntax) pairs are added per association where they are known: the
#: instances a C-MOVE sends, the pairs a dicom_scu pool has met.
_COMPRESSIBLE = {
    "1.2.840.10008.5.1.4.1.1.2": (RLELossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless,
                                  JPEG2000Lossless),  # CT
    "1.2.840.10008.5.1.4.1.1.4": (RLELossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless,
                                  JPEG2000Lossless),  # MR
    "1.2.840.10008.5.1.4.1.1.7": (RLELossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEG2000Lossless),  # SC
    "1.2.840.10008.5.1.4.1.1.1": (JPEGBaseline8Bit, JPEGLosslessSV1),  # CR
    "1.2.840.10008.5.1.4.1.1.1.1": (JPEGBaseline8Bit, JPEGLosslessSV1),  # DX
    "1.2.840.10008.5.1.4.1.1.6.1": (JPEGBaseline8Bit, RLELossless),  # US
}
#: Common non-image classes that must fit in the 128 contexts before rarer ones.
_COMMON = (
    "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.5.1.4.1.1.11.1",
    "1.2.840.10008.5.1.4.1.1.481.1", "1.2.840.10008.5.1.4.1.1.481.2", "1.2.840.10008.5.1.4.1.1.481.3",
    "1.2.840.10008.5.1.4.1.1.481.5", "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.20",
    "1.2.840.10008.5.1.4.1.1.12.1", "1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.66.4",
)
MAX_CONTEXTS = 128


def requestor_contexts(pairs=()):
    """Presentation contexts for one association that can do everything:
    verification, find/get/move in both roots, and storage (SCU for C-STORE,
    SCP role for C-GET sub-operations).  PS3.8 caps a request at 128, so the
    retired storage classes are left out and the rarest current ones come last
    (a C-STORE of a class that did not fit gets an association of its own).

    *pairs* are (SOP class, transfer syntax) pairs known to be needed - the
    instances of a C-MOVE, the pairs a sender has met: each gets its own
    context (with the uncompressed fall-backs for its class) ahead of the
    standard storage set, so they go through as stored."""
    contexts = [build_context(Verification)]
    for ops in QUERY_MODELS.values():
        contexts.extend(build_context(uid) for uid in ops.values())
    compressed = [build_context(uid, [ts]) for uid, syntaxes in _COMPRESSIBLE.items() for ts in syntaxes]
    have = {(str(cx.abstract_syntax), str(ts)) for cx in compressed for ts in cx.transfer_syntax}
    standard = _storage_by_priority()
    extra, covered = [], set()
    for sop_class, syntax in pairs:
        sop_class, syntax = str(sop_class), str(syntax)
        if (sop_class, syntax) not in have and syntax not in transfer.FALLBACK:
            extra.append(build_context(sop_class, [syntax]))
            have.add((sop_class, syntax))
        if sop_class not in covered:
            extra.append(build_context(sop_class, list(transfer.FALLBACK)))
            covered.add(sop_class)
    extra = extra[:MAX_CONTEXTS - len(contexts) - len(compressed)]
    room = MAX_CONTEXTS - len(contexts) - len(compressed) - len(extra)
    storage = [build_context(uid, list(transfer.FALLBACK)) for uid in standard if uid not in covered][:room]
    return contexts + extra + storage + compressed


def _storage_by_priority() -> list:
    current = [cx.abstract_syntax for cx in StoragePresentationContexts if not cx.abstract_syntax.is_retired]
    first = list(_COMPRESSIBLE) + [uid for uid in _COMMON if uid in current]
    return first + [uid for uid in current if uid not in first]


def storage_roles(contexts) -> list:
    """SCP/SCU role selection items so the peer may C-STORE to us during C-GET."""
    seen, roles = set(), []
    for cx in contexts:
        uid = cx.abstract_syntax
        if uid in seen or uid == Verification or uid in MODEL_OF:
            continue
        seen.add(uid)
        roles.append(build_role(uid, scu_role=True, scp_role=True))
    return roles


def storage_contexts(pairs=()):
    """The storage part of :func:`requestor_contexts` (for C-STORE-only associations)."""
    return [cx for cx in requestor_contexts(pairs) if cx.abstract_syntax != Verification
            and cx.abstract_syntax not in MODEL_OF]
