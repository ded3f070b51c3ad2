"""A convenient base for backend types."""

from __future__ import annotations

from zope.interface import implementer, provider

from harmony.interfaces import IBackend, IComponentFactory


@implementer(IBackend)
@provider(IComponentFactory)
class Backend:
    def __init__(self, name: str):
        self.name = name

    @classmethod
    def from_config(cls, name, options, ctx):
        return cls(name)

    def send(self, request):
        raise NotImplementedError
