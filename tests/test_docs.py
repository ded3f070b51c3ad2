"""docs/ must stay true to the code: the product promises a page per type.

Each check here reads the code (not a hand-kept list) and fails when a page is
missing something the code accepts or registers, so a change that adds an
option, a metric or a module cannot land with its documentation forgotten.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import textwrap
from pathlib import Path

import pytest

from harmony.config.loader import KNOWN_KEYS
from harmony.config.options import Options
from harmony.registry import BUILTIN

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
OPTION_READERS = {name for name, value in vars(Options).items() if callable(value) and not name.startswith("_")}
KIND_FOLDERS = {"endpoint": "endpoints", "backend": "backends", "middleware": "middleware"}


def _function_keys(func, param: str, seen: set, owner: type | None = None) -> set[str]:
    """Option keys *func* reads from its parameter *param*, following helpers it hands it to.

    *owner* is the plug-in class: ``super().from_config(name, options, ctx)``,
    ``cls.more_options(options, ctx)`` and ``cls(...).take_shared_options(options)``
    are looked up on it, so options read by a base class count for the type."""
    func = inspect.unwrap(getattr(func, "__func__", func))
    if func in seen:
        return set()
    seen.add(func)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError):
        return set()
    module_globals = getattr(func, "__globals__", {})
    # A key given as a parameter with a default (spec_option(options, ctx, key="spec_path")).
    string_defaults = {}
    try:
        string_defaults = {n: p.default for n, p in inspect.signature(func).parameters.items()
                           if isinstance(p.default, str)}
    except (TypeError, ValueError):
        pass
    keys: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) \
                and isinstance(node.ops[0], ast.In) and isinstance(node.comparators[0], ast.Name) \
                and node.comparators[0].id == param:
            keys.add(node.left.value)
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in OPTION_READERS and isinstance(f.value, ast.Name) \
                and f.value.id == param and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant):
                keys.add(first.value)
            elif isinstance(first, ast.Name) and first.id in string_defaults:
                keys.add(string_defaults[first.id])
            continue
        if isinstance(f, ast.Attribute) and f.attr == "get" and isinstance(f.value, ast.Attribute) \
                and f.value.attr == "raw" and isinstance(f.value.value, ast.Name) and f.value.value.id == param \
                and node.args and isinstance(node.args[0], ast.Constant):
            keys.add(node.args[0].value)  # options.raw.get("audience"): read raw, marked used by hand
            continue
        passed = [i for i, a in enumerate(node.args) if isinstance(a, ast.Name) and a.id == param]
        passed_kw = [k.arg for k in node.keywords if isinstance(k.value, ast.Name) and k.value.id == param]
        if not passed and not passed_kw:
            continue
        # A helper given the options with a literal key (net.check_aet(options, "local_aet")).
        keys.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                    and re.fullmatch(r"[a-z][a-z0-9_]*", a.value))
        callee = _resolve(f, module_globals, owner, func)
        if callee is None:
            continue
        try:
            params = list(inspect.signature(callee).parameters)
        except (TypeError, ValueError):
            continue
        names = [params[i] for i in passed if i < len(params)] + [k for k in passed_kw if k in params]
        for name in names:
            keys |= _function_keys(callee, name, seen, owner)
    return keys


def _resolve(func_node, module_globals, owner=None, caller=None):
    if isinstance(func_node, ast.Name):
        return module_globals.get(func_node.id)
    if not isinstance(func_node, ast.Attribute):
        return None
    value = func_node.value
    if isinstance(value, ast.Name) and value.id in module_globals:
        target = getattr(module_globals[value.id], func_node.attr, None)
        return target if callable(target) else None
    if owner is None:
        return None
    # super().x, cls.x, self.x, cls(...).x: the plug-in class's own attribute,
    # or for super() the next definition after the caller's in the MRO.
    mro = owner.__mro__
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super":
        defining = [i for i, c in enumerate(mro)
                    if getattr(c.__dict__.get(func_node.attr), "__func__", None) is caller]
        mro = mro[defining[0] + 1:] if defining else mro[1:]
    for klass in mro:
        if func_node.attr in klass.__dict__:
            # Bound to the plug-in class, so a signature's parameters line up with the call's arguments
            # (an instance method's self is left out the same way).
            target = klass.__dict__[func_node.attr].__get__(object.__new__(owner) if isinstance(
                klass.__dict__[func_node.attr], type(_resolve)) else None, owner)
            return target if callable(target) else None
    return None


def type_option_keys(spec: str) -> set[str]:
    module_name, _, attr = spec.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    return _function_keys(cls.from_config, "options", set(), cls)


def _doc_text(page: Path) -> str:
    """The page plus the pages it links to (shared options live on one page: targets.md)."""
    text = page.read_text()
    for link in re.findall(r"\]\(([^)#]+\.md)", text):
        linked = (page.parent / link).resolve()
        if linked.is_file():
            text += "\n" + linked.read_text()
    return text


def documented(key: str, text: str) -> bool:
    return re.search(rf"(`{key}`|\b{key}\s*=|[.\[]{key}[\].]|`[^`\n]*\b{key}\b[^`\n]*`|\b{key}/|/{key}\b)",
                     text) is not None


TYPES = sorted({(kind, spec.partition(":")[2]): (kind, name, spec) for kind, types in BUILTIN.items()
                for name, spec in reversed(list(types.items()))}.values())


@pytest.mark.parametrize(("kind", "name", "spec"), TYPES, ids=[f"{k}-{n}" for k, n, _ in TYPES])
def test_every_option_a_type_reads_is_on_its_page(kind, name, spec):
    page = DOCS / KIND_FOLDERS[kind] / f"{name}.md"
    assert page.is_file(), f"{kind} type {name!r} has no page {page.relative_to(ROOT)}"
    text = _doc_text(page)
    missing = sorted(k for k in type_option_keys(spec) if not documented(k, text))
    assert not missing, f"{page.relative_to(ROOT)} does not document {missing}"


def test_the_option_scan_sees_helpers():
    """The scan follows options into helpers: a guard that it is not vacuous."""
    assert {"retries", "connect_timeout_secs", "base_url"} <= type_option_keys(BUILTIN["backend"]["http"])
    assert "local_aet" in type_option_keys(BUILTIN["endpoint"]["dicom_scp"])
    assert "path" in type_option_keys(BUILTIN["backend"]["local_archive"])


def test_every_storage_option_is_on_the_storage_page():
    text = (DOCS / "storage.md").read_text()
    missing = [k for k in KNOWN_KEYS["storage.options"] + KNOWN_KEYS["storage"] if not documented(k, text)]
    assert not missing, f"docs/storage.md does not document [storage] keys {missing}"


@pytest.mark.parametrize("table", sorted(KNOWN_KEYS))
def test_every_key_of_a_fixed_table_is_documented(table):
    """The keys the loader knows (its did-you-mean list) are each on some page of docs/."""
    text = "\n".join(p.read_text() for p in DOCS.glob("*.md"))
    missing = [k for k in KNOWN_KEYS[table] if not documented(k, text)]
    assert not missing, f"[{table}] keys {missing} are on no page of docs/"


def test_every_management_option_is_on_the_management_page():
    from harmony.management.settings import ManagementSettings

    keys = _function_keys(ManagementSettings._parse.__func__, "o", set())
    assert {"enabled", "base_path"} <= keys
    text = (DOCS / "management.md").read_text()
    missing = sorted(k for k in keys if not documented(k, text))
    assert not missing, f"docs/management.md does not document [management] {missing}"


METRIC_MAKERS = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram",
                 "CounterMetricFamily": "counter", "GaugeMetricFamily": "gauge",
                 "HistogramMetricFamily": "histogram"}


def registered_metrics() -> dict[str, tuple[str, list[str]]]:
    """Every metric family src/harmony makes: exposed name -> (type, labels), read from the calls."""
    found = {}
    for path in (ROOT / "src" / "harmony").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in METRIC_MAKERS and node.args and isinstance(node.args[0], ast.Constant)):
                continue
            kind = METRIC_MAKERS[node.func.id]
            labels_node = next((k.value for k in node.keywords if k.arg in ("labels", "labelnames")),
                               node.args[2] if len(node.args) > 2 else None)
            labels = ast.literal_eval(labels_node) if labels_node is not None else []
            name = node.args[0].value + ("_total" if kind == "counter" else "")
            found[name] = (kind, list(labels))
    return found


def documented_metrics() -> dict[str, tuple[str, list[str]]]:
    """docs/metrics.md's table: name -> (type, labels); a row may name several metrics."""
    rows = {}
    for line in (DOCS / "metrics.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`harmony_"):
            continue
        labels = [re.sub(r"\s*\(.*", "", part).strip() for part in re.sub(r"\([^)]*\)", "", cells[2]).split(",")]
        for name in re.findall(r"`(harmony_[a-z0-9_]+)`", cells[0]):
            rows[name] = (cells[1], [x for x in labels if x])
    return rows


