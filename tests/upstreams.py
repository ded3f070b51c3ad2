"""Small real HTTP upstreams on 127.0.0.1 that can be killed and restarted
on the same port (for targets, failover and reload tests).

Killing one stops listening *and* aborts its open connections, as a crashed
process would; a bare ``stopListening`` keeps serving keep-alive connections.
"""

from __future__ import annotations

import json

from twisted.internet import defer, reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site


class NamedResource(Resource):
    isLeaf = True

    def __init__(self, name):
        super().__init__()
        self.name = name
        self.hits = []
        #: path -> status to answer instead of 200
        self.status = {}
        #: paths to hold open (requests parked in ``parked``)
        self.hang = set()
        self.parked = []

    def render(self, request):
        path = request.path.decode()
        self.hits.append(path)
        if path in self.hang:
            self.parked.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.status.get(path, 200))
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"served_by": self.name, "path": path}).encode()

    def release(self):
        for r in self.parked:
            if not r.finished and not r._disconnected:
                r.write(json.dumps({"served_by": self.name}).encode())
                r.finish()
        self.parked = []


class _TrackingSite(Site):
    noisy = False

    def __init__(self, resource, server):
        super().__init__(resource)
        self.server = server

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        self.server.connections.append(p)
        return p


class KillableUpstream:
    def __init__(self, name):
        self.name = name
        self.resource = NamedResource(name)
        self.site = _TrackingSite(self.resource, self)
        self.port_number = 0
        self.listening = None
        self.connections = []

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port_number}"

    @property
    def hits(self):
        return self.resource.hits

    def start(self):
        self.listening = reactor.listenTCP(self.port_number, self.site, interface="127.0.0.1")
        self.port_number = self.listening.getHost().port
        return self

    @defer.inlineCallbacks
    def kill(self):
        if self.listening is not None:
            port, self.listening = self.listening, None
            yield port.stopListening()
        for p in self.connections:
            transport = getattr(getattr(p, "_channel", p), "transport", None)
            if transport is not None:
                transport.abortConnection()
        self.connections = []


def lb_pipeline(servers, *, backend="", rules="", health="", extra_targets=None, description="lb",
                prefix="/api"):
    """Pipeline TOML: endpoint ``api`` at *prefix* -> http backend ``up`` over
    one target per server (named after it); extra text goes into ``[backends.up]``."""
    names = ", ".join(f'"{s.name}"' for s in servers)
    text = f"""
[pipelines.lb]
description = "{description}"
networks = ["default"]
endpoints = ["api"]
backends = ["up"]

[endpoints.api]
service = "http"
path_prefix = "{prefix}"

[backends.up]
service = "http"
timeout_secs = 5
targets = [{names}]
{backend}
{health}
{rules}
"""
    for s in servers:
        text += f'\n[targets.{s.name}]\nurl = "{s.url}"\n' + (extra_targets or {}).get(s.name, "")
    return text


def served_by(bodies):
    """Count responses per upstream name."""
    counts = {}
    for b in bodies:
        name = json.loads(b)["served_by"]
        counts[name] = counts.get(name, 0) + 1
    return counts
