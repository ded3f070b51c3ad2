"""The XML counterpart of :class:`harmony.fhir.rewrite.JsonUrlRewriter`.

FHIR XML carries the same URLs as ``value`` attributes of the same elements
(``<Bundle><link><url value="..."/>``, ``<entry><fullUrl value="..."/>``,
``<entry><response><location value="..."/>``,
``<CapabilityStatement><implementation><url value="..."/>``), so paging for
an XML client needs them rewritten just as much.  Same approach: follow the
element nesting with a tokenizer, copy every byte through, and rewrite only
the ``value`` attribute of an element at one of those paths (also inside
``<entry><resource><Bundle>...``).  Comments, CDATA and processing
instructions are skipped as wholes; a tag longer than :data:`HOLD_LIMIT`
(a Binary's ``<data value="...base64...">``) is streamed, never held.
"""

from __future__ import annotations

import html
import re

from harmony.fhir.rewrite import HOLD_LIMIT, StreamingRewriter

_TAG = re.compile(rb'<(?:!--.*?-->|!\[CDATA\[.*?\]\]>|\?.*?\?>|!(?:[^>"\']|"[^"]*"|\'[^\']*\')*>|'
                  rb'(/?)(?:[A-Za-z_][\w.\-]*:)?([A-Za-z_][\w.\-]*)((?:[^>"\']|"[^"]*"|\'[^\']*\')*)>)',
                  re.S)
_VALUE = re.compile(rb'(\svalue\s*=\s*)("[^"]*"|\'[^\']*\')')
_ATTR_REST = re.compile(rb'(?:[^>"\']|"[^"]*"|\'[^\']*\')*')

_TARGETS = frozenset({
    (b"Bundle", b"link", b"url"),
    (b"Bundle", b"entry", b"fullUrl"),
    (b"Bundle", b"entry", b"response", b"location"),
    (b"CapabilityStatement", b"implementation", b"url"),
    (b"TerminologyCapabilities", b"implementation", b"url"),
})
_LEAVES = frozenset(p[-1] for p in _TARGETS)


def _is_target(path: tuple) -> bool:
    # <Bundle><entry><resource><Bundle>... : a nested resource is a root of its own.
    while len(path) > 3 and path[0] == b"Bundle" and path[1] == b"entry" and path[2] == b"resource":
        path = path[3:]
    return path in _TARGETS


def _escape(value: str, quote: bytes) -> bytes:
    out = value.replace("&", "&amp;").replace("<", "&lt;")
    out = out.replace('"', "&quot;") if quote == b'"' else out.replace("'", "&apos;")
    return quote + out.encode("utf-8") + quote


class XmlUrlRewriter(StreamingRewriter):
    """``feed(chunk) -> bytes`` and ``close() -> bytes``, like the JSON one."""

    def __init__(self, rewrite):
        super().__init__(rewrite)
        self.quote = None  # streaming a huge tag, currently inside this attribute quote

    def _scan(self, buf: bytes, out: list):
        last = 0
        at = 0
        stack = self.stack
        while True:
            lt = buf.find(b"<", at)
            if lt == -1:
                break
            m = _TAG.match(buf, lt)
            if m is None:
                # A tag (or comment) the buffer does not hold the end of yet.
                if len(buf) - lt <= HOLD_LIMIT:
                    out.append(buf[last:lt])
                    self.pending = buf[lt:]
                    return
                out.append(buf[last:])
                self._enter_long_tag(buf, lt)
                return
            at = m.end()
            name = m.group(2)
            if name is None:
                continue  # comment, CDATA, PI, declaration
            if m.group(1):
                if stack:
                    stack.pop()
                continue
            attrs = m.group(3)
            closed = attrs.endswith(b"/")
            if name in _LEAVES and _is_target(tuple(stack) + (name,)):
                new = self._rewrite_attrs(attrs)
                if new is not None:
                    out.append(buf[last:m.start(3)])
                    out.append(new)
                    last = m.end(3)
            if not closed:
                stack.append(name)
        out.append(buf[last:] if last else buf)

    def _rewrite_attrs(self, attrs: bytes) -> bytes | None:
        m = _VALUE.search(attrs)
        if m is None:
            return None
        quoted = m.group(2)
        value = html.unescape(quoted[1:-1].decode("utf-8", "replace"))
        new = self.rewrite(value)
        if new is None:
            return None
        self.rewritten += 1
        return attrs[:m.start(2)] + _escape(new, quoted[:1]) + attrs[m.end(2):]

    def _enter_long_tag(self, buf: bytes, lt: int):
        """Stream a tag too long to hold; track quotes to find its end."""
        self.streaming, self.quote = True, None
        name = re.match(rb"</?(?:[A-Za-z_][\w.\-]*:)?([A-Za-z_][\w.\-]*)", buf[lt:lt + 256])
        self._long = (name.group(0).startswith(b"</"), name.group(1)) if name else (False, None)
        self._scan_long(buf, lt + 1)

    def _scan_long(self, data: bytes, start: int) -> int:
        """Advance through a long tag from *start*; returns where it ended, or -1."""
        i = start
        n = len(data)
        while i < n:
            if self.quote is not None:
                j = data.find(self.quote, i)
                if j == -1:
                    return -1
                self.quote = None
                i = j + 1
                continue
            m = _ATTR_REST.match(data, i)
            i = m.end()
            if i >= n:
                return -1
            c = data[i:i + 1]
            if c == b">":
                closing, name = self._long
                self.streaming = False
                if name is not None and not closing and data[i - 1:i] != b"/":
                    self.stack.append(name)
                elif closing and self.stack:
                    self.stack.pop()
                return i + 1
            self.quote = c  # an opening quote whose end is not in this chunk
            i += 1
        return -1

    def _stream(self, data: bytes, out: list) -> int:
        end = self._scan_long(data, 0)
        if end == -1:
            out.append(data)
            return len(data)
        out.append(data[:end])
        return end
