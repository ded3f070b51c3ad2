"""Every configuration Harmony ships (etc/harmony.toml, each example under
etc/examples/) must pass `harmony check` as it is: docs/examples.md promises
it, and a platform engineer's first command is `harmony check -c <file>`."""

from pathlib import Path

import pytest

from harmony.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "etc" / "examples"
# Top-level configs only: pipeline fragments live in a pipelines/ folder beside one.
SHIPPED = [ROOT / "etc" / "harmony.toml", *sorted(EXAMPLES.glob("*.toml")), *sorted(EXAMPLES.glob("*/harmony.toml"))]


def test_examples_are_found():
    assert len(SHIPPED) >= 3, SHIPPED


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_config_passes_check(config, capsys):
    assert main(["check", "-c", str(config)]) == 0, capsys.readouterr()
    assert ": OK" in capsys.readouterr().out
