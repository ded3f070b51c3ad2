"""The absolute URL clients use to reach this proxy's DICOMweb service.

RetrieveURL and BulkDataURI values must point at the proxy, not at the PACS
behind it.  A configured ``public_base_url`` wins; otherwise the scheme, host
and port come from ``X-Forwarded-Proto/Host/Port`` (when trusted) or from the
request itself.  dicomweb-client sends ``Host`` without the port, so a Host
with no port is completed with the port the request actually arrived on.
"""

from __future__ import annotations

import re

_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(:\d{1,5})?$")


def _first(request, name: str) -> str | None:
    v = request.getHeader(name)
    if v is None:
        return None
    v = v.decode("latin-1") if isinstance(v, bytes) else v
    return v.split(",")[0].strip() or None


def _split_host(host: str) -> tuple[str, str | None]:
    m = _HOST.match(host)
    if not m:
        return "", None
    return m.group(1), (m.group(2)[1:] if m.group(2) else None)


def public_root(request, *, trust_forwarded: bool = True) -> str:
    """``scheme://host[:port]`` for a twisted.web request."""
    local = request.getHost()
    scheme = "https" if request.isSecure() else "http"
    host, port = _split_host(_first(request, "host") or "")
    if trust_forwarded:
        fproto = _first(request, "x-forwarded-proto")
        if fproto in ("http", "https"):
            scheme = fproto
        fhost = _first(request, "x-forwarded-host")
        if fhost:
            h, p = _split_host(fhost)
            if h:
                host, port = h, p
                port = port or ""  # a forwarded host without a port means the scheme's default
        fport = _first(request, "x-forwarded-port")
        if fport and fport.isdigit():
            port = fport
    if not host:
        host = getattr(local, "host", "127.0.0.1")
        if ":" in host:
            host = f"[{host}]"
    if port is None:
        port = str(getattr(local, "port", ""))
    default = "443" if scheme == "https" else "80"
    return f"{scheme}://{host}" + (f":{port}" if port and port != default else "")
