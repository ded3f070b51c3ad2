"""harmony.backends.base: what a custom backend type inherits."""

from __future__ import annotations

import pytest

from harmony.backends.base import Backend
from harmony.interfaces import IBackend, IComponentFactory
from tests.memory import build, request


def test_the_base_is_a_named_backend_factory_that_must_be_given_send():
    backend = build(Backend, name="custom")
    assert backend.name == "custom"
    assert IBackend.providedBy(backend) and IComponentFactory.providedBy(Backend)
    with pytest.raises(NotImplementedError):
        backend.send(request())
