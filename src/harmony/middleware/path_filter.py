"""``path_filter``: only sub-paths matching one of ``rules`` reach the backend.

A rule is a path pattern over the sub-path below the endpoint's prefix::

    rules = ["/Patient", "/Patient/{id}", "/studies/{study}/series/{*rest}"]

``{name}`` matches exactly one non-empty segment; a trailing ``{*rest}``
matches zero or more.  Trailing slashes are ignored on both sides.  A request
matching no rule gets a real 404 and the backend is never called.  Captured
segments are put in metadata as ``path.<name>`` for later steps.

Matching is done on percent-decoded segments, and a path with ``.``/``..``
segments (encoded or not), empty segments or an encoded ``/`` never matches:
an upstream that normalises ``/allowed/../secret`` after we let it through
would otherwise turn an allow-list into a suggestion.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from harmony.config.errors import OptionError
from harmony.errors import NotFound
from harmony.middleware.base import Middleware

_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_REST = re.compile(r"^\{\*([A-Za-z_][A-Za-z0-9_]*)?\}$")


class Rule:
    def __init__(self, pattern: str):
        if not isinstance(pattern, str) or not pattern.startswith("/"):
            raise ValueError(f"must start with '/', got {pattern!r}")
        self.pattern = pattern
        parts = [p for p in pattern.split("/") if p] if pattern.strip("/") else []
        self.rest: str | None = None
        self.parts: list[tuple[str, str]] = []  # ("lit", text) | ("param", name)
        for i, part in enumerate(parts):
            rest = _REST.match(part)
            if rest:
                if i != len(parts) - 1:
                    raise ValueError(f"{{*...}} must be the last segment in {pattern!r}")
                self.rest = rest.group(1) or "rest"
                continue
            param = _PARAM.match(part)
            if param:
                self.parts.append(("param", param.group(1)))
            elif "{" in part or "}" in part:
                raise ValueError(f"bad segment {part!r} in {pattern!r} (use {{name}} or a trailing {{*rest}})")
            else:
                self.parts.append(("lit", unquote(part)))

    def match(self, segments: list[str]) -> dict | None:
        if len(segments) < len(self.parts) or (self.rest is None and len(segments) != len(self.parts)):
            return None
        captured = {}
        for (kind, value), seg in zip(self.parts, segments, strict=False):  # segments may run on into `rest`
            if kind == "lit":
                if seg != value:
                    return None
            else:
                captured[value] = seg
        if self.rest is not None:
            captured[self.rest] = "/".join(segments[len(self.parts):])
        return captured


def split_subpath(subpath: str) -> list[str] | None:
    """Decoded segments of a sub-path, or None when it is not one we can judge safely."""
    # One leading slash belongs to the sub-path, one trailing slash is forgiven;
    # any other empty segment ("//") is refused rather than guessed at.
    stripped = (subpath or "").removeprefix("/")
    stripped = stripped[:-1] if stripped.endswith("/") else stripped
    if not stripped:
        return []
    segments = []
    for raw in stripped.split("/"):
        seg = unquote(raw, errors="strict") if "%" in raw else raw
        if seg in ("", ".", "..") or "/" in seg or "\\" in seg or "\x00" in seg:
            return None
        segments.append(seg)
    return segments


class PathFilter(Middleware):
    def __init__(self, name, rules: list[Rule]):
        super().__init__(name)
        self.rules = rules

    @classmethod
    def from_config(cls, name, options, ctx):
        raw = options.list("rules", of=str)
        if not raw:
            raise OptionError("rules", "must list at least one pattern (an empty allow-list refuses everything)")
        rules = []
        for i, pattern in enumerate(raw):
            try:
                rules.append(Rule(pattern))
            except ValueError as e:
                raise OptionError(f"rules[{i}]", str(e)) from None
        return cls(name, rules)

    def on_request(self, request):
        try:
            segments = split_subpath(request.subpath)
        except UnicodeDecodeError:
            segments = None
        if segments is not None:
            for rule in self.rules:
                captured = rule.match(segments)
                if captured is not None:
                    for key, value in captured.items():
                        request.metadata[f"path.{key}"] = value
                    return request
        raise NotFound(f"no route for {request.subpath!r} here")
