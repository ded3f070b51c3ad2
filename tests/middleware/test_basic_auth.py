"""harmony.middleware.basic_auth in memory: credentials, the challenge, and what is passed on."""

from __future__ import annotations

import base64

import pytest

from harmony.config.errors import OptionError
from harmony.errors import AuthenticationFailed
from harmony.middleware.basic_auth import BasicAuth, parse_basic, quoted
from tests.memory import build, request


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _auth(**options):
    return build(BasicAuth, {"username": "alice", "password": "s3cret", **options})


def test_right_credentials_pass_and_are_dropped_before_the_upstream():
    req = _auth().on_request(request(headers={"Authorization": _basic("alice", "s3cret")}))
    assert req.metadata["auth.method"] == "basic" and req.metadata["auth.sub"] == "alice"
    assert not req.headers.hasHeader(b"authorization")


def test_forward_credentials_keeps_the_header():
    req = _auth(forward_credentials=True).on_request(request(headers={"Authorization": _basic("alice", "s3cret")}))
    assert req.headers.hasHeader(b"authorization")


@pytest.mark.parametrize("header", [None, _basic("alice", "wrong"), _basic("bob", "s3cret"), "Bearer abc",
                                    "Basic !!!notbase64", "Basic " + base64.b64encode(b"nocolon").decode()])
def test_anything_else_is_401_with_a_challenge(header):
    headers = {"Authorization": header} if header else {}
    with pytest.raises(AuthenticationFailed) as e:
        _auth(realm='Lab "A"').on_request(request(headers=headers))
    assert ("WWW-Authenticate", 'Basic realm="Lab \\"A\\"", charset="UTF-8"') in e.value.headers


def test_parse_basic_and_quoted():
    assert parse_basic(_basic("u", "p:with:colons")) == (b"u", b"p:with:colons")
    assert parse_basic("basic " + base64.b64encode(b"u:").decode()) == (b"u", b"")
    assert parse_basic("") is None
    assert quoted('a\\b"c') == 'a\\\\b\\"c'


def test_password_from_a_file(tmp_path):
    (tmp_path / "pw").write_text("from-file\nignored\n")
    mw = build(BasicAuth, {"username": "alice", "password_file": "pw"}, base_dir=tmp_path)
    passed = mw.on_request(request(headers={"Authorization": _basic("alice", "from-file")}))
    assert passed.metadata["auth.sub"] == "alice"


@pytest.mark.parametrize("options, key", [
    ({"username": "a:b", "password": "x"}, "username"),
    ({"username": "a"}, "password"),
    ({"username": "a", "password": "x", "password_file": "f"}, "password"),
    ({"username": "a", "password": ""}, "password"),
])
def test_config_errors_name_the_key(options, key):
    with pytest.raises(OptionError) as e:
        build(BasicAuth, options)
    assert e.value.key == key
