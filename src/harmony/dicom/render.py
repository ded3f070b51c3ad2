"""HTTP renderings of a :class:`ResultStream`: a DICOM JSON array for C-FIND,
``multipart/related; type="application/dicom"`` for retrieved instances.

Both are ``IBodyProducer``s that pull from the stream only once an HTTP
response is being written, and write each match or file as it arrives; a slow
client pauses them.  An endpoint that wants the items themselves (the DIMSE
SCP, the DICOMweb bridge) reads ``context["dicom_results"]`` instead and never
starts the body.
"""

from __future__ import annotations

import json
import uuid

from twisted.internet import defer, task
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from harmony.dicom.dicomjson import identifier_to_json
from harmony.dicom.net import is_failure
from harmony.dicom.results import DicomInstance

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


@implementer(IBodyProducer)
class ResultBodyProducer:
    length = UNKNOWN_LENGTH

    def __init__(self, stream, kind: str = "json", boundary: str | None = None):
        self.stream = stream
        self.kind = kind
        self.boundary = boundary or uuid.uuid4().hex
        self._task = None

    @property
    def content_type(self) -> str:
        if self.kind == "json":
            return "application/dicom+json"
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def startProducing(self, consumer):
        self._task = task.cooperate(self._produce(consumer))
        return self._task.whenDone().addCallback(lambda _: None)

    def pauseProducing(self):
        if self._task is not None:
            self._task.pause()

    def resumeProducing(self):
        if self._task is not None:
            self._task.resume()

    def stopProducing(self):
        if self._task is not None:
            try:
                self._task.stop()
            except task.TaskDone:
                pass
        self.stream.cancel()
        release_rest(self.stream)

    def _produce(self, consumer):
        first = True
        if self.kind == "json":
            consumer.write(b"[")
        boundary = self.boundary.encode("ascii")
        while True:
            box = []
            d = self.stream.next().addCallback(box.append)
            if not box:
                yield d
            item = box[0]
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
                with open(item.path, "rb") as f:
                    while True:
                        chunk = f.read(CHUNK)
                        if not chunk:
                            break
                        consumer.write(chunk)
                        yield None
                consumer.write(b"\r\n")
            finally:
                item.release()
        if is_failure(self.stream.status) and not self.stream.cancelled:
            raise StreamBroken(f"DIMSE operation ended with status 0x{self.stream.status or 0:04X}")
        if self.kind == "json":
            consumer.write(b"]")
        else:
            consumer.write(b"--" + boundary + b"--\r\n")
