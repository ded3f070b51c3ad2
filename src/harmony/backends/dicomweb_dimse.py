"""DIMSE operations answered by a DICOMweb server: the ``dicomweb`` backend's
side of the DIMSE -> DICOMweb direction (a ``dicom_scp`` endpoint in front).

- C-FIND -> QIDO-RS at the level's resource (UIDs in the path when single),
  matching keys as parameters and the other keys as ``includefield``; each
  match goes onward as a ``pydicom.Dataset`` holding the asked-for keys.
- C-GET / C-MOVE -> a QIDO-RS count (the SCP must announce the number of
  sub-operations first), then WADO-RS with ``transfer-syntax=*``; the
  multipart answer is parsed incrementally and each instance goes onward as a
  :class:`DicomInstance` file the moment its part is complete.
- C-STORE -> STOW-RS of the one instance, streamed from its file; the STOW
  response's status / FailureReason becomes the C-STORE status.

Results follow :mod:`harmony.dicom.results`: a ``ResultStream`` in
``response.state.dicom_results``.
"""

from __future__ import annotations

import json
import os
import uuid
from urllib.parse import quote, urlencode

from pydicom.dataset import Dataset
from twisted.internet import defer, reactor
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from harmony import jsonutil
from harmony.dicom import status as dimse
from harmony.dicom.files import read_instance, valid_uid
from harmony.dicom.results import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE, DicomInstance, ResultStream
from harmony.dicomweb import qido
from harmony.dicomweb.accept import parse_media_range
from harmony.dicomweb.multipart import StowParser, parse_body
from harmony.envelope import ForwardingProducer, ResponseEnvelope, read_body
from harmony.errors import BackendUnavailable, BadRequest
from harmony.log import get_logger

log = get_logger("harmony.backends.dicomweb")

_SKIP_PARAMS = ("00080052", "00080005", "00080054", "00081190")
QIDO_JSON_LIMIT = 64 * 1024 * 1024


def _uids(identifier: dict, tag: str) -> list[str]:
    values = (identifier.get(tag) or {}).get("Value") or []
    out = [str(v).rstrip("\0 ") for v in values if str(v).strip("\0 ")]
    for u in out:
        if not valid_uid(u):
            raise BadRequest(f"{qido.keyword_of(tag)} {u!r} is not a valid UID")
    return out


def qido_target(level: str, identifier: dict) -> tuple[str, list[tuple[str, str]]]:
    """The QIDO-RS path and parameters for a C-FIND identifier."""
    study, series = _uids(identifier, "0020000D"), _uids(identifier, "0020000E")
    in_path = set()
    if level in ("PATIENT", "STUDY"):
        path = "/studies"
    elif level == "SERIES":
        path = f"/studies/{study[0]}/series" if len(study) == 1 else "/series"
        in_path |= {"0020000D"} if len(study) == 1 else set()
    else:
        if len(study) == 1 and len(series) == 1:
            path = f"/studies/{study[0]}/series/{series[0]}/instances"
            in_path |= {"0020000D", "0020000E"}
        elif len(study) == 1:
            path = f"/studies/{study[0]}/instances"
            in_path.add("0020000D")
        else:
            path = "/instances"
    matching, include = {}, []
    for tag, attr in identifier.items():
        if tag in _SKIP_PARAMS or tag in in_path:
            continue
        if attr.get("Value") and attr.get("vr") != "SQ":
            matching[tag] = attr
        elif attr.get("vr") != "SQ":
            include.append(tag)
    pairs = qido.to_query_pairs(matching)
    pairs += [("includefield", t) for t in include]
    return path, pairs


def filter_result(doc: dict, identifier: dict, level: str) -> Dataset:
    """A QIDO result as a C-FIND response identifier: the asked-for keys only
    (a C-FIND SCP answers what was asked), no bulk data."""
    wanted = {t for t in identifier if t not in ("00080052",)}
    out = {t: a for t, a in doc.items() if t in wanted and "BulkDataURI" not in a}
    for tag in wanted:
        if tag not in out and tag in identifier:
            out[tag] = {"vr": identifier[tag].get("vr", "UN")}
    ds = Dataset.from_json(out)
    ds.QueryRetrieveLevel = level
    return ds


@implementer(IBodyProducer)
class _InstanceStowBody(ForwardingProducer):
    """One Part-10 file as a STOW-RS multipart body, streamed from disk."""

    def __init__(self, path, boundary: str):
        self.path = path
        self.head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        self.tail = f"\r\n--{boundary}--\r\n".encode()
        self.length = len(self.head) + os.path.getsize(path) + len(self.tail)
        self._inner = None

    def startProducing(self, consumer):
        from twisted.web.client import FileBodyProducer
        consumer.write(self.head)
        self._file = open(self.path, "rb")
        self._inner = FileBodyProducer(self._file)

        def done(result):
            self._file.close()
            if not isinstance(result, Failure):
                consumer.write(self.tail)
            return result
        return self._inner.startProducing(consumer).addBoth(done)

    def _delegate(self):
        return self._inner


