"""harmony.middleware.path_filter in memory: patterns, captures, and the paths it refuses to judge."""

from __future__ import annotations

import pytest

from harmony.config.errors import OptionError
from harmony.errors import NotFound
from harmony.middleware.path_filter import PathFilter, Rule, split_subpath
from tests.memory import build, request


def _filter(*rules):
    return build(PathFilter, {"rules": list(rules)})


def test_a_matching_path_goes_on_with_its_captures_in_metadata():
    mw = _filter("/Patient", "/studies/{study}/series/{*rest}")
    req = mw.on_request(request(subpath="/studies/1.2.3/series/4.5/instances/6"))
    assert req.metadata["path.study"] == "1.2.3"
    assert req.metadata["path.rest"] == "4.5/instances/6"


def test_trailing_slashes_are_forgiven_on_both_sides():
    mw = _filter("/Patient/")
    assert mw.on_request(request(subpath="/Patient/")).subpath == "/Patient/"
    assert mw.on_request(request(subpath="/Patient")).subpath == "/Patient"


@pytest.mark.parametrize("subpath", [
    "/Observation",            # no rule
    "/Patient/1/extra",        # too long for /Patient/{id}
    "/Patient/../secret",      # dot segments never match
    "/Patient/%2e%2e",         # nor encoded ones
    "/Patient/a%2Fb",          # an encoded slash
    "/Patient//1",             # an empty segment
    "/Patient/%ff",            # not UTF-8
])
def test_anything_else_is_a_404_before_the_backend(subpath):
    mw = _filter("/Patient", "/Patient/{id}")
    with pytest.raises(NotFound):
        mw.on_request(request(subpath=subpath))


def test_split_subpath_decodes_and_refuses_what_it_cannot_judge():
    assert split_subpath("/a/b%20c/") == ["a", "b c"]
    assert split_subpath("/") == []
    assert split_subpath("/a/./b") is None
    assert split_subpath("/a\\b") is None


def test_rest_must_be_last_and_braces_must_be_a_parameter():
    with pytest.raises(ValueError, match="last segment"):
        Rule("/{*rest}/x")
    with pytest.raises(ValueError, match="bad segment"):
        Rule("/a{b}")
    with pytest.raises(ValueError, match="must start with '/'"):
        Rule("Patient")


def test_config_errors_name_the_key():
    with pytest.raises(OptionError) as empty:
        build(PathFilter, {"rules": []})
    assert empty.value.key == "rules"
    with pytest.raises(OptionError) as bad:
        build(PathFilter, {"rules": ["/ok", "nope"]})
    assert bad.value.key == "rules[1]"
