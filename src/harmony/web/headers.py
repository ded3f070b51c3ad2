"""Header rules a proxy must apply in both directions (RFC 9110 section 7.6.1)."""

from __future__ import annotations

from twisted.web.http_headers import Headers

from harmony.compat.twisted import header_name_encoder

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


def copy_headers(headers: Headers, skip=frozenset()) -> Headers:
    """A copy of *headers* without the (lower-case) names in *skip*.

    Values in a ``Headers`` are already encoded and sanitised, so they are
    copied as they are instead of through ``setRawHeaders``, which would redo
    that for every value of every header: this runs several times per proxied
    request and showed up in the passthrough profile.
    """
    out = Headers()
    raw = getattr(out, "_rawHeaders", None)
    if raw is None:  # a Twisted without the private dict: the public, slower way
        for name, values in headers.getAllRawHeaders():
            if name.lower() not in skip:
                out.setRawHeaders(name, list(values))
        return out
    for name, values in headers.getAllRawHeaders():
        if name.lower() not in skip:
            raw[name] = list(values)
    return out


def end_to_end(headers: Headers, *, drop=()) -> Headers:
    """A copy of *headers* without hop-by-hop ones (and without *drop*)."""
    raw = getattr(headers, "_rawHeaders", None)
    if raw is None:  # a Twisted without the private dict: the public, slower way
        skip = _skip_set(drop)
        if headers.hasHeader(b"connection"):
            skip = skip | connection_listed(headers)
        return copy_headers(headers, skip)
    # Compared as Headers keys them (Header-Case), sparing a lower() a name: this
    # runs on both ways of every proxied request.
    skip = _canonical_skip_set(drop)
    listed = connection_listed(headers) if _CONNECTION in raw else None
    out = Headers()
    out_raw = out._rawHeaders
    for name, values in raw.items():
        if name in skip or (listed and name.lower() in listed):
            continue
        out_raw[name] = list(values)
    return out


_SKIP_SETS: dict[tuple, frozenset] = {}
_CANONICAL_SKIP_SETS: dict[tuple, frozenset] = {}
_CONNECTION = b"Connection"  # as Headers keys it


def _skip_set(drop) -> frozenset:
    """HOP_BY_HOP plus *drop* (lower-cased), made once per distinct *drop*."""
    key = tuple(drop)
    found = _SKIP_SETS.get(key)
    if found is None:
        found = _SKIP_SETS[key] = HOP_BY_HOP | {d.lower() for d in drop}
    return found


def _canonical_skip_set(drop) -> frozenset:
    """:func:`_skip_set` spelt as ``Headers`` keys names, made once per distinct *drop*."""
    key = drop if isinstance(drop, tuple) else tuple(drop)
    found = _CANONICAL_SKIP_SETS.get(key)
    if found is None:
        encode = header_name_encoder().encode
        found = _CANONICAL_SKIP_SETS[key] = frozenset(encode(n) for n in _skip_set(drop))
    return found
