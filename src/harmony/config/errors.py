"""Configuration problems, each naming the file and the table/key at fault."""

from __future__ import annotations

import attr


@attr.s(frozen=True, auto_attribs=True)
class Problem:
    file: str
    key: str
    message: str

    def __str__(self):
        where = f"{self.file}: [{self.key}]" if self.key else self.file
        return f"{where}: {self.message}"


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
