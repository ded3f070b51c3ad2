"""``dicomweb_bridge`` middleware: DICOMweb in front of a DIMSE-only PACS.

Placed before a ``dicom_scu`` backend, behind a ``dicomweb`` endpoint, it maps

- QIDO-RS -> C-FIND at the resource's level (return keys: the level's required
  attributes plus ``includefield``), with ``limit``/``offset`` applied here
  (the rest of the matches are C-CANCELled), so paging works on any PACS;
- WADO-RS -> C-GET (the backend's ``dimse_retrieve_mode`` may make it a C-MOVE
  to itself), the multipart answer streamed as each instance arrives;
  metadata built from the retrieved instances (BulkDataURIs pointing back
  here), cached on disk with an ETag, concurrent identical fetches collapsed;
  frames cut from the pixel data (decoded only for rendered types);
  bulkdata, rendered and thumbnail;
- STOW-RS -> one C-STORE per part (parsed incrementally to files), each
  instance's status mapped into ReferencedSOPSequence / FailedSOPSequence.

It follows :mod:`harmony.dicom.results`: the request names the operation in
``metadata["dimse_op"]`` / ``["query_level"]`` and carries the identifier as
DICOM JSON in ``request.normalized``; the backend answers with a
``ResultStream`` in ``response.state.dicom_results``.  Requests that did
not come through a ``dicomweb`` endpoint pass through untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import attr
from pydicom.uid import ExplicitVRLittleEndian
from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from harmony.dicom import status as dimse
from harmony.dicom import transfer
from harmony.dicom.files import check_complete, parse_stamped, read_instance, stamp_of
from harmony.dicom.rawscan import ScanDeclined, scan_bytes, scan_file
from harmony.dicom.render import abandon_for_client, release_rest
from harmony.dicom.results import C_FIND, C_GET, C_STORE, DICOM_JSON, RESULTS_AS, STAGE_IN_MEMORY, DicomInstance
from harmony.dicom.status import is_failure
from harmony.dicom.uids import strip_padding
from harmony.dicomweb import accept as acc
from harmony.dicomweb import qido
from harmony.dicomweb.cache import BASE_PLACEHOLDER, MetadataCache, etag_for, with_base
from harmony.dicomweb.dicomjson import find_result_json, find_result_to_json, instance_metadata
from harmony.dicomweb.multipart import (
    HeldPart,
    MultipartWriter,
    Part,
    StowParser,
    multipart_bytes,
    parse_body,
    split_held,
)
from harmony.dicomweb.pixels import bulk_value, extract_frames, render
from harmony.dicomweb.routes import QIDO, STOW, WADO, resource_path
from harmony.dicomweb.uids import is_uid
from harmony.envelope import RequestEnvelope, ResponseEnvelope
from harmony.errors import (
    BackendUnavailable,
    BadRequest,
    ConfigurationFailure,
    HarmonyError,
    NotAcceptable,
    NotFound,
    mark_client_gone,
)
from harmony.log import get_logger
from harmony.middleware.base import Middleware
from harmony.storage.config import shared_parts
from harmony.web import coding
from harmony.web.streaming import INLINE_BODY_LIMIT

log = get_logger("harmony.middleware.dicomweb_bridge")

#: Extra return keys asked for with includefield=all (beyond each level's required ones).
ALL_EXTRA = {
    "STUDY": ("00081030", "00080061", "00080062", "00101010", "00101020", "00101030", "00321060"),
    "SERIES": ("00080021", "00080031", "00181030", "00180015", "00200060", "00081050"),
    "IMAGE": ("00080008", "00080023", "00080033", "00200020", "00200032", "00200037", "00280004"),
}


#: A STOW-RS body up to this size that the HTTP layer read whole is cut into parts
#: in memory, no part files (:meth:`DicomWebBridge._files_held_instances`): the
#: size twisted.web and the fast channel hand over as bytes.
HELD_BODY_BYTES = INLINE_BODY_LIMIT
#: Held parts up to this many are scanned on the reactor; a body cut into more
#: (256 KiB can carry ~15,000 tiny parts) is described on a thread, still without files,
#: so no request holds the reactor for more than a few milliseconds.
HELD_PARTS_ON_REACTOR = 64


class DicomWebBridge(Middleware):
    def __init__(self, name, reactor, storage, *, metadata_ttl=300.0, render_quality=90, stow_concurrency=4,
                 cache_database=None):
        super().__init__(name)
        self.stow_concurrency = stow_concurrency
        self.reactor = reactor
        self.storage = storage
        # On a cluster the cache is the shared database's: any node serves what another fetched.
        self.cache = MetadataCache(storage / "metadata", reactor, metadata_ttl, database=cache_database,
                                   namespace=name)
        self.render_quality = render_quality
        remove_stale_parts(storage / "stow")

    @classmethod
    def from_config(cls, name, options, ctx):
        storage = options.path("storage_dir", None) or (ctx.storage_path / "dicomweb-bridge" / name)
        shared = shared_parts(ctx, f"dicomweb {name}", storage)
        return cls(name, ctx.reactor, storage, cache_database=shared.database if shared else None,
                   metadata_ttl=options.number("metadata_cache_secs", 300.0, minimum=0),
                   render_quality=options.int("jpeg_quality", 90, minimum=1, maximum=100),
                   stow_concurrency=options.int("stow_concurrency", 4, minimum=1, maximum=64))

    # ------------------------------------------------------------------ requests

    def on_request(self, request):
        dw = request.state.dicomweb.request
        if dw is None:
            return request
        if dw.aet:
            self._route_aet(request, dw.aet)
        if dw.service == QIDO:
            return self._qido_request(request, dw)
        if dw.service == STOW:
            return self._stow(request, dw)
        return self._wado_request(request, dw)

    def _route_aet(self, request, aet):
        """``/aets/{aet}/rs``: the pipeline backend named *aet*, or whose PACS
        has that AE title (a pipeline may hold one dicom_scu backend per PACS)."""
        pipeline = request.state.pipeline
        for backend in getattr(pipeline, "backends", ()):
            titles = set(getattr(backend, "ae_titles", ()))
            if backend.name == aet or aet in titles:
                request.metadata["backend"] = backend.name
                return
        raise NotFound(f"no PACS with AE title {aet!r} behind this DICOMweb service")

    def _qido_request(self, request, dw):
        q = dw.query
        # A new top level only: the elements are replaced here, never changed in place.
        identifier = dict(request.normalized or {})
        keys = qido.return_keys(dw.level, q, study_in_path=bool(dw.study_uid), series_in_path=bool(dw.series_uid))
        keys += ["0020000D"] + (["0020000E"] if dw.level != "STUDY" else [])
        if q.include_all:
            keys += list(ALL_EXTRA[dw.level])
        for tag in keys:
            identifier.setdefault(tag, {"vr": qido.vr_of(tag)})
        # DIMSE has no RetrieveURL; it is built from the UIDs on the way back.
        identifier.pop("00081190", None)
        identifier["00080052"] = {"vr": "CS", "Value": [dw.level]}
        request.normalized = identifier
        request.metadata["dimse_op"] = C_FIND
        request.metadata["query_level"] = dw.level
        request.metadata[RESULTS_AS] = DICOM_JSON  # matches as DICOM JSON where the backend holds it
        return request

    def _wado_request(self, request, dw):
        if dw.resource in ("study", "series", "instance") and dw.transfer_syntax not in (
                None, "*", ExplicitVRLittleEndian):
            raise NotAcceptable(f"this proxy serves instances as stored (transfer-syntax=*) or as "
                                f"{ExplicitVRLittleEndian}; it does not transcode to {dw.transfer_syntax}")
        if dw.resource == "metadata":
            key = self._metadata_key(dw)
            return self.cache.get_async(key).addCallback(self._metadata_request, request, dw, key)
        self._prepare_retrieve(request, dw)
        pipeline = request.state.pipeline
        if dw.resource in ("study", "series", "instance") and pipeline is not None and \
                getattr(pipeline, "middleware", [None])[-1] is self:
            # Nothing between here and the backend reads the instances' files: the
            # backend may hand them over in memory (no tmpfs pages to fill, splice and
            # free; bench/dimse/retrieve.py), and they go to the client with sendmsg.
            request.metadata[STAGE_IN_MEMORY] = True
        return request

    def _metadata_request(self, cached, request, dw, key):
        if cached is not None:
            return self._metadata_response(request, dw, cached)
        waiting = self.cache.join(key)
        if waiting is not None:
            return waiting.addCallback(lambda body: self._metadata_response(request, dw, body))
        request.state.dicomweb.cache_key = key
        pipeline = request.state.pipeline
        self._prepare_retrieve(request, dw)
        request.metadata[RESULTS_AS] = DICOM_JSON  # a backend that keeps each instance's metadata sends it
        if pipeline is not None:
            # Fetch here rather than let the pipeline carry on: a backend
            # failure would skip on_response and leave the waiters hanging.
            return self._shared_fetch(pipeline, request, dw, key)
        return request

    def _shared_fetch(self, pipeline, request, dw, key):
        """The metadata fetch of *key* for *request*, and for whoever joins it meanwhile.

        It runs on its own copy of the request's state: the first client leaving is
        not the others' doing.  Its leaving cancels the fetch (a client abort) only
        when no one else waits on it; otherwise the fetch goes on, for them and the
        cache (before, they got the first client's 499)."""
        fetching = attr.evolve(request, state=attr.evolve(request.state))
        fetch = self._fetch_metadata(pipeline, fetching, dw, key)

        def left(_):
            if not self.cache.waiting(key):
                mark_client_gone(fetching)
                fetch.cancel()

        answer: defer.Deferred = defer.Deferred(left)

        def settled(result):
            if not answer.called:  # else the first client left, and the others have it (cache.settle)
                if isinstance(result, Failure):
                    answer.errback(result)
                else:
                    answer.callback(result)
        fetch.addBoth(settled)
        return answer

    def _prepare_retrieve(self, request, dw):
        identifier = {"00080052": {"vr": "CS", "Value": [dw.level]}}
        for tag, uid in (("0020000D", dw.study_uid), ("0020000E", dw.series_uid), ("00080018", dw.instance_uid)):
            if uid:
                identifier[tag] = {"vr": "UI", "Value": [uid]}
        request.normalized = identifier
        request.metadata["dimse_op"] = C_GET
        request.metadata["query_level"] = dw.level
        return request

    @defer.inlineCallbacks
    def _fetch_metadata(self, pipeline, request, dw, key):
        try:
            response = yield pipeline.send_after(self, request)
            result = yield defer.maybeDeferred(self._respond, request, dw, response).addErrback(_as_backend_error)
        except BaseException:
            self.cache.settle(key, Failure())
            raise
        if self.cache.running(key):  # an error response some step made: waiters get it too
            self.cache.settle(key, Failure(HarmonyError("metadata fetch failed", status=result.status)))
        return result

    # ------------------------------------------------------------------ responses

    def on_response(self, request, response):
        dw = request.state.dicomweb.request
        if dw is None or dw.service == STOW:
            return response
        key = request.state.dicomweb.cache_key
        d = defer.maybeDeferred(self._respond, request, dw, response)
        d.addErrback(_as_backend_error)
        if key is not None:
            def settle_failure(failure):
                self.cache.settle(key, failure)
                return failure
            d.addErrback(settle_failure)
        return d

    def _respond(self, request, dw, response):
        stream = response.state.dicom_results
        if stream is None:
            if response.status >= 400:
                return response  # an error some other step made; pass it on
            raise ConfigurationFailure("the dicomweb_bridge needs a DIMSE backend (dicom_scu) behind it")
        if response.status >= 400:
            return self._failed_retrieve(request, dw, response)
        if dw.service == QIDO:
            return self._qido_response(request, dw, stream)
        if dw.resource in ("study", "series", "instance"):
            return self._retrieve_response(request, dw, stream)
        if dw.resource == "metadata":
            return self._metadata_fetch(request, dw, stream)
        return self._single_instance_response(request, dw, stream)

    @defer.inlineCallbacks
    def _failed_retrieve(self, request, dw, response):
        """A PACS often fails a C-GET for UIDs it does not have (Orthanc: 0xC000)
        instead of completing with no sub-operations; ask with a C-FIND whether
        the entity exists, so the client gets 404 rather than 502."""
        error = BackendUnavailable(_dimse_detail(request, response), status=response.status)
        if dw.service != WADO or response.status < 500 or request.state.pipeline is None:
            raise error
        identifier = dict(request.normalized or {})
        identifier["00080052"] = {"vr": "CS", "Value": [dw.level]}
        probe = RequestEnvelope(method="GET", path=request.path, subpath=request.subpath,
                                metadata={**request.metadata, "dimse_op": C_FIND, "query_level": dw.level},
                                normalized=identifier, client_ip=request.client_ip)
        try:
            found = yield request.state.pipeline.send_after(self, probe)
            stream = found.state.dicom_results
            first = (yield stream.next()) if stream is not None and found.status < 400 else "unknown"
        except Exception:  # noqa: BLE001 - the probe is best effort; the retrieve's own error stands
            raise error from None
        if first is None:
            raise NotFound("no such study, series or instance")
        if stream is not None:
            stream.cancel()
            release_rest(stream)
        raise error

    @defer.inlineCallbacks
    def _qido_response(self, request, dw, stream):
        q = dw.query
        skip, take = q.offset, q.limit
        results, more = [], False
        while True:
            item = yield stream.next()
            if item is None:
                break
            if skip:
                skip -= 1
                continue
            if take is not None and len(results) >= take:
                more = True
                stream.cancel()
                release_rest(stream)
                break
            results.append(self._qido_item(dw, item))
        if not more and _failed(stream):
            raise BackendUnavailable(f"the PACS ended the C-FIND with status 0x{stream.status or 0:04X}"
                                     + (f": {stream.error_comment}" if stream.error_comment else ""))
        headers = Headers()
        if more:
            headers.addRawHeader("Warning", '299 harmony "There are additional results that can be requested"')
        return ResponseEnvelope.json(200, results, "application/dicom+json", headers)

    def _qido_item(self, dw, item) -> dict:
        doc = find_result_json(item) if isinstance(item, dict) else find_result_to_json(item)
        study = _uid(doc, "0020000D") or dw.study_uid
        series = _uid(doc, "0020000E") or dw.series_uid
        sop = _uid(doc, "00080018")
        if study and (dw.level == "STUDY" or series) and (dw.level != "IMAGE" or sop):
            path = resource_path(study, series if dw.level != "STUDY" else None, sop if dw.level == "IMAGE" else None)
            doc["00081190"] = {"vr": "UR", "Value": [dw.base_url + path]}
        return dict(sorted(doc.items()))

    @defer.inlineCallbacks
    def _retrieve_response(self, request, dw, stream):
        first = yield stream.next()
        if first is None:
            raise _nothing_retrieved(stream)
        target = dw.transfer_syntax
        try:
            # The first part is made ready before the head goes out, so an
            # instance this proxy cannot decode is still a clean error.
            ready = yield self._instance_part(first, target, dw)
        except Exception as e:  # noqa: BLE001 - any decoder failure
            stream.cancel()
            release_rest(stream)
            if isinstance(e, defer.CancelledError):
                raise  # the client left (or the pipeline gave up) meanwhile: not a 406
            why = str(e) if isinstance(e, transfer.NotConvertible) else f"converting it failed ({type(e).__name__})"
            raise NotAcceptable(f"cannot serve it as {ExplicitVRLittleEndian}: {why}; "
                                f"ask with transfer-syntax=* for the instance as stored") from None
        pending = [ready]

        def next_part():
            if pending:
                return defer.succeed(pending.pop())
            return stream.next().addCallback(self._instance_part, target, dw)

        # The client left mid-body: a client abort, whether the PACS is still sending (C-CANCEL) or done.
        writer = MultipartWriter(next_part, acc.DICOM, on_stop=lambda: abandon_for_client(stream, request))
        return ResponseEnvelope(200, Headers({"Content-Type": [writer.content_type]}), writer,
                                metadata={dimse.METADATA_KEY: dimse.label(stream.status)})

    def _instance_part(self, item, target, dw):
        if item is None:
            return defer.succeed(None)
        where = {"Content-Location": dw.base_url + resource_path(
            item.study_instance_uid or dw.study_uid, item.series_instance_uid or dw.series_uid,
            item.sop_instance_uid)}
        as_stored = target == "*" or item.transfer_syntax_uid == (target or ExplicitVRLittleEndian)
        if as_stored and item.data is not None:
            return defer.succeed(Part(f"{acc.DICOM}; transfer-syntax={item.transfer_syntax_uid}",
                                      buffers=item.data, headers=where, release=item.release))
        if as_stored:
            return defer.succeed(Part(f"{acc.DICOM}; transfer-syntax={item.transfer_syntax_uid}", path=item.path,
                                      headers=where, release=item.release, staged=item.owned))

        # A cancel (the client left before the head) answers at once; the copy on the
        # thread still reads the instance, so it is released, and the copy deleted,
        # only when the thread is done with them.
        converted: defer.Deferred[Part] = defer.Deferred(lambda _: None)

        def done(path):
            item.release()
            part = Part(f"{acc.DICOM}; transfer-syntax={ExplicitVRLittleEndian}", path=path, headers=where,
                        release=lambda: _unlink(path), staged=True)
            if converted.called:
                part.done()  # cancelled meanwhile: no one will send it
            else:
                converted.callback(part)

        def failed(failure):
            item.release()
            if not converted.called:
                converted.errback(failure)
        threads.deferToThread(_explicit_copy, item, self.storage).addCallbacks(done, failed)
        return converted

    # -- metadata
    def _metadata_key(self, dw) -> str:
        # The AE title is part of the key: two PACS behind /aets/{aet}/rs may hold different data.
        return f"metadata:{dw.aet or ''}:" + resource_path(dw.study_uid, dw.series_uid, dw.instance_uid)

    @defer.inlineCallbacks
    def _metadata_fetch(self, request, dw, stream):
        key = request.state.dicomweb.cache_key
        docs = []
        try:
            while True:
                item = yield stream.next()
                if item is None:
                    break
                try:
                    if item.metadata_json is not None:
                        # Kept by the backend (local_archive, made at ingest): no file to
                        # parse, nor the text (parsing 200 of them cost more than the rest).
                        docs.append(((item.instance_number, item.sop_instance_uid), item.metadata_json))
                        continue
                    base = BASE_PLACEHOLDER + resource_path(item.study_instance_uid or dw.study_uid,
                                                           item.series_instance_uid or dw.series_uid,
                                                           item.sop_instance_uid)
                    doc = yield threads.deferToThread(instance_metadata, item.path, base)
                    docs.append(((_int(doc, "00200013"), _uid(doc, "00080018") or ""), doc))
                finally:
                    item.release()
        except Exception:
            stream.cancel()
            release_rest(stream)
            raise
        if not docs:
            raise _nothing_retrieved(stream)
        docs.sort(key=lambda d: d[0])
        # Kept texts are joined as they are: the same compact JSON json.dumps makes.
        body = ("[" + ",".join(doc if isinstance(doc, str) else json.dumps(doc, separators=(",", ":"))
                               for _key, doc in docs) + "]").encode("utf-8")
        if key is not None:
            # Waiters get the body now; a failed cache write only costs a refetch later.
            self.cache.settle(key, body)
            self.cache.put_async(key, body).addErrback(
                lambda f: log.warn("metadata cache write failed: {error}", error=f.getErrorMessage()))
        return self._metadata_response(request, dw, body)

    def _metadata_response(self, request, dw, body: bytes) -> ResponseEnvelope:
        body = with_base(body, dw.base_url)
        etag = etag_for(body)
        headers = Headers({"ETag": [etag], "Cache-Control": ["private, no-cache"]})
        # Weak comparison (RFC 9110 13.1.2): a gzipped answer went out with W/ (harmony.web.coding).
        if coding.etag_matches(request.header("if-none-match"), etag):
            return ResponseEnvelope(304, headers, b"")
        headers.setRawHeaders("Content-Type", ["application/dicom+json"])
        return ResponseEnvelope(200, headers, body)

    # -- frames, bulkdata, rendered, thumbnail: one instance
    @defer.inlineCallbacks
    def _single_instance_response(self, request, dw, stream):
        item = yield stream.next()
        if item is None:
            raise _nothing_retrieved(stream)
        stream.cancel()  # a series/study thumbnail needs only the first instance
        release_rest(stream)
        try:
            if dw.resource == "frames":
                frames, ts = yield threads.deferToThread(self._frames, item, dw)
            elif dw.resource == "bulkdata":
                data = yield threads.deferToThread(bulk_value, item.path, dw.bulk_path)
                frames, ts = [data], None
            else:
                frame = dw.frames[0] if dw.frames else 1
                image = yield threads.deferToThread(render, item.path, frame, dw.accept,
                                                    thumbnail=dw.resource == "thumbnail",
                                                    quality=self.render_quality)
                return ResponseEnvelope(200, Headers({"Content-Type": [dw.accept]}), image)
        finally:
            item.release()
        ctype = dw.accept + (f"; transfer-syntax={ts}" if ts and dw.accept == acc.OCTET else "")
        if not dw.multipart:
            return ResponseEnvelope(200, Headers({"Content-Type": [ctype]}), frames[0])
        body, content_type = multipart_bytes([Part(ctype, data=f) for f in frames], dw.accept)
        return ResponseEnvelope(200, Headers({"Content-Type": [content_type]}), body)

    def _frames(self, item, dw):
        if dw.accept in (acc.JPEG, acc.PNG):
            return [render(item.path, f, dw.accept, quality=self.render_quality) for f in dw.frames], None
        return extract_frames(item.path, dw.frames, dw.transfer_syntax)

    # ------------------------------------------------------------------ STOW

    def _stow(self, request, dw):
        """The STOW-RS answer for *request*.  Plain callbacks rather than generators
        (``inlineCallbacks``): this runs on the reactor once a request, and each
        generator layer is a frame resumed per step there."""
        try:
            pipeline = request.state.pipeline
            if pipeline is None:
                raise ConfigurationFailure("dicomweb_bridge STOW needs to run inside a pipeline")
            boundary = request.metadata.get("dicomweb.boundary")
            if not boundary:
                raise BadRequest("STOW-RS needs a multipart/related body with a boundary")
            body = request.body
            held = (split_held(body, boundary) if isinstance(body, bytes) and len(body) <= HELD_BODY_BYTES
                    and self._files_held_instances(pipeline) else None)
            if held is not None:
                parsed = self._describe_held(held)
            else:
                parser = StowParser(boundary, self.storage / "stow")
                # Parsed, written to files and each part's header read on a thread, in
                # one hand-off per request (all blocking work, none of it on the reactor).
                parsed = parse_body(body, parser, run=self._off_reactor, finish=_describe_parts)
        except Exception:
            return defer.fail()
        return parsed.addCallback(self._store_described, pipeline, request, dw)

    def _files_held_instances(self, pipeline) -> bool:
        """Whether this STOW-RS's instances may go on as bytes in memory: nothing after
        this middleware reads them, and every backend files instances from their bytes
        and checks them itself (``checks_received_instances``: the store)."""
        middleware = getattr(pipeline, "middleware", None)
        backends = getattr(pipeline, "backends", None)
        return bool(middleware) and middleware[-1] is self and bool(backends) and all(
            getattr(backend, "checks_received_instances", False) for backend in backends)

    def _describe_held(self, parts: list[HeldPart]) -> defer.Deferred:
        """The held parts described on the reactor by the DICOM scanner (tens of
        microseconds a small instance: less than a thread hand-off costs); a part the
        scanner leaves to pydicom, or more than :data:`HELD_PARTS_ON_REACTOR` parts,
        send the lot to a thread instead.  No part file is
        made, written, read back or renamed: the store files each from its bytes."""
        if len(parts) > HELD_PARTS_ON_REACTOR:
            return self._off_reactor(_describe_parts, parts)
        try:
            described = [(part, _held_instance(part, scan_only=True)) for part in parts]
        except ScanDeclined:
            return self._off_reactor(_describe_parts, parts)
        return defer.succeed(described)

    def _store_described(self, described, pipeline, request, dw):
        if not described:
            raise BadRequest("the multipart body has no parts")
        try:
            stored = self._store_parts(pipeline, request, dw, described)
        except BaseException:
            _release_parts(None, described)
            raise
        return stored.addBoth(_release_parts, described).addCallback(_stow_answer, dw)

    def _off_reactor(self, fn, *args):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)

    def _store_parts(self, pipeline, request, dw, described) -> defer.Deferred:
        """(ok, entry, reason) per part, in order.  The parts that are DICOM of the
        right study go on together (``Pipeline.send_batch_after``: a backend that
        files batches commits them at once, else a C-STORE each, ``stow_concurrency``
        in flight - each is a round trip to a PACS, and a dicom_scu backend keeps a
        pool of associations for exactly this)."""
        outcomes: list = [None] * len(described)
        subs, sent = [], []
        for i, (_part, instance) in enumerate(described):
            refused = _refusal(instance, dw)
            if refused is not None:
                outcomes[i] = refused
                continue
            sub = RequestEnvelope(method="POST", path=request.path, subpath=request.subpath,
                                  metadata={**request.metadata, "dimse_op": C_STORE},
                                  client_ip=request.client_ip, scheme=request.scheme, host=request.host)
            sub.metadata.pop("query_level", None)
            sub.state.dicom.instance = instance
            sub.state.dicomweb.request = dw
            subs.append(sub)
            sent.append(i)

        def answered(answers):
            for i, sub, answer in zip(sent, subs, answers, strict=True):
                outcomes[i] = self._stored_entry(dw, sub, described[i][1], answer)
            return outcomes
        return pipeline.send_batch_after(self, subs, self.stow_concurrency).addCallback(answered)

    def _stored_entry(self, dw, sub, instance, answer):
        sop_class, sop = instance.sop_class_uid, instance.sop_instance_uid
        if isinstance(answer, Failure):
            if not answer.check(HarmonyError):
                answer.raiseException()  # not a refusal: the request fails as before
            e = answer.value
            log.warn("dicomweb_bridge {name}: C-STORE failed: {error}", name=self.name, error=e.detail)
            reason = getattr(e, "dimse_status", None) or dimse.PROCESSING_FAILURE  # e.g. 0xA700 from a full store
            return False, _failed_entry(sop_class, sop, reason), reason
        status = dimse.of_response(answer)
        if status is None or is_failure(status) or answer.status >= 400:
            reason = status if status not in (None, 0) else dimse.PROCESSING_FAILURE
            return False, _failed_entry(sop_class, sop, reason), reason
        # A middleware that rewrote the instance (deidentify) left the one it stored in the request:
        # the answer names that one, with the coercion warning PS3.18 asks for.
        stored = sub.state.dicom.instance
        if isinstance(stored, DicomInstance) and stored.sop_instance_uid != sop and status == 0:
            instance, sop, status = stored, stored.sop_instance_uid, dimse.STORE_COERCION
        entry = {"00081150": {"vr": "UI", "Value": [sop_class]}, "00081155": {"vr": "UI", "Value": [sop]},
                 "00081190": {"vr": "UR", "Value": [dw.base_url + resource_path(
                     instance.study_instance_uid, instance.series_instance_uid, sop)]}}
        if status != 0:
            entry["00081196"] = {"vr": "US", "Value": [status]}  # WarningReason
        return True, entry, None


