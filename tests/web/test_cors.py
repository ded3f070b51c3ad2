"""harmony.web.cors: the policy an endpoint's ``cors`` table configures, on twisted.web DummyRequests."""

from __future__ import annotations

import pytest
from twisted.web.test.requesthelper import DummyRequest

from harmony.config.errors import OptionError
from harmony.config.options import Options
from harmony.web.cors import CorsPolicy
from tests.memory import response

METHODS = ("GET", "POST")


def _policy(**cors):
    return CorsPolicy.from_options(Options({"cors": cors}), METHODS)


def _request(method=b"GET", **headers):
    r = DummyRequest([b""])
    r.method = method
    for name, value in headers.items():
        r.requestHeaders.setRawHeaders(name.replace("_", "-"), [value])
    return r


def test_off_unless_configured():
    assert CorsPolicy.from_options(Options({}), METHODS) is None


def test_a_preflight_from_an_allowed_origin():
    policy = _policy(allow_origins=["https://viewer.test"], allow_credentials=True, max_age_secs=60)
    req = _request(b"OPTIONS", Origin="https://VIEWER.test", Access_Control_Request_Method="POST")
    assert CorsPolicy.is_preflight(req)
    answer = policy.preflight(req)
    h = answer.headers
    assert answer.status == 204
    assert h.getRawHeaders(b"access-control-allow-origin") == [b"https://VIEWER.test"]
    assert h.getRawHeaders(b"access-control-allow-methods") == [b"GET, POST"]
    assert h.getRawHeaders(b"access-control-allow-credentials") == [b"true"]
    assert h.getRawHeaders(b"access-control-max-age") == [b"60"]
    assert policy.preflight(_request(b"OPTIONS", Origin="https://evil.test",
                                     Access_Control_Request_Method="POST")) is None


def test_answers_get_the_origin_and_the_proxy_owns_cors():
    policy = _policy(allow_origins=["https://viewer.test"])
    upstream = response(200, headers={"Access-Control-Allow-Origin": "*", "Vary": "Accept-Encoding"})
    out = policy.decorate(_request(Origin="https://viewer.test"), upstream)
    assert out.headers.getRawHeaders(b"access-control-allow-origin") == [b"https://viewer.test"]
    assert out.headers.getRawHeaders(b"vary") == [b"Accept-Encoding, Origin"]
    assert b"X-Request-ID" in out.headers.getRawHeaders(b"access-control-expose-headers")[0]
    stranger = policy.decorate(_request(Origin="https://evil.test"), response(200))
    assert not stranger.headers.hasHeader(b"access-control-allow-origin")


def test_a_wildcard_without_credentials_and_echoed_headers():
    policy = _policy(allow_origins=["*"], allow_headers=["*"])
    req = _request(b"OPTIONS", Origin="https://any.test", Access_Control_Request_Method="GET",
                   Access_Control_Request_Headers="x-custom")
    h = policy.preflight(req).headers
    assert h.getRawHeaders(b"access-control-allow-origin") == [b"*"]
    assert h.getRawHeaders(b"access-control-allow-headers") == [b"x-custom"]
    assert not policy.decorate(_request(Origin="https://any.test"), response(200)).headers.hasHeader(b"vary")


@pytest.mark.parametrize("cors, key", [
    ({}, "cors.allow_origins"),
    ({"allow_origins": ["https://viewer.test/"]}, "cors.allow_origins"),
    ({"allow_origins": ["*"], "allow_credentials": True}, "cors.allow_credentials"),
    ({"allow_origins": ["https://v.test"], "allow_methods": [""]}, "cors.allow_methods"),
    ({"allow_origins": ["https://v.test"], "colour": "blue"}, "cors.colour"),
])
def test_configuration_errors_name_the_key(cors, key):
    with pytest.raises(OptionError) as e:
        _policy(**cors)
    assert e.value.key == key
