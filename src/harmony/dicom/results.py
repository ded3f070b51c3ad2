"""The contract between DICOM backends and whatever consumes their results.

A DICOM backend (``dicom_scu``, ``dicomweb`` via the bridge, ``local_archive``)
answers a pipeline request with a :class:`ResponseEnvelope` whose
``state.dicom_results`` is a :class:`ResultStream`.  Consumers - the DIMSE
SCP endpoint, the DICOMweb bridge, the JMIX builder, an HTTP JSON rendering -
pull items from it *as they arrive*, so the first C-FIND match or retrieved
instance goes onward long before the last one exists.

Requests ask for an operation through envelope metadata:

- ``metadata["dimse_op"]``: one of :data:`OPERATIONS`.
- ``metadata["query_level"]``: ``PATIENT`` / ``STUDY`` / ``SERIES`` / ``IMAGE``.
- ``metadata["query_model"]``: ``study`` (default) or ``patient`` root.
- ``metadata["move_destination"]``: AE title for C-MOVE.
- ``request.normalized``: the identifier as DICOM JSON (PS3.18 F.2), which is
  what middleware transforms see and edit.
- C-STORE: ``request.state.dicom.instance`` is a :class:`DicomInstance`
  (or the body is Part-10 bytes / a producer with ``Content-Type: application/dicom``).

Items are ``pydicom.Dataset`` identifiers for C-FIND and :class:`DicomInstance`
for C-GET / C-MOVE.  Big instances live in files, never whole in memory.

A consumer that works in DICOM JSON (the DICOMweb bridge) may say so with
``metadata[RESULTS_AS] = DICOM_JSON``; a backend that keeps DICOM JSON (the
local archive) may then answer C-FIND with DICOM JSON dicts instead of
Datasets, and fill :attr:`DicomInstance.metadata_json` on retrieved
instances.  It is a hint: a backend that ignores it answers as usual, so the
consumer takes either.  A middleware between them that reads or rewrites the
results (de-identification) removes the hint on the way in.
"""

from __future__ import annotations

import os
from pathlib import Path

import attr
from twisted.internet import defer

from harmony.dicom.status import SUCCESS

C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE = "C-ECHO", "C-FIND", "C-GET", "C-MOVE", "C-STORE"
#: ``metadata[RESULTS_AS] = DICOM_JSON``: see the module docstring.
RESULTS_AS, DICOM_JSON = "results_as", "dicom+json"
#: ``metadata[STAGE_IN_MEMORY] = True``: the consumer (the DICOMweb bridge, when nothing
#: between it and the backend reads files) takes retrieved instances held in memory
#: (:attr:`DicomInstance.data`) as well as staged files.
STAGE_IN_MEMORY = "stage_in_memory"
OPERATIONS = (C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE)
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")


