"""Helpers for the store-and-forward tests: a scripted DICOM-receiving HTTP target."""

from __future__ import annotations

import io

from pydicom import dcmread
from twisted.web.resource import Resource


class ScriptedTarget(Resource):
    """A real HTTP server that receives Part-10 bodies and answers as scripted.

    ``rules(sop_uid, times_seen)`` returns the status to answer; deliveries
    answered 2xx are recorded in ``stored`` (SOP UID -> count), every request
    in ``seen``.  This stands in for a target that refuses one instance
    permanently, which no real PACS here can be told to do.
    """

    isLeaf = True

    def __init__(self, rules=lambda sop, n: 200):
        super().__init__()
        self.rules = rules
        self.seen: list[str] = []
        self.stored: dict[str, int] = {}

    def render_POST(self, request):
        ds = dcmread(io.BytesIO(request.content.read()))
        sop = str(ds.SOPInstanceUID)
        n = self.seen.count(sop)
        self.seen.append(sop)
        status = self.rules(sop, n)
        request.setResponseCode(status)
        if 200 <= status < 300:
            self.stored[sop] = self.stored.get(sop, 0) + 1
            return b"{}"
        return f"refused {sop}".encode()
