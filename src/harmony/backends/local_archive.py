"""``local_archive`` backend: Harmony's own archive, answered from the durable store.

C-ECHO, C-FIND (PATIENT/STUDY/SERIES/IMAGE, study and patient root), C-GET and
C-MOVE (the instances under the matched entities, as files the consumer sends)
and C-STORE (a durable write, acknowledged only once it is on disk and
indexed), following the :mod:`harmony.dicom.results` contract.  With the
DICOMweb bridge in front, QIDO-RS and WADO-RS are answered from the same store.

    [backends.archive]
    service = "local_archive"
    # path = "archive"       # default: [storage.options] path
"""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from harmony.backends.base import Backend
from harmony.dicom import charset
from harmony.dicom import status as dimse
from harmony.dicom.results import (
    C_ECHO,
    C_FIND,
    C_GET,
    C_MOVE,
    C_STORE,
    DICOM_JSON,
    RESULTS_AS,
    DicomInstance,
    ResultStream,
)
from harmony.envelope import ResponseEnvelope
from harmony.errors import BadRequest
from harmony.interfaces import IBatchBackend
from harmony.state import ResponseState
from harmony.storage.config import store_from_context
from harmony.storage.errors import InvalidInstance, InvalidQuery
from harmony.storage.query import STUDY_ROOT, levels_for, plain_json_elements
from harmony.storage.store import release_store

#: QueryRetrieveLevel (0008,0052) as a DICOM JSON key.
QUERY_LEVEL_TAG = "00080052"


def identifier_of(request) -> Dataset:
    """The request's identifier (DICOM JSON in ``normalized``) as a Dataset."""
    doc = request.normalized
    if doc is None:
        return Dataset()
    if isinstance(doc, Dataset):
        return doc
    if not isinstance(doc, dict):
        raise InvalidQuery("the identifier must be a DICOM JSON object")
    try:
        return Dataset.from_json(doc)
    except Exception as e:  # noqa: BLE001 - any malformed DICOM JSON is the client's error
        raise InvalidQuery(f"the identifier is not valid DICOM JSON: {e}") from None


def query_identifier(request) -> Dataset | dict:
    """What a C-FIND matches with: the request's DICOM JSON as it is when it is
    plain text (a DICOMweb query nearly always is: ``Dataset.from_json`` was a
    tenth of a study search's reactor time), else the Dataset."""
    doc = request.normalized
    if isinstance(doc, dict) and plain_json_elements(doc) is not None:
        return doc
    return identifier_of(request)


def query_level(request, identifier: Dataset | dict) -> str:
    level = request.metadata.get("query_level")
    if not level and isinstance(identifier, dict):
        level = (identifier.get(QUERY_LEVEL_TAG, {}).get("Value") or [""])[0]
    elif not level:
        level = str(identifier.get("QueryRetrieveLevel", "") or "")
    level = level.strip().upper()
    if not level:
        raise InvalidQuery("no query level (metadata 'query_level' or QueryRetrieveLevel)")
    return level


def results_response(stream: ResultStream) -> ResponseEnvelope:
    return ResponseEnvelope(status=200, state=ResponseState(dicom_results=stream))


