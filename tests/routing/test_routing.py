"""harmony.routing: key sources and rules, the same for target rules, hashing and the route middleware."""

from __future__ import annotations

import pytest

from harmony.config.errors import OptionError
from harmony.routing import KeySource, first_match, parse_rule, parse_rules
from tests.memory import request


def _req(**kwargs):
    return request("GET", path="/studies/1.2.3/series/4", subpath="/", **kwargs)


@pytest.mark.parametrize("spec, expected", [
    ("header:X-Tenant", "blue"),
    ("query:StudyInstanceUID", "1.2.3"),
    ("metadata:calling_aet", "CT_1"),
    ("path:/studies/([^/]+)", "1.2.3"),
    ("path:/series/[0-9]+", "/series/4"),       # no group: the match
    ("tag:PatientName", "Synthetic^Patient"),   # PN: the alphabetic group
    ("tag:0020000D", "9.8.7"),                  # trailing NUL/space padding trimmed
    ("header:Absent", None),
    ("tag:PatientID", None),
])
def test_key_sources(spec, expected):
    req = _req(headers={"X-Tenant": "blue"}, query=[("StudyInstanceUID", "1.2.3")],
               metadata={"calling_aet": "CT_1"},
               normalized={"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Synthetic^Patient"}]},
                           "0020000D": {"vr": "UI", "Value": ["9.8.7\0"]}})
    assert KeySource.parse(spec, "hash_key").value(req) == expected


@pytest.mark.parametrize("spec, message", [
    ("nocolon", "must look like"), ("cookie:x", "unknown key source"), ("header:", "needs a name"),
    ("path:([", "invalid regex"), ("tag:NotAKeyword", "neither a DICOM keyword"),
])
def test_bad_key_sources_name_the_option(spec, message):
    with pytest.raises(OptionError) as e:
        KeySource.parse(spec, "hash_key")
    assert e.value.key == "hash_key" and message in e.value.message


def test_every_condition_must_hold_and_the_first_rule_wins():
    rules = parse_rules([
        {"path": "^/studies/", "header": {"X-Tenant": "blue|green"}, "targets": ["fast"]},
        {"metadata": {"calling_aet": "CT_.*"}, "targets": ["ct"]},
    ], "rules", "targets")
    assert first_match(rules, _req(headers={"X-Tenant": "green"})).choice == ["fast"]
    assert first_match(rules, _req(headers={"X-Tenant": "greenish"}, metadata={"calling_aet": "CT_2"})).index == 1
    assert first_match(rules, _req()) is None


@pytest.mark.parametrize("table, key, message", [
    ({"targets": ["a"]}, "rules[0]", "no conditions"),
    ({"header": {"X": "y"}}, "rules[0]", "needs 'targets'"),
    ({"heder": {"X": "y"}, "targets": ["a"]}, "rules[0].heder", "did you mean 'header'"),
    ({"header": {}, "targets": ["a"]}, "rules[0].header", "non-empty table"),
    ({"query": {"q": "("}, "targets": ["a"]}, "rules[0].query.q", "invalid regex"),
])
def test_rule_errors_name_their_key(table, key, message):
    with pytest.raises(OptionError) as e:
        parse_rules([table], "rules", "targets")
    assert e.value.key == key and message in e.value.message


def test_rules_must_be_a_list_of_tables():
    assert parse_rules(None, "rules", "targets") == []
    with pytest.raises(OptionError, match="list of rule tables"):
        parse_rules({"a": 1}, "rules", "targets")
    with pytest.raises(OptionError, match="table of conditions"):
        parse_rule("x", "rules[0]", "targets")
