"""No module outside harmony.compat reaches into Twisted's, pynetdicom's or pydicom's
private API: private modules or names imported, or the private attributes we know of.

Those reach-ins live in harmony.compat (one module per dependency, each name tested in
tests/compat/); a new one elsewhere fails here.  Exceptions are listed with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "src" / "harmony"
DEPENDENCIES = ("twisted", "pynetdicom", "pydicom")

#: Private attributes of these dependencies' objects that Harmony has used.
KNOWN_PRIVATE_ATTRIBUTES = {"_sslContextFactory", "_run_loop_delay", "_character_set", "_parser",
                            "_quiescentCallback", "_factory", "_config"}

#: "path:name" -> why it is not in harmony.compat yet.
EXCEPTIONS: dict[str, str] = {}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def reach_ins() -> set[str]:
    found = set()
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("compat/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in DEPENDENCIES:
                parts = node.module.split(".")
                for part in parts:
                    if _private(part):
                        found.add(f"{rel}:{part}")
                for alias in node.names:
                    if _private(alias.name):
                        found.add(f"{rel}:{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] in DEPENDENCIES and any(_private(p) for p in parts):
                        found.add(f"{rel}:{alias.name}")
            elif isinstance(node, ast.Attribute) and node.attr in KNOWN_PRIVATE_ATTRIBUTES:
                owner = node.value
                if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                    found.add(f"{rel}:{node.attr}")
    return found


def test_private_api_is_reached_only_through_compat():
    found = reach_ins()
    unlisted = sorted(found - set(EXCEPTIONS))
    assert not unlisted, "move these into harmony.compat (with a test): " + ", ".join(unlisted)


def test_no_stale_exception():
    assert not set(EXCEPTIONS) - reach_ins(), "gone: remove from EXCEPTIONS"
