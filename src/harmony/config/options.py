"""Typed accessors for a component's options table.

They raise :class:`OptionError` naming the key, so every type validates its
options the same way and every message names what is wrong.
"""

from __future__ import annotations

import builtins
from pathlib import Path

from harmony.config.errors import OptionError

_MISSING = object()


class Options:
    def __init__(self, raw: dict | None, base_dir: Path | None = None):
        self.raw = dict(raw or {})
        self.base_dir = base_dir or Path.cwd()
        self.used: set[str] = set()

    def __contains__(self, key):
        return key in self.raw

    def _get(self, key, default):
        self.used.add(key)
        value = self.raw.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise OptionError(key, "is required")
            return default
        return value

    def str(self, key, default=_MISSING, *, choices=None) -> str | None:
        value = self._get(key, default)
        if value is None:
            return None
        if not isinstance(value, str):
            raise OptionError(key, f"must be a string, got {type(value).__name__}")
        if choices is not None and value not in choices:
            raise OptionError(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    def bool(self, key, default=_MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise OptionError(key, f"must be true or false, got {value!r}")
        return value

    def int(self, key, default=_MISSING, *, minimum=None, maximum=None) -> int | None:
        value = self._get(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(key, f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum or maximum is not None and value > maximum:
            raise OptionError(key, f"must be between {minimum} and {maximum}, got {value}")
        return value

    def number(self, key, default=_MISSING, *, minimum=None) -> float | None:
        value = self._get(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionError(key, f"must be a number, got {value!r}")
        if minimum is not None and value < minimum:
            raise OptionError(key, f"must be at least {minimum}, got {value}")
        return float(value)

    def port(self, key, default=_MISSING) -> builtins.int:
        return self.int(key, default, minimum=0, maximum=65535)

    def list(self, key, default=_MISSING, *, of=builtins.str) -> builtins.list:
        value = self._get(key, default)
        if value is None:
            return value
        if not isinstance(value, list) or not all(isinstance(v, of) for v in value):
            raise OptionError(key, f"must be a list of {of.__name__}")
        return builtins.list(value)

    def table(self, key, default=_MISSING) -> dict:
        value = self._get(key, default)
        if value is None:
            return value
        if not isinstance(value, dict):
            raise OptionError(key, "must be a table")
        return dict(value)

    def path(self, key, default=_MISSING) -> Path | None:
        """A filesystem path; relative ones are taken from the config file's folder."""
        value = self.str(key, default)
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    def secret(self, key, file_key=None, default=_MISSING) -> builtins.str | None:
        """A secret given inline (*key*) or in a file (*file_key*, first line)."""
        file_key = file_key or f"{key}_file"
        if file_key in self.raw:
            path = self.path(file_key)
            try:
                text = path.read_text()
            except OSError as e:
                raise OptionError(file_key, f"cannot read {path}: {e.strerror}") from None
            lines = text.strip().splitlines()
            return lines[0].strip() if lines else ""
        return self.str(key, default)
