"""HTTP client plumbing shared by everything that talks to an HTTP upstream.

Why a toolkit module: the ``http`` backend's agent and the target pool's HTTP health
checks must connect the same way (the same TLS policy per target, the same direct
connect to IPv4 literals), and a toolkit (``harmony.targets``) may not import a
plug-in (``harmony.backends``): docs/architecture.md, "Layers".
"""

from __future__ import annotations

import ipaddress

from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from harmony.compat.twisted import StandardEndpointFactory


@implementer(IAgentEndpointFactory)
class DirectEndpointFactory:
    """Connect straight to IPv4 literals; HostnameEndpoint's happy-eyeballs
    machinery adds ~300 ms to every refused connection, which makes failover slow."""

    def __init__(self, reactor, connect_timeout, tls_policy):
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.standard = StandardEndpointFactory(reactor, tls_policy, connect_timeout, None)
        #: Agent asks for an endpoint on every request; a target's is always the same.
        self._plain: dict = {}

    def endpointForURI(self, uri):
        if uri.scheme == b"http":
            key = (uri.host, uri.port)
            endpoint = self._plain.get(key)
            if endpoint is None:
                endpoint = self._plain[key] = self._plain_endpoint(uri)
            return endpoint
        return self.standard.endpointForURI(uri)

    def _plain_endpoint(self, uri):
        try:
            ipaddress.IPv4Address(uri.host.decode("ascii"))
        except ValueError:
            return self.standard.endpointForURI(uri)
        return TCP4ClientEndpoint(self.reactor, uri.host.decode("ascii"), uri.port, timeout=self.connect_timeout)
