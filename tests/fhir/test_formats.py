"""harmony.fhir.formats: _format and Accept negotiation, request body formats, FHIR versions."""

from __future__ import annotations

import pytest

from harmony.errors import NotAcceptable, UnsupportedMediaType
from harmony.fhir.formats import body_format, family, negotiate


def test_family_ignores_parameters_and_case():
    assert family("Application/FHIR+JSON; fhirVersion=4.0") == "json"
    assert family("text/xml") == "xml"
    assert family("text/html") is None


@pytest.mark.parametrize("fmt, accept, expected", [
    (None, None, "json"),
    ("xml", "application/fhir+json", "xml"),            # _format wins
    ("application/fhir json", None, "json"),             # an unencoded '+' became a space
    (None, "application/fhir+xml;q=0.9, application/fhir+json;q=0.5", "xml"),
    (None, "text/html, */*;q=0.1", "json"),
    (None, "application/fhir+json; fhirVersion=4.0", "json"),
])
def test_negotiate(fmt, accept, expected):
    assert negotiate(fmt, accept, "4.0") == expected


@pytest.mark.parametrize("fmt, accept", [
    ("turtle", None),
    (None, "text/html"),
    (None, "application/fhir+json; fhirVersion=5.0"),
    (None, "application/fhir+json;q=0"),
])
def test_what_cannot_be_served_is_406(fmt, accept):
    with pytest.raises(NotAcceptable):
        negotiate(fmt, accept, "4.0")


def test_a_binary_read_may_accept_anything():
    assert negotiate(None, "application/pdf", "4.0", any_accept=True) == "json"


def test_body_format():
    assert body_format(None, "4.0") == "json"
    assert body_format("application/fhir+xml", "4.0") == "xml"
    with pytest.raises(UnsupportedMediaType):
        body_format("text/plain", "4.0")
    with pytest.raises(UnsupportedMediaType):
        body_format("application/fhir+json; fhirVersion=3.0", "4.0")