def test_every_registered_metric_is_in_metrics_md_with_its_type_and_labels():
    code, docs = registered_metrics(), documented_metrics()
    assert len(code) >= 30, "the metric scan found too little to be trusted"
    missing = sorted(set(code) - set(docs))
    assert not missing, f"docs/metrics.md lacks {missing}"
    wrong = {n: {"code": code[n], "docs": docs[n]} for n in code if code[n] != docs[n]}
    assert not wrong, f"docs/metrics.md's type or labels differ from the code: {wrong}"


def test_every_metric_in_metrics_md_exists():
    extra = sorted(set(documented_metrics()) - set(registered_metrics()))
    assert not extra, f"docs/metrics.md documents metrics no code registers: {extra}"


def _module_rows() -> dict[str, str]:
    rows = {}
    for line in (DOCS / "architecture.md").read_text().splitlines():
        m = re.match(r"\| `(harmony(?:\.[a-z0-9_]+)*)`", line)
        if m:
            rows[m.group(1)] = line
    return rows


SRC = ROOT / "src" / "harmony"
TOP_LEVEL = sorted(p.stem if p.suffix == ".py" else p.name for p in SRC.iterdir()
                   if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file())


def test_every_top_level_module_has_a_row_in_the_architecture_table():
    rows = _module_rows()
    missing = [f"harmony.{name}" for name in TOP_LEVEL if f"harmony.{name}" not in rows]
    assert not missing, f"docs/architecture.md's module table has no row for {missing}"


