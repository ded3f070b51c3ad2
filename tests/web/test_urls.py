"""harmony.web.urls: configured base URLs, and the origin a client reached the proxy by."""

from __future__ import annotations

import pytest

from harmony.config.errors import OptionError
from harmony.web.urls import check_base_url, request_origin
from tests.memory import request


def test_check_base_url():
    assert check_base_url("https://pacs.test:8443/dicom-web/") == "https://pacs.test:8443/dicom-web"
    for bad in ("ftp://x", "/relative", "http://x/?q=1", "http://x/#f", "http://"):
        with pytest.raises(OptionError) as e:
            check_base_url(bad, "upstream")
        assert e.value.key == "upstream"


def _req(headers=None, host="harmony.test:8080", scheme="http"):
    return request(headers=headers or {}, host=host, scheme=scheme)


def test_the_requests_own_scheme_and_host_without_forwarding():
    assert request_origin(_req()) == "http://harmony.test:8080"
    assert request_origin(_req(host="bad host!")) is None


def test_x_forwarded_headers_when_trusted():
    forwarded = {"X-Forwarded-Proto": "https, http", "X-Forwarded-Host": "public.test", "X-Forwarded-Port": "8443"}
    assert request_origin(_req(forwarded)) == "https://public.test:8443"
    assert request_origin(_req(dict(forwarded, **{"X-Forwarded-Port": "443"}))) == "https://public.test"
    assert request_origin(_req(forwarded), trust_forwarded=False) == "http://harmony.test:8080"


def test_rfc7239_forwarded_and_refused_values():
    assert request_origin(_req({"Forwarded": 'for=1.2.3.4;proto=https;host="edge.test", for=5.6.7.8'})) \
        == "https://edge.test"
    # a host that is no host, or a scheme we do not speak, is ignored
    assert request_origin(_req({"X-Forwarded-Host": "evil.test/path", "X-Forwarded-Proto": "gopher"})) \
        == "http://harmony.test:8080"
