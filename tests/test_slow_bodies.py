"""A body dripped in too slowly is cut with 408 over a real socket (issue 12, defect 19).

The client drips one byte every 0.2 s (its own pace, driven by a LoopingCall);
the network asks for 100 bytes/s judged over 1 s windows.  Each byte restarts
twisted.web's idle timeout, so before the body clock such a client held the
connection for ever.  The fast, exhaustive cases run on task.Clock in
tests/test_http_head_deadline.py.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from tests.harness import ECHO, MINIMAL_MAIN, http_pipeline, start_harmony, write_config

SAFETY = 20  # seconds: a guard against hanging for ever, never a synchronisation

MAIN = MINIMAL_MAIN + """body_timeout_secs = 1
body_min_rate = 100
"""

def pipelines(upstream: str) -> str:
    up = f'service = "http"\n[backends.up.options]\nbase_url = "{upstream}"'
    return (http_pipeline("api", "/api", "api", "up", up)
            + http_pipeline("fhir", "/fhir", "fhir", "echo", ECHO, service="fhir"))


class Dripper(Protocol):
    """Sends a head, then the body one byte every 0.2 s until the server closes."""

    def __init__(self, head):
        self.head, self.received, self.sent, self.done = head, b"", 0, defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.head)
        self.drip = task.LoopingCall(self._byte)
        self.drip.start(0.2, now=False)

    def _byte(self):
        self.transport.write(b"1\r\n{\r\n" if b"chunked" in self.head else b"{")
        self.sent += 1

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        if self.drip.running:
            self.drip.stop()
        self.done.callback(self.received)


@pytest.fixture
def harmony(tmp_path, upstream):
    running = pytest_twisted.blockon(defer.ensureDeferred(start_harmony(
        write_config(tmp_path, MAIN, {"p": pipelines(upstream.url + "/base")}))))
    yield running
    pytest_twisted.blockon(running.stop())


@pytest.mark.parametrize("path,framing,dialect", [
    ("/fhir/Patient", "Content-Length: 5000", "outcome"),  # spooled by twisted.web: refused before dispatch
    ("/api/x", "Transfer-Encoding: chunked", "problem"),  # streamed to the upstream as it arrives
])
@pytest_twisted.ensureDeferred
async def test_a_dripped_body_is_cut_with_408(harmony, upstream, path, framing, dialect):
    head = f"POST {path} HTTP/1.1\r\nHost: a\r\nContent-Type: application/fhir+json\r\n{framing}\r\n\r\n".encode()
    client = Dripper(head)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", harmony.port()), client)
    answer = await client.done.addTimeout(SAFETY, reactor)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer[:300]
    doc = json.loads(body)
    if dialect == "outcome":
        assert doc["resourceType"] == "OperationOutcome"
    else:
        assert doc["status"] == 408 and "too slowly" in doc["detail"] and doc["request_id"]
        target = harmony.service.runtime.backends["up"].target_pool.targets[0]
        assert target.failures_total == 0  # the client's slowness is not the upstream's failure
    assert client.sent < 5000 and upstream.requests == []


def test_bad_slow_client_settings_are_config_errors_naming_each_key(tmp_path):
    from harmony.config import ConfigErrors, load_config

    main = MINIMAL_MAIN.replace("bind_port = 0", "bind_port = 70000")
    path = write_config(tmp_path, main + 'head_timeout_secs = "soon"\nbody_min_rate = -1\n')
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    text = str(info.value)
    for key in ("head_timeout_secs", "body_min_rate", "bind_port"):
        assert f"network.default.http.{key}" in text, text
