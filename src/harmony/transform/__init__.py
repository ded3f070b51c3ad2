"""JOLT transforms behind Harmony's own small interface.

The engine is ``jolt-py`` (import name ``pyjolt``), pinned exactly in
setup.cfg: it is young and single-author, so nothing outside this module
imports it.  Swapping engines means rewriting this file and keeping
``tests/test_jolt_fixtures.py`` green, nothing else.

    spec = load_spec(path)          # parse + compile once, at start-up
    output = spec.apply(document, context={"method": "GET"})

A *spec* is a JOLT chain: a list of ``{"operation": ..., "spec": ...}``.  A
single ``{"operation": ...}`` object is accepted as a one-step chain.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

#: The distribution that must own the ``pyjolt`` import name.  An unrelated
#: web framework is also called ``pyjolt``; if it were installed instead we
#: would rather refuse to start than run someone else's code on patient data.
ENGINE_DISTRIBUTION = "jolt-py"
OPERATIONS = ("shift", "default", "remove", "sort", "cardinality",
              "modify-overwrite-beta", "modify-default-beta", "modify-define-beta")


class SpecInvalid(ValueError):
    """A spec that cannot be used; the message names the source (file) and the step."""


class TransformFailed(RuntimeError):
    """A valid spec could not be applied to a given input."""


#: How far past its end a shift may grow an output array.  Array indexes in a
#: shift can come from the *input* (``x[&0]`` with a key such as "99999999"),
#: so without a bound one small request could make the proxy allocate
#: gigabytes.  JOLT itself has no such bound; no sane document needs one this big.
MAX_ARRAY_GAP = 10_000

_engine = None


def _guard_array_growth(engine):
    """Bound shift's array padding (see MAX_ARRAY_GAP).

    This reaches into the engine's private path step class; the engine is
    pinned exactly and ``tests/test_jolt_fixtures.py`` checks the guard, so
    an upgrade that moves it fails loudly rather than silently unguarded.
    """
    from pyjolt._common import paths
    from pyjolt._common.util import parse_int
    step = paths._ArrayStep
    if getattr(step, "_harmony_guarded", False):
        return
    original = step.overwrite_set

    def overwrite_set(self, tree, key, data):
        if parse_int(key) - len(tree) > MAX_ARRAY_GAP:
            raise engine.TransformError(f"array index {key} is too far past the end of the array")
        return original(self, tree, key, data)

    step.overwrite_set = overwrite_set
    step._harmony_guarded = True


def _load_engine():
    global _engine
    if _engine is None:
        from importlib.metadata import packages_distributions
        owners = packages_distributions().get("pyjolt", [])
        if owners != [ENGINE_DISTRIBUTION]:
            raise ImportError(f"the 'pyjolt' module must come from {ENGINE_DISTRIBUTION!r} only, "
                              f"found it provided by {owners or 'nothing'}")
        import pyjolt
        _guard_array_growth(pyjolt)
        _engine = pyjolt
    return _engine


class Spec:
    """A compiled, reusable JOLT chain.  Thread-safe to apply concurrently:
    the engine copies its input once and keeps no state between calls."""

    def __init__(self, chain, steps: list[str], source: str):
        self._chain = chain
        #: Operation names in order, for ``harmony check`` and error messages.
        self.steps = steps
        self.source = source

    def apply(self, document: Any, context: dict | None = None) -> Any:
        """Transform *document* (JSON-compatible Python values); never mutates it.

        *context* is what ``modify-*`` specs read with ``^path`` (JOLT's context).
        """
        engine = _load_engine()
        try:
            return self._chain.apply(document, context)
        except (engine.PyJoltError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                RecursionError) as e:
            raise TransformFailed(f"{self.source}: {type(e).__name__}: {e}") from e

    def __repr__(self):
        return f"<Spec {self.source} {self.steps}>"


def compile_spec(document: Any, source: str = "<spec>") -> Spec:
    """Compile a parsed spec document; raises :class:`SpecInvalid` naming *source*."""
    engine = _load_engine()
    if isinstance(document, dict) and "operation" in document:
        document = [document]
    if not isinstance(document, list) or not document:
        raise SpecInvalid(f"{source}: a spec must be a non-empty list of {{\"operation\": ..., \"spec\": ...}} steps")
    steps = []
    for i, step in enumerate(document):
        if not isinstance(step, dict) or not isinstance(step.get("operation"), str):
            raise SpecInvalid(f"{source}: step {i} must be an object with an 'operation' string")
        op = step["operation"]
        # The engine also takes Java class names and un-suffixed modify names;
        # we accept JOLT's documented names so specs stay portable to JOLT itself.
        if op not in OPERATIONS:
            raise SpecInvalid(f"{source}: step {i}: unknown operation {op!r} "
                              f"(one of {', '.join(OPERATIONS)})")
        if op != "sort" and "spec" not in step:
            raise SpecInvalid(f"{source}: step {i} ({op}) needs a 'spec'")
        steps.append(op)
    try:
        # The engine only warns about an unknown modify function (it would then
        # silently produce nothing); a typo in a spec is a start-up error for us.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            chain = engine.Chainr.from_spec(document)
    except (engine.PyJoltError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise SpecInvalid(f"{source}: {e}") from e
    # Only the engine's own warnings: whatever else warns meanwhile (the garbage collector
    # reporting another component's unclosed socket, say) says nothing about this spec.
    engine_dir = str(Path(engine.__file__).parent)
    for w in caught:
        if str(w.filename).startswith(engine_dir):
            raise SpecInvalid(f"{source}: {w.message}")
    return Spec(chain, steps, source)


def parse_json_text(text: str | bytes, source: str) -> Any:
    """Parse JSON, refusing NaN/Infinity (not JSON); raises ValueError naming *source*."""
    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")
    if isinstance(text, (bytes, bytearray)):
        # JSON is UTF-8 (RFC 8259); json.loads would guess UTF-16/32 from the first bytes.
        try:
            text = bytes(text).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text, parse_constant=no_constants)
    except RecursionError:
        raise ValueError(f"{source}: JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:
        raise ValueError(f"{source}: invalid JSON: {e}") from None


def load_spec(path: str | Path) -> Spec:
    """Read, parse and compile a spec file; every failure is a :class:`SpecInvalid`
    whose message starts with the file name."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SpecInvalid(f"{path}: cannot read: {e.strerror}") from None
    try:
        document = parse_json_text(raw, str(path))
    except ValueError as e:
        raise SpecInvalid(str(e)) from None
    return compile_spec(document, str(path))


__all__ = ["Spec", "SpecInvalid", "TransformFailed", "compile_spec", "load_spec", "parse_json_text",
           "OPERATIONS"]