# ---------------------------------------------------------------------- helpers


def _describe_parts(parts) -> list:
    """(part, its :class:`DicomInstance` or None when it is not DICOM) for each part
    (off the reactor: each part's header is read from its bytes or its file)."""
    described = []
    for part in parts:
        ctype = acc.parse_media_range(part.content_type)[0] if part.content_type else acc.DICOM
        try:
            if ctype != acc.DICOM:
                instance = None
            elif isinstance(part, HeldPart):
                instance = _held_instance(part)
            else:
                instance = _describe(part.path, part.data)
        except Exception:  # noqa: BLE001 - any unreadable part is that part's failure, not the request's
            instance = None
        described.append((part, instance))
    return described


def _release_parts(result, described):
    """Remove the part files the store did not take (it moved the others into place);
    passes *result* on (an outcome or a Failure)."""
    for part, instance in described:
        if instance is None or instance.owned:
            part.release()
    return result


def _stow_answer(outcomes, dw) -> ResponseEnvelope:
    """The STOW-RS response for the parts' (ok, entry, reason) outcomes, and its status:
    200 all stored, 202 some, else why none was (507 full, 503 unavailable, 409)."""
    referenced: list[dict] = []
    failed: list[dict] = []
    reasons: list[int] = []
    for ok, entry, reason in outcomes:
        (referenced if ok else failed).append(entry)
        if not ok:
            reasons.append(reason)
    doc = {}
    if dw.study_uid:
        doc["00081190"] = {"vr": "UR", "Value": [dw.base_url + resource_path(dw.study_uid)]}
    if failed:
        doc["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        doc["00081199"] = {"vr": "SQ", "Value": referenced}
    if not failed:
        status = 200
    elif referenced:
        status = 202
    elif all(dimse.is_out_of_resources(r) for r in reasons):
        status = 507  # a full store (or PACS): nothing was written, try again once there is room
    elif all(dimse.is_unavailable(r) for r in reasons):
        status = 503  # nothing stored because the PACS could not take it, not because of the request
    else:
        status = 409
    return ResponseEnvelope.json(status, doc, "application/dicom+json")


def _refusal(instance, dw):
    """The (ok, entry, reason) refusing a part before any store, or None when it may go on."""
    if instance is None:
        return False, _failed_entry("", "", dimse.STORE_CANNOT_UNDERSTAND), dimse.STORE_CANNOT_UNDERSTAND
    sop_class, sop = instance.sop_class_uid, instance.sop_instance_uid
    if not (is_uid(sop) and is_uid(instance.study_instance_uid)):
        return False, _failed_entry(sop_class, sop, dimse.STORE_CANNOT_UNDERSTAND), dimse.STORE_CANNOT_UNDERSTAND
    if dw.study_uid and instance.study_instance_uid != dw.study_uid:
        return False, _failed_entry(sop_class, sop, dimse.STORE_DATASET_MISMATCH), dimse.STORE_DATASET_MISMATCH
    return None


def _held_instance(part: HeldPart, scan_only: bool = False) -> DicomInstance | None:
    """A held part's instance (None when the part is not DICOM): read by the scanner,
    whose scan rides on it (the store files the same bytes without scanning them
    again), pydicom only for what the scanner declines - unless *scan_only*, when
    that raises :class:`ScanDeclined` (pydicom is not run on the reactor)."""
    if part.content_type and acc.parse_media_range(part.content_type)[0] != acc.DICOM:
        return None
    data = part.data
    if data[128:132] != b"DICM":
        return None  # no Part-10 preamble: pydicom refuses it too (no force), the store would as well
    try:
        scan = scan_bytes(data)
        uids = (scan.sop_class_uid, scan.sop_instance_uid, scan.study_instance_uid, scan.series_instance_uid)
    except ScanDeclined:
        if scan_only:
            raise
        ds = check_complete(data)
        return DicomInstance(path=Path(os.devnull), sop_class_uid=strip_padding(ds.get("SOPClassUID")),
                             sop_instance_uid=strip_padding(ds.get("SOPInstanceUID")),
                             transfer_syntax_uid=strip_padding(ds.file_meta.get("TransferSyntaxUID", "")),
                             study_instance_uid=strip_padding(ds.get("StudyInstanceUID")),
                             series_instance_uid=strip_padding(ds.get("SeriesInstanceUID")), size=len(data),
                             data=[data])
    except Exception:  # noqa: BLE001 - cut short, or not DICOM: that part's refusal
        return None
    return DicomInstance(path=Path(os.devnull), sop_class_uid=uids[0] or "", sop_instance_uid=uids[1] or "",
                         transfer_syntax_uid=scan.transfer_syntax_uid, study_instance_uid=uids[2] or "",
                         series_instance_uid=uids[3] or "", size=len(data), parsed=(None, scan), data=[data])


def _describe(path, data: bytes | None = None) -> DicomInstance:
    """The part's header, checked whole once (every element inside the file): scanned
    from its bytes (*data*, when the body was parsed in memory, else the file) by
    :mod:`harmony.dicom.rawscan`, pydicom only for what the scanner declines.  The scan
    (or parse) rides on the instance so a store behind the bridge does not read or
    parse the part again.  ``CorruptDataset`` (or any error) refuses the part."""
    stamp = stamp_of(path)
    try:
        scan = scan_bytes(data, path) if data is not None else scan_file(path)
    except ScanDeclined:
        scan = None
    if scan is not None:
        try:
            uids = (scan.sop_class_uid, scan.sop_instance_uid, scan.study_instance_uid, scan.series_instance_uid)
        except ScanDeclined:  # a UID only pydicom can read (several values, other characters)
            uids = None
        if uids is not None:
            # The part's file is ours alone: a store may move it into place rather than
            # copy it (the part's release tolerates it gone).
            instance = DicomInstance(path=Path(path), sop_class_uid=uids[0] or "", sop_instance_uid=uids[1] or "",
                                     transfer_syntax_uid=scan.transfer_syntax_uid, study_instance_uid=uids[2] or "",
                                     series_instance_uid=uids[3] or "", size=stamp[1], owned=True)
            if isinstance(scan.data, bytes):
                instance.parsed = (stamp, scan)
            else:
                scan.close()  # mapped (a large part): the store maps it again when it files it
            return instance
        scan.close()
    parsed = parse_stamped(path)
    instance = read_instance(path, owned=True, ds=parsed[1])
    instance.parsed = parsed
    return instance


#: STOW part files older than this are leftovers of a crash (a live request's
#: parts are minutes old at most); younger ones may belong to the bridge a
#: reload is replacing, which shares the folder.
STALE_PART_SECONDS = 6 * 3600


def remove_stale_parts(folder, now=None, older_than=STALE_PART_SECONDS) -> int:
    """Delete STOW part files a killed process left behind; how many."""
    import time
    now = time.time() if now is None else now
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and now - entry.stat().st_mtime > older_than:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            pass  # gone meanwhile, or not ours to remove: never a reason not to start
    if removed:
        log.info("dicomweb_bridge: removed {n} STOW part file(s) left by an earlier run", n=removed)
    return removed


def _explicit_copy(item, storage):
    """``transfer.explicit_copy`` of a retrieved instance, written to a file first when
    the backend held it in memory (off the reactor)."""
    if item.data is None:
        return transfer.explicit_copy(item.path, storage)
    with open(item.path, "wb") as f:
        f.writelines(item.data)
    try:
        return transfer.explicit_copy(item.path, storage)
    finally:
        _unlink(item.path)


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _failed_entry(sop_class, sop, reason) -> dict:
    entry = {}
    if sop_class:
        entry["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop:
        entry["00081155"] = {"vr": "UI", "Value": [sop]}
    entry["00081197"] = {"vr": "US", "Value": [int(reason)]}
    return entry


def _failed(stream) -> bool:
    return stream.status is not None and is_failure(stream.status)


def _as_backend_error(failure):
    """A result stream that broke (the PACS association died mid-answer) is the
    backend's failure (502), not this middleware's."""
    if failure.check(HarmonyError, defer.CancelledError):
        return failure
    raise BackendUnavailable(f"the PACS answer broke off: {failure.getErrorMessage()}")


def _nothing_retrieved(stream) -> HarmonyError:
    """The error for a retrieve that produced no instance: the PACS failed, or nothing matched."""
    if _failed(stream):
        return BackendUnavailable(f"the PACS ended the retrieve with status 0x{stream.status or 0:04X}")
    return NotFound("no instances match")


def _uid(doc, tag):
    v = doc.get(tag, {}).get("Value")
    return str(v[0]).rstrip("\0 ") if v else None


def _int(doc, tag):
    v = doc.get(tag, {}).get("Value")
    try:
        return int(v[0]) if v else 0
    except (TypeError, ValueError):
        return 0


def _dimse_detail(request, response) -> str:
    """What a failed DIMSE answer says, from its typed status and comment."""
    status = dimse.of_response(response)
    if status is None:
        return "the PACS could not serve the request"
    stream = response.state.dicom_results
    comment = (stream.error_comment if stream is not None else None) or response.state.error_comment
    detail = f"the PACS answered {request.metadata.get('dimse_op', 'DIMSE')} with status 0x{status:04X}"
    return detail + (f": {comment}" if comment else "")
