"""harmony.config.options: typed option accessors, each failure naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from harmony.config.errors import OptionError
from harmony.config.options import Options


def _error(call) -> OptionError:
    with pytest.raises(OptionError) as e:
        call()
    return e.value


def test_typed_accessors_and_defaults():
    o = Options({"s": "x", "b": True, "i": 5, "n": 2.5, "l": ["a"], "t": {"k": 1}, "p": 8080})
    assert (o.str("s"), o.bool("b"), o.int("i"), o.number("n"), o.list("l"), o.table("t"), o.port("p")) == \
        ("x", True, 5, 2.5, ["a"], {"k": 1}, 8080)
    assert o.str("missing", "d") == "d" and o.int("missing", None) is None
    assert o.used == {"s", "b", "i", "n", "l", "t", "p", "missing"}
    assert "s" in o and "nope" not in o


@pytest.mark.parametrize("call, key, message", [
    (lambda o: o.str("required"), "required", "is required"),
    (lambda o: o.str("i"), "i", "must be a string"),
    (lambda o: o.str("s", choices=("a", "b")), "s", "must be one of 'a', 'b'"),
    (lambda o: o.bool("s"), "s", "true or false"),
    (lambda o: o.int("b"), "b", "must be an integer"),      # a bool is not an int here
    (lambda o: o.int("i", minimum=10, maximum=20), "i", "between 10 and 20"),
    (lambda o: o.number("s"), "s", "must be a number"),
    (lambda o: o.number("i", minimum=6), "i", "at least 6"),
    (lambda o: o.port("big"), "big", "between 0 and 65535"),
    (lambda o: o.list("mixed", of=str), "mixed", "list of str"),
    (lambda o: o.table("s"), "s", "must be a table"),
])
def test_every_failure_names_its_key(call, key, message):
    o = Options({"s": "x", "i": 5, "b": True, "big": 70000, "mixed": ["a", 1]})
    error = _error(lambda: call(o))
    assert error.key == key and message in error.message


def test_relative_paths_are_taken_from_the_config_folder(tmp_path):
    o = Options({"rel": "data/x", "abs": "/srv/y"}, base_dir=tmp_path)
    assert o.path("rel") == tmp_path / "data" / "x"
    assert o.path("abs") == Path("/srv/y")


def test_a_secret_inline_or_the_first_line_of_its_file(tmp_path):
    (tmp_path / "token").write_text("\n  s3cret  \n# a comment the operator left\n")
    assert Options({"token_file": "token"}, base_dir=tmp_path).secret("token") == "s3cret"
    assert Options({"token": "inline"}).secret("token") == "inline"
    assert Options({}).secret("token", default=None) is None
    (tmp_path / "empty").write_text("\n")
    assert Options({"token_file": "empty"}, base_dir=tmp_path).secret("token") == ""


def test_an_unreadable_secret_file_names_the_file_key(tmp_path):
    error = _error(lambda: Options({"pw_file": "absent"}, base_dir=tmp_path).secret("pw"))
    assert error.key == "pw_file" and "cannot read" in error.message
