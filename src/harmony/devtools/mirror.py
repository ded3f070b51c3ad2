"""Which Harmony modules have a test module that mirrors them, and where the others' tests would go.

Why: a test suite laid out like the code (``harmony/backends/dicom_scu.py`` is tested by
``tests/backends/test_dicom_scu.py``) tells a reader where a module's tests are and tells a
reviewer which modules have none.  ``python -m harmony.devtools.mirror`` prints the count and
the modules without a mirror (largest first); ``--plan`` prints the moves that would bring the
existing, older flat test files (``tests/test_dicom_scu.py``) to their mirrored place.
``tests/devtools/test_mirror.py`` keeps the rule: every module has its mirror, except the
modules in ``tests/unmirrored.txt``, a list that may only shrink.

The rule, for a module under ``src/harmony``:

- ``harmony/x.py`` -> ``tests/test_x.py``;
- ``harmony/pkg/mod.py`` -> ``tests/pkg/test_mod.py`` (and ``harmony/a/b/c.py`` ->
  ``tests/a/b/test_c.py``);
- ``harmony/pkg/__init__.py`` counts as a module only when it defines something (a function or
  a class); its mirror is ``tests/pkg/test_pkg.py``.  A package ``__init__`` that only re-exports
  needs none, nor does ``__main__``.

A mirror counts only when it names the module it mirrors (``harmony.pkg.mod`` or
``from harmony.pkg import mod``): an empty file in the right place is not a test.  Like
``harmony.devtools.imports``, this reads files only and imports nothing from Harmony.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import attr


@attr.s(frozen=True, auto_attribs=True)
class Module:
    name: str  # dotted, e.g. harmony.backends.dicom_scu
    path: Path
    lines: int

    @property
    def mirror(self) -> Path:
        """The test module's path relative to the tests folder."""
        parts = self.name.split(".")[1:]
        if self.path.name == "__init__.py":
            return Path(*parts, f"test_{parts[-1]}.py")
        return Path(*parts[:-1], f"test_{parts[-1]}.py")


def _defines_something(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for node in tree.body)


def modules(root: Path) -> list[Module]:
    """Every module under *root* (the ``harmony`` package folder) that needs a mirror."""
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root.parent)
        if path.name == "__main__.py" or any(part.startswith(".") for part in relative.parts):
            continue
        if path.name == "__init__.py":
            if path.parent == root or not _defines_something(path):
                continue
            name = ".".join(relative.parent.parts)
        else:
            name = ".".join(relative.with_suffix("").parts)
        found.append(Module(name, path, len(path.read_text(encoding="utf-8").splitlines())))
    return found


def names_module(test_text: str, module: str) -> bool:
    """Whether a test module's text refers to *module* (dotted name, or ``from parent import leaf``)."""
    parent, _, leaf = module.rpartition(".")
    if re.search(rf"\b{re.escape(module)}\b", test_text):
        return True
    return bool(re.search(rf"from\s+{re.escape(parent)}\s+import\s+\(?[^)]*?\b{re.escape(leaf)}\b", test_text, re.S))


def mirrored(module: Module, tests: Path) -> bool:
    path = tests / module.mirror
    return path.exists() and names_module(path.read_text(encoding="utf-8"), module.name)


def missing(root: Path, tests: Path) -> list[Module]:
    """The modules without a mirror, largest first."""
    return sorted((m for m in modules(root) if not mirrored(m, tests)), key=lambda m: (-m.lines, m.name))


# -- the plan for the older flat test files ---------------------------------------------------------

def _mirror_paths(found: list[Module]) -> set[Path]:
    return {m.mirror for m in found}


def _imported_modules(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except SyntaxError:
        return []
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harmony"):
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names if alias.name.startswith("harmony"))
    return names


