"""``json.loads`` for bytes that come from outside (requests, uploads, upstreams).

The standard parser recurses once per nesting level, so ``[[[[...]]]]`` a few
thousand levels deep raises ``RecursionError`` - not a ``ValueError``, which is
what every caller catches to answer "malformed JSON".  Without this a 60 KB body
turned into a 500 (or twisted.web's HTML "Processing Failed") instead of a 400.
"""

from __future__ import annotations

import json


def loads(data, **kwargs):
    """Like :func:`json.loads`; JSON nested too deeply is a ``ValueError`` too."""
    try:
        return json.loads(data, **kwargs)
    except RecursionError:
        raise ValueError("JSON is nested too deeply") from None
