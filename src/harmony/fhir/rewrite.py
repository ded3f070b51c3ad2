"""Rewriting the upstream FHIR server's absolute URLs to the proxy's base.

A FHIR server writes its own base URL into what it answers: paging links,
``fullUrl``s, ``Location`` headers, the CapabilityStatement's
``implementation.url``.  Behind a proxy those point past the proxy (or at a
host the client cannot reach), so paging breaks.  :class:`UrlMap` maps one URL;
:class:`JsonUrlRewriter` applies it to a JSON body *as a stream*.

The streaming rewriter is deliberately not a JSON parser: it tracks just enough
structure (object keys, array nesting) to know where a string value sits, and
copies every other byte through untouched.  Only the string values at these
paths are rewritten, so canonical URLs (``StructureDefinition.url``),
references and narrative stay exactly as the server wrote them::

    link[*].url                 (Bundle paging)
    entry[*].fullUrl
    entry[*].response.location  (batch/transaction responses)
    implementation.url          (CapabilityStatement, TerminologyCapabilities)

each also inside ``entry[*].resource`` (a batch response carries searchset
Bundles).  Memory stays bounded whatever the body's size: a 50 MB Bundle goes
through in chunks, and a single huge string (a Binary's base64) is streamed
rather than held.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

_DEFAULT_PORT = {"http": 80, "https": 443}


def _split_origin(url: str):
    """``'HTTP://Host:80/x?y'`` -> (``'http://host:80'``, ``'/x?y'``) or None."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _DEFAULT_PORT:
        return None
    end = len(rest)
    for ch in "/?#":
        i = rest.find(ch)
        if i != -1 and i < end:
            end = i
    return scheme.lower() + "://" + rest[:end].lower(), rest[end:]


def _origins(base: str) -> list[str]:
    """The spellings of one base URL's origin: with and without a default port."""
    parts = urlsplit(base)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port or _DEFAULT_PORT[scheme]
    out = [f"{scheme}://{host}:{port}"]
    if port == _DEFAULT_PORT[scheme]:
        out.append(f"{scheme}://{host}")
    return out


class UrlMap:
    """Map URLs under any of *upstream_bases* to the same place under *proxy_base*.

    Matching is on whole path segments (``http://up/fhir`` does not own
    ``http://up/fhirx``), scheme and host case-insensitively, default ports
    either way.  URLs under no upstream base are left alone (``None``).
    """

    def __init__(self, upstream_bases, proxy_base: str):
        self.proxy_base = proxy_base.rstrip("/")
        prefixes = set()
        for base in upstream_bases:
            path = urlsplit(base).path.rstrip("/")
            for origin in _origins(base):
                prefixes.add((origin, path))
        # Longest path first: /fhir/r4 must win over /fhir.
        self.prefixes = sorted(prefixes, key=lambda p: len(p[1]), reverse=True)
        # The same, as the bytes of a JSON string's start, for the fast path.
        self._quoted = [b'"' + (o + p).encode("utf-8") for o, p in self.prefixes]
        self._proxy_quoted = json.dumps(self.proxy_base, ensure_ascii=False)[:-1].encode("utf-8")

    def __call__(self, url: str) -> str | None:
        split = _split_origin(url)
        if split is None:
            return None
        origin, rest = split
        for o, path in self.prefixes:
            if origin == o and rest.startswith(path):
                tail = rest[len(path):]
                if not tail or tail[0] in "/?#":
                    return self.proxy_base + tail
        return None

    def rewrite_token(self, token: bytes) -> bytes | None:
        """Rewrite a JSON string token (quotes included); None when unchanged.

        Plain tokens spelled as configured are done on bytes; anything else
        (escapes, other letter case) is decoded and matched the careful way.
        """
        if b"\\" not in token:
            for q in self._quoted:
                if token.startswith(q):
                    nxt = token[len(q):len(q) + 1]
                    if nxt in (b'"', b"/", b"?", b"#"):
                        return self._proxy_quoted + token[len(q):]
                    break
            if token[1:5].lower() != b"http":
                return None
        try:
            value = json.loads(token)
        except ValueError:
            return None
        new = self(value)
        return None if new is None else json.dumps(new, ensure_ascii=False).encode("utf-8")


