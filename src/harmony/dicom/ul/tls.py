"""TLS for DICOM associations carried by Twisted (PS3.15 Annex B secure transport).

The pynetdicom engine took :class:`ssl.SSLContext` objects; Twisted's TLS is
pyOpenSSL's, so the same PEM files become
:class:`twisted.internet.ssl.CertificateOptions` here: a server that, given a
CA, requires and verifies a client certificate; a client that verifies the
server against a CA (or the system store) and may present its own.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import ssl


def _pem(path) -> bytes:
    return Path(path).read_bytes()


def server_options(cert, key, ca=None) -> ssl.CertificateOptions:
    """Options for an SCP; with *ca*, only clients with a certificate it signed get in."""
    identity = ssl.PrivateCertificate.loadPEM(_pem(cert) + b"\n" + _pem(key))
    if ca is None:
        return identity.options()
    authority = ssl.Certificate.loadPEM(_pem(ca))
    # trustRoot implies verifying (and requiring) the peer's certificate.
    return ssl.CertificateOptions(privateKey=identity.privateKey.original, certificate=identity.original,
                                  trustRoot=authority)


def client_options(hostname: str, cert=None, key=None, ca=None, verify: bool = True):
    """Options for an SCU connecting to *hostname*."""
    client_cert = None
    if cert:
        client_cert = ssl.PrivateCertificate.loadPEM(_pem(cert) + b"\n" + _pem(key or cert))
    if not verify:
        kw = {}
        if client_cert is not None:
            kw = {"privateKey": client_cert.privateKey.original, "certificate": client_cert.original}
        return ssl.CertificateOptions(verify=False, **kw)
    trust = ssl.Certificate.loadPEM(_pem(ca)) if ca else ssl.platformTrust()
    return ssl.optionsForClientTLS(hostname, trustRoot=trust, clientCertificate=client_cert)