@pytest.mark.parametrize("package", [n for n in TOP_LEVEL if (SRC / n).is_dir()])
def test_every_module_of_a_package_is_named_in_its_rows(package):
    """A package's row (or rows of its sub-modules) names each of its modules, as `name` or `x.name`."""
    rows = " ".join(v for k, v in _module_rows().items() if k == f"harmony.{package}"
                    or k.startswith(f"harmony.{package}."))
    names = {p.parent.name if p.name == "__init__.py" else p.stem for p in (SRC / package).rglob("*.py")
             if p.parent != SRC / package or p.name != "__init__.py"}
    missing = sorted(n for n in names if not re.search(rf"`([^`\s]*[./])?{n}([./(][^`]*)?`", rows))
    assert not missing, f"docs/architecture.md's harmony.{package} row does not name {missing}"


def test_every_row_of_the_architecture_table_names_a_real_module():
    gone = [name for name in _module_rows() if importlib.util.find_spec(name) is None]
    assert not gone, f"docs/architecture.md has rows for modules that do not exist: {gone}"


def test_the_readme_names_every_debian_package_scripts_test_installs():
    script = (ROOT / "scripts" / "test").read_text()
    installed = set()
    for group in re.findall(r"pkgs\+?=\(([^)]*)\)", script):
        installed.update(group.split())
    assert {"dcmtk", "orthanc", "postgresql"} <= installed, "the scan of scripts/test found too little"
    readme = (ROOT / "README.md").read_text()
    test_it = readme[readme.index("## Test it"):readme.index("```sh\nscripts/test")]
    missing = sorted(p for p in installed if f"`{p}`" not in test_it)
    assert not missing, f"README's 'Test it' does not name the Debian packages {missing}"


