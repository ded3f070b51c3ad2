"""harmony.config.errors: every configuration problem names its file and key, all at once."""

from __future__ import annotations

from harmony.config.errors import ConfigErrors, OptionError, Problem, did_you_mean, unknown_key_problems


def test_a_problem_reads_file_key_message():
    assert str(Problem("/etc/harmony.toml", "proxy.workers", "must be 1-256")) == \
        "/etc/harmony.toml: [proxy.workers]: must be 1-256"
    assert str(Problem("/etc/harmony.toml", "", "not TOML")) == "/etc/harmony.toml: not TOML"


def test_did_you_mean():
    assert did_you_mean("log_levle", ["log_level", "id"]) == " (did you mean 'log_level'?)"
    assert did_you_mean("zzz", ["log_level"]) == ""


def test_unknown_keys_are_each_named_with_a_suggestion():
    problems = unknown_key_problems({"bind_port": 1, "bnd_address": "x", "colour": 2}, ["bind_port", "bind_address"],
                                    "h.toml", "network.default.http")
    assert [str(p) for p in problems] == [
        "h.toml: [network.default.http.bnd_address]: unknown key, ignored (did you mean 'bind_address'?)",
        "h.toml: [network.default.http.colour]: unknown key, ignored"]
    refused = unknown_key_problems({"x": 1}, [], "h.toml", "storage", refused=True)
    assert refused[0].message == "unknown key"
    assert unknown_key_problems("not a table", [], "h.toml", "x") == []


def test_config_errors_render_every_problem():
    errors = ConfigErrors([Problem("a.toml", "x", "bad"), Problem("b.toml", "y", "worse")])
    assert errors.render() == "2 configuration problem(s):\n  - a.toml: [x]: bad\n  - b.toml: [y]: worse"
    assert str(errors) == errors.render()


def test_option_error_keeps_key_and_message():
    e = OptionError("port", "must be 1-65535")
    assert (e.key, e.message, str(e)) == ("port", "must be 1-65535", "port: must be 1-65535")
