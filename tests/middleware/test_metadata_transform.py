"""harmony.middleware.metadata_transform in memory: a JOLT spec derives metadata keys, nested
output comes back dotted, only strings are written and nothing is dropped."""

from __future__ import annotations

import json
import types

from harmony.middleware.metadata_transform import MetadataTransform, flatten
from tests.memory import build, request, response

SPEC = [{"operation": "shift", "spec": {"auth.tenant": "backend", "path": "route.key", "*": "&"}},
        {"operation": "default", "spec": {"count": 3}}]


def _mw(tmp_path, **options):
    (tmp_path / "spec.json").write_text(json.dumps(SPEC))
    ctx = types.SimpleNamespace(transforms_path=tmp_path, reactor=None)
    return build(MetadataTransform, {"spec_path": "spec.json", **options}, ctx=ctx)


def test_flatten_keeps_string_leaves_dotted():
    assert flatten({"a": {"b": "x", "c": 1}, "d": "y", "e": ["z"]}) == {"a.b": "x", "d": "y"}
    assert flatten(["not", "a", "map"]) == {}


def test_metadata_is_derived_and_nothing_dropped(tmp_path):
    req = request(metadata={"auth.tenant": "north", "path": "/x", "request_id": "r1"})
    out = _mw(tmp_path).on_request(req)
    assert out.metadata["backend"] == "north" and out.metadata["route.key"] == "/x"
    assert out.metadata["request_id"] == "r1"
    assert "count" not in out.metadata  # not a string: not written


def test_the_response_side_when_asked(tmp_path):
    mw = _mw(tmp_path, apply="right")
    resp = response(metadata={"auth.tenant": "south"})
    assert mw.on_request(request(metadata={"auth.tenant": "x"})).metadata == {"auth.tenant": "x"}
    assert mw.on_response(request(), resp).metadata["backend"] == "south"
