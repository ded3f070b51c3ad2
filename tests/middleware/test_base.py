"""harmony.middleware.base and passthru: the no-op both ways that custom types build on."""

from __future__ import annotations

from harmony.interfaces import IComponentFactory, IMiddleware
from harmony.middleware.base import Middleware
from tests.memory import build, request, response


def test_the_base_declares_its_interfaces_and_changes_nothing():
    mw = build(Middleware, name="noop")
    assert mw.name == "noop"
    assert IMiddleware.providedBy(mw) and IComponentFactory.providedBy(Middleware)
    req, resp = request(subpath="/x"), response(201)
    assert mw.on_request(req) is req
    assert mw.on_response(req, resp) is resp
