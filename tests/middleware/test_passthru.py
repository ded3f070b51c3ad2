"""harmony.middleware.passthru: a placeholder that hands both envelopes on untouched."""

from __future__ import annotations

from harmony.interfaces import IMiddleware
from harmony.middleware.passthru import Passthru
from tests.memory import build, request, response


def test_passthru_returns_the_very_same_envelopes():
    mw = build(Passthru, name="p")
    req, resp = request(body=b"x"), response(204)
    assert IMiddleware.providedBy(mw)
    assert mw.on_request(req) is req and mw.on_response(req, resp) is resp
    assert req.body == b"x" and resp.status == 204
