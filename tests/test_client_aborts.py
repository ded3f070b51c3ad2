"""A client that goes away is never evidence against the upstream (issue 12, defects 1 and 13).

Real nginx is the upstream and real wrk the client: wrk closes its connections
with requests in flight when its run ends, and raw sockets cut chunked uploads
mid-body.  nginx's ``limit_req`` (rate 1 per minute, a deep burst queue) holds
every request after the first, so the cancellations hit requests that are
really in flight upstream.  Afterwards a normal request must succeed and both
targets' circuits stay closed, with the aborts counted apart (nginx's 499).
"""

from __future__ import annotations

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from harmony.targets import CLOSED
from tests.harness import MINIMAL_MAIN, http_pipeline, start_harmony, write_config
from tests.peers import Nginx, free_port, require

WRK = "/usr/bin/wrk"


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    ports = [free_port(), free_port()]
    inner = free_port()
    listens = "\n".join(f"listen 127.0.0.1:{p};" for p in ports)
    patient = '{"resourceType": "Patient", "id": "1"}'  # what the FHIR case's upstream answers
    # limit_req acts before the content phase (proxy_pass), but after 'return',
    # so the held locations hand over to a second server block that answers.
    server = Nginx(tmp_path_factory.mktemp("nginx"), f"""
        limit_req_zone $server_port zone=slow:1m rate=1r/m;
        limit_req_zone $server_port zone=upload:1m rate=1r/m;
        server {{
            {listens}
            client_max_body_size 0;
            location /fast {{ return 200 "fast\\n"; }}
            location /Fast {{ default_type application/fhir+json; return 200 '{patient}'; }}
            location /slow {{ limit_req zone=slow burst=10000; proxy_pass http://127.0.0.1:{inner}/; }}
            location /Slow {{ limit_req zone=slow burst=10000; proxy_pass http://127.0.0.1:{inner}/; }}
            location /upload {{ limit_req zone=upload burst=10000; proxy_pass http://127.0.0.1:{inner}/; }}
        }}
        server {{
            listen 127.0.0.1:{inner};
            client_max_body_size 0;
            default_type application/fhir+json;
            location / {{ return 200 '{patient}'; }}
        }}""", ports + [inner]).start()
    server.ports = ports
    yield server
    server.stop()


def config(nginx, failures=5, kind="http", prefix="/api"):
    """*prefix* -> endpoint and backend of type *kind* ("up") over one target per nginx port."""
    targets = "".join(f'\n[targets.n{i}]\nurl = "http://127.0.0.1:{p}"\n' for i, p in enumerate(nginx.ports))
    backend = (f'service = "{kind}"\ntimeout_secs = 60\ntargets = ["n0", "n1"]\n'
               f'[backends.up.circuit]\nfailures = {failures}\nopen_secs = 30\n')
    return http_pipeline("p", prefix, "api", "up", backend, service=kind) + targets


async def settled(pool, timeout=10.0):
    """Poll until no attempt is in flight (the cancellations have been accounted)."""
    for _ in range(int(timeout / 0.02)):
        if all(t.in_flight == 0 for t in pool.targets):
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"attempts still in flight: {[t.state(0) for t in pool.targets]}")


async def until(predicate, what, timeout=10.0):
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"not after {timeout}s: {what}")


def assert_untouched(pool):
    for t in pool.targets:
        assert t.circuit == CLOSED, t.state(0)
        assert t.failures_total == 0 and t.consecutive_failures == 0, t.state(0)
        assert t.last_error is None, t.state(0)


@pytest.mark.parametrize("kind,prefix,slow,fast", [
    ("http", "/api", "/api/slow", "/api/fast"),
    ("fhir", "/fhir", "/fhir/Slow/1", "/fhir/Fast/1"),  # the fhir backend sends through the same pool
])
@pytest_twisted.ensureDeferred
async def test_wrk_closing_connections_mid_request_leaves_the_circuit_closed(tmp_path, nginx, kind, prefix, slow,
                                                                             fast):
    running = await start_harmony(write_config(tmp_path, MINIMAL_MAIN, {"p": config(nginx, kind=kind,
                                                                                    prefix=prefix)}))
    pool = running.service.runtime.backends["up"].target_pool
    try:
        for _ in range(2):  # two short bursts, each ending with 40 requests held by nginx
            out, err, code = await getProcessOutputAndValue(
                require(WRK), ["-t2", "-c40", "-d1s", running.url(slow)])
            assert code == 0, err
            await settled(pool)
        assert sum(t.client_aborts_total for t in pool.targets) >= 60, [t.state(0) for t in pool.targets]
        assert_untouched(pool)
        resp = await treq.get(running.url(fast))
        assert resp.code == 200 and await resp.content()
        metrics = running.service.metrics.text().decode()
        assert 'status="499"' in metrics  # counted apart, as nginx logs 499
        for bad in ('status="502"', 'status="503"', 'status="504"'):
            assert bad not in metrics, metrics
        assert 'harmony_target_failures_total{backend="up",target="n0"} 0.0' in metrics
    finally:
        await running.stop()


class _Upload(protocol.Protocol):
    def __init__(self):
        self.received = b""
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed.callback(None)


@pytest_twisted.ensureDeferred
async def test_chunked_uploads_cut_mid_body_leave_the_circuit_closed(tmp_path, nginx):
    running = await start_harmony(write_config(tmp_path, MINIMAL_MAIN, {"p": config(nginx, failures=2)}))
    pool = running.service.runtime.backends["up"].target_pool
    try:
        # The first request in nginx's zone passes undelayed: spend it.
        for _ in range(2):
            resp = await treq.post(running.url("/api/upload"), data=b"warm-up")
        for i in range(6):
            client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", running.port()), _Upload())
            client.transport.write(b"POST /api/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                   b"Content-Type: application/octet-stream\r\n\r\n"
                                   + b"%x\r\n" % 65536 + b"\x00" * 65536 + b"\r\n")
            await until(lambda: sum(t.in_flight for t in pool.targets) == 1, "the upload is dispatched upstream")
            if i % 2:
                client.transport.abortConnection()  # RST
            else:
                client.transport.loseConnection()  # FIN, mid-body
            await client.closed
            await settled(pool)
        assert sum(t.client_aborts_total for t in pool.targets) == 6
        assert_untouched(pool)
        resp = await treq.get(running.url("/api/fast"))
        assert resp.code == 200
    finally:
        await running.stop()