# --------------------------------------------------------------------------- streaming JSON

# Tokens: an object key with its colon (group 1 is the key); a *leaf* object or
# array, one with no object or array inside (codings, references, quantities,
# names: most of a FHIR resource), taken whole so Python never loops over its
# insides; a complete string value; a bracket; or a lone quote (a string whose
# end the buffer does not hold yet).  Commas and colons need no tokens: a
# string followed by a colon is a key, any other is a value.  Possessive
# quantifiers keep a failed leaf match from backtracking.
_STR = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_LEAF_OBJ = rb'\{(?:[^{}\[\]"]++|' + _STR + rb')*+\}'
_LEAF_ARR = rb'\[(?:[^{}\[\]"]++|' + _STR + rb')*+\]'
_TOKEN = re.compile(rb"(" + _STR + rb")\s*:|" + _LEAF_OBJ + b"|" + _LEAF_ARR + b"|" + _STR + rb'|[{}\[\]]|"')
#: Inside a leaf object: keys (group 1) and string values, in order.
_MEMBER = re.compile(rb"(" + _STR + rb")\s*:|" + _STR)
# The rest of a string being streamed: up to (not including) its closing quote.
_STRING_BODY = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*')
#: A value string this close to the end of the buffer may yet turn out to be a key.
_TAIL = 256

_ARRAY = object()      # stack marker for an array
_NOKEY = b""           # an object frame before its first key

_K = {name: b'"' + name.encode() + b'"'
      for name in ("link", "url", "entry", "fullUrl", "response", "location", "implementation", "resource")}
_VALUE_KEYS = frozenset((_K["url"], _K["fullUrl"], _K["location"]))
_TARGETS = frozenset({
    (_K["link"], _ARRAY, _K["url"]),
    (_K["entry"], _ARRAY, _K["fullUrl"]),
    (_K["entry"], _ARRAY, _K["response"], _K["location"]),
    (_K["implementation"], _K["url"]),
})
_NESTED = (_K["entry"], _ARRAY, _K["resource"])

#: Strings longer than this that are still incomplete are streamed, not held.
HOLD_LIMIT = 64 * 1024


def _is_target(stack: list) -> bool:
    path = tuple(stack)
    while path[:3] == _NESTED:
        path = path[3:]
    return path in _TARGETS


class StreamingRewriter:
    """What the JSON and XML rewriters share: ``feed(chunk)`` returns the bytes
    that can be passed on now, ``close()`` the rest.  Between feeds a few bytes
    may be ``pending`` (a token cut by the chunk boundary, at most about
    HOLD_LIMIT); something larger is ``streaming`` instead (passed on as it
    comes, tracked only to find its end)."""

    def __init__(self, rewrite):
        self.rewrite = rewrite
        self.stack: list = []
        self.pending = b""
        self.streaming = False
        self.rewritten = 0

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        out: list = []
        if self.streaming:
            pos = self._stream(data, out)
            if self.streaming:
                return b"".join(out)
            data = data[pos:]
        buf = self.pending + data if self.pending else data
        self.pending = b""
        self._scan(buf, out)
        return b"".join(out)

    def close(self) -> bytes:
        rest, self.pending = self.pending, b""
        return rest

    def _scan(self, buf: bytes, out: list):
        """Append *buf*, rewritten, to *out*; leave an incomplete tail in ``pending``
        or enter ``streaming``."""
        raise NotImplementedError

    def _stream(self, data: bytes, out: list) -> int:
        """Pass on *data* while streaming; return where the streamed thing ended."""
        raise NotImplementedError


