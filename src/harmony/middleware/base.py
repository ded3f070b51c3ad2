"""A convenient base for middleware types: both directions default to no-ops."""

from __future__ import annotations

from zope.interface import alsoProvides, implementer, provider

from harmony.interfaces import IComponentFactory, IMiddleware


@implementer(IMiddleware)
@provider(IComponentFactory)
class Middleware:
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

    def on_request(self, request):
        return request

    def on_response(self, request, response):
        return response
