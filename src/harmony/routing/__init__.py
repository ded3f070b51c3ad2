"""Request matching shared by routing rules and consistent hashing.

A *key source* names one value in a request, the same way everywhere:

    header:X-Tenant        first value of a request header
    query:StudyInstanceUID first value of a query parameter
    metadata:auth.sub      an envelope metadata key (calling_aet, auth.*, ...)
    path:/studies/([^/]+)  a regex searched in the path; its first group (or the match)
    tag:StudyInstanceUID   a DICOM attribute (keyword or 8-hex tag) of the request's
                           DICOM JSON identifier (``request.normalized``, e.g. a C-FIND)

A *rule* is a table of conditions, all of which must hold, plus what it
chooses (``targets`` inside a backend, ``backend`` in the ``route`` middleware)::

    { path = "^/urgent/", header = { X-Tenant = "blue" }, targets = ["fast"] }

``path`` is a regex matched at the start of the request path; every other
condition is a regex that must match the whole value.
"""

from __future__ import annotations

import re

import attr

from harmony.config.errors import OptionError, did_you_mean

KINDS = ("header", "query", "metadata", "path", "tag")
#: Condition tables a rule may carry (``path`` is a plain regex string instead).
CONDITION_TABLES = ("header", "query", "metadata", "tag")


def _tag_key(name: str, option_key: str) -> str:
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return name.upper()
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(name)
    if tag is None:
        raise OptionError(option_key, f"{name!r} is neither a DICOM keyword nor an 8-hex-digit tag")
    return f"{tag:08X}"


def _compile(pattern, option_key: str):
    if not isinstance(pattern, str):
        raise OptionError(option_key, f"must be a regex string, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise OptionError(option_key, f"invalid regex {pattern!r}: {e}") from None


@attr.s(auto_attribs=True, frozen=True)
class KeySource:
    kind: str
    arg: str
    regex: re.Pattern | None = None

    @classmethod
    def parse(cls, spec, option_key: str) -> "KeySource":
        if not isinstance(spec, str) or ":" not in spec:
            raise OptionError(option_key, f"must look like 'header:NAME', 'query:NAME', 'metadata:KEY', "
                                          f"'path:REGEX' or 'tag:KEYWORD', got {spec!r}")
        kind, _, arg = spec.partition(":")
        return cls.of(kind, arg, option_key)

    @classmethod
    def of(cls, kind: str, arg: str, option_key: str) -> "KeySource":
        if kind not in KINDS:
            raise OptionError(option_key, f"unknown key source {kind!r} (known: {', '.join(KINDS)})")
        if not arg:
            raise OptionError(option_key, f"{kind!r} needs a name after the colon")
        if kind == "path":
            return cls(kind, arg, _compile(arg, option_key))
        if kind == "tag":
            return cls(kind, _tag_key(arg, option_key))
        return cls(kind, arg)

    def value(self, request) -> str | None:
        if self.kind == "header":
            return request.header(self.arg)
        if self.kind == "query":
            return request.query_value(self.arg)
        if self.kind == "metadata":
            v = request.metadata.get(self.arg)
            return None if v is None else str(v)
        if self.kind == "path":
            m = self.regex.search(request.path)
            if m is None:
                return None
            return m.group(1) if m.groups() else m.group(0)
        # tag: DICOM JSON, {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}
        doc = request.normalized
        if not isinstance(doc, dict):
            return None
        element = doc.get(self.arg)
        values = element.get("Value") if isinstance(element, dict) else None
        if not values:
            return None
        v = values[0]
        if isinstance(v, dict):  # PN: {"Alphabetic": "..."}
            v = v.get("Alphabetic", "")
        return str(v).rstrip("\0 ")


@attr.s(auto_attribs=True, frozen=True)
class Rule:
    """Conditions (all must hold) and the choice the rule makes."""

    conditions: tuple
    choice: object
    #: Index in its list, for messages and the admin API.
    index: int = 0

    def matches(self, request) -> bool:
        for source, regex in self.conditions:
            if source.kind == "path":
                if regex.match(request.path) is None:
                    return False
                continue
            value = source.value(request)
            if value is None or regex.fullmatch(value) is None:
                return False
        return True


def parse_rule(table, option_key: str, choice_key: str, index: int = 0) -> Rule:
    """One rule table; *choice_key* is the key holding what it chooses."""
    if not isinstance(table, dict):
        raise OptionError(option_key, "must be a table of conditions")
    conditions = []
    for key, value in table.items():
        where = f"{option_key}.{key}"
        if key == choice_key:
            continue
        if key == "path":
            conditions.append((KeySource.of("path", str(value), where), _compile(value, where)))
        elif key in CONDITION_TABLES:
            if not isinstance(value, dict) or not value:
                raise OptionError(where, "must be a non-empty table of name = regex")
            for name, pattern in value.items():
                conditions.append((KeySource.of(key, name, f"{where}.{name}"), _compile(pattern, f"{where}.{name}")))
        else:
            known = ("path", *CONDITION_TABLES, choice_key)
            raise OptionError(where, f"unknown condition{did_you_mean(key, known)} (known: {', '.join(known)})")
    if choice_key not in table:
        raise OptionError(option_key, f"needs {choice_key!r}: what the rule chooses")
    if not conditions:
        raise OptionError(option_key, "has no conditions, so it would match everything; "
                                      "make it the default instead")
    return Rule(tuple(conditions), table[choice_key], index)


def parse_rules(value, option_key: str, choice_key: str) -> list[Rule]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise OptionError(option_key, "must be a list of rule tables ([[...]] or [{...}, ...])")
    return [parse_rule(t, f"{option_key}[{i}]", choice_key, i) for i, t in enumerate(value)]


def first_match(rules, request):
    for rule in rules:
        if rule.matches(request):
            return rule
    return None
