"""harmony.web.network.NetworkService on a MemoryReactor: it listens on its description, tells every
waiter the outcome (a failure too, to each its own), and stops listening when stopped."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.web.resource import Resource

from harmony.web.network import NetworkService
from tests.memory import failure_of, result_of


def test_it_listens_and_each_waiter_hears_so():
    reactor = MemoryReactorClock()
    service = NetworkService("default", "tcp:8080:interface=127.0.0.1", Resource(), reactor)
    early = service.wait_listening()
    service.startService()
    port = result_of(early)
    assert result_of(service.wait_listening()) is port  # a late waiter too
    assert reactor.tcpServers[0][0] == 8080 and reactor.tcpServers[0][3] == "127.0.0.1"
    assert service.name == "network:default" and service.site.resource is service.router
    result_of(service.stopService())
    assert service.port is None


def test_a_description_that_cannot_listen_fails_every_waiter():
    reactor = MemoryReactorClock()
    service = NetworkService("broken", "nonsense:whatever", Resource(), reactor)
    first, second = service.wait_listening(), service.wait_listening()
    service.startService()
    failure_of(first)
    failure_of(second)  # one waiter consuming the failure does not hide it from the other
    assert service.port is None
