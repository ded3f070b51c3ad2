"""HL7 v2 escape sequences (v2.5 section 2.7), both ways, without loss.

Delimiters inside data are written ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` (and
``\\P\\`` for v2.7's truncation character); any byte can be written
``\\Xhh..\\`` in the message's character set.  python-hl7's own ``unescape``
is lossy for our purposes (it reads ``\\X..\\`` as Latin-1 characters and
drops formatting commands), so the JSON view uses this codec instead.

In the view, text is plain: delimiters are themselves and ``\\X0D\\`` is a
carriage return.  Formatting commands (``\\H\\ \\N\\ \\.br\\ \\Zxx\\ \\Cxxyy\\
\\Mxxyyzz\\``) have no plain-text meaning: the view keeps them as written,
with a backslash as escape character whatever the message used, and
:func:`escape` writes them back as commands.  (The one ambiguity: data text
that literally reads like a formatting command comes back as that command.)
"""

from __future__ import annotations

import re

import attr

#: Formatting commands as they appear in view text (backslash-delimited).
FORMATTING = re.compile(r"\\(H|N|\.(?:br|sp|fi|nf|in|ti|sk|ce)[-+]?\d*|Z[^\\\r]{0,40}|C[0-9A-Fa-f]{4}|"
                        r"M[0-9A-Fa-f]{4,6})\\")


@attr.s(auto_attribs=True, frozen=True)
class Separators:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""

    @classmethod
    def from_msh2(cls, field: str, encoding: str) -> "Separators":
        chars = list(encoding) + [""] * (5 - len(encoding))
        return cls(field, chars[0], chars[1], chars[2], chars[3], chars[4])

    @property
    def msh2(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent + self.truncation

    def check(self) -> None:
        """Raise ValueError unless these can delimit a message."""
        chars = [self.field, self.component, self.repetition, self.escape, self.subcomponent]
        if self.truncation:
            chars.append(self.truncation)
        if any(len(c) != 1 for c in chars):
            raise ValueError("MSH-2 must hold the component, repetition, escape and subcomponent characters")
        if len(set(chars)) != len(chars):
            raise ValueError("the delimiters in MSH-1/MSH-2 are not distinct")
        if any(c.isalnum() or c in "\r\n " for c in chars):
            raise ValueError("a delimiter in MSH-1/MSH-2 is a letter, digit, blank or line end")


DEFAULT = Separators()


def unescape(text: str, seps: Separators, codec: str = "utf-8") -> str:
    """ER7 field text -> plain text."""
    esc = seps.escape
    if esc not in text:
        return text
    out: list[str] = []
    i, n = 0, len(text)
    plain = {"F": seps.field, "S": seps.component, "T": seps.subcomponent, "R": seps.repetition,
             "E": seps.escape}
    if seps.truncation:
        plain["P"] = seps.truncation
    while i < n:
        c = text[i]
        if c != esc:
            out.append(c)
            i += 1
            continue
        j = text.find(esc, i + 1)
        if j < 0:  # unterminated: not an escape sequence, keep as written
            out.append(text[i:])
            break
        body = text[i + 1:j]
        if body in plain:
            out.append(plain[body])
        elif body[:1] == "X" and len(body) > 1 and len(body) % 2 == 1:
            try:
                out.append(bytes.fromhex(body[1:]).decode(codec))
            except (ValueError, LookupError):
                out.append("\\" + body + "\\")
        else:
            # a formatting command (or an unknown one): kept, written with "\"
            out.append("\\" + body + "\\")
        i = j + 1
    return "".join(out)


def escape(text: str, seps: Separators, codec: str = "utf-8") -> str:
    """Plain text -> ER7 field text for a message using *seps* and *codec*."""
    if not text:
        return text
    table = {seps.field: "F", seps.component: "S", seps.subcomponent: "T", seps.repetition: "R",
             seps.escape: "E"}
    if seps.truncation:
        table[seps.truncation] = "P"
    esc = seps.escape
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            m = FORMATTING.match(text, i)
            if m is not None:
                out.append(esc + m.group(1) + esc)
                i = m.end()
                continue
        if c in table:
            out.append(esc + table[c] + esc)
        elif c in "\r\n":
            out.append(esc + "X" + c.encode(codec).hex().upper() + esc)
        else:
            out.append(c)
        i += 1
    return "".join(out)
