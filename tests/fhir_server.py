"""A small FHIR server of our own, for the fhir endpoint/backend tests.

Why not a real one: no FHIR server (HAPI, Firely, Medplum, Aidbox) can be
installed on this machine kind - they need a JVM, .NET or Node stacks and
databases that are not among the packages we can install - so this module
plays one on a real loopback port.  It behaves like one where the proxy can
tell: it writes its own absolute base URL into ``Bundle.link``,
``entry.fullUrl``, ``Location`` and ``CapabilityStatement.implementation.url``;
pages searches HAPI-style through the bare base (``GET [base]?_getpages=...``);
versions resources (``ETag: W/"n"``, ``Last-Modified``, ``If-Match`` -> 412,
``If-None-Match`` -> 304, vread, history); honours ``If-None-Exist``
(conditional create) and ``Prefer: return=minimal``; answers errors as
OperationOutcome; answers transactions with ``entry.response.location``.
It records every request (method, raw URI, headers, body) so tests can see
exactly what the proxy sent.
"""

from __future__ import annotations

import gzip
import json
from email.utils import formatdate
from urllib.parse import parse_qsl

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

FHIR_JSON = b"application/fhir+json; charset=utf-8"


def outcome(code, text):
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": text}]}


class FhirServer(Resource):
    isLeaf = True

    def __init__(self, base_path=b"/fhir"):
        super().__init__()
        self.base_path = base_path
        self.base = ""  # set once listening
        self.store: dict[tuple, list[dict]] = {}
        self.requests: list[dict] = []
        self.respond: dict[bytes, tuple] = {}  # path -> (status, headers, body) overrides
        self.pages: dict[str, list] = {}
        self.next_id = 1
        self.clock = 1_700_000_000
        #: "asked": gzip answers when the request accepts gzip (what servers
        #: behind nginx do); "always": whatever the request said (servers
        #: that ignore Accept-Encoding exist); None: never.
        self.gzip = None

    # -------------------------------------------------------------- helpers

    def seed(self, rtype, rid, **fields):
        res = {"resourceType": rtype, "id": rid, **fields}
        self._store(res)
        return res

    def _store(self, res):
        versions = self.store.setdefault((res["resourceType"], res["id"]), [])
        self.clock += 60
        res["meta"] = {"versionId": str(len(versions) + 1),
                       "lastUpdated": f"2023-11-14T22:{len(versions):02d}:00Z"}
        versions.append(res)
        return res

    def _send(self, request, status, doc=None, headers=None):
        request.setResponseCode(status)
        for k, v in (headers or {}).items():
            request.setHeader(k, v)
        if doc is None:
            return b""
        request.setHeader(b"content-type", FHIR_JSON)
        body = json.dumps(doc).encode()
        accepted = b"gzip" in b",".join(request.requestHeaders.getRawHeaders(b"accept-encoding", []))
        if self.gzip == "always" or (self.gzip == "asked" and accepted):
            request.setHeader(b"content-encoding", b"gzip")
            body = gzip.compress(body)
        return body

    def _version_headers(self, res):
        return {b"etag": f'W/"{res["meta"]["versionId"]}"'.encode(),
                b"last-modified": formatdate(self.clock, usegmt=True).encode(),
                b"content-location": f'{self.base}/{res["resourceType"]}/{res["id"]}/_history/'
                                     f'{res["meta"]["versionId"]}'.encode()}

    def _current(self, rtype, rid):
        versions = self.store.get((rtype, rid))
        return versions[-1] if versions and not versions[-1].get("_deleted") else None

    def _matches(self, res, params):
        for key, value in params:
            name, _, modifier = key.partition(":")
            if name == "_id" and res["id"] != value:
                return False
            if name == "name":
                names = [n for hn in res.get("name", []) for n in [hn.get("family", "")] + hn.get("given", [])]
                if modifier == "exact":
                    if value not in names:
                        return False
                elif not any(n.lower().startswith(value.lower()) for n in names):
                    return False
        return True

    def _bundle_page(self, rtype, matches, offset, count, query):
        page = matches[offset:offset + count]
        links = [{"relation": "self", "url": f"{self.base}/{rtype}?{query}"}]
        if offset + count < len(matches):
            token = f"p{len(self.pages)}"
            self.pages[token] = [rtype, matches, count, query]
            links.append({"relation": "next", "url": f"{self.base}?_getpages={token}&_getpagesoffset={offset + count}"
                                                     f"&_count={count}&_bundletype=searchset"})
        return {"resourceType": "Bundle", "type": "searchset", "total": len(matches), "link": links,
                "entry": [{"fullUrl": f"{self.base}/{r['resourceType']}/{r['id']}", "resource": r,
                           "search": {"mode": "match"}} for r in page]}

    # -------------------------------------------------------------- dispatch

    def render(self, request):
        body = request.content.read()
        self.requests.append({"method": request.method, "uri": request.uri, "path": request.path,
                              "headers": {k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()},
                              "body": body})
        if request.path in self.respond:
            status, headers, payload = self.respond[request.path]
            request.setResponseCode(status)
            for k, v in headers.items():
                request.setHeader(k, v)
            if callable(payload):
                payload(request)
                return NOT_DONE_YET
            return payload
        if not request.path.startswith(self.base_path):
            return self._send(request, 404, outcome("not-found", "outside the FHIR base"))
        segs = [s for s in request.path[len(self.base_path):].decode().split("/") if s]
        _, _, raw_query = request.uri.partition(b"?")
        params = parse_qsl(raw_query.decode(), keep_blank_values=True)
        method = "GET" if request.method == b"HEAD" else request.method.decode()
        accept = (request.getHeader(b"accept") or b"").decode()
        if "xml" in accept and "json" not in accept:
            request.setResponseCode(200)
            request.setHeader(b"content-type", b"application/fhir+xml")
            return b'<Patient xmlns="http://hl7.org/fhir"><id value="xml"/></Patient>'
        try:
            return self.route(request, method, segs, params, raw_query.decode(), body)
        except KeyError as e:
            return self._send(request, 404, outcome("not-found", f"unknown {e}"))

    def route(self, request, method, segs, params, query, body):
        if segs == ["metadata"]:
            return self._send(request, 200, {
                "resourceType": "CapabilityStatement", "status": "active", "date": "2023-11-14",
                "kind": "instance", "fhirVersion": "4.0.1", "format": ["json"],
                "implementation": {"description": "tests.fhir_server", "url": self.base},
                "rest": [{"mode": "server", "resource": [{"type": "Patient"}]}]})
        if not segs and method == "GET" and "_getpages" in dict(params):
            p = dict(params)
            rtype, matches, count, q = self.pages[p["_getpages"]]
            return self._send(request, 200, self._bundle_page(rtype, matches, int(p["_getpagesoffset"]), count, q))
        if not segs and method == "POST":
            return self.transaction(request, json.loads(body))
        rtype = segs[0]
        if len(segs) == 1 and method == "GET" or segs[1:] == ["_search"]:
            if segs[1:] == ["_search"]:
                params = params + parse_qsl(body.decode(), keep_blank_values=True)
            matches = [v[-1] for (t, _), v in sorted(self.store.items())
                       if t == rtype and not v[-1].get("_deleted") and self._matches(v[-1], params)]
            count = int(dict(params).get("_count", 2))
            return self._send(request, 200, self._bundle_page(rtype, matches, 0, count, query))
        if len(segs) == 1 and method == "POST":
            return self.create(request, rtype, json.loads(body))
        rid = segs[1]
        if len(segs) == 2 and method == "GET":
            res = self._current(rtype, rid)
            if res is None:
                return self._send(request, 404, outcome("not-found", f"{rtype}/{rid} is not known"))
            headers = self._version_headers(res)
            if request.getHeader(b"if-none-match") == headers[b"etag"]:
                return self._send(request, 304, None, {b"etag": headers[b"etag"]})
            return self._send(request, 200, res, headers)
        if len(segs) == 2 and method == "PUT":
            res = json.loads(body)
            current = self._current(rtype, rid)
            match = request.getHeader(b"if-match")
            if match and (current is None or match.decode() != f'W/"{current["meta"]["versionId"]}"'):
                return self._send(request, 412, outcome("conflict", "version conflict"))
            res = self._store(res)
            return self._send(request, 201 if current is None else 200, res, self._version_headers(res))
        if len(segs) == 2 and method == "DELETE":
            self._current(rtype, rid)["_deleted"] = True
            return self._send(request, 204)
        if len(segs) == 4 and segs[2] == "_history" and method == "GET":
            res = self.store[(rtype, rid)][int(segs[3]) - 1]
            return self._send(request, 200, res, self._version_headers(res))
        return self._send(request, 404, outcome("not-supported", "not implemented here"))

    def create(self, request, rtype, res):
        cond = request.getHeader(b"if-none-exist")
        if cond:
            crit = parse_qsl(cond.decode())
            found = [v[-1] for (t, _), v in self.store.items() if t == rtype and self._matches(v[-1], crit)]
            if len(found) > 1:
                return self._send(request, 412, outcome("multiple-matches", "more than one match"))
            if found:
                return self._send(request, 200, found[0], self._version_headers(found[0]))
        res["id"] = f"n{self.next_id}"
        self.next_id += 1
        res = self._store(res)
        headers = self._version_headers(res)
        headers[b"location"] = headers.pop(b"content-location")
        minimal = b"return=minimal" in (request.getHeader(b"prefer") or b"")
        return self._send(request, 201, None if minimal else res, headers)

    def transaction(self, request, bundle):
        entries = []
        for e in bundle.get("entry", []):
            res = dict(e["resource"])
            res["id"] = f"n{self.next_id}"
            self.next_id += 1
            res = self._store(res)
            entries.append({"fullUrl": f"{self.base}/{res['resourceType']}/{res['id']}",
                            "response": {"status": "201 Created",
                                         "location": f"{self.base}/{res['resourceType']}/{res['id']}/_history/1"}})
        return self._send(request, 200, {"resourceType": "Bundle", "type": f"{bundle['type']}-response",
                                         "entry": entries})


def start_fhir_server():
    server = FhirServer()
    site = Site(server)
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    server.base = f"http://127.0.0.1:{port.getHost().port}/fhir"
    server.port = port
    return server
