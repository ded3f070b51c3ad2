"""Networks: TLS listeners, and clients that leave mid-request."""

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
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tests.harness import MINIMAL_MAIN, echo_pipeline, listen, proxy_pipeline, start_harmony, write_config

SAFETY = 20  # seconds: only a guard against hanging forever, never a synchronisation


def self_signed(folder):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "harmony-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (folder / "cert.pem").write_bytes(cert_pem)
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return cert_pem


ECHO = echo_pipeline()

LISTEN = '[network.default]\nlisten = "ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"\n'
HTTP_TLS = ('[network.default.http]\nbind_address = "127.0.0.1"\nbind_port = 0\n'
            '[network.default.http.tls]\ncert = "cert.pem"\nkey = "key.pem"\n')


@pytest.mark.parametrize("style", ["listen", "http.tls"])
@pytest_twisted.ensureDeferred
async def test_tls_listener(tmp_path, style):
    cert_pem = self_signed(tmp_path)
    network = (LISTEN.format(key=tmp_path / "key.pem", cert=tmp_path / "cert.pem") if style == "listen"
               else HTTP_TLS)
    main = MINIMAL_MAIN.split("[network.default.http]")[0] + network
    running = await start_harmony(write_config(tmp_path, main, {"e": ECHO}))
    try:
        agent = Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(cert_pem)))
        client = treq.client.HTTPClient(agent)
        resp = await client.get(f"https://127.0.0.1:{running.port()}/echo/secure?x=1")
        doc = json.loads(await resp.content())
        assert resp.code == 200 and doc["subpath"] == "/secure"
        # Plain HTTP on the TLS port gets no HTTP answer.
        with pytest.raises(Exception):
            await treq.get(f"http://127.0.0.1:{running.port()}/echo").addTimeout(SAFETY, reactor)
    finally:
        await running.stop()


# ----------------------------------------------------------- clients that leave


class Hanging(Resource):
    """Upstream that never answers; reports arrival and loss of the request."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.arrived = defer.Deferred()
        self.gone = defer.Deferred()

    def _finished(self, result):
        # Fires with None when the response finished, a Failure when the connection was lost.
        self.gone.callback("finished" if result is None else type(result.value).__name__)

    def render(self, request):
        request.notifyFinish().addBoth(self._finished)
        self.arrived.callback(None)
        return NOT_DONE_YET


class Endless:
    """A pull producer writing an endless body: only flow control stops it."""

    def __init__(self, request):
        self.request = request
        self.chunk = b"x" * 65536

    def resumeProducing(self):
        self.request.write(self.chunk)

    def stopProducing(self):
        pass


class Streaming(Hanging):
    def render(self, request):
        request.notifyFinish().addBoth(self._finished)
        request.setHeader(b"content-type", b"application/octet-stream")
        request.registerProducer(Endless(request), False)
        return NOT_DONE_YET


class RawClient(Protocol):
    """Sends one request, reports once *enough* response bytes arrived."""

    def __init__(self, request: bytes, enough: int = 0):
        self.request = request
        self.enough = enough
        self.received = 0
        self.got_enough = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.received += len(data)
        if self.enough and self.received >= self.enough and not self.got_enough.called:
            self.got_enough.callback(self.received)


async def proxy_to(tmp_path, resource):
    port = listen(resource)
    upstream = f"http://127.0.0.1:{port.getHost().port}"
    path = write_config(tmp_path, MINIMAL_MAIN, {"p": proxy_pipeline(upstream, timeout_secs=60)})
    return port, await start_harmony(path)


async def connect(running, client):
    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", running.port()), client)


@pytest_twisted.ensureDeferred
async def test_client_leaving_before_response_cancels_upstream_request(tmp_path):
    upstream = Hanging()
    port, running = await proxy_to(tmp_path, upstream)
    try:
        client = await connect(running, RawClient(b"GET /api/wait HTTP/1.1\r\nHost: h\r\n\r\n"))
        await upstream.arrived.addTimeout(SAFETY, reactor)
        client.transport.abortConnection()
        outcome = await upstream.gone.addTimeout(SAFETY, reactor)
        assert outcome in ("ConnectionDone", "ConnectionLost")  # the upstream saw its connection close
    finally:
        await running.stop()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_client_leaving_mid_stream_closes_upstream(tmp_path):
    upstream = Streaming()
    port, running = await proxy_to(tmp_path, upstream)
    try:
        client = await connect(running, RawClient(b"GET /api/stream HTTP/1.1\r\nHost: h\r\n\r\n", 1024 * 1024))
        received = await client.got_enough.addTimeout(SAFETY, reactor)
        assert received >= 1024 * 1024
        client.transport.abortConnection()
        outcome = await upstream.gone.addTimeout(SAFETY, reactor)
        assert outcome in ("ConnectionDone", "ConnectionLost")
    finally:
        await running.stop()
        await port.stopListening()


class CloseOnRequest(Protocol):
    """An upstream that reads the request and hangs up without a word."""

    def dataReceived(self, data):
        self.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_upstream_reset_is_502_problem(tmp_path):
    from twisted.internet.protocol import Factory
    port = reactor.listenTCP(0, Factory.forProtocol(CloseOnRequest), interface="127.0.0.1")
    upstream = f"http://127.0.0.1:{port.getHost().port}"
    running = await start_harmony(write_config(tmp_path, MINIMAL_MAIN, {"p": proxy_pipeline(upstream)}))
    try:
        resp = await treq.post(running.url("/api/x"), b"payload")
        doc = json.loads(await resp.content())
        assert resp.code == 502 and resp.headers.getRawHeaders("content-type") == ["application/problem+json"]
        assert doc["detail"] == "upstream closed the connection before answering"
    finally:
        await running.stop()
        await port.stopListening()


TWO_NETWORKS = MINIMAL_MAIN + '\n[network.internal]\nlisten = "tcp:0:interface=127.0.0.1"\n'


@pytest_twisted.ensureDeferred
async def test_each_network_serves_only_its_pipelines(tmp_path):
    pipes = (echo_pipeline("public", "/public", "pub", "b1", network="default")
             + echo_pipeline("admin", "/admin", "adm", "b2", network="internal")
             + echo_pipeline("both", "/both", "bth", "b3").replace('networks = ["default"]', "networks = []"))
    running = await start_harmony(write_config(tmp_path, TWO_NETWORKS, {"p": pipes}))
    try:
        assert running.port("default") != running.port("internal")
        expected = {("default", "/public"): 200, ("default", "/admin"): 404, ("default", "/both"): 200,
                    ("internal", "/public"): 404, ("internal", "/admin"): 200, ("internal", "/both"): 200}
        for (network, path), status in expected.items():
            resp = await treq.get(running.url(path, network=network))
            await resp.content()
            assert resp.code == status, (network, path)
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_head_keeps_the_upstream_content_length(tmp_path, upstream):
    upstream.respond[b"/f"] = (200, {b"content-type": b"text/plain", b"etag": b'"v1"'}, b"x" * 1234)
    running = await start_harmony(write_config(tmp_path, MINIMAL_MAIN, {"p": proxy_pipeline(upstream.url)}))
    try:
        resp = await treq.head(running.url("/api/f"))
        assert resp.code == 200 and await resp.content() == b""
        assert resp.headers.getRawHeaders("content-length") == ["1234"]
        assert resp.headers.getRawHeaders("etag") == ['"v1"']
        # The connection stays usable after a HEAD (no phantom body expected).
        resp = await treq.get(running.url("/api/f"))
        assert await resp.content() == b"x" * 1234
    finally:
        await running.stop()
