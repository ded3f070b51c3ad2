"""harmony.interfaces: every built-in type provides the factory interface and implements its kind's."""

from __future__ import annotations

import pytest
from zope.interface.verify import verifyClass

from harmony.interfaces import IBackend, IComponentFactory, IEndpoint, IMiddleware
from harmony.registry import BACKEND, BUILTIN, ENDPOINT, MIDDLEWARE, Registry

KIND_INTERFACE = {ENDPOINT: IEndpoint, BACKEND: IBackend, MIDDLEWARE: IMiddleware}


@pytest.mark.parametrize("kind, name", [(k, n) for k, types in BUILTIN.items() for n in types])
def test_every_builtin_keeps_its_contract(kind, name):
    cls = Registry().lookup(kind, name)
    assert IComponentFactory.providedBy(cls), f"{name}: the class must provide IComponentFactory"
    assert verifyClass(KIND_INTERFACE[kind], cls)
