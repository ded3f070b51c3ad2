"""harmony.dicomweb.accept: PS3.18 Accept negotiation per resource, 406 rather than a guess."""

from __future__ import annotations

import pytest

from harmony.dicomweb.accept import DICOM, DICOM_JSON, JPEG, OCTET, PNG, negotiate, parse_accept
from harmony.errors import BadRequest, NotAcceptable


@pytest.mark.parametrize("kind, header, expected", [
    ("qido", None, (DICOM_JSON, False, None)),
    ("qido", "application/json", (DICOM_JSON, False, None)),
    ("retrieve", "*/*", (DICOM, True, None)),
    ("retrieve", 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1',
     (DICOM, True, "1.2.840.10008.1.2.1")),
    ("retrieve", 'multipart/related; type="application/dicom"; transfer-syntax=*', (DICOM, True, "*")),
    ("frames", 'multipart/related; type="image/png"', (PNG, True, None)),
    ("frames", "application/octet-stream", (OCTET, False, None)),
    ("rendered", "image/png;q=0.9, image/jpeg;q=0.5", (PNG, False, None)),
    ("rendered", "image/*", (JPEG, False, None)),
])
def test_negotiate(kind, header, expected):
    assert negotiate(kind, header) == expected


def test_quality_orders_ranges_and_zero_excludes():
    assert [m for m, _p, _q in parse_accept("a/b;q=0.2, c/d, e/f;q=0")] == ["c/d", "a/b"]
    assert parse_accept("") == [("*/*", {}, 1.0)]
    assert parse_accept('multipart/related; type="application/dicom; x"')[0][1]["type"] == "application/dicom; x"


def test_what_cannot_be_served_is_406_naming_the_offers():
    with pytest.raises(NotAcceptable, match='multipart/related; type="application/dicom"'):
        negotiate("retrieve", "application/pdf")


@pytest.mark.parametrize("header", ["application/dicom+json;q=high", 'multipart/related; transfer-syntax="../x"'])
def test_malformed_accept_is_400(header):
    with pytest.raises(BadRequest):
        negotiate("retrieve" if "multipart" in header else "qido", header)
