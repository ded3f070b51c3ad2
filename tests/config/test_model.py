"""harmony.config.model: where state and storage live when the config does or does not say."""

from __future__ import annotations

from pathlib import Path

from harmony.config.model import HarmonyConfig, ProxySettings


def _config(tmp_path, *, state_dir=None, storage=None):
    return HarmonyConfig(path=tmp_path / "harmony.toml", base_dir=tmp_path, proxy=ProxySettings(state_dir=state_dir),
                         networks={}, pipelines={}, endpoints={}, backends={}, middleware={}, targets={},
                         storage=storage or {})


def test_state_dir_defaults_next_to_the_config(tmp_path):
    assert _config(tmp_path).state_dir == tmp_path / "var" / "harmony"
    assert _config(tmp_path, state_dir=Path("/srv/state")).state_dir == Path("/srv/state")


def test_storage_path_is_the_state_dir_unless_configured(tmp_path):
    assert _config(tmp_path, state_dir=Path("/srv/state")).storage_path == Path("/srv/state")
    assert _config(tmp_path, storage={"options": {"path": "archive"}}).storage_path == tmp_path / "archive"
    assert _config(tmp_path, storage={"options": {"path": "/data/a"}}).storage_path == Path("/data/a")
