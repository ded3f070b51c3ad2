"""Body helpers shared by the JSON-aware middleware (json_extractor, transform).

They read a body only up to a cap (a stream stays a stream until someone
really needs it whole) and write bytes back with a matching Content-Length, so
whichever endpoint or backend comes next sees a consistent envelope.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer

from harmony.config.errors import OptionError
from harmony.envelope import body_length, is_json_type, read_body
from harmony.errors import BadRequest, MiddlewareFailed, PayloadTooLarge, UnsupportedMediaType
from harmony.transform import parse_json_text
from harmony.web import coding

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


#: read_json's answer when there is no JSON body to work on (or it may be skipped).
SKIP = object()


@defer.inlineCallbacks
def read_json(envelope, max_bytes: int, *, fail: bool, client_side: bool, who: str):
    """The envelope's JSON body, parsed; or :data:`SKIP`.

    Bodies that are not JSON by Content-Type, or empty, are SKIPped.  A body
    that is too big, encoded in a way we cannot undo, or not valid JSON is
    SKIPped when not *fail*, and otherwise is the client's error (400/413,
    415 for a coding we cannot undo; *client_side*) or the upstream's (500).
    The body read stays on the envelope as bytes, in its content coding: gzip
    and deflate are undone on a copy, and *max_bytes* bounds both the bytes
    read and the bytes they decode to (a small gzip bomb stops at the cap).
    *who* names the middleware in error details.
    """
    if not is_json_type(envelope.header("content-type")):
        return SKIP
    try:
        body_coding = coding.content_coding(envelope.headers)
    except coding.UnsupportedCoding as e:
        if not fail:
            return SKIP
        raise (UnsupportedMediaType(f"{who}: {e}") if client_side
               else MiddlewareFailed(f"upstream body, {who}: {e}")) from None
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
        return parse_json_text(coding.decode_bytes(data, body_coding, max_bytes), "body")
    except PayloadTooLarge:
        if not fail:
            return SKIP
        raise (PayloadTooLarge(limit) if client_side else MiddlewareFailed(limit)) from None
    except ValueError as e:
        if not fail:
            return SKIP
        raise (BadRequest(f"{who}: {e}") if client_side else MiddlewareFailed(f"upstream body, {who}: {e}")) from None
