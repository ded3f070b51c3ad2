"""Streaming a Twisted body producer into a store temp file without blocking
the reactor or buffering the body: chunks are queued, written by a storage
thread one batch at a time, and the producer is paused while the queue is over
a high-water mark."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IConsumer
from twisted.python.failure import Failure
from zope.interface import implementer

from harmony.storage.files import TempFile

HIGH_WATER = 4 * 1024 * 1024


@implementer(IConsumer)
class ThreadedFileConsumer:
    def __init__(self, store):
        self.store = store
        self.tmp = TempFile(store.tmp_dir, store.guard, store.fsync)
        self._opened = False
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._writing = False
        self._paused = False
        self._producer = None
        self._producer_done = False
        self._error: Failure | None = None
        self._result: defer.Deferred = defer.Deferred()

    def consume(self, producer) -> defer.Deferred:
        """Fires with the closed :class:`TempFile` once the body is written (its data
        is synced when the store places it, alongside the index commit)."""
        self._producer = producer
        producer.startProducing(self).addCallbacks(self._body_done, self._fail)
        return self._result

    # IConsumer
    def registerProducer(self, producer, streaming):
        self._producer = producer

    def unregisterProducer(self):
        pass

    def write(self, data: bytes):
        if self._error is not None:
            return
        self._pending.append(bytes(data))
        self._pending_size += len(data)
        if self._pending_size > HIGH_WATER and not self._paused and self._producer is not None:
            self._paused = True
            self._producer.pauseProducing()
        if not self._writing:
            self._flush()

    def _write_batch(self, batch):
        self.store.open_sync()
        if not self._opened:
            self.tmp.__enter__()
            self._opened = True
        for chunk in batch:
            self.tmp.write(chunk)

    def _flush(self):
        batch, self._pending, self._pending_size = self._pending, [], 0
        self._writing = True
        self.store.run(self._write_batch, batch).addCallbacks(self._written, self._fail)

    def _written(self, _):
        self._writing = False
        if self._error is not None:
            return
        if self._pending:
            self._flush()
            return
        if self._paused:
            self._paused = False
            self._producer.resumeProducing()
        if self._producer_done:
            self._finish()

    def _body_done(self, _):
        self._producer_done = True
        if not self._writing:
            if self._pending:
                self._flush()
            else:
                self._finish()

    def _finish(self):
        def close():
            self.store.open_sync()
            if not self._opened:
                self.tmp.__enter__()
                self._opened = True
            self.tmp.close(sync=False)
            return self.tmp

        self.store.run(close).addCallbacks(self._result.callback, self._fail)

    def _fail(self, failure):
        if self._error is not None:
            return
        self._error = failure
        if self._producer is not None and not self._producer_done:
            try:
                self._producer.stopProducing()
            except Exception:  # noqa: BLE001 - the producer may already be finished
                pass

        def discard():
            if self._opened:
                self.tmp.__exit__(None, None, None)

        self.store.run(discard).addBoth(lambda _: self._result.errback(failure))
