"""harmony.web.routes: werkzeug's routing misses as Harmony errors, and Klein answers from envelopes."""

from __future__ import annotations

import pytest
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest
from werkzeug.exceptions import BadRequest as WerkzeugBadRequest
from werkzeug.routing import Map, Rule

from harmony.envelope import ResponseEnvelope
from harmony.errors import BadRequest, MethodNotAllowed, NotFound
from harmony.web.routes import apply_response, harmony_error, match, routing_failure

URLS = Map([Rule("/items/<int:item>", endpoint="item", methods=["GET", "PUT"])])


def test_match_gives_the_endpoint_and_arguments():
    assert match(URLS, "/items/7", "GET") == ("item", {"item": 7})


def test_a_miss_is_404_and_a_wrong_method_is_405_with_allow():
    with pytest.raises(NotFound):
        match(URLS, "/nothing", "GET")
    with pytest.raises(MethodNotAllowed) as e:
        match(URLS, "/items/7", "DELETE")
    allow = dict(e.value.headers)["Allow"]
    assert set(allow.split(", ")) == {"GET", "HEAD", "PUT"}


def test_other_werkzeug_errors_keep_their_status():
    assert isinstance(harmony_error(WerkzeugBadRequest("nope")), BadRequest)


def test_routing_failure_converts_only_routing_errors():
    request = DummyRequest([b"x"])
    request.path = b"/x"
    converted = routing_failure(request, Failure(WerkzeugBadRequest("bad")))
    assert isinstance(converted.value, BadRequest)
    other = Failure(KeyError("k"))
    assert routing_failure(request, other) is other


def test_apply_response_sets_status_headers_and_length():
    request = DummyRequest([b""])
    response = ResponseEnvelope.json(201, {"ok": True})
    response.headers.setRawHeaders("Content-Length", ["999"])
    body = apply_response(request, response)
    assert request.responseCode == 201 and body == b'{"ok":true}'
    assert request.responseHeaders.getRawHeaders(b"content-length") == [str(len(body)).encode()]
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
