"""The two tiers of the suite: ``peers`` (tests that start a real process: Orthanc,
DCMTK, nginx, PostgreSQL, a browser, twistd, worker processes, a CLI in a subprocess,
ruff/mypy) and the fast in-process tier (``pytest -m "not peers"``).

Why automatic: a hand-kept marker list goes stale the day someone adds a peer to a
test.  Collection marks a test ``peers`` when its own source, a fixture it uses, or a
helper it calls (one level, from its module or tests.*) starts a process.  And the
marker is checked, not trusted: a test left unmarked that spawns a process anyway
(``subprocess.Popen`` or ``reactor.spawnProcess``) fails, naming itself.
"""

from __future__ import annotations

import inspect
import re
import subprocess

import pytest

PEERS = "peers"

#: What starting a process looks like in this suite's code.
_STARTS_A_PROCESS = re.compile(
    r"\bsubprocess\b|\bspawnProcess\b|\bPeerProcess\b|\bOrthanc\(|\bDcmqrscp\b|\bStorescp\b|\bStartedPeer\b"
    r"|/usr/bin/|/usr/sbin/|\bchromium\b|\btwistd\b|\bnginx\b|\bpostgres\b|\bminio\b|\bworkers\s*=\s*[2-9]"
    r"|\bWorkerPool\(|\bpeers\.\w+\(|from tests\.peers import|from tests\.hl7\.peers import"
)
_NAME = re.compile(r"\b([A-Za-z_]\w*)\b")


def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _ours(obj) -> bool:
    module = getattr(obj, "__module__", "") or ""
    return module == "tests" or module.startswith("tests.") or module.startswith("conftest")


def _referenced(source: str, namespace: dict, seen: set) -> list[tuple[str, dict]]:
    """The tests.* functions and classes (with their own module namespace) and the string
    constants that *source* names."""
    found = []
    for name in set(_NAME.findall(source)):
        value = namespace.get(name)
        if value is None or id(value) in seen:
            continue
        if isinstance(value, str):
            found.append((value, {}))
        elif callable(value) and _ours(value):
            seen.add(id(value))
            found.append((_source(value), _namespace(value)))
    return found


def _namespace(obj) -> dict:
    if hasattr(obj, "__globals__"):
        return obj.__globals__
    module = inspect.getmodule(obj)
    return vars(module) if module is not None else {}


#: Tests that start a process no source scan can see (Harmony itself starts it).
EXPLICIT = {
    "tests/management/test_console.py::test_console_data_calls": "the console's config check runs `harmony check` "
                                                      "in a subprocess (harmony.management.configview)",
}


def starts_a_process(item) -> bool:
    """Whether *item*, its fixtures, or what they name (three levels deep) start a process."""
    if item.nodeid in EXPLICIT:
        return True
    function = getattr(item, "function", None)
    if function is None:
        return False
    roots = [function]
    fixtures = list(item._fixtureinfo.name2fixturedefs.values())
    if "getfixturevalue" in _source(function):
        # Fixtures chosen at run time by name (``request.getfixturevalue(shape)``): the
        # names are among the test's parameters.
        callspec = getattr(item, "callspec", None)
        manager = item.session._fixturemanager
        for value in (callspec.params.values() if callspec else ()):
            if isinstance(value, str) and value.isidentifier():
                fixtures.append(manager.getfixturedefs(value, item) or ())
    for defs in fixtures:
        roots.extend(d.func for d in defs if _ours(d.func) and d.func.__module__ != __name__)
    seen = {id(root) for root in roots}
    for root in roots:
        level = [(_source(root), _namespace(root))]
        for _depth in range(4):
            if any(_STARTS_A_PROCESS.search(text) for text, _ns in level):
                return True
            level = [found for text, ns in level for found in _referenced(text, ns, seen)]
    return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker(PEERS) is None and starts_a_process(item):
            item.add_marker(PEERS)


@pytest.fixture(autouse=True)
def _in_process_tier_starts_no_process(request, monkeypatch):
    """An unmarked test that starts a process anyway is mis-tiered: fail it, by name."""
    if request.node.get_closest_marker(PEERS) is not None:
        yield
        return
    where = request.node.nodeid

    class RefusedPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            raise AssertionError(f"{where} starts a process ({args[:1]!r}) but is not marked 'peers': "
                                 "mark it @pytest.mark.peers, or teach tests/tiers.py what it starts")

    monkeypatch.setattr(subprocess, "Popen", RefusedPopen)
    from twisted.internet import reactor

    def refused_spawn(*args, **kwargs):
        raise AssertionError(f"{where} spawns a process but is not marked 'peers'")

    monkeypatch.setattr(reactor, "spawnProcess", refused_spawn)
    yield
