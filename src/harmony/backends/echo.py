"""``echo`` backend: answers with a JSON description of the request it got.

For testing pipelines: what the backend sees is exactly what middleware made
of the request, so the echo shows the effect of every step before it.
"""

from __future__ import annotations

import base64

from twisted.internet import defer

from harmony.backends.base import Backend
from harmony.envelope import ResponseEnvelope, read_body

ECHO_BODY_LIMIT = 16 * 1024 * 1024


class EchoBackend(Backend):
    @defer.inlineCallbacks
    def send(self, request):
        body = yield read_body(request.body, ECHO_BODY_LIMIT)
        query: dict[str, list[str]] = {}
        for k, v in request.query:
            query.setdefault(k, []).append(v)
        headers: dict[str, list[str]] = {}
        for name, values in request.headers.getAllRawHeaders():
            headers[name.decode("latin-1").lower()] = [v.decode("latin-1") for v in values]
        doc = {
            "method": request.method,
            "path": request.path,
            "subpath": request.subpath,
            "query": query,
            "headers": headers,
            "metadata": dict(request.metadata),
        }
        try:
            doc["body"] = body.decode("utf-8")
            doc["body_encoding"] = "utf-8"
        except UnicodeDecodeError:
            doc["body"] = base64.b64encode(body).decode("ascii")
            doc["body_encoding"] = "base64"
        if request.normalized is not None:
            doc["normalized"] = request.normalized
        return ResponseEnvelope.json(200, doc)
