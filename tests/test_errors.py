"""harmony.errors: each proxy-made error carries its status, title, stable code and headers."""

from __future__ import annotations

import inspect

from harmony import errors
from harmony.envelope import RequestEnvelope

ALL = [cls for _name, cls in inspect.getmembers(errors, inspect.isclass)
       if issubclass(cls, errors.HarmonyError)]


def test_every_error_has_a_distinct_stable_code_and_a_real_status():
    codes = [cls.code for cls in ALL]
    assert len(codes) == len(set(codes))
    assert all(400 <= cls.status <= 599 and cls.title for cls in ALL)


def test_detail_status_and_headers():
    e = errors.Forbidden("not yours", headers=[("X-Why", "acl")])
    assert (e.status, e.detail, str(e), e.headers) == (403, "not yours", "not yours", [("X-Why", "acl")])
    plain = errors.BackendTimeout()
    assert plain.detail == "Gateway Timeout" and plain.headers == []
    assert errors.HarmonyError("x", status=418).status == 418 and errors.HarmonyError.status == 500


def test_a_client_gone_mark_is_per_request():
    gone, other = RequestEnvelope(), RequestEnvelope()
    errors.mark_client_gone(gone)
    assert errors.client_gone(gone) and not errors.client_gone(other)
    assert errors.ClientClosedRequest.status == 499
