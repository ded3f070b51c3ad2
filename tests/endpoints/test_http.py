"""harmony.endpoints.http in memory: a request through twisted.web's parser, the endpoint and
the pipeline to the echo backend, on treq's in-memory agent (no port)."""

from __future__ import annotations

import json

import pytest

from harmony.backends.echo import EchoBackend
from harmony.config.errors import OptionError
from harmony.endpoints.http import HttpEndpoint
from tests.memory import HttpStub, build


def _stub(**options):
    endpoint = build(HttpEndpoint, {"path_prefix": "/api", **options}, name="api")
    return endpoint, HttpStub(endpoint, [EchoBackend("echo")])


def test_the_request_reaches_the_backend_as_it_came():
    _endpoint, stub = _stub()
    answer, body = stub.request("POST", "/api/items/7?b=2&a=1&a=", data=b'{"x": 1}',
                                headers={"X-Custom": ["one", "two"], "Content-Type": "application/json"})
    assert answer.code == 200
    seen = json.loads(body)
    assert seen["method"] == "POST" and seen["path"] == "/api/items/7" and seen["subpath"] == "/items/7"
    assert seen["query"] == {"b": ["2"], "a": ["1", ""]}
    assert seen["headers"]["x-custom"] == ["one", "two"]
    assert seen["body"] == '{"x": 1}'
    assert seen["metadata"]["endpoint"] == "api" and seen["metadata"]["protocol"] == "http"


def test_a_path_outside_the_prefix_is_not_this_endpoints():
    _endpoint, stub = _stub()
    answer, body = stub.request("GET", "/apix")
    assert answer.code == 404 and json.loads(body)["status"] == 404


def test_it_streams_and_max_body_bytes_is_its_limit():
    endpoint, _stub_ = _stub(max_body_bytes=1000)
    assert endpoint.stream_request_body is True
    assert endpoint.request_body_limit("POST", "/x") == (1000, "max_body_bytes")
    unlimited, _ = _stub()
    assert unlimited.request_body_limit("POST", "/x") is None


@pytest.mark.parametrize("prefix", ["api", "/a/../b", "/a?x", "/a#f"])
def test_a_prefix_that_is_not_a_plain_path_is_refused(prefix):
    with pytest.raises(OptionError) as e:
        build(HttpEndpoint, {"path_prefix": prefix})
    assert e.value.key == "path_prefix"


def test_max_body_bytes_must_be_positive():
    with pytest.raises(OptionError) as e:
        build(HttpEndpoint, {"max_body_bytes": 0})
    assert e.value.key == "max_body_bytes"
