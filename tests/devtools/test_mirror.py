"""The tests mirror the code: every module under src/harmony has tests/<package>/test_<module>.py.

Modules that have none yet are listed in tests/unmirrored.txt, a list that may only shrink (like
the mypy baseline): a module missing from it and from the tests fails, and so does a listed module
that has gained its mirror (remove its line).  ``python -m harmony.devtools.mirror`` prints the
count and the largest modules still without a mirror; the synthetic trees below prove the rule.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from harmony.devtools import mirror

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src" / "harmony"
TESTS = REPO / "tests"
ALLOWED = TESTS / "unmirrored.txt"


def _allowed() -> set[str]:
    lines = (line.split("#", 1)[0].strip() for line in ALLOWED.read_text().splitlines())
    return {line for line in lines if line}


def test_every_module_has_its_mirror_or_is_listed():
    lacking = {m.name: m for m in mirror.missing(SRC, TESTS)}
    new = sorted(set(lacking) - _allowed())
    assert not new, "modules without a mirrored test module (write tests/<package>/test_<module>.py):\n" + \
        "\n".join(f"  {name} -> tests/{lacking[name].mirror}" for name in new)


def test_the_allow_list_only_shrinks():
    lacking = {m.name for m in mirror.missing(SRC, TESTS)}
    mirrored_now = sorted(_allowed() - lacking)
    assert not mirrored_now, f"mirrored now, remove from tests/unmirrored.txt: {mirrored_now}"


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_rule_on_a_synthetic_tree(tmp_path):
    src, tests = tmp_path / "harmony", tmp_path / "tests"
    _tree(src, {
        "__init__.py": "",
        "core.py": "",
        "kit/__init__.py": "from .a import A\n",         # re-exports only: needs no mirror
        "kit/a.py": "class A: ...\n",
        "kit/b.py": "",
        "logic/__init__.py": "def rule(): ...\n",         # defines something: needs one
        "ns/c.py": "",                                     # a namespace package counts too
    })
    _tree(tests, {
        "test_core.py": "from harmony import core\n",
        "kit/test_a.py": "from harmony.kit.a import A\n",
        "kit/test_b.py": "# in the right place, but it names no module\n",
        "logic/test_logic.py": "import harmony.logic\n",
    })
    found = {m.name: str(m.mirror) for m in mirror.modules(src)}
    assert found == {"harmony.core": "test_core.py", "harmony.kit.a": "kit/test_a.py",
                     "harmony.kit.b": "kit/test_b.py", "harmony.logic": "logic/test_logic.py",
                     "harmony.ns.c": "ns/test_c.py"}
    assert [m.name for m in mirror.missing(src, tests)] == ["harmony.kit.b", "harmony.ns.c"]


def test_names_module_accepts_the_usual_import_forms():
    assert mirror.names_module("from harmony.web import (\n    headers,\n    urls)\n", "harmony.web.urls")
    assert mirror.names_module("import harmony.web.urls as u\n", "harmony.web.urls")
    assert not mirror.names_module("from harmony.web import urlsafe\n", "harmony.web.urls")
    assert not mirror.names_module("import harmony.web.urls_extra\n", "harmony.web.urls")


def test_the_plan_places_flat_files_by_name_and_import(tmp_path):
    src, tests = tmp_path / "harmony", tmp_path / "tests"
    _tree(src, {"__init__.py": "", "backends/dicom_scu.py": "", "endpoints/jmix.py": "",
                "dicom/files.py": "", "storage/files.py": ""})
    _tree(tests, {"test_dicom_scu.py": "", "test_jmix_endpoint.py": "",
                  "test_dicom_files.py": "from harmony.dicom.files import x\n", "test_crash.py": ""})
    rows = {str(old): (str(new) if new else None) for old, new, _why in mirror.plan(src, tests)}
    assert rows == {"test_dicom_scu.py": "backends/test_dicom_scu.py",
                    "test_jmix_endpoint.py": "endpoints/test_jmix.py",
                    "test_dicom_files.py": "dicom/test_files.py", "test_crash.py": None}
