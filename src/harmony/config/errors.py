"""Configuration problems, each naming the file and the table/key at fault."""

from __future__ import annotations

import difflib

import attr


@attr.s(frozen=True, auto_attribs=True)
class Problem:
    file: str
    key: str
    message: str

    def __str__(self):
        where = f"{self.file}: [{self.key}]" if self.key else self.file
        return f"{where}: {self.message}"


def did_you_mean(key: str, known) -> str:
    """`` (did you mean 'log_level'?)`` when *key* is close to one of *known*, else ``""``."""
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_key_problems(table, known, source: str, where: str, *, refused: bool = False) -> list:
    """One :class:`Problem` per key of *table* not in *known*, each with a did-you-mean.

    *where* is the table's dotted name (``network.default.http``); the problem's key
    is the full dotted key, so an operator sees exactly which line to fix.  Callers
    put them in the warnings list, or (``refused=True``: where an ignored key would
    silently change what Harmony does, e.g. storage) in the problems list.
    """
    if not isinstance(table, dict):
        return []
    verdict = "unknown key" if refused else "unknown key, ignored"
    return [Problem(source, f"{where}.{k}" if where else str(k), verdict + did_you_mean(k, known))
            for k in sorted(table, key=str) if k not in known]


class OptionError(ValueError):
    """Raised by a type's ``from_config`` for one bad option.

    *key* is relative to the component's options table (``"port"``); the loader
    prefixes it with the component's table, so the message reads
    ``harmony.toml: [endpoints.scp.options.port]: must be 1-65535``.
    """

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class ConfigErrors(Exception):
    """All problems found in one configuration; nothing should listen."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{len(self.problems)} configuration problem(s):"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)
