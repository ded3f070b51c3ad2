"""Per-target TLS for HTTP-family backends.

A ``[targets.NAME]`` table may pin what its ``https`` upstream is trusted by and
present a client certificate (mutual TLS), instead of the system trust store::

    [targets.pacs]
    url = "https://pacs.example.org:8443"
    tls_ca_file = "certs/pacs-ca.pem"        # trust only this CA (PEM)
    tls_cert_file = "certs/harmony.pem"      # client certificate (PEM) ...
    tls_key_file = "certs/harmony.key"       # ... and its key (PEM; default: tls_cert_file)

The Agent asks its policy for a TLS context per host and port, so the policy
maps each configured target's netloc to its own options and leaves every other
host to the default browser-like policy.  Paths are relative to the file that
defines the target.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from twisted.internet import ssl
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from harmony.config.errors import ConfigErrors, Problem

TLS_KEYS = ("tls_ca_file", "tls_cert_file", "tls_key_file")


def _read(target, key: str) -> bytes:
    value = target.options[key]
    base = Path(target.source).parent if target.source else Path.cwd()
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigErrors([Problem(target.source, f"targets.{target.name}.{key}",
                                    f"cannot read {path}: {e.strerror}")]) from None


def _problem(target, key, message):
    return ConfigErrors([Problem(target.source, f"targets.{target.name}.{key}", message)])


def client_options(target):
    """TLS client options for *target*, or None when it sets no TLS keys."""
    if not any(k in target.options for k in TLS_KEYS):
        return None
    parts = urlsplit(target.url)
    if parts.scheme != "https":
        raise _problem(target, next(k for k in TLS_KEYS if k in target.options), "only applies to https URLs")
    kwargs = {}
    if "tls_ca_file" in target.options:
        pem = _read(target, "tls_ca_file")
        try:
            kwargs["trustRoot"] = ssl.Certificate.loadPEM(pem)
        except Exception as e:  # noqa: BLE001 - any parse failure is a config problem
            raise _problem(target, "tls_ca_file", f"is not a PEM certificate: {e}") from None
    if "tls_cert_file" in target.options:
        cert = _read(target, "tls_cert_file")
        key = _read(target, "tls_key_file") if "tls_key_file" in target.options else cert
        try:
            kwargs["clientCertificate"] = ssl.PrivateCertificate.loadPEM(cert + b"\n" + key)
        except Exception as e:  # noqa: BLE001
            raise _problem(target, "tls_cert_file", f"is not a PEM certificate and key: {e}") from None
    elif "tls_key_file" in target.options:
        raise _problem(target, "tls_key_file", "needs tls_cert_file")
    return ssl.optionsForClientTLS(parts.hostname, **kwargs)


@implementer(IPolicyForHTTPS)
class PerTargetTLSPolicy:
    def __init__(self, targets, default=None):
        self.default = default or BrowserLikePolicyForHTTPS()
        self.by_netloc = {}
        for t in targets:
            options = client_options(t) if t.url else None
            if options is not None:
                parts = urlsplit(t.url)
                self.by_netloc[(parts.hostname.encode("idna"), parts.port or 443)] = options

    def creatorForNetloc(self, hostname, port):
        return self.by_netloc.get((hostname, port)) or self.default.creatorForNetloc(hostname, port)
