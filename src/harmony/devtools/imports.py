"""The import graph between Harmony's packages, and the layering rule it must keep.

Why: the seams between parts (core, toolkits, plug-ins, process) only stay clean if
something checks them. ``python -m harmony.devtools.imports`` prints the graph between
packages (and, with ``--check``, every import that breaks the rule, as ``file:line``);
``tests/devtools/test_imports.py`` runs the same check so a violation fails the suite.

The rule (docs/architecture.md, "Layers"): a module may import from its own layer or a
lower one, never a higher one; the three plug-in kinds never import each other. Every
import counts, including imports inside functions and under ``TYPE_CHECKING``: a
function-local import is still a dependency, only a hidden one.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import attr

CORE, TOOLKIT, PLUGIN, PROCESS = 0, 1, 2, 3
LAYER_NAMES = {CORE: "core", TOOLKIT: "toolkit", PLUGIN: "plug-in", PROCESS: "process"}

#: first component under ``harmony`` -> layer.  A new package must be placed here
#: (the check reports a package it does not know).
LAYERS: dict[str, int] = {
    # core: the contracts every part speaks
    "__init__": CORE,
    "envelope": CORE,
    "state": CORE,
    "pipeline": CORE,
    "config": CORE,
    "registry": CORE,
    "errors": CORE,
    "interfaces": CORE,
    "log": CORE,
    "jsonutil": CORE,
    # toolkits: protocol and infrastructure libraries, usable without the proxy's plug-ins
    "dicom": TOOLKIT,
    "dicomweb": TOOLKIT,
    "fhir": TOOLKIT,
    "jmix": TOOLKIT,
    "hl7": TOOLKIT,
    "deid": TOOLKIT,
    "web": TOOLKIT,
    "storage": TOOLKIT,
    "targets": TOOLKIT,
    "routing": TOOLKIT,
    "transform": TOOLKIT,
    "compat": TOOLKIT,
    # plug-ins: the types a config names; each kind stands alone
    "endpoints": PLUGIN,
    "backends": PLUGIN,
    "middleware": PLUGIN,
    # process: assembling and running the proxy
    "runtime": PROCESS,
    "service": PROCESS,
    "tap": PROCESS,
    "workers": PROCESS,
    "management": PROCESS,
    "cli": PROCESS,
    "devtools": PROCESS,
}

PLUGIN_KINDS = frozenset(name for name, layer in LAYERS.items() if layer == PLUGIN)

#: Inside the process layer, each may import only those before it: the runtime is
#: built first, the management API and hot reload work on a built runtime, the service
#: classes run both, worker processes run a service, the tap chooses between them, and
#: the command line and the twistd plug-in sit on top.
PROCESS_ORDER = ("runtime", "management", "service", "workers", "tap", "cli", "twisted.plugins", "devtools")

#: (importing package, imported package) -> why it is allowed.  Empty is the goal; an
#: entry here must say why the rule does not fit, never just silence a report.
EXCEPTIONS: dict[tuple[str, str], str] = {}


@attr.s(frozen=True, auto_attribs=True)
class Import:
    path: str  # relative to the scanned root's parent, e.g. harmony/backends/http.py
    line: int
    importer: str  # dotted module name
    imported: str  # dotted module name (or package.name for ``from package import name``)
    local: bool  # inside a function body


def package_of(module: str) -> str:
    """``harmony.backends.http`` -> ``backends``; ``harmony`` -> ``__init__``."""
    parts = module.split(".")
    if parts[0] == "twisted":
        return "twisted.plugins"
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(package: str) -> int | None:
    if package == "twisted.plugins":
        return PROCESS
    return LAYERS.get(package)


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool):
        self.module, self.is_package = module, is_package
        self.depth = 0
        self.found: list[tuple[int, str, bool]] = []

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            self.found.append((node.lineno, alias.name, self.depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if node.level:
            base = self.module.split(".")
            if not self.is_package:
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        for alias in node.names:
            # ``from harmony.x import y``: y may be a module or a name; keep both levels,
            # the package is what the rule looks at.
            target = prefix if not prefix.startswith("harmony") or prefix.count(".") >= 1 else (
                f"{prefix}.{alias.name}"
            )
            self.found.append((node.lineno, target, self.depth > 0))


def scan(root: Path, extra: Iterable[Path] = ()) -> list[Import]:
    """Every import of ``harmony`` made by a module under *root* (the ``harmony`` folder)."""
    imports: list[Import] = []
    files = sorted(root.rglob("*.py")) + [Path(p) for p in extra]
    for path in files:
        if path.is_relative_to(root):
            module = _module_name(root, path)
            shown = str(path.relative_to(root.parent))
        else:
            module = "twisted.plugins." + path.stem
            shown = str(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        collector = _Collector(module, path.name == "__init__.py")
        collector.visit(tree)
        for line, target, local in collector.found:
            if target == "harmony" or target.startswith("harmony."):
                imports.append(Import(shown, line, module, target, local))
    return imports


def package_graph(imports: list[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        a, b = package_of(imp.importer), package_of(imp.imported)
        if a != b:
            graph[a].add(b)
    return graph


def violations(imports: list[Import]) -> list[str]:
    """Every import that breaks the layering rule, as ``file:line: why``."""
    found = []
    for imp in imports:
        a, b = package_of(imp.importer), package_of(imp.imported)
        if a == b or (a, b) in EXCEPTIONS:
            continue
        la, lb = layer_of(a), layer_of(b)
        where = f"{imp.path}:{imp.line}: {imp.importer} imports {imp.imported}"
        if la is None or lb is None:
            unknown = a if la is None else b
            found.append(f"{where} (package {unknown!r} has no layer in LAYERS)")
        elif lb > la:
            found.append(f"{where} ({LAYER_NAMES[la]} {a} -> {LAYER_NAMES[lb]} {b})")
        elif a in PLUGIN_KINDS and b in PLUGIN_KINDS:
            found.append(f"{where} (plug-in kinds never import each other: {a} -> {b})")
        elif la == lb == PROCESS and PROCESS_ORDER.index(b) > PROCESS_ORDER.index(a):
            found.append(f"{where} (process order {' < '.join(PROCESS_ORDER)}: {a} -> {b})")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = [0]

    def visit(node: str):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                group.append(item)
                if item == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(set(graph) | {n for targets in graph.values() for n in targets}):
        if node not in index:
            visit(node)
    return groups


def module_cycles(imports: list[Import]) -> list[list[str]]:
    """Circles between modules, counting function-local imports (the ones they hide)."""
    known = {imp.importer for imp in imports}
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        target = imp.imported
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != imp.importer and not _is_ancestor(target, imp.importer):
            graph[imp.importer].add(target)
    return cycles(graph)


def _is_ancestor(package: str, module: str) -> bool:
    return module.startswith(package + ".")


def render(graph: dict[str, set[str]]) -> str:
    lines = []
    for layer in (PROCESS, PLUGIN, TOOLKIT, CORE):
        members = sorted(p for p in set(graph) | set(LAYERS) if layer_of(p) == layer and p in graph)
        for package in members:
            targets = sorted(graph[package], key=lambda p: (-(layer_of(p) or 0), p))
            lines.append(f"{LAYER_NAMES[layer]:8} {package:16} -> {', '.join(targets)}")
    return "\n".join(lines)


def default_root() -> Path:
    return Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harmony.devtools.imports",
        description="Print the import graph between Harmony's packages; --check lists layering violations.",
    )
    parser.add_argument("src", nargs="?", help="the harmony package folder (default: this installation's)")
    parser.add_argument("--plugin", action="append", default=[], help="a twisted/plugins module to include")
    parser.add_argument("--check", action="store_true", help="list violations and circles; exit 1 if any")
    args = parser.parse_args(argv)
    root = Path(args.src).resolve() if args.src else default_root()
    plugins = args.plugin
    if not plugins:
        guess = root.parent / "twisted" / "plugins" / "harmony_plugin.py"
        plugins = [guess] if guess.exists() else []
    imports = scan(root, plugins)
    graph = package_graph(imports)
    print(render(graph))
    bad = violations(imports)
    circles = module_cycles(imports)
    print(f"\n{len(bad)} layering violation(s); {len(circles)} module circle(s)")
    if args.check:
        for line in bad:
            print("  " + line)
        for group in circles:
            print("  circle: " + " <-> ".join(group))
    return 1 if args.check and (bad or circles) else 0


if __name__ == "__main__":
    sys.exit(main())
