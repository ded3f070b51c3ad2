"""HTTP renderings of a :class:`ResultStream`: a DICOM JSON array for C-FIND,
``multipart/related; type="application/dicom"`` for retrieved instances.

Both are ``IBodyProducer``s that pull from the stream only once an HTTP
response is being written, and write each match or file as it arrives; a slow
client pauses them.  An endpoint that wants the items themselves (the DIMSE
SCP, the DICOMweb bridge) reads ``state.dicom_results`` instead and never
starts the body.
"""

from __future__ import annotations

import json
import uuid

from twisted.internet import defer

from harmony.dicom.dicomjson import identifier_to_json
from harmony.dicom.results import DicomInstance
from harmony.dicom.status import is_failure
from harmony.envelope import CooperativeProducer
from harmony.errors import mark_client_gone

CHUNK = 64 * 1024


class StreamBroken(Exception):
    """The operation failed after the response head was sent."""


def release_rest(stream) -> defer.Deferred:
    """Take and release every remaining item (after a cancel), so staged files go."""
    def loop(item):
        if item is None:
            return None
        if isinstance(item, DicomInstance):
            item.release()
        return stream.next().addCallback(loop)
    return stream.next().addCallback(loop).addErrback(lambda _: None)


def next_or_give_up(stream) -> defer.Deferred:
    """``stream.next()`` for a consumer that drains *stream* in a cancellable chain (a
    middleware's ``on_response``): cancelling it -- the client left, or the pipeline gave
    up -- gives the stream up (C-CANCEL upstream) and releases what it still holds,
    rather than only the wait for the next item."""
    def cancelled(failure):
        if failure.check(defer.CancelledError):
            stream.cancel()
            release_rest(stream)
        return failure
    return stream.next().addErrback(cancelled)


def abandon_for_client(stream, request) -> None:
    """An HTTP body made from *stream* was stopped before its end: only the HTTP layer
    stops a body, and only when its client left.  *request* is marked client-gone
    first, then the stream is cancelled (C-CANCEL upstream) and what it still holds
    released.

    The order is the point.  The target pool counts a client abort, never a PACS
    failure, from that mark when the stream is abandoned (``ResultStream.when_abandoned``),
    and that is at once when the PACS had already finished; the transport stops its
    producer before the endpoint hears that the connection was lost."""
    mark_client_gone(request)
    stream.cancel()
    release_rest(stream)


class ResultBodyProducer(CooperativeProducer):
    def __init__(self, stream, kind: str = "json", boundary: str | None = None, request=None):
        self.stream = stream
        self.kind = kind
        self._boundary = boundary
        #: The pipeline request this body answers (marked client-gone if the body is stopped).
        self.request = request

    @property
    def boundary(self) -> str:
        """Made when first needed: a C-FIND's JSON body has none (and a DIMSE client never starts it)."""
        if self._boundary is None:
            self._boundary = uuid.uuid4().hex
        return self._boundary

    @property
    def content_type(self) -> str:
        if self.kind == "json":
            return "application/dicom+json"
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def _stopped(self):
        if self.request is not None:
            abandon_for_client(self.stream, self.request)
        else:
            self.stream.cancel()
            release_rest(self.stream)

    def _produce(self, consumer):
        first = True
        if self.kind == "json":
            consumer.write(b"[")
        boundary = self.boundary.encode("ascii") if self.kind != "json" else b""
        while True:
            item = yield from self._result(self.stream.next())
            if item is None:
                break
            if self.kind == "json":
                data = identifier_to_json(item) if not isinstance(item, dict) else item
                consumer.write((b"" if first else b",") + json.dumps(data, separators=(",", ":")).encode())
                first = False
                continue
            try:
                consumer.write(b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n"
                               + f"Content-Length: {item.path.stat().st_size}\r\n\r\n".encode())
                yield from self._file_chunks(consumer, item.path, CHUNK)
                consumer.write(b"\r\n")
            finally:
                item.release()
        if is_failure(self.stream.status) and not self.stream.cancelled:
            raise StreamBroken(f"DIMSE operation ended with status 0x{self.stream.status or 0:04X}")
        if self.kind == "json":
            consumer.write(b"]")
        else:
            consumer.write(b"--" + boundary + b"--\r\n")