class DimseOverDicomWeb:
    def __init__(self, backend, staging):
        self.backend = backend
        self.staging = staging

    def _url(self, request, path: str, pairs=()) -> bytes:
        base = self.backend.pick_base_url(request)
        query = urlencode(list(pairs), safe="*?,^:-._~", quote_via=quote)
        return (base + path + ("?" + query if query else "")).encode("utf-8")

    def _headers(self, request, accept: str, content_type: str | None = None) -> Headers:
        # No Accept-Encoding would mean "any coding" (RFC 9110 12.5.3); these
        # answers are parsed here, so ask for them plain (and decode anyway).
        h = Headers({"Accept": [accept], "Accept-Encoding": ["identity"]})
        if content_type:
            h.setRawHeaders("Content-Type", [content_type])
        if self.backend.auth_header:
            h.setRawHeaders("Authorization", [self.backend.auth_header])
        if request.request_id:
            h.setRawHeaders("X-Request-ID", [request.request_id])
        return h

    def send(self, request) -> defer.Deferred:
        op = request.metadata.get("dimse_op", "").upper()
        if op == C_FIND:
            return defer.ensureDeferred(self.find(request))
        if op in (C_GET, C_MOVE):
            if op == C_MOVE and request.metadata.get("move_delivery") != "proxy":
                return defer.fail(BadRequest("a dicomweb backend delivers C-MOVE results to the proxy only"))
            return defer.ensureDeferred(self.retrieve(request))
        if op == C_STORE:
            return defer.ensureDeferred(self.store(request))
        if op == C_ECHO:
            return defer.ensureDeferred(self.echo(request))
        return defer.fail(BadRequest(f"unsupported dimse_op {op!r}"))

    @staticmethod
    def _respond(stream: ResultStream, op: str, status: int = 200) -> ResponseEnvelope:
        resp = ResponseEnvelope(status=status, headers=Headers(), body=b"", metadata={"dimse_op": op})
        resp.state.dicom_results = stream
        return resp

    async def _get_json(self, request, path, pairs):
        resp = await self.backend.request(b"GET", self._url(request, path, pairs),
                                          self._headers(request, "application/dicom+json"), None)
        body = await read_body(self.backend.decoded_body(resp, QIDO_JSON_LIMIT), QIDO_JSON_LIMIT)
        if resp.code == 204 or (resp.code == 200 and not body.strip()):
            return []
        if resp.code == 404:
            return []
        if resp.code >= 400:
            raise BackendUnavailable(f"the DICOMweb server answered {resp.code} to a search")
        try:
            doc = jsonutil.loads(body)
        except ValueError:
            raise BackendUnavailable("the DICOMweb server answered malformed DICOM JSON") from None
        return doc if isinstance(doc, list) else [doc]

    async def echo(self, request):
        stream = ResultStream()
        await self._get_json(request, "/studies", [("limit", "1")])
        stream.finish(dimse.SUCCESS)
        return self._respond(stream, C_ECHO)

    # -- C-FIND
    async def find(self, request):
        identifier = request.normalized or {}
        level = (request.metadata.get("query_level") or
                 ((identifier.get("00080052") or {}).get("Value") or [""])[0]).upper()
        if level not in ("PATIENT", "STUDY", "SERIES", "IMAGE"):
            raise BadRequest(f"query level {level!r} is not PATIENT, STUDY, SERIES or IMAGE")
        path, pairs = qido_target(level, identifier)
        results = await self._get_json(request, path, pairs)
        stream = ResultStream()
        seen = set()
        for doc in results:
            if level == "PATIENT":
                # QIDO-RS has no patient resource: one match per patient from the studies.
                pid = json.dumps(doc.get("00100020", {}).get("Value"))
                if pid in seen:
                    continue
                seen.add(pid)
            stream.put(filter_result(doc, identifier, level))
        stream.finish(dimse.SUCCESS)
        return self._respond(stream, C_FIND)

    # -- C-GET / C-MOVE
    def _retrieve_paths(self, level, identifier) -> list[tuple[str, str]]:
        """(WADO path, QIDO instances path) per entity the identifier names."""
        studies = _uids(identifier, "0020000D")
        series = _uids(identifier, "0020000E")
        sops = _uids(identifier, "00080018")
        if len(studies) != 1:
            raise BadRequest("a retrieve through DICOMweb needs exactly one StudyInstanceUID")
        s = studies[0]
        if level == "STUDY" or (level in ("PATIENT",) and not series):
            return [(f"/studies/{s}", f"/studies/{s}/instances")]
        if level == "SERIES" or not sops:
            if not series:
                raise BadRequest("a SERIES retrieve needs SeriesInstanceUID")
            return [(f"/studies/{s}/series/{r}", f"/studies/{s}/series/{r}/instances") for r in series]
        if len(series) != 1:
            raise BadRequest("an IMAGE retrieve through DICOMweb needs one SeriesInstanceUID")
        return [(f"/studies/{s}/series/{series[0]}/instances/{i}", "") for i in sops]

    async def retrieve(self, request):
        op = request.metadata.get("dimse_op", C_GET).upper()
        identifier = request.normalized or {}
        level = (request.metadata.get("query_level") or "STUDY").upper()
        targets = self._retrieve_paths(level, identifier)
        total = 0
        for _wado, count_path in targets:
            total += len(await self._get_json(request, count_path, [("includefield", "00080018")])) \
                if count_path else 1
        stream = ResultStream()
        stream.set_counts(total)
        if total == 0:
            stream.finish(dimse.SUCCESS)
            return self._respond(stream, op)
        d = defer.ensureDeferred(self._fetch_all(request, targets, stream, total))
        d.addErrback(lambda f: stream.finish(dimse.UNABLE_TO_PROCESS, f.getErrorMessage())
                     if not stream.done else None)
        return self._respond(stream, op)

    async def _fetch_all(self, request, targets, stream, total):
        state = {"completed": 0, "failed": 0}
        for wado_path, _ in targets:
            if stream.cancelled:
                break
            try:
                await self._fetch(request, wado_path, stream, state, total)
            except Exception as e:  # noqa: BLE001 - one entity failing must not hide the others' results
                log.warn("dicomweb backend: WADO-RS retrieve failed: {error}", error=str(e))
        failed = max(0, total - state["completed"])
        stream.set_counts(0, state["completed"], failed, 0)
        stream.finish(dimse.SUCCESS if failed == 0 else (
            dimse.WARNING_SUBOPS if state["completed"] else dimse.UNABLE_TO_PROCESS))

    async def _fetch(self, request, path, stream, state, total):
        accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
        resp = await self.backend.request(b"GET", self._url(request, path), self._headers(request, accept), None)
        if resp.code >= 400:
            await read_body(self.backend.body_producer(resp), 1 << 20)
            raise BackendUnavailable(f"the DICOMweb server answered {resp.code} to a retrieve")
        mtype, params = parse_media_range((resp.headers.getRawHeaders("content-type") or [""])[0])
        if mtype != "multipart/related" or not params.get("boundary"):
            await read_body(self.backend.body_producer(resp), 1 << 20)
            raise BackendUnavailable("the DICOMweb server did not answer multipart/related")
        self.staging.ensure()

        def on_part(part):
            # On the parser's thread (parse_body): the part's file is written and read there, never on the reactor.
            parser.parts.remove(part)  # ours now: released by whoever consumes the instance
            try:
                instance = read_instance(part.path, owned=True)
            except Exception:  # noqa: BLE001 - a part that is not DICOM is a failed sub-operation
                part.release()
                return
            reactor.callFromThread(deliver, instance)  # in order, and before parse_body's own result

        def deliver(instance):
            if stream.cancelled:
                instance.release()
                return
            state["completed"] += 1
            stream.set_counts(max(0, total - state["completed"]), state["completed"], 0, 0)
            stream.put(instance)

        parser = StowParser(params["boundary"], self.staging.folder, on_part=on_part)
        producer = self.backend.decoded_body(resp, None)
        stream.on_cancel = producer.stopProducing
        await parse_body(producer, parser)  # a parse error removes every part file written so far

    # -- C-STORE
    async def store(self, request):
        instance = request.state.dicom.instance
        if not isinstance(instance, DicomInstance):
            raise BadRequest("C-STORE through DICOMweb needs context['instance'] (a DicomInstance)")
        boundary = uuid.uuid4().hex
        body = _InstanceStowBody(instance.path, boundary)
        ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
        resp = await self.backend.request(b"POST", self._url(request, "/studies"),
                                          self._headers(request, "application/dicom+json", ctype), body)
        raw = await read_body(self.backend.decoded_body(resp, 16 * 1024 * 1024), 16 * 1024 * 1024)
        status, comment = stow_status(resp.code, raw, instance.sop_instance_uid)
        stream = ResultStream()
        stream.finish(status, comment)
        return self._respond(stream, C_STORE)


