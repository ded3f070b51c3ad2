"""JSON read from outside, and JSON text written into the archive's index.

:func:`loads`: ``json.loads`` for bytes that come from outside (requests,
uploads, upstreams).  The standard parser recurses once per nesting level, so
``[[[[...]]]]`` a few thousand levels deep raises ``RecursionError`` - not a
``ValueError``, which is what every caller catches to answer "malformed JSON".
Without this a 60 KB body turned into a 500 (or twisted.web's HTML "Processing
Failed") instead of a 400.

:func:`dumps_stored`: every instance an archive ingests gets its WADO-RS metadata
and its query attributes stored as JSON text, and the standard encoder made that
text at ~170 µs for a CT header: 13 % of the GIL-holding samples of a STOW-RS
ingest (py-spy, bench/ingest "Merged build, session 8 end").  orjson makes the
same document in ~17 µs.
"""

from __future__ import annotations

import json

import orjson


def loads(data, **kwargs):
    """Like :func:`json.loads`; JSON nested too deeply is a ``ValueError`` too."""
    try:
        return json.loads(data, **kwargs)
    except RecursionError:
        raise ValueError("JSON is nested too deeply") from None


def dumps_stored(obj) -> str:
    """Compact JSON text of *obj* for the index, as ``json.dumps(obj,
    separators=(",", ":"))`` would read back.

    orjson writes non-ASCII characters as UTF-8 where the standard encoder
    escapes them; text stored in the index stays ASCII (a PostgreSQL database
    created with ``SQL_ASCII`` hands non-ASCII text back as bytes), so such a
    document - and anything orjson declines (an integer past 64 bits, a key that
    is not a string, a subclass of float) - is made by the standard encoder.
    Floats that are not finite never reach here: the metadata writes them as
    strings (harmony.dicom.rawjson.finite_json)."""
    try:
        text = orjson.dumps(obj).decode("ascii")
    except (TypeError, UnicodeDecodeError):   # orjson.JSONEncodeError is a TypeError
        return json.dumps(obj, separators=(",", ":"))
    return text