@pytest.mark.parametrize(("kind", "name", "spec"), TYPES, ids=[f"{k}-{n}" for k, n, _ in TYPES])
def test_the_readme_links_every_type_page(kind, name, spec):
    link = f"(docs/{KIND_FOLDERS[kind]}/{name}.md)"
    assert link in (ROOT / "README.md").read_text(), f"README.md does not link {link}"


BENCHES = sorted(p.name for p in (ROOT / "bench").iterdir() if p.is_dir() and any(p.glob("*.py")))


@pytest.mark.parametrize("bench", BENCHES)
def test_every_bench_readme_says_how_to_run_it_with_flags_its_script_has(bench):
    readme = ROOT / "bench" / bench / "README.md"
    assert readme.is_file(), f"bench/{bench} has no README.md"
    commands = re.findall(rf"(bench/{bench}/[a-z_]+\.py)([^`#\n]*)", readme.read_text())
    assert commands, f"bench/{bench}/README.md shows no command that runs it"
    for script, args in commands:
        source = (ROOT / script).read_text()
        unknown = [f for f in re.findall(r"(?<![\w-])--[a-z][a-z-]*", args) if f'"{f}"' not in source]
        assert not unknown, f"bench/{bench}/README.md runs {script} with {unknown}, which it does not take"


def _option_table_names(text: str) -> set[str]:
    """Names in the first column of the page's tables headed ``| option |``."""
    names, in_table = set(), False
    for line in text.splitlines():
        if not line.startswith("|"):
            in_table = False
        elif re.match(r"\|\s*options?\s*\|", line, re.I):
            in_table = True
        elif in_table:
            names.update(re.findall(r"`([a-z][a-z0-9_]*)`", line.strip("|").split("|")[0]))
    return names


#: Documented names that are not options the type reads: `targets` is the component's own key
#: (beside `type`), and jwt_auth builds `verify_<claim>` with an f-string the scan cannot follow.
NOT_READ_AS_OPTIONS = {"targets", "verify_audience", "verify_issuer"}


@pytest.mark.parametrize(("kind", "name", "spec"), TYPES, ids=[f"{k}-{n}" for k, n, _ in TYPES])
def test_every_option_a_page_lists_is_read_by_its_type(kind, name, spec):
    page = DOCS / KIND_FOLDERS[kind] / f"{name}.md"
    keys = type_option_keys(spec)
    secrets = {f"{k}_file" for k in keys}  # Options.secret reads KEY or KEY_file
    phantom = sorted(_option_table_names(page.read_text()) - keys - secrets - NOT_READ_AS_OPTIONS)
    assert not phantom, f"{page.relative_to(ROOT)} lists options its type does not read: {phantom}"


def test_every_environment_variable_the_code_reads_is_documented():
    """HARMONY_* names the code reads (os.environ / a *_ENV constant) are each on some page of docs/."""
    names = set()
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        names.update(re.findall(r"""_ENV\s*=\s*["'](HARMONY_[A-Z_]+)["']""", text))
        names.update(re.findall(r"""environ(?:\.get\(|\[)\s*["'](HARMONY_[A-Z_]+)["']""", text))
    assert "HARMONY_GC_FREEZE" in names, "the environment scan found too little"
    docs = "\n".join(p.read_text() for p in DOCS.rglob("*.md"))
    missing = sorted(n for n in names if f"`{n}" not in docs)
    assert not missing, f"environment variables on no page of docs/: {missing}"