#: Where the name alone misleads (a generic name, or the module the file tests most is not in
#: its name): old test file -> its mirror, read from what the file imports and exercises.
PLAN_OVERRIDES: dict[str, str] = {
    "test_storage.py": "storage/test_store.py",
    "test_storage_recovery.py": "storage/test_store.py",
    "test_config.py": "config/test_loader.py",
    "test_targets.py": "targets/test_pool.py",
    "test_targets_dimse.py": "targets/test_dimse_health.py",
    "test_layering.py": "devtools/test_imports.py",
    "test_management.py": "management/test_api.py",
    "test_queue_admin.py": "storage/test_admin.py",
    "test_shared_queue.py": "storage/test_queue.py",
    "test_auth_middleware.py": "middleware/test_jwt_auth.py",
    "test_logging.py": "test_log.py",
}


def plan(root: Path, tests: Path) -> list[tuple[Path, Path | None, str]]:
    """For each test module not at a mirror path: (old, proposed new or None, why).

    The guess: the module whose name, its package's name prepended or appended, spells the
    test file's name (``test_dicom_scu`` -> ``backends/dicom_scu``, ``test_dicom_fastcmd`` ->
    ``dicom/fastcmd``, ``test_jmix_endpoint`` -> ``endpoints/jmix``); among several, the one the
    test imports.  Files it cannot place are end-to-end or cross-cutting and stay flat.
    """
    found = modules(root)
    by_spelling: dict[str, list[Module]] = {}
    for module in found:
        parts = module.name.split(".")[1:]
        leaf, package = parts[-1], parts[-2] if len(parts) > 1 else ""
        singular = package[:-1] if package.endswith("s") else package
        spellings = {leaf, "_".join(parts)}
        if package:
            spellings |= {f"{package}_{leaf}", f"{leaf}_{package}", f"{singular}_{leaf}", f"{leaf}_{singular}"}
        for spelling in spellings:
            by_spelling.setdefault(spelling, []).append(module)
    at_mirror = _mirror_paths(found)
    rows = []
    for path in sorted(tests.rglob("test_*.py")):
        relative = path.relative_to(tests)
        if relative in at_mirror or relative.parts[0] in ("interop", "fixtures", "golden"):
            continue
        stem = path.stem.removeprefix("test_")
        if str(relative) in PLAN_OVERRIDES:
            target = Path(PLAN_OVERRIDES[str(relative)])
            why = "read from what it imports and exercises"
            if (tests / target).exists():
                why += f"; merge into the existing {target}"
            rows.append((relative, target, why))
            continue
        imported = set(_imported_modules(path))
        candidates = by_spelling.get(stem, [])
        if len(candidates) > 1:
            candidates = [m for m in candidates if m.name in imported]
        if len(candidates) == 1:
            target = candidates[0].mirror
            why = f"tests {candidates[0].name}"
            if candidates[0].name not in imported:
                why += " (through a whole Harmony: it does not import the module)"
            if (tests / target).exists():
                why += f"; merge into the existing {target}"
            rows.append((relative, target, why))
        else:
            rows.append((relative, None, "end-to-end or cross-cutting: stays a flat tests/test_<thing>.py"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harmony.devtools.mirror", description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path("src/harmony"), help="the harmony package folder")
    parser.add_argument("--tests", type=Path, default=Path("tests"), help="the tests folder")
    parser.add_argument("--plan", action="store_true", help="print the proposed moves of existing test files")
    parser.add_argument("--names", action="store_true",
                        help="print only the names of modules without a mirror (the allow-list's form)")
    args = parser.parse_args(argv)
    if args.names:
        print("\n".join(sorted(m.name for m in missing(args.src, args.tests))))
        return 0
    if args.plan:
        for old, new, why in plan(args.src, args.tests):
            print(f"{'tests/' + str(old):48} -> {('tests/' + str(new)) if new else '(stays)':48} {why}")
        return 0
    found = modules(args.src)
    lacking = missing(args.src, args.tests)
    for module in lacking:
        print(f"{module.lines:5}  {module.name:45} tests/{module.mirror}")
    print(f"{len(found) - len(lacking)} of {len(found)} modules have a mirrored test module "
          f"({sum(m.lines for m in lacking)} of {sum(m.lines for m in found)} lines without one)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