@attr.s(auto_attribs=True)
class DicomInstance:
    """One DICOM instance as a Part-10 file on disk.

    ``owned`` instances live in a staging folder and are deleted by
    :meth:`release` once the consumer has sent or copied them.
    """

    path: Path
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    transfer_syntax_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    size: int = 0
    owned: bool = False
    #: The instance's WADO-RS metadata (DICOM JSON text, BulkDataURIs under
    #: ``harmony.dicomweb.cache.BASE_PLACEHOLDER`` + its resource path), when
    #: the backend keeps it precomputed and was asked (:data:`RESULTS_AS`).
    metadata_json: str | None = None
    #: Its InstanceNumber (0 when it has none), sent with ``metadata_json``:
    #: what a metadata answer is sorted by, without parsing the text.
    instance_number: int = 0
    #: ``(stamp, dataset)`` of a parse already done (:func:`harmony.dicom.files.parse_stamped`),
    #: or ``(stamp, ScannedFile)`` of a scan of its bytes (:mod:`harmony.dicom.rawscan`),
    #: so the store does not read or parse the file again; ignored once the file changed.
    parsed: object = attr.ib(default=None, eq=False, repr=False)
    #: Described from what came with it (a C-STORE request's UIDs, the data set's head),
    #: never parsed: a consumer that files it must first check the file is complete and
    #: is the instance these fields say (``InstanceStore.put_instance`` does).
    unchecked: bool = attr.ib(default=False, eq=False)
    #: The Part-10 bytes held in memory, in order, instead of a file at ``path`` (which
    #: then does not exist): only for a consumer that asked (:data:`STAGE_IN_MEMORY`).
    data: list | None = attr.ib(default=None, eq=False, repr=False)

    def release(self) -> None:
        self.data = None
        if self.owned:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class ResultStream:
    """Items delivered one at a time, from any thread, to a consumer on the reactor.

    Producer side (reactor thread; from other threads go through
    ``reactor.callFromThread``): :meth:`put`, :meth:`finish`, :meth:`fail`.
    Consumer side: :meth:`next` fires with the next item, or ``None`` at the end;
    or :meth:`listen` has every item handed over the moment it is put (a
    consumer that does the same thing with each, the DIMSE SCP relaying C-FIND
    matches: a Deferred and a coroutine step per match cost more than relaying it);
    a producer that holds a C-FIND match as the bytes it received (``dicom_scu``)
    offers them with :meth:`put_encoded`, and a listener that sends them on in the
    same transfer syntax takes them as they are, with no Dataset made per match;
    :meth:`cancel` asks the producer to stop (C-CANCEL) via ``on_cancel``.
    Counters mirror PS3.4 sub-operation counts for retrieves.
    """

    def __init__(self, on_cancel=None):
        self._items: list = []
        self._waiting: defer.Deferred | None = None
        self._done = False
        self._failure = None
        self.on_cancel = on_cancel
        self.cancelled = False
        #: Final DIMSE status (int) once finished, e.g. 0x0000, 0xB000, 0xA700.
        self.status: int | None = None
        self.error_comment: str | None = None
        self.completed = self.failed = self.warning = 0
        self.remaining: int | None = None
        self.failed_sop_uids: list[str] = []
        self._counted: list[defer.Deferred] = []
        self._total: int | None = None
        self._listener = None
        #: ``(transfer syntax, on_encoded)`` of a listener that takes matches as bytes (:meth:`listen`).
        self._encoded: tuple | None = None
        self._ended: defer.Deferred | None = None
        #: The consumer gave up before taking the end (:meth:`cancel`), even after the producer ended.
        self._given_up = False
        self._abandoned: list[defer.Deferred] = []

    # -- producer
    def put(self, item) -> None:
        if self._listener is not None:
            self._listener(item)
        elif self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback(item)
        else:
            self._items.append(item)

    def put_encoded(self, data: bytes, transfer_syntax: str, as_item) -> None:
        """An identifier the producer holds as *data*, encoded in *transfer_syntax*: handed
        as those bytes to a listener that asked for them in that syntax
        (``listen(encoded=...)``), otherwise put as ``as_item(data, transfer_syntax)``
        (a Dataset, e.g. ``ReceivedIdentifier``) -- the same bytes either way when
        nobody looks inside, without the Dataset's making per match (bench/dimse, C-FIND)."""
        encoded = self._encoded
        if encoded is not None and encoded[0] == transfer_syntax:
            encoded[1](data)
        else:
            self.put(as_item(data, transfer_syntax))

    def set_counts(self, remaining: int | None, completed: int = 0, failed: int = 0, warning: int = 0) -> None:
        """Record PS3.4 sub-operation counts (e.g. from a PACS's pending responses)."""
        self.remaining, self.completed, self.failed, self.warning = remaining, completed, failed, warning
        if remaining is not None:
            self._total = remaining + completed + failed + warning
            self._fire_counted()

    def finish(self, status: int = SUCCESS, comment: str | None = None) -> None:
        self.status = status
        self.error_comment = comment
        self._done = True
        if self._waiting is not None and not self._items:
            d, self._waiting = self._waiting, None
            d.callback(None)
        self._fire_counted()
        self._end(None)
        self._settle()

    def fail(self, failure) -> None:
        self._failure = failure
        self._done = True
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(failure)
        self._fire_counted()
        self._end(failure)
        self._settle()

    def _end(self, failure) -> None:
        ended, self._ended = self._ended, None
        if ended is not None:
            self._listener = self._encoded = None
            if failure is None:
                ended.callback(None)
            else:
                ended.errback(failure)

    def _fire_counted(self) -> None:
        waiting, self._counted = self._counted, []
        for d in waiting:
            d.callback(self)

    @property
    def done(self) -> bool:
        """True once the producer has finished or failed (items may remain)."""
        return self._done

    def when_counted(self) -> defer.Deferred:
        """Fires (with the stream) once the total number of sub-operations is
        known: counts were set with a ``remaining`` value, or the stream ended.
        A C-GET/C-MOVE SCP must announce that total before its first sub-operation."""
        if self._done or self._total is not None:
            return defer.succeed(self)
        d: defer.Deferred[ResultStream] = defer.Deferred()
        self._counted.append(d)
        return d

    def total(self) -> int:
        """The number of sub-operations: as last counted by the producer, or else
        (once finished, before anything was taken) the items queued."""
        if self._total is not None:
            return self._total
        return len(self._items)

    # -- consumer
    def next(self) -> defer.Deferred:
        if self._items:
            return defer.succeed(self._items.pop(0))
        if self._failure is not None:
            return defer.fail(self._failure)
        if self._done:
            return defer.succeed(None)
        self._waiting = defer.Deferred()
        return self._waiting

    def listen(self, on_item, encoded: tuple | None = None) -> defer.Deferred:
        """Push mode: ``on_item(item)`` for every item queued so far and from now on each
        one as it is put (on the producer's call stack); the result fires with ``None``
        when the stream ends, or fails with its failure.  :meth:`unlisten` stops it.
        *encoded*: ``(transfer syntax, on_encoded)``: items the producer offers as bytes
        in that syntax (:meth:`put_encoded`) go to ``on_encoded(data)`` instead."""
        while self._items:
            on_item(self._items.pop(0))
            if self.cancelled:
                break
        ended: defer.Deferred = defer.Deferred()
        if self._failure is not None:
            ended.errback(self._failure)
        elif self._done and not self._items:
            ended.callback(None)
        else:
            self._listener, self._ended, self._encoded = on_item, ended, encoded
        return ended

    @property
    def listened(self) -> bool:
        """Whether a consumer takes items as they are put (:meth:`listen`)."""
        return self._listener is not None

    def unlisten(self) -> None:
        """Back to pull mode: items queue again for :meth:`next` (the listener's Deferred never fires)."""
        self._listener = self._ended = self._encoded = None

    def queued(self) -> list:
        """The items produced but not yet taken, without taking them (a C-MOVE
        SCP reads their transfer syntaxes before it opens its association)."""
        return list(self._items)

    @property
    def pending(self) -> int:
        """Items produced but not yet taken (for flow control by producers)."""
        return len(self._items)

    def cancel(self) -> None:
        """The consumer gives up before the end: the producer is asked to stop
        (``on_cancel``, unless it has ended already) and :meth:`when_abandoned` fires
        once it has."""
        self._given_up = True
        if not self.cancelled and not self._done:
            self.cancelled = True
            if self.on_cancel is not None:
                self.on_cancel()
        self._settle()

    @property
    def given_up(self) -> bool:
        """Whether the consumer gave up (:meth:`cancel`), before or after the producer ended."""
        return self._given_up

    def when_abandoned(self) -> defer.Deferred:
        """Fires (with ``None``) once the consumer gave up (:meth:`cancel`) AND the
        producer has ended -- whichever comes last; never, for a stream read to its end.

        The target pool decides there whether a streamed answer's attempt ended as a
        client abort: by then the consumer has said why it stopped (a DIMSE client
        that left is marked client-gone before the relay cancels), whatever order the
        association's end, the relay and the upstream's last response came in."""
        d: defer.Deferred[None] = defer.Deferred()
        self._abandoned.append(d)
        self._settle()
        return d

    def _settle(self) -> None:
        if self._given_up and self._done and self._abandoned:
            waiting, self._abandoned = self._abandoned, []
            for d in waiting:
                d.callback(None)

    @defer.inlineCallbacks
    def collect(self):
        """All remaining items as a list (for small results and tests only)."""
        out = []
        while True:
            item = yield self.next()
            if item is None:
                return out
            out.append(item)


