"""harmony.fhir.rest: every FHIR REST URL classified, everything else refused with its issue code."""

from __future__ import annotations

import pytest

from harmony.errors import BadRequest, MethodNotAllowed, NotFound
from harmony.fhir.outcome import issue_code
from harmony.fhir.rest import Interaction, check_resource_body, classify


@pytest.mark.parametrize("method, subpath, query, expected", [
    ("GET", "/", False, Interaction("base")),
    ("GET", "", True, Interaction("search-system")),
    ("POST", "/", False, Interaction("batch-transaction")),
    ("GET", "/metadata", False, Interaction("capabilities")),
    ("GET", "/_history", False, Interaction("history-system")),
    ("GET", "/.well-known/smart-configuration", False, Interaction("well-known")),
    ("POST", "/$export", False, Interaction("operation", operation="export")),
    ("GET", "/Patient", True, Interaction("search-type", resource_type="Patient")),
    ("POST", "/Patient", False, Interaction("create", resource_type="Patient")),
    ("PUT", "/Patient", True, Interaction("conditional-update", resource_type="Patient")),
    ("POST", "/Patient/_search", False, Interaction("search-type", resource_type="Patient")),
    ("GET", "/Patient/_history", False, Interaction("history-type", resource_type="Patient")),
    ("GET", "/Patient/p-1", False, Interaction("read", resource_type="Patient", id="p-1")),
    ("PUT", "/Patient/p-1", False, Interaction("update", resource_type="Patient", id="p-1")),
    ("DELETE", "/Patient/p-1", False, Interaction("delete", resource_type="Patient", id="p-1")),
    ("GET", "/Patient/p-1/_history", False, Interaction("history-instance", resource_type="Patient", id="p-1")),
    ("GET", "/Patient/p-1/Observation", False, Interaction("search-compartment", resource_type="Patient", id="p-1")),
    ("GET", "/Patient/p-1/_history/3", False,
     Interaction("vread", resource_type="Patient", id="p-1", version_id="3")),
    ("POST", "/Patient/p-1/$everything", False,
     Interaction("operation", resource_type="Patient", id="p-1", operation="everything")),
])
def test_classify(method, subpath, query, expected):
    assert classify(method, subpath, query) == expected


def test_metadata_names_only_what_is_set():
    assert Interaction("read", resource_type="Patient", id="1").metadata() == {
        "fhir.interaction": "read", "fhir.resource_type": "Patient", "fhir.id": "1"}


@pytest.mark.parametrize("subpath, issue", [
    ("/patient", "not-supported"),         # not a resource type
    ("/Patient/..", "not-found"),          # not an id
    ("/Patient/" + "x" * 65, "not-found"),
    ("/Patient/1/_history/2/3", "not-supported"),
])
def test_not_a_fhir_url_is_404_with_an_issue_code(subpath, issue):
    with pytest.raises(NotFound) as e:
        classify("GET", subpath)
    assert issue_code(e.value) == issue


def test_a_method_the_url_does_not_take_is_405_with_allow():
    with pytest.raises(MethodNotAllowed) as e:
        classify("DELETE", "/metadata")
    assert ("Allow", "GET, HEAD") in e.value.headers


def test_a_resource_body_must_be_the_resource_the_url_names():
    create = classify("POST", "/Patient")
    assert check_resource_body(create, "json", b'{"resourceType": "Patient"}')["resourceType"] == "Patient"
    with pytest.raises(BadRequest):
        check_resource_body(create, "json", b'{"resourceType": "Observation"}')
    with pytest.raises(BadRequest) as broken:
        check_resource_body(create, "json", b"{not json")
    assert issue_code(broken.value) == "structure"
    update = classify("PUT", "/Patient/1")
    with pytest.raises(BadRequest):
        check_resource_body(update, "json", b'{"resourceType": "Patient", "id": "2"}')


def test_xml_bodies_are_read_without_entities():
    create = classify("POST", "/Patient")
    check_resource_body(create, "xml", b'<Patient xmlns="http://hl7.org/fhir"><id value="1"/></Patient>')
    with pytest.raises(BadRequest):
        check_resource_body(create, "xml", b'<Patient xmlns="urn:other"/>')
    bomb = b'<?xml version="1.0"?><!DOCTYPE p [<!ENTITY a "aaaa">]><Patient xmlns="http://hl7.org/fhir">&a;</Patient>'
    with pytest.raises(BadRequest):
        check_resource_body(create, "xml", bomb)
