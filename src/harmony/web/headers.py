"""Header rules a proxy must apply in both directions (RFC 9110 section 7.6.1)."""

from __future__ import annotations

from twisted.web.http_headers import Headers

#: Hop-by-hop headers: they describe one connection, never the message.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authorization", b"proxy-authenticate",
})


def connection_listed(headers: Headers) -> set[bytes]:
    """Names a ``Connection`` header lists: they are hop-by-hop for this message too."""
    listed = set()
    for value in headers.getRawHeaders(b"connection", []):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                listed.add(token)
    return listed


def end_to_end(headers: Headers, *, drop=()) -> Headers:
    """A copy of *headers* without hop-by-hop ones (and without *drop*)."""
    skip = HOP_BY_HOP | connection_listed(headers) | {d.lower() for d in drop}
    out = Headers()
    for name, values in headers.getAllRawHeaders():
        if name.lower() not in skip:
            out.setRawHeaders(name, list(values))
    return out
