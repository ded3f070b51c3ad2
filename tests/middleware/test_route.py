"""harmony.middleware.route in memory: the first matching rule names the backend."""

from __future__ import annotations

import types

import pytest

from harmony.config.errors import OptionError
from harmony.middleware.route import RouteMiddleware
from tests.memory import build, request

CTX = types.SimpleNamespace(config=types.SimpleNamespace(backends={"ct": {}, "mr": {}, "fallback": {}}))

RULES = [
    {"metadata": {"calling_aet": "CT_.*"}, "backend": "ct"},
    {"header": {"x-modality": "MR"}, "backend": "mr"},
]


def test_the_first_matching_rule_sets_the_backend():
    mw = build(RouteMiddleware, {"rules": RULES, "default": "fallback"}, ctx=CTX)
    ct = request(metadata={"calling_aet": "CT_SCANNER"})
    assert mw.on_request(ct).metadata["backend"] == "ct"
    mr = request(headers={"X-Modality": "MR"})
    assert mw.on_request(mr).metadata["backend"] == "mr"


def test_no_match_goes_to_the_default_or_leaves_the_choice_to_the_pipeline():
    with_default = build(RouteMiddleware, {"rules": RULES, "default": "fallback"}, ctx=CTX)
    assert with_default.on_request(request()).metadata["backend"] == "fallback"
    without = build(RouteMiddleware, {"rules": RULES}, ctx=CTX)
    assert "backend" not in without.on_request(request()).metadata


def test_an_unknown_backend_is_refused_with_its_key():
    with pytest.raises(OptionError) as rule:
        build(RouteMiddleware, {"rules": [{"metadata": {"x": "y"}, "backend": "nowhere"}]}, ctx=CTX)
    assert rule.value.key == "rules[0].backend" and "known: ct, fallback, mr" in rule.value.message
    with pytest.raises(OptionError) as default:
        build(RouteMiddleware, {"rules": RULES, "default": "nowhere"}, ctx=CTX)
    assert default.value.key == "default"
