"""Per-target TLS: an https upstream with a private CA, and mutual TLS, on
127.0.0.1.  Certificates are made for the test with ``cryptography``."""

import datetime
import ipaddress
import json

import pytest
import pytest_twisted
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, ssl
from twisted.web.server import Site

from harmony.config import ConfigErrors, load_config
from harmony.runtime import build_runtime
from tests.harness import MINIMAL_MAIN, start_harmony, write_config
from tests.upstreams import NamedResource


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(key, cert):
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def make_cert(cn, issuer=None, ca=False, ip=None):
    """(key, cert); self-signed when *issuer* (key, cert) is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    signer_key, signer_name = (key, _name(cn)) if issuer is None else (issuer[0], issuer[1].subject)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(signer_name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
    return key, b.sign(signer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = make_cert("Test CA", ca=True)
    server = make_cert("upstream", issuer=ca, ip="127.0.0.1")
    client_ca = make_cert("Client CA", ca=True)
    client = make_cert("harmony", issuer=client_ca)
    files = {}
    for name, (key, cert) in {"ca": ca, "server": server, "client_ca": client_ca, "client": client}.items():
        cert_pem, key_pem = _pem(key, cert)
        (folder / f"{name}.pem").write_bytes(cert_pem)
        (folder / f"{name}.key").write_bytes(key_pem)
        files[name] = (cert_pem, key_pem)
    return folder, files


def https_upstream(pki, require_client_cert=False):
    folder, files = pki
    cert_pem, key_pem = files["server"]
    server = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem)
    if require_client_cert:
        options = server.options(ssl.Certificate.loadPEM(files["client_ca"][0]))
    else:
        options = server.options()
    resource = NamedResource("tls")
    site = Site(resource)
    site.noisy = False
    return reactor.listenSSL(0, site, options, interface="127.0.0.1"), resource


def config(port, extra):
    return f"""
[pipelines.p]
networks = ["default"]
endpoints = ["api"]
backends = ["up"]
[endpoints.api]
service = "http"
path_prefix = "/api"
[backends.up]
service = "http"
targets = ["secure"]
timeout_secs = 5
[backends.up.health]
path = "/health"
interval_secs = 3600
unhealthy_threshold = 1
[targets.secure]
url = "https://127.0.0.1:{port}"
{extra}
"""


async def get(tmp_path, port, extra):
    running = await start_harmony(write_config(tmp_path, MINIMAL_MAIN, {"p": config(port, extra)}))
    try:
        pool = running.service.runtime.backends["up"].target_pool
        await pool.monitor.last_run
        r = await treq.get(running.url("/api/x"))
        return r.code, await r.content(), pool.by_name["secure"]
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_private_ca_per_target(tmp_path, pki):
    folder, _ = pki
    port, resource = https_upstream(pki)
    try:
        code, body, target = await get(tmp_path, port.getHost().port, f'tls_ca_file = "{folder}/ca.pem"')
        assert code == 200 and json.loads(body)["served_by"] == "tls"
        assert target.healthy and resource.hits == ["/health", "/x"]  # health check used the same trust
        # Without the CA the system trust store rejects the upstream: not served, not healthy.
        code, body, target = await get(tmp_path, port.getHost().port, "")
        assert code == 503 and not target.healthy
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_mutual_tls_client_certificate(tmp_path, pki):
    folder, _ = pki
    port, resource = https_upstream(pki, require_client_cert=True)
    try:
        extra = (f'tls_ca_file = "{folder}/ca.pem"\ntls_cert_file = "{folder}/client.pem"\n'
                 f'tls_key_file = "{folder}/client.key"')
        code, body, _ = await get(tmp_path, port.getHost().port, extra)
        assert code == 200
        code, _, _ = await get(tmp_path, port.getHost().port, f'tls_ca_file = "{folder}/ca.pem"')
        assert code in (502, 503)  # no client certificate: the upstream refuses the handshake
    finally:
        await port.stopListening()


@pytest.mark.parametrize("extra,key,message", [
    ('tls_ca_file = "missing.pem"', "tls_ca_file", "cannot read"),
    ('tls_key_file = "x.key"', "tls_key_file", "needs tls_cert_file"),
    ('tls_ca_file = "../harmony.toml"', "tls_ca_file", "is not a PEM certificate"),
])
def test_tls_config_errors_name_the_target_key(tmp_path, extra, key, message):
    path = write_config(tmp_path, MINIMAL_MAIN, {"p": config(1, extra)})
    with pytest.raises(ConfigErrors) as e:
        build_runtime(load_config(path))
    text = e.value.render()
    assert f"p.toml: [targets.secure.{key}]" in text and message in text and text.count("problem") == 1, text
