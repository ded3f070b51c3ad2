"""harmony.dicomweb.baseurl: the proxy's public root from a twisted.web request (DummyRequest)."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.web.test.requesthelper import DummyRequest

from harmony.dicomweb.baseurl import public_root


def _request(headers=None, *, secure=False, port=8042):
    r = DummyRequest([b""])
    r.getHost = lambda: IPv4Address("TCP", "10.1.2.3", port)
    r.isSecure = lambda: secure
    for name, value in (headers or {}).items():
        r.requestHeaders.setRawHeaders(name, [value])
    return r


def test_the_host_header_completed_with_the_port_the_request_came_to():
    assert public_root(_request({"Host": "harmony.test"})) == "http://harmony.test:8042"  # dicomweb-client's Host
    assert public_root(_request({"Host": "harmony.test:9000"})) == "http://harmony.test:9000"
    assert public_root(_request({"Host": "harmony.test"}, secure=True, port=443)) == "https://harmony.test"


def test_forwarded_headers_when_trusted():
    headers = {"Host": "internal:8042", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "pacs.example.test"}
    assert public_root(_request(headers)) == "https://pacs.example.test"
    assert public_root(_request(dict(headers, **{"X-Forwarded-Port": "8443"}))) == "https://pacs.example.test:8443"
    assert public_root(_request(headers), trust_forwarded=False) == "http://internal:8042"


def test_no_usable_host_falls_back_to_the_local_address():
    assert public_root(_request({"Host": "bad host/with/path"})) == "http://10.1.2.3:8042"
    assert public_root(_request()) == "http://10.1.2.3:8042"
