"""harmony.management.settings: the management API is off, local and token-protected by default,
and every refusal names its key."""

from __future__ import annotations

import stat
import types

import pytest

from harmony.config.errors import ConfigErrors
from harmony.config.model import NetworkConfig
from harmony.management.settings import ManagementSettings, check_routes, create_token_file, is_loopback

TOKEN = "a-token-long-enough-1234"


def _config(tmp_path, **management):
    return types.SimpleNamespace(path=tmp_path / "harmony.toml", base_dir=tmp_path, management=management,
                                 networks={"default": NetworkConfig("default", "x", listen="tcp:8080")})


def _refusal(tmp_path, **management) -> str:
    with pytest.raises(ConfigErrors) as e:
        ManagementSettings.from_config(_config(tmp_path, **management))
    return e.value.render()


def test_defaults_are_off_and_local(tmp_path):
    s = ManagementSettings.from_config(_config(tmp_path))
    assert (s.enabled, s.listen, s.base_path, s.token) == (False, "tcp:9901:interface=127.0.0.1", "/admin", None)


def test_enabled_needs_a_token_or_a_deliberate_loopback_opt_out(tmp_path):
    assert "[management.token]: is required" in _refusal(tmp_path, enabled=True)
    s = ManagementSettings.from_config(_config(tmp_path, enabled=True, allow_unauthenticated=True))
    assert s.allow_unauthenticated and s.token is None
    text = _refusal(tmp_path, enabled=True, allow_unauthenticated=True, bind_address="0.0.0.0")
    assert "[management.allow_unauthenticated]: is only honoured on loopback" in text


@pytest.mark.parametrize("management, key", [
    ({"token": "short"}, "management.token"),
    ({"base_path": "a/../b"}, "management.base_path"),
    ({"network": "nowhere"}, "management.network"),
    ({"network": "default", "bind_port": 1}, "management.network"),
    ({"create_token_file": True}, "management.create_token_file"),
    ({"colour": "blue"}, "management.colour"),
])
def test_refusals_name_the_key(tmp_path, management, key):
    assert f"[{key}]" in _refusal(tmp_path, **management)


def test_a_generated_token_file_is_private_and_kept(tmp_path):
    path = tmp_path / "secrets" / "admin.token"
    s = ManagementSettings.from_config(_config(tmp_path, enabled=True, create_token_file=True,
                                               token_file="secrets/admin.token"))
    assert s.token and len(s.token) >= 32 and path.read_text().strip() == s.token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert create_token_file(path) is False  # never overwritten
    again = ManagementSettings.from_config(_config(tmp_path, enabled=True, create_token_file=True,
                                                   token_file="secrets/admin.token"))
    assert again.token == s.token


def test_mounted_on_a_network(tmp_path):
    s = ManagementSettings.from_config(_config(tmp_path, enabled=True, token=TOKEN, network="default",
                                               base_path="/ops/"))
    assert (s.network, s.listen, s.base_path) == ("default", None, "/ops")
    route = types.SimpleNamespace(prefix="/ops", endpoint=types.SimpleNamespace(name="api"))
    runtime = types.SimpleNamespace(routes={"default": [route]}, config=types.SimpleNamespace(path="h.toml"))
    with pytest.raises(ConfigErrors, match="also the prefix of endpoint 'api'"):
        check_routes(s, runtime)


@pytest.mark.parametrize("description, loopback", [
    ("tcp:9901:interface=127.0.0.1", True), ("tcp6:9901:interface=\\:\\:1", True),
    ("tcp:9901:interface=localhost", True), ("unix:/run/h.sock", True),
    ("tcp:9901", False), ("tcp:9901:interface=0.0.0.0", False), ("systemd:domain=INET:index=0", False),
])
def test_is_loopback(description, loopback):
    assert is_loopback(description) is loopback
