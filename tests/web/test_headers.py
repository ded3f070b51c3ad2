"""harmony.web.headers: hop-by-hop headers never cross the proxy, end-to-end ones cross untouched."""

from __future__ import annotations

from twisted.web.http_headers import Headers

from harmony.web.headers import HOP_BY_HOP, connection_listed, copy_headers, end_to_end


def _headers(**values):
    h = Headers()
    for name, value in values.items():
        h.setRawHeaders(name.replace("_", "-"), value if isinstance(value, list) else [value])
    return h


def test_hop_by_hop_and_connection_listed_headers_are_dropped():
    h = _headers(Connection="close, X-Secret-Hop", X_Secret_Hop="1", Keep_Alive="5", Transfer_Encoding="chunked",
                 TE="trailers", Accept="text/plain", X_Kept=["a", "b"])
    assert connection_listed(h) == {b"close", b"x-secret-hop"}
    out = end_to_end(h)
    assert dict(out.getAllRawHeaders()) == {b"Accept": [b"text/plain"], b"X-Kept": [b"a", b"b"]}
    assert b"te" in HOP_BY_HOP and b"upgrade" in HOP_BY_HOP


def test_drop_removes_more_names_case_insensitively():
    out = end_to_end(_headers(Host="a", Accept="b"), drop=(b"HOST",))
    assert not out.hasHeader(b"host") and out.hasHeader(b"accept")


def test_copy_headers_is_a_copy():
    original = _headers(Accept="x", Cookie="c")
    copy = copy_headers(original, skip={b"cookie"})
    copy.addRawHeader(b"accept", b"y")
    assert original.getRawHeaders(b"accept") == [b"x"]
    assert copy.getRawHeaders(b"accept") == [b"x", b"y"] and not copy.hasHeader(b"cookie")
