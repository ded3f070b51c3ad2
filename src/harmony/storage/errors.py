"""Errors the durable store raises, each with the status a client should see.

Every one is a :class:`~harmony.errors.HarmonyError`, so HTTP endpoints render
it as problem+json with its HTTP status; ``dimse_status`` is the PS3.4 status a
DIMSE endpoint answers with instead (C-STORE failure codes, PS3.4 Annex B.2.3).
"""

from __future__ import annotations

from harmony.dicom import status as dimse
from harmony.errors import BadRequest, HarmonyError, InsufficientStorage


class StorageFull(InsufficientStorage):
    """Refused *before* writing: the free-space floor would be crossed."""

    code = "storage-full"
    dimse_status = dimse.STORE_OUT_OF_RESOURCES


class InvalidInstance(BadRequest):
    """The data is not a DICOM instance the store can file (bad UIDs, not DICOM)."""

    code = "invalid-instance"
    dimse_status = dimse.STORE_CANNOT_UNDERSTAND


class MismatchedInstance(InvalidInstance):
    """The file is not the instance it was sent as (its SOP Class or Instance UID differs)."""

    code = "dataset-mismatch"
    dimse_status = dimse.STORE_DATASET_MISMATCH


class InvalidQuery(BadRequest):
    """A C-FIND/C-GET/C-MOVE identifier the archive cannot answer."""

    code = "invalid-query"
    dimse_status = dimse.IDENTIFIER_MISMATCH


class StorageFailure(HarmonyError):
    """An I/O error while writing; nothing was acknowledged."""

    status, title, code = 500, "Storage Failure", "storage-failure"
    dimse_status = dimse.PROCESSING_FAILURE


class DatabaseUnavailable(StorageFailure):
    """The store's database (the shared PostgreSQL) cannot be reached: nothing
    was acknowledged; try again shortly (a restart or failover is under way)."""

    status, title, code = 503, "Service Unavailable", "database-unavailable"
    dimse_status = dimse.STORE_OUT_OF_RESOURCES
    #: Seconds a client is asked to wait (HTTP Retry-After).
    RETRY_AFTER = 5

    def __init__(self, detail: str = "", **kwargs):
        kwargs.setdefault("headers", [(b"Retry-After", str(self.RETRY_AFTER).encode())])
        super().__init__(detail, **kwargs)
