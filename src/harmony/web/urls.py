"""URLs a configuration names and the origin a client reached us by.

Why a toolkit module: the ``http``/``fhir``/``dicomweb`` backends, the ``dicomweb``
endpoint and the ``dicom_results_json`` middleware all check a configured base URL
and compute the client-facing origin the same way; plug-in kinds never import each
other (docs/architecture.md, "Layers"), so the shared rule lives here.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from harmony.config.errors import OptionError

_HOST = re.compile(r"^(?:[A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?$")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def check_base_url(url: str, key: str = "base_url") -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OptionError(key, f"must be an absolute http(s) URL, got {url!r}")
    if parts.query or parts.fragment:
        raise OptionError(key, "must not carry a query or fragment")
    return url.rstrip("/")


def _first(value: str | None) -> str:
    return value.split(",", 1)[0].strip() if value else ""


def request_origin(request, trust_forwarded: bool = True) -> str | None:
    """``scheme://host[:port]`` a client used to reach the proxy, for a
    RequestEnvelope: ``Forwarded``/``X-Forwarded-*`` when trusted, else the
    request's own scheme and ``Host``; None when no sane host is known."""
    proto, host, port = request.scheme, request.host, ""
    if trust_forwarded:
        fwd = _forwarded(request.header("forwarded"))
        xf_proto = (_first(request.header("x-forwarded-proto")) or fwd.get("proto", "")).lower()
        if xf_proto in _DEFAULT_PORTS:
            proto = xf_proto
        xf_host = _first(request.header("x-forwarded-host")) or fwd.get("host", "")
        if xf_host and _HOST.match(xf_host):
            host = xf_host
        port = _first(request.header("x-forwarded-port"))
    if not host or not _HOST.match(host):
        return None
    if port.isdigit() and not host.endswith("]") and ":" not in host and port != _DEFAULT_PORTS[proto]:
        host = f"{host}:{port}"
    return f"{proto}://{host}"


def _forwarded(value: str | None) -> dict[str, str]:
    """The first element of an RFC 7239 ``Forwarded`` header, as a dict."""
    out: dict[str, str] = {}
    for pair in _first(value).split(";"):
        k, sep, v = pair.partition("=")
        if sep:
            out[k.strip().lower()] = v.strip().strip('"')
    return out
