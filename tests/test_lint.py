"""ruff and mypy, as configured in pyproject.toml, run in the suite so CI keeps them.

ruff: clean on src/ (the rule set and the few per-file exceptions are in
pyproject.toml).  mypy: every module is checked (core, toolkits, plug-ins, the process
layer and the twistd plug-in) and every module is clean: the baseline of not-yet-clean
modules was emptied, and an ``ignore_errors`` override may not come back (a module with
an error is fixed; a third-party stub that lies gets a targeted ignore saying which).
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


def test_mypy_is_clean():
    mypy = tomlkit.parse((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    silenced = [o["module"] for o in mypy.get("overrides", []) if o.get("ignore_errors")]
    assert not silenced, f"an ignore_errors override hides modules from mypy: {silenced}"
    result = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(REPO / ".mypy_cache")],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    failing = sorted({_module(m.group(1)) for m in re.finditer(r"^(src/\S+\.py):\d+: error:", result.stdout, re.M)})
    assert result.returncode == 0, f"mypy errors in {failing}:\n{result.stdout}{result.stderr}"