class JsonUrlRewriter(StreamingRewriter):
    """Incrementally rewrite URL values at the FHIR paths above.

    ``feed(chunk)`` returns the bytes that can be passed on now, ``close()``
    the rest.  Output equals input except for rewritten values, for any
    chunking.  Invalid JSON is never an error here: bytes the rewriter cannot
    place pass through as they came.
    """

    def __init__(self, rewrite):
        """*rewrite* maps a URL to its new value or None; a :class:`UrlMap`
        also rewrites raw tokens, which is faster."""
        super().__init__(rewrite)
        if hasattr(rewrite, "rewrite_token"):
            self._rewrite_token = rewrite.rewrite_token
        self.escaped = False  # streaming a long string whose last byte so far was a lone backslash

    def _scan(self, buf: bytes, out: list):
        last = 0
        stack = self.stack
        size = len(buf)
        for m in _TOKEN.finditer(buf):
            if m.lastindex:  # a key
                if stack:
                    stack[-1] = m.group(1)
                continue
            t = m.group()
            c = t[0]
            if c == 0x22:  # '"'
                start = m.start()
                if len(t) == 1:  # incomplete string: hold it if it may matter, else stream it
                    if len(buf) - start <= HOLD_LIMIT:
                        out.append(buf[last:start])
                        self.pending = buf[start:]
                    else:
                        out.append(buf[last:])
                        if stack and stack[-1] is not _ARRAY:
                            stack[-1] = _NOKEY  # were it a (huge) key, no value after it is a target
                        self._track_escape(buf, start + 1)
                    return
                if m.end() + _TAIL > size and not buf[m.end():].strip():
                    # Its colon, if it is a key, has not arrived yet.
                    out.append(buf[last:start])
                    self.pending = buf[start:]
                    return
                if stack and stack[-1] in _VALUE_KEYS and _is_target(stack):
                    new = self._rewrite(t)
                    if new is not None:
                        out.append(buf[last:start])
                        out.append(new)
                        last = m.end()
            elif c == 0x7B:  # '{'
                if len(t) == 1:
                    stack.append(_NOKEY)
                elif b'"url"' in t or b'"fullUrl"' in t or b'"location"' in t:
                    last = self._leaf(buf, m.start(), t, out, last)
            elif c == 0x5B:  # '['
                if len(t) == 1:
                    stack.append(_ARRAY)
                # a leaf array holds no objects, so no target values
            elif stack:  # '}' or ']'
                stack.pop()
        out.append(buf[last:] if last else buf)

    def _leaf(self, buf: bytes, offset: int, leaf: bytes, out: list, last: int) -> int:
        """Rewrite the target values of a leaf object found whole at *offset*."""
        stack = self.stack
        stack.append(_NOKEY)
        try:
            for m in _MEMBER.finditer(leaf):
                if m.lastindex:
                    stack[-1] = m.group(1)
                elif stack[-1] in _VALUE_KEYS and _is_target(stack):
                    new = self._rewrite(m.group())
                    if new is not None:
                        out.append(buf[last:offset + m.start()])
                        out.append(new)
                        last = offset + m.end()
        finally:
            stack.pop()
        return last

    def close(self) -> bytes:
        """The held tail; a last value string held for its colon is rewritten if it is a target."""
        rest = super().close()
        if rest[:1] == b'"' and rest.rstrip()[-1:] == b'"' and self.stack and self.stack[-1] in _VALUE_KEYS \
                and _is_target(self.stack):
            body = rest.rstrip()
            new = self._rewrite(body)
            if new is not None:
                return new + rest[len(body):]
        return rest

    def _rewrite(self, token: bytes) -> bytes | None:
        new = self._rewrite_token(token)
        if new is not None:
            self.rewritten += 1
        return new

    def _rewrite_token(self, token: bytes) -> bytes | None:
        try:
            value = json.loads(token)
        except ValueError:
            return None
        new = self.rewrite(value)
        return None if new is None else json.dumps(new, ensure_ascii=False).encode("utf-8")

    def _track_escape(self, buf: bytes, start: int):
        """Enter streaming mode for a string that began at *start* - 1."""
        self.streaming = True
        end = _STRING_BODY.match(buf, start).end()
        self.escaped = end == len(buf) - 1  # stopped on a trailing lone backslash

    def _stream(self, data: bytes, out: list) -> int:
        """Stream the rest of a long string; return where it ends in *data*."""
        start = 1 if self.escaped else 0
        if start > len(data):
            return 0
        end = _STRING_BODY.match(data, start).end()
        if end < len(data) and data[end] == 0x22:
            self.streaming = self.escaped = False
            out.append(data[:end + 1])
            return end + 1
        out.append(data)
        self.escaped = end == len(data) - 1
        return len(data)
