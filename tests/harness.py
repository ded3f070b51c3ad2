"""Shared test harness: write configs, run Harmony on real loopback ports,
and small real upstream servers.  Used by every test module."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import attr
import treq
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from harmony.config import load_config
from harmony.runtime import build_runtime
from harmony.service import HarmonyService


def write_config(folder: Path, main: str, pipelines: dict[str, str] | None = None) -> Path:
    """Write ``harmony.toml`` (and ``pipelines/*.toml``) into *folder*."""
    folder.mkdir(parents=True, exist_ok=True)
    main = textwrap.dedent(main)
    if pipelines is not None:
        (folder / "pipelines").mkdir(exist_ok=True)
        for name, text in pipelines.items():
            (folder / "pipelines" / f"{name}.toml").write_text(textwrap.dedent(text))
        if "pipelines_path" not in main:
            main = main.replace("[proxy]", '[proxy]\npipelines_path = "pipelines"', 1)
    path = folder / "harmony.toml"
    path.write_text(main)
    return path


MINIMAL_MAIN = """
[proxy]
id = "test"
log_level = "debug"

[network.default.http]
bind_address = "127.0.0.1"
bind_port = 0
"""


#: The body of a ``[backends.X]`` table for the echo backend.
ECHO = 'service = "echo"'


def http_pipeline(name, prefix, endpoint, backend, backend_table, middleware=(), network="default", *,
                  service="http", options="") -> str:
    """TOML for a pipeline with one HTTP-family endpoint (*service*) at *prefix* and one
    backend; *options* is extra TOML for the endpoint's options table (sub-tables included),
    an empty *backend_table* names a backend defined elsewhere."""
    mws = ", ".join(f'"{m}"' for m in middleware)
    text = f"""
[pipelines.{name}]
networks = ["{network}"]
endpoints = ["{endpoint}"]
middleware = [{mws}]
backends = ["{backend}"]
[endpoints.{endpoint}]
service = "{service}"
[endpoints.{endpoint}.options]
path_prefix = "{prefix}"
{textwrap.dedent(options).strip()}
"""
    if backend_table:
        text += f"[backends.{backend}]\n{backend_table}\n"
    return text


def echo_pipeline(name="echo", prefix="/echo", endpoint="e", backend="b", **kw) -> str:
    """A pipeline answering with the echo backend under *prefix*."""
    return http_pipeline(name, prefix, endpoint, backend, ECHO, **kw)


def proxy_pipeline(upstream: str, name="proxy", prefix="/api", endpoint="api", backend="up",
                   middleware=(), network="default", **options) -> str:
    """An http endpoint at *prefix* proxying to *upstream* (extra backend options as keywords)."""
    table = f'service = "http"\n[backends.{backend}.options]\nbase_url = "{upstream}"\n'
    table += "".join(f"{k} = {json.dumps(v)}\n" for k, v in options.items())
    return http_pipeline(name, prefix, endpoint, backend, table, middleware, network)


@attr.s(auto_attribs=True)
class RunningHarmony:
    service: HarmonyService

    def port(self, network="default") -> int:
        return self.service.networks[network].port.getHost().port

    def url(self, path="", network="default") -> str:
        return f"http://127.0.0.1:{self.port(network)}{path}"

    def stop(self):
        return self.service.stopService()


@defer.inlineCallbacks
def start_harmony(config_path: Path):
    """Build and start Harmony from a config file; fires once it listens."""
    runtime = build_runtime(load_config(config_path), reactor)
    service = HarmonyService(runtime, reactor)
    service.startService()
    yield service.when_listening()
    return RunningHarmony(service)


def listen(resource, interface="127.0.0.1"):
    """Serve a twisted.web resource on a free loopback port; returns the port."""
    site = Site(resource)
    site.noisy = False
    return reactor.listenTCP(0, site, interface=interface)


class RecordingUpstream(Resource):
    """A real HTTP upstream that records each request and answers as told.

    ``respond`` maps a path to (status, headers, body); unknown paths get 200
    with a JSON summary of the request.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []
        self.respond = {}
        self.hang = set()

    def render(self, request):
        body = request.content.read()
        self.requests.append({
            "method": request.method, "uri": request.uri, "path": request.path,
            "headers": {k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()},
            "body": body,
        })
        if request.path in self.hang:
            return NOT_DONE_YET
        if request.path in self.respond:
            status, headers, payload = self.respond[request.path]
            request.setResponseCode(status)
            for k, v in headers.items():
                request.setHeader(k, v)
            return payload
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"uri": request.uri.decode(), "length": len(body)}).encode()


class RawClient(Protocol):
    """Sends bytes as they are (hostile or malformed input), collects whatever
    comes back until the server closes."""

    def __init__(self, data: bytes):
        self.data, self.received, self.done = data, b"", defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.data)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.done.callback(self.received)


async def raw_exchange(port: int, data: bytes, safety: float = 20.0) -> bytes:
    """Send *data* on a fresh loopback connection; the whole answer once the server
    closes.  *safety* only guards against hanging for ever; it is no synchronisation."""
    client = RawClient(data)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    return await client.done.addTimeout(safety, reactor)


async def get_json(response):
    return json.loads(await response.content())


__all__ = ["write_config", "start_harmony", "listen", "RecordingUpstream", "MINIMAL_MAIN", "treq",
           "echo_pipeline", "proxy_pipeline", "RawClient", "raw_exchange"]
