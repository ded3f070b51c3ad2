"""Body helpers shared by the JSON-aware middleware (json_extractor, transform).

They read a body only up to a cap (a stream stays a stream until someone
really needs it whole) and write bytes back with a matching Content-Length, so
whichever endpoint or backend comes next sees a consistent envelope.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from twisted.internet import defer

from harmony.config.errors import OptionError
from harmony.envelope import body_length, is_json_type, read_body
from harmony.errors import BadRequest, MiddlewareFailed, PayloadTooLarge
from harmony.transform import parse_json_text

#: Default cap on a body a JSON middleware will pull into memory.
DEFAULT_MAX_BODY = 16 * 1024 * 1024
DIRECTIONS = ("left", "right", "both")


def dump_json(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def replace_body(envelope, data: bytes) -> None:
    """Put *data* in place of the envelope's body, fixing Content-Length."""
    envelope.body = data
    if envelope.headers.hasHeader(b"content-length"):
        envelope.headers.setRawHeaders(b"content-length", [str(len(data)).encode()])


def too_big(envelope, max_bytes: int) -> bool:
    """True when the body is known (without reading it) to exceed *max_bytes*."""
    length = body_length(envelope.body)
    return length is not None and length > max_bytes


@defer.inlineCallbacks
def read_whole(envelope, max_bytes: int):
    """Read the envelope's body into bytes (capped) and keep them as the body:
    a producer can be read only once, so later steps must see the bytes."""
    data = yield read_body(envelope.body, max_bytes)
    envelope.body = data
    return data


def direction_options(options, default="left") -> tuple[bool, bool]:
    """``apply = "left" | "right" | "both"`` -> (on request, on response)."""
    apply = options.str("apply", default, choices=DIRECTIONS)
    return apply in ("left", "both"), apply in ("right", "both")


def max_body_option(options) -> int:
    value = options.int("max_body_bytes", DEFAULT_MAX_BODY, minimum=1, maximum=1 << 40)
    if value is None:
        raise OptionError("max_body_bytes", "must be an integer")
    return value


def content_coding(envelope) -> str:
    """The body's Content-Encoding, lower-cased; "" for none/identity."""
    value = (envelope.header("content-encoding") or "").strip().lower()
    return "" if value == "identity" else value


def decode_content(data: bytes, coding: str, max_bytes: int) -> bytes:
    """Undo a gzip/deflate Content-Encoding, refusing to inflate past *max_bytes*
    (a few KB of gzip can expand to gigabytes).  Raises ValueError."""
    if not coding:
        return data
    if coding in ("gzip", "x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif coding == "deflate":
        wbits = zlib.MAX_WBITS
    else:
        raise ValueError(f"cannot read a body with Content-Encoding {coding!r}")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, max_bytes + 1)
    except zlib.error as e:
        raise ValueError(f"body is not valid {coding}: {e}") from None
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise ValueError(f"decoded body exceeds {max_bytes} bytes")
    return out


#: read_json's answer when there is no JSON body to work on (or it may be skipped).
SKIP = object()


@defer.inlineCallbacks
def read_json(envelope, max_bytes: int, *, fail: bool, client_side: bool, who: str):
    """The envelope's JSON body, parsed; or :data:`SKIP`.

    Bodies that are not JSON by Content-Type, or empty, are SKIPped.  A body
    that is too big, encoded in a way we cannot undo, or not valid JSON is
    SKIPped when not *fail*, and otherwise is the client's error (400/413,
    *client_side*) or the upstream's (500).  The body read stays on the
    envelope as bytes.  *who* names the middleware in error details.
    """
    if not is_json_type(envelope.header("content-type")):
        return SKIP
    limit = f"JSON body exceeds {max_bytes} bytes ({who}, max_body_bytes)"
    if too_big(envelope, max_bytes):
        if not fail:
            return SKIP
        raise PayloadTooLarge(limit) if client_side else MiddlewareFailed(limit)
    try:
        data = yield read_whole(envelope, max_bytes)
    except PayloadTooLarge:
        # A stream of unknown length ran past the cap; it is half read, so it
        # cannot be passed on untouched, whatever *fail* says.
        raise (PayloadTooLarge(limit) if client_side else MiddlewareFailed(limit)) from None
    if not data.strip():
        return SKIP
    try:
        return parse_json_text(decode_content(data, content_coding(envelope), max_bytes), "body")
    except ValueError as e:
        if not fail:
            return SKIP
        raise (BadRequest(f"{who}: {e}") if client_side else MiddlewareFailed(f"upstream body, {who}: {e}")) from None
