"""The layering rule (docs/architecture.md, "Layers") holds for the whole source tree.

core <- toolkits <- plug-ins (endpoints, backends, middleware: never each other) <- process,
and no circle between modules, counting imports hidden inside functions.  The check is
``harmony.devtools.imports``, the same code ``python -m harmony.devtools.imports --check``
runs; the synthetic trees below prove it reports what it should.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from harmony.devtools import imports as layering

SRC = Path(__file__).resolve().parents[2] / "src"
ROOT = SRC / "harmony"
PLUGIN = SRC / "twisted" / "plugins" / "harmony_plugin.py"


def _imports():
    return layering.scan(ROOT, [PLUGIN])


def test_no_import_breaks_the_layering():
    bad = layering.violations(_imports())
    assert bad == [], "imports that break the layering rule:\n" + "\n".join(bad)


def test_no_module_circle_even_through_function_local_imports():
    circles = layering.module_cycles(_imports())
    assert circles == [], "\n".join(" <-> ".join(group) for group in circles)


def test_every_package_has_a_layer():
    names = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert names - set(layering.LAYERS) == set()


def test_every_exception_says_why():
    for pair, why in layering.EXCEPTIONS.items():
        assert isinstance(why, str) and len(why) > 20, pair


def _tree(tmp_path, files: dict[str, str]) -> Path:
    root = tmp_path / "harmony"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_the_check_reports_each_kind_of_violation_with_file_and_line(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "envelope.py": "from harmony.web import headers\n",  # core -> toolkit
        "web/__init__.py": "",
        "web/headers.py": "",
        "targets/__init__.py": "",
        "targets/health.py": "def check():\n    from harmony.backends.http import Factory\n",  # hidden in a function
        "backends/__init__.py": "",
        "backends/http.py": "",
        "middleware/__init__.py": "",
        "middleware/auth.py": "from ..endpoints import base\n",  # relative, plug-in -> plug-in
        "endpoints/__init__.py": "",
        "endpoints/base.py": "",
        "service.py": "import harmony.tap\n",  # against the process order
        "tap.py": "",
        "nowhere.py": "import harmony.envelope\n",  # a package with no layer
    })
    report = "\n".join(layering.violations(layering.scan(root)))
    assert "harmony/envelope.py:1: harmony.envelope imports harmony.web" in report
    assert "harmony/targets/health.py:2: harmony.targets.health imports harmony.backends.http" in report
    assert "harmony/middleware/auth.py:1: harmony.middleware.auth imports harmony.endpoints" in report
    assert "plug-in kinds never import each other" in report
    assert "harmony/service.py:1:" in report and "process order" in report
    assert "'nowhere' has no layer" in report


def test_the_check_finds_a_circle_dodged_by_a_function_local_import(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "service.py": "def build():\n    from harmony.workers import Pool\n",
        "workers.py": "from harmony.service import Service\n",
    })
    assert layering.module_cycles(layering.scan(root)) == [["harmony.service", "harmony.workers"]]


def test_the_command_prints_the_graph_and_fails_on_a_violation(tmp_path, capsys):
    root = _tree(tmp_path, {"__init__.py": "", "errors.py": "from harmony.backends import http\n",
                            "backends/__init__.py": "", "backends/http.py": ""})
    assert layering.main([str(root), "--check"]) == 1
    out = capsys.readouterr().out
    assert "core     errors           -> backends" in out
    assert "1 layering violation(s)" in out
    assert layering.main([str(ROOT)]) == 0
