"""ruff and mypy, as configured in pyproject.toml, run in the suite so CI keeps them.

ruff: clean on src/ (the rule set and the few per-file exceptions are in
pyproject.toml).  mypy: every module is checked (core, toolkits, plug-ins, the process
layer and the twistd plug-in), and the baseline's list of not-yet-clean modules is exact:
a new error outside the list fails, and so does a listed module that has become clean
(remove it from the list: the baseline only shrinks).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomlkit

REPO = Path(__file__).resolve().parents[1]


def test_ruff_is_clean_on_src():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "src"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _baseline(config) -> set[str]:
    for override in config["tool"]["mypy"]["overrides"]:
        if override.get("ignore_errors"):
            return set(override["module"])
    return set()


def _module(path: str) -> str:
    name = path.removeprefix("src/").removesuffix(".py").removesuffix("/__init__")
    return name.replace("/", ".")


def test_mypy_checks_every_module():
    checked = [REPO / f for f in tomlkit.parse((REPO / "pyproject.toml").read_text())["tool"]["mypy"]["files"]]
    sources = sorted((REPO / "src").rglob("*.py"))
    assert sources
    left_out = [str(p.relative_to(REPO)) for p in sources
                if not any(p == c or c in p.parents for c in checked)]
    assert left_out == [], f"add to [tool.mypy] files in pyproject.toml: {left_out}"


def test_mypy_baseline_is_exact(tmp_path):
    config = tomlkit.parse((REPO / "pyproject.toml").read_text())
    baseline = _baseline(config)
    assert baseline, "the mypy baseline override is missing from pyproject.toml"
    mypy = config["tool"]["mypy"]
    mypy["overrides"] = [o for o in mypy["overrides"] if not o.get("ignore_errors")]
    unbaselined = tmp_path / "mypy.toml"
    unbaselined.write_text(tomlkit.dumps({"tool": {"mypy": mypy}}))
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(unbaselined),
                             "--cache-dir", str(REPO / ".mypy_cache")],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert "error:" in result.stdout or result.returncode == 0, result.stdout + result.stderr
    failing = {_module(m.group(1)) for m in re.finditer(r"^(src/\S+\.py):\d+: error:", result.stdout, re.M)}
    new = failing - baseline
    assert not new, "mypy errors outside the baseline:\n" + "\n".join(
        line for line in result.stdout.splitlines() if any(line.startswith(f"src/{m.replace('.', '/')}") for m in new))
    assert not baseline - failing, f"clean now, remove from the baseline in pyproject.toml: {sorted(baseline - failing)}"
