"""harmony.dicom.status: one vocabulary of DIMSE statuses (issue 19 item 2).

Its answers are the ones the five former copies gave (dicom/net.py, the
DICOMweb bridge, dicomweb_dimse, storage/errors.py, storage/forward.py), and
those modules now use it rather than their own constants."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

import harmony
from harmony.dicom import status as dimse
from harmony.storage.errors import InvalidInstance, InvalidQuery, StorageFailure, StorageFull
from harmony.storage.forward import dimse_outcome


@pytest.mark.parametrize("code,category", [
    (0x0000, "Success"), (0xFF00, "Pending"), (0xFF01, "Pending"), (0xFE00, "Cancel"), (0xB000, "Warning"),
    (0xB007, "Warning"), (0x0001, "Warning"), (0x0107, "Warning"), (0x0116, "Warning"), (0xA700, "Failure"),
    (0xA801, "Failure"), (0xC000, "Failure"), (0x0110, "Failure"), (0x0124, "Failure"), (None, "Failure"),
])
def test_categories(code, category):
    assert dimse.category(code) == category
    assert dimse.is_failure(code) is (category == "Failure")


@pytest.mark.parametrize("code,http", [
    (0x0000, 200), (0xB000, 200), (0xA900, 400), (0xA801, 400), (0x0124, 403), (0xC002, 504), (0xC001, 502),
    (0xC000, 502), (0xA700, 502), (0x0110, 502), (None, 502),
])
def test_http_mapping(code, http):
    assert dimse.http_status_for(code) == http


def test_store_forward_retries_only_transient_failures():
    assert dimse_outcome(dimse.SUCCESS).ok and dimse_outcome(dimse.STORE_ELEMENTS_DISCARDED).ok
    for code in (dimse.STORE_OUT_OF_RESOURCES, 0xA7FE, dimse.PROCESSING_FAILURE, dimse.RESOURCE_LIMITATION,
                 dimse.UNABLE_TO_PROCESS_BACKEND):
        outcome = dimse_outcome(code)
        assert not outcome.ok and not outcome.permanent, hex(code)
    for code in (dimse.STORE_CANNOT_UNDERSTAND, dimse.STORE_DATASET_MISMATCH, dimse.SOP_CLASS_NOT_SUPPORTED):
        assert dimse_outcome(code).permanent, hex(code)
    assert "0xC000" in dimse_outcome(0xC000, "bad").detail


def test_store_errors_carry_named_statuses():
    assert StorageFull.dimse_status == dimse.STORE_OUT_OF_RESOURCES
    assert InvalidInstance.dimse_status == dimse.STORE_CANNOT_UNDERSTAND
    assert InvalidQuery.dimse_status == dimse.IDENTIFIER_MISMATCH
    assert StorageFailure.dimse_status == dimse.PROCESSING_FAILURE


def test_no_module_declares_its_own_status_codes():
    """A module-level constant bound to a 0xNNNN status, or a 0xA7../0xC0../0xFE00 literal, outside
    status.py means the vocabulary has started to drift again."""
    root = pathlib.Path(harmony.__file__).parent
    status_like = re.compile(r"0x(0000|FF0[01]|FE00|B00[067]|A7\w\w|A801|A900|C00\w|011[06]|012[24]|0213)\b",
                             re.IGNORECASE)
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "status.py" or path.name == "fastcmd.py":
            continue
        rel = path.relative_to(root)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, int) and node.value in (
                    0xFF00, 0xFE00, 0xA700, 0xA701, 0xA702, 0xA801, 0xA900, 0xC000, 0xC001, 0xC002, 0xB000):
                segment = ast.get_source_segment(path.read_text(), node) or ""
                if status_like.fullmatch(segment):
                    offenders.append(f"{rel}:{node.lineno} {segment}")
    assert offenders == []