@implementer(IBatchBackend)
class LocalArchiveBackend(Backend):
    #: C-STORE: the instance is filed from its file; the header JSON a DIMSE endpoint
    #: could make for middleware (``request.normalized``) is never read here.
    reads_store_header = False
    #: The store parses and checks every received instance before filing it
    #: (dicom_scp then skips its own parse: DicomInstance.unchecked).
    checks_received_instances = True

    def __init__(self, name: str, store):
        super().__init__(name)
        self.store = store

    @classmethod
    def from_config(cls, name, options, ctx):
        return cls(name, store_from_context(ctx, options))

    def close(self):
        if self.store is not None:
            store, self.store = self.store, None
            release_store(store)

    def send(self, request):
        op = request.metadata.get("dimse_op", "")
        if op == C_STORE:   # most requests: no table of bound methods and maybeDeferred each
            try:
                return self.store_instance(request)
            except Exception:  # noqa: BLE001
                return defer.fail()
        handler = {C_ECHO: self.echo, C_FIND: self.find, C_GET: self.retrieve, C_MOVE: self.retrieve}.get(op)
        if handler is None:
            return defer.fail(BadRequest(f"local_archive answers C-ECHO, C-FIND, C-GET, C-MOVE and C-STORE, "
                                         f"not {op or 'a request without dimse_op'}"))
        try:
            return defer.maybeDeferred(handler, request)
        except Exception:  # noqa: BLE001
            return defer.fail()

    def echo(self, request):
        stream = ResultStream()
        stream.finish(dimse.SUCCESS)
        return results_response(stream)

    def find(self, request):
        identifier = query_identifier(request)
        level = query_level(request, identifier)
        model = request.metadata.get("query_model", STUDY_ROOT) or STUDY_ROOT
        levels_for(level, model)  # a bad level fails now, not half-way through the stream

        if request.metadata.get(RESULTS_AS) == DICOM_JSON:
            # The consumer (the DICOMweb bridge) speaks DICOM JSON, which the index
            # holds: a Dataset round trip cost half of a QIDO answer (bench/archive).
            def matches(should_stop):
                for doc in self.store.query_sync(identifier, level, model, should_stop=should_stop):
                    yield charset.declare_json(doc)
        else:
            def matches(should_stop):
                for doc in self.store.query_sync(identifier, level, model, should_stop=should_stop):
                    yield charset.declare(Dataset.from_json(doc))  # ISO_IR 192 when not ASCII

        return results_response(self.store.stream(matches))

    def retrieve(self, request):
        identifier = identifier_of(request)
        level = query_level(request, identifier)
        model = request.metadata.get("query_model", STUDY_ROOT) or STUDY_ROOT
        levels_for(level, model)
        if not any(elem.value not in (None, "") for elem in identifier
                   if elem.keyword not in ("QueryRetrieveLevel", "SpecificCharacterSet")):
            raise InvalidQuery("a retrieve needs at least one unique key")
        stream = ResultStream()
        # The DICOMweb bridge building metadata: the index holds it, made at ingest.
        with_metadata = request.metadata.get(RESULTS_AS) == DICOM_JSON

        def listing():
            return list(self.store.instances_sync(identifier, level, model, metadata=with_metadata))

        def found(instances):
            # Queued before the count is announced: a consumer woken by the count
            # then sees every instance (a C-MOVE proposes their transfer syntaxes).
            for inst in instances:
                if stream.cancelled:
                    stream.finish(dimse.CANCEL, "cancelled")
                    return
                stream.put(inst)
            stream.set_counts(len(instances))
            stream.finish(dimse.SUCCESS)

        self.store.run(listing).addCallbacks(found, stream.fail)
        return results_response(stream)

    def store_instance(self, request):
        # Plain callbacks: a generator per C-STORE was a visible share of its reactor time.
        return ingest(self.store, request).addCallback(_stored_response)

    def send_batch(self, requests):
        """Several C-STOREs (one STOW-RS upload) filed as one group: one commit for all."""
        for request in requests:
            op = request.metadata.get("dimse_op", "")
            if op != C_STORE:
                return defer.fail(BadRequest(f"local_archive files batches of C-STOREs only, not {op}"))
        return ingest_batch(self.store, requests).addCallback(
            lambda outcomes: [o if isinstance(o, Failure) else _stored_response(o) for o in outcomes])


def _stored_response(stored: DicomInstance) -> ResponseEnvelope:
    # One per stored instance (ten per STOW-RS request): the body is formatted, not
    # JSON-encoded, as both values are UIDs the store checked (digits and dots).
    sop, sop_class = stored.sop_instance_uid, stored.sop_class_uid
    headers = Headers()
    headers.setRawHeaders(b"content-type", [b"application/json"])
    response = ResponseEnvelope(200, headers, f'{{"stored":"{sop}","sop_class_uid":"{sop_class}"}}'.encode(),
                                normalized={"stored": sop, "sop_class_uid": sop_class})
    dimse.record(response, dimse.SUCCESS)
    response.state.stored_instance = stored
    return response


def ingest(store, request, enqueue=(), now=None) -> defer.Deferred:
    """Write the request's instance (``state.dicom.instance`` or a Part-10 body) durably."""
    instance = request.state.dicom.instance
    if isinstance(instance, DicomInstance):
        return store.put_instance(instance, enqueue=enqueue, now=now)
    if isinstance(instance, (str, Path)):
        return store.put_file(instance, enqueue=enqueue, now=now)
    body = request.body
    if isinstance(body, (bytes, bytearray)):
        if not body:
            return defer.fail(InvalidInstance("C-STORE without an instance"))
        return store.put_bytes(body, enqueue=enqueue, now=now)
    return store.put_producer(body, enqueue=enqueue, now=now)


def ingest_batch(store, requests, enqueue=(), now=None) -> defer.Deferred:
    """Write several requests' instances durably as one group; fires with each
    one's stored :class:`DicomInstance` or Failure, in order
    (:meth:`~harmony.storage.store.InstanceStore.put_instances`)."""
    instances = [r.state.dicom.instance for r in requests]
    if all(isinstance(i, DicomInstance) for i in instances):
        return store.put_instances(instances, enqueue=enqueue, now=now)
    alone = [ingest(store, r, enqueue, now) for r in requests]
    return defer.DeferredList(alone, consumeErrors=True).addCallback(lambda done: [v for _ok, v in done])
