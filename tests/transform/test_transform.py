"""harmony.transform: the JOLT engine behind Harmony's interface: compile once, apply many,
every failure named by its spec, no unbounded arrays, no NaN."""

from __future__ import annotations

import pytest

from harmony.transform import SpecInvalid, TransformFailed, compile_spec, load_spec, parse_json_text


def test_a_chain_applies_without_touching_its_input():
    spec = compile_spec([{"operation": "shift", "spec": {"a": "b.c"}},
                         {"operation": "default", "spec": {"d": 1}}], "inline")
    document = {"a": [1, 2]}
    assert spec.apply(document) == {"b": {"c": [1, 2]}, "d": 1}
    assert document == {"a": [1, 2]} and spec.steps == ["shift", "default"]
    assert compile_spec({"operation": "sort"}).steps == ["sort"]  # a single step needs no list


def test_modify_reads_the_context():
    spec = compile_spec([{"operation": "modify-overwrite-beta", "spec": {"who": "^user"}}])
    assert spec.apply({"who": "?"}, {"user": "alice"}) == {"who": "alice"}


@pytest.mark.parametrize("document, message", [
    ([], "non-empty list"),
    ([{"operation": "teleport", "spec": {}}], "unknown operation 'teleport'"),
    ([{"operation": "shift"}], "needs a 'spec'"),
    (["shift"], "step 0 must be an object"),
    ([{"operation": "modify-overwrite-beta", "spec": {"x": "=noSuchFunction(@(1,x))"}}], "my.json"),
])
def test_a_bad_spec_is_refused_naming_its_source(document, message):
    with pytest.raises(SpecInvalid) as e:
        compile_spec(document, "my.json")
    assert str(e.value).startswith("my.json") and message in str(e.value)


def test_a_shift_cannot_grow_an_array_without_bound():
    spec = compile_spec([{"operation": "shift", "spec": {"*": "out[&0]"}}], "grow")
    assert spec.apply({"2": "x"}) == {"out": [None, None, "x"]}
    with pytest.raises(TransformFailed, match="too far past the end"):
        spec.apply({"99999999": "x"})


def test_parse_json_text_is_strict_utf8_json():
    assert parse_json_text(b'\xef\xbb\xbf{"a": 1}', "f") == {"a": 1}
    for bad, message in ((b'{"a": NaN}', "NaN is not valid JSON"), (b"\xff\xfe{}", "not UTF-8"),
                         (b'{"a": 1', "invalid JSON"), (b"[" * 100_000, "nested too deeply")):
        with pytest.raises(ValueError, match=message):
            parse_json_text(bad, "f")


def test_load_spec_names_the_file(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text('[{"operation": "shift", "spec": {"a": "b"}}]')
    assert load_spec(path).apply({"a": 1}) == {"b": 1}
    with pytest.raises(SpecInvalid, match="cannot read"):
        load_spec(tmp_path / "missing.json")
    path.write_text("{broken")
    with pytest.raises(SpecInvalid, match=str(path)):
        load_spec(path)