def stow_status(code: int, body: bytes, sop_uid: str) -> tuple[int, str | None]:
    """A STOW-RS answer for one instance as a C-STORE status."""
    try:
        doc = jsonutil.loads(body) if body.strip() else {}
    except ValueError:
        doc = {}
    if isinstance(doc, list):
        doc = doc[0] if doc else {}
    for item in (doc.get("00081198") or {}).get("Value") or []:
        uid = ((item.get("00081155") or {}).get("Value") or [""])[0]
        if not uid or uid == sop_uid:
            reason = ((item.get("00081197") or {}).get("Value") or [dimse.PROCESSING_FAILURE])[0]
            return int(reason), f"the DICOMweb server refused the instance (HTTP {code})"
    if code in (200, 202):
        for item in (doc.get("00081199") or {}).get("Value") or []:
            warn = (item.get("00081196") or {}).get("Value")
            if warn:
                return int(warn[0]), None
        return dimse.SUCCESS, None
    if code == 409:
        return dimse.STORE_DATASET_MISMATCH, "the DICOMweb server reported a conflict"
    if code == 413 or code == 507:
        return dimse.STORE_OUT_OF_RESOURCES, f"the DICOMweb server is out of resources (HTTP {code})"
    return dimse.PROCESSING_FAILURE, f"the DICOMweb server answered HTTP {code}"


__all__ = ["DimseOverDicomWeb", "qido_target", "filter_result", "stow_status"]
