"""A convenient base for backend types."""

from __future__ import annotations

from zope.interface import alsoProvides, implementer, provider

from harmony.interfaces import IBackend, IComponentFactory


@implementer(IBackend)
@provider(IComponentFactory)
class Backend:
    def __init_subclass__(cls, **kwargs):
        # zope's @provider declares the class object alone: without this every
        # subclass (each concrete type) would not provide IComponentFactory.
        super().__init_subclass__(**kwargs)
        alsoProvides(cls, IComponentFactory)

    def __init__(self, name: str):
        self.name = name

    @classmethod
    def from_config(cls, name, options, ctx):
        return cls(name)

    def send(self, request):
        raise NotImplementedError