class BoundedResultStream(ResultStream):
    """A result stream that counts the bytes of the instances queued in it and lets a
    waiting producer go on (:meth:`room`) once the consumer has taken enough of them.

    What bounds memory and staging when a consumer reads slowly: ``dicom_scu`` waits
    for room before it answers the PACS's next C-STORE, and the ``deidentify``
    middleware before it takes the next instance from its source.  Items handed
    straight to a waiting :meth:`next` or a listener (:meth:`listen`) are never queued,
    so never counted."""

    def __init__(self, on_cancel=None, limit: int = 128 * 1024 * 1024):
        super().__init__(on_cancel=on_cancel)
        self.limit = limit
        self.queued_bytes = 0
        self._room: list[defer.Deferred] = []

    def put(self, item) -> None:
        if self._listener is None and self._waiting is None and isinstance(item, DicomInstance):
            self.queued_bytes += item.size
        super().put(item)

    def next(self) -> defer.Deferred:
        if self._items and isinstance(self._items[0], DicomInstance):
            self.queued_bytes -= self._items[0].size
            if self.queued_bytes < self.limit and self._room:
                self._wake()
        return super().next()

    def listen(self, on_item, encoded: tuple | None = None) -> defer.Deferred:
        self.queued_bytes = 0  # what is queued is handed over now, and nothing queues from now on
        ended = super().listen(on_item, encoded)
        self._wake()
        return ended

    def room(self) -> defer.Deferred:
        """Fires once the queued instances are under the limit (at once when they are)."""
        if self.queued_bytes < self.limit or self.cancelled or self.done:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._room.append(d)
        return d

    def _wake(self) -> None:
        waiting, self._room = self._room, []
        for d in waiting:
            d.callback(None)

    def cancel(self) -> None:
        super().cancel()
        self._wake()
