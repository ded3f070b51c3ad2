"""Response bodies made of stored files, handed to the socket with ``os.sendfile``.

Why it exists: a WADO-RS study retrieve from the archive was copying bytes
around.  Each file was read into Python, framed as an HTTP chunk by
twisted.web's ``Request.write`` and joined into the TCP transport's buffer,
and then the kernel copied it into the socket.  In bench/archive's profile,
27 % of the samples were socket writes and 7 % file reads.  ``os.sendfile``
moves a page-cached file into the socket inside the kernel.  twisted.web
cannot do that itself: ``Request.write`` frames every write, and the transport
owns the socket and its buffer.

How it works:

- twisted.web still writes the response head, so the status, the headers,
  chunked or not, and keep-alive are decided there as usual.
- For that one write the transport's ``bufferSize`` is 0.  Its documented
  producer contract then pauses this body as soon as the head is buffered,
  and resumes it when the buffer is empty.
- From then on the body owns the socket until its end.  The chunk framing and
  each piece's head go out with ``send`` (``MSG_MORE`` when a file follows),
  and the file bytes with ``sendfile``.
- It waits for writability on a duplicate of the socket's descriptor, which
  it registers with the reactor (``IReactorFDSet.addWriter``).  A full socket
  pauses the body until the client reads.  So a slow reader costs no memory:
  one open file and nothing buffered.
- Each reactor turn sends at most :data:`TURN_BYTES`.
- At the end it hands back to twisted.web, whose ``finish`` writes the last
  chunk.

It falls back to copying, with the same bytes on the wire, where ``sendfile``
cannot be used:

- a TLS connection (sendfile cannot go through TLS);
- a body wrapped on its way (gzip, :mod:`harmony.web.coding`);
- a consumer that is not a twisted.web request on a plain TCP or UNIX
  transport;
- a HEAD request;
- ``HARMONY_SENDFILE=0``, for A/B runs.

Failures:

- A file shorter than the size given for it fails the body, whichever path is
  used, and the HTTP layer cuts the connection.  A short part must never look
  complete.
- A send that fails (the client reset or closed) aborts the connection.
  twisted.web then reports the request as lost, and it is counted as the
  client's doing (``notifyFinish``, :func:`harmony.errors.mark_client_gone`).
  The stop that follows closes the open file and releases the piece.

The API: :class:`FileBody`, an ``IBodyProducer``, reads :class:`Piece`\\ s
from a ``next_piece()`` callable.  ``harmony.dicomweb.multipart.MultipartWriter``
is one, and any staged-file answer can be another.

Staged files (``Piece.discard``): a file that is deleted once sent, e.g. an
instance the DICOMweb bridge retrieved over DIMSE into memory-backed staging.
Its release (the unlink) runs first, on the reactor, so the file is gone from
the folder the moment the piece is done; the descriptor's close, which is when
tmpfs frees the file's pages, runs on one background thread (:func:`close_later`).
That freeing was 7 % of Harmony's CPU in a WADO-RS retrieve through the bridge
(perf, bench/dimse/retrieve.py), all of it on the reactor thread.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections.abc import Callable

import attr
from twisted.internet import defer, tcp
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IReactorFDSet, IWriteDescriptor
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES, Request
from zope.interface import implementer

from harmony.envelope import CooperativeProducer

#: The copying path reads and writes files in blocks of this size: one read for
#: a typical CT or MR slice, few enough writes that the per-write cost stays
#: small (bench/archive).
CHUNK = 256 * 1024
#: At most this many bytes go to one socket in one reactor turn: a fast client
#: on loopback never makes the socket full, and other connections must get turns.
TURN_BYTES = 1024 * 1024


#: Bytes this process has sent with ``sendfile`` (a diagnostic; tests read it).
spliced_total = 0
#: Bytes of in-memory pieces (``Piece.buffers``) this process sent with ``sendmsg`` (likewise).
sent_from_memory_total = 0


def enabled() -> bool:
    """``HARMONY_SENDFILE=0`` sends every body through the copying path (A/B runs)."""
    return os.environ.get("HARMONY_SENDFILE", "1") != "0"


@attr.s(auto_attribs=True, slots=True)
class Piece:
    """The next stretch of a :class:`FileBody`: *head* bytes, then *size*
    bytes of the open file *fd*, read from its start.  The body owns *fd* once it has
    the piece: it closes the fd, and calls *release* once the piece is sent
    or abandoned."""

    head: bytes
    fd: int | None = None
    size: int = 0
    release: Callable[[], object] | None = None
    #: *release* deletes the file: it runs before the descriptor is closed, and
    #: the close (where the file's pages are freed) is left to :func:`close_later`.
    discard: bool = False
    #: Bytes held in memory sent after *head* instead of a file (*fd* is then None
    #: and *size* their total): with ``sendmsg``, no copy in Python.
    buffers: list | None = None

    def close(self) -> None:
        fd, self.fd = self.fd, None
        self.buffers = None
        release, self.release = self.release, None
        if self.discard:
            if release is not None:
                release()
            if fd is not None:
                close_later(fd)
            return
        if fd is not None:
            os.close(fd)
        if release is not None:
            release()


def file_piece(head: bytes, path, release=None, *, discard: bool = False) -> Piece:
    """A :class:`Piece` for the file at *path*.  Its size is taken from the
    open file, so the size announced is the size sent, even if the path is
    replaced meanwhile.  *discard*: *release* deletes the file (see :class:`Piece`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        raise
    return Piece(head, fd, size, release, discard)


class _Closer:
    """One daemon thread closing the descriptors of deleted files: the last
    close of an unlinked file frees its pages (tmpfs: ~50 us for a 512 KiB
    instance), work that need not hold up the reactor.  Handing a descriptor
    over is a queue put; nothing comes back to the reactor."""

    def __init__(self):
        self._queue: queue.SimpleQueue[int | threading.Event] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def close(self, fd: int) -> None:
        self._start()
        self._queue.put(fd)

    def _start(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    thread = threading.Thread(target=self._run, name="harmony-sendfile-closer", daemon=True)
                    thread.start()
                    self._thread = thread

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                os.close(item)
            except OSError:
                pass  # nothing to do about a failed close of a deleted file

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every descriptor handed over so far is closed (tests, shutdown)."""
        self._start()
        done = threading.Event()
        self._queue.put(done)   # served in order, after the descriptors before it
        return done.wait(timeout)


_closer = _Closer()


def close_later(fd: int) -> None:
    """Close *fd* on the closer thread (the file was deleted; see :class:`_Closer`)."""
    _closer.close(fd)


class FileBody(CooperativeProducer):
    """An ``IBodyProducer`` that writes the :class:`Piece`\\ s ``next_piece()``
    gives.  ``next_piece()`` returns a Deferred that fires with a piece, or
    with ``None`` at the end.  A failure fails the body.

    *on_stop* is called when the consumer gives up before the end, e.g. to
    cancel the source.  ``spliced`` counts the bytes sent with ``sendfile``.
    """

    def __init__(self, next_piece: Callable[[], defer.Deferred], on_stop: Callable[[], object] | None = None):
        self.next_piece = next_piece
        self.on_stop = on_stop
        self.spliced = 0
        self._pump: _SocketPump | None = None
        self._gave_up = False

    def _stopped(self):
        self._gave_up = True
        if self.on_stop is not None:
            on_stop, self.on_stop = self.on_stop, None
            on_stop()

    # ---------------------------------------------------------------- IBodyProducer

    def startProducing(self, consumer):
        transport = _sendfile_transport(consumer, self)
        if transport is None:
            return super().startProducing(consumer)
        self._pump = _SocketPump(self, consumer, transport)
        return self._pump.start()

    def pauseProducing(self):
        if self._pump is not None:
            self._pump.pause()
        else:
            super().pauseProducing()

    def resumeProducing(self):
        if self._pump is not None:
            self._pump.resume()
        else:
            super().resumeProducing()

    def stopProducing(self):
        if self._pump is not None:
            self._pump.stop()
            self._stopped()
        else:
            super().stopProducing()

    # ------------------------------------------------------------- copying path

    def _produce(self, consumer):
        while True:
            piece = yield from self._result(self.next_piece().addCallback(self._unless_stopped))
            if piece is None:
                return
            try:
                if piece.buffers is not None:
                    yield from _buffer_chunks(consumer, piece.buffers, piece.head)
                elif piece.fd is None:
                    if piece.head:
                        consumer.write(piece.head)
                else:
                    yield from _fd_chunks(consumer, piece.fd, piece.size, piece.head)
            finally:
                piece.close()

    def _unless_stopped(self, piece):
        """A piece that arrives once the body was stopped is let go (its staged file
        deleted, its descriptor closed): the stopped generator never takes it."""
        if self._gave_up and piece is not None:
            piece.close()
            return None
        return piece


def _fd_chunks(consumer, fd: int, size: int, first: bytes):
    """Write *size* bytes of *fd* to *consumer* in :data:`CHUNK` blocks, the
    first prefixed with *first*.  A pause or a stop can come between blocks.
    A file that ends early fails the body."""
    left = size
    prefix = first
    offset = 0
    while left > 0:
        block = os.pread(fd, min(CHUNK, left), offset)
        if not block:
            raise OSError(f"the file ended {left} bytes early")
        left -= len(block)
        offset += len(block)
        consumer.write(prefix + block if prefix else block)
        prefix = b""
        yield None
    if prefix:
        consumer.write(prefix)


def _buffer_chunks(consumer, buffers: list, first: bytes):
    """Write *first* and then *buffers* to *consumer*, about :data:`CHUNK` at a time."""
    out, held = [first] if first else [], len(first)
    for buf in buffers:
        out.append(buf)
        held += len(buf)
        if held >= CHUNK:
            consumer.write(b"".join(out))
            out, held = [], 0
            yield None
    if out:
        consumer.write(b"".join(out))


def _sendfile_transport(consumer, body) -> tcp.Connection | None:
    """The TCP transport under *consumer* when *body* may write to its socket
    itself, else ``None`` (copy)."""
    if not enabled() or not isinstance(consumer, Request):
        return None
    if consumer.method == b"HEAD" or consumer.code in NO_BODY_CODES or consumer.finished or consumer.startedWriting:
        return None  # no body, or a head already out: nothing would resume us after it
    # Registered as the request's streaming producer (harmony.web.bridge does):
    # the transport's pause/resume must reach this body.
    if consumer.producer is not body or not consumer.streamingProducer:
        return None
    transport = getattr(consumer.channel, "transport", None)
    # A TLS connection's transport is the TLS protocol (not a tcp.Connection),
    # or a tcp.Connection with TLS started on it.
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
        return None
    if not IReactorFDSet.providedBy(transport.reactor):
        return None
    return transport


_HEAD, _SENDING, _DONE = "head", "sending", "done"
#: Buffers given to one ``sendmsg`` at most (under the system's IOV_MAX).
_IOV_BATCH = 512


def drop_sent(views: list, sent: int) -> None:
    """Drop *sent* bytes from the front of *views* (memoryviews), after a ``sendmsg``
    or ``writev`` took that many."""
    while sent and views:
        n = views[0].nbytes
        if sent >= n:
            sent -= n
            views.pop(0)
        else:
            views[0] = views[0][sent:]
            sent = 0


@implementer(IWriteDescriptor)
class _SocketPump:
    """The sendfile path of one :class:`FileBody`: state and reactor descriptor.

    States:

    - ``head``: waiting for the transport to send the response head.
    - ``sending``: the socket is ours.
    - ``done``: finished, failed or stopped.
    """

    def __init__(self, body: FileBody, request: Request, transport: tcp.Connection):
        self.body = body
        self.request = request
        self.transport = transport
        self.reactor = transport.reactor
        self.finished: defer.Deferred[None] = defer.Deferred()
        self.state = _HEAD
        self._sock: socket.socket | None = None
        self._writing = False
        self._out = b""  # framing and piece heads still to send
        self._more = False  # a file follows _out (MSG_MORE)
        self._tail = b""  # the CRLF that closes the current chunk, sent with the next framing
        self._piece: Piece | None = None
        self._offset = 0
        self._left = 0
        self._views: list[memoryview] = []  # a piece's buffers still to send
        self._waiting = False  # next_piece() has not fired yet
        self._ended = False
        self._chunked = False
        self._saved_buffer_size = transport.__dict__.get("bufferSize")

    # ------------------------------------------------------------------ start-up

    def start(self) -> defer.Deferred:
        # bufferSize 0: the head, once buffered, pauses us, and resume() then
        # means the transport's buffer is empty: the socket is ours to write.
        self.transport.bufferSize = 0
        self.request.write(b"")
        return self.finished

    def pause(self):
        pass  # the only pause we heed is the head's: resume() ends it

    def resume(self):
        if self.state != _HEAD:
            return
        self._restore_buffer_size()
        if self.request._disconnected or self.request.finished:
            return  # stop() follows (connectionLost)
        self.state = _SENDING
        self._chunked = bool(self.request.chunked)
        try:
            self._sock = socket.socket(fileno=os.dup(self.transport.fileno()))
        except OSError:
            self._lost()
            return
        self._pump()

    def _restore_buffer_size(self):
        if self._saved_buffer_size is None:
            self.transport.__dict__.pop("bufferSize", None)
        else:
            self.transport.bufferSize = self._saved_buffer_size

    # ------------------------------------------------------------ IWriteDescriptor

    def fileno(self) -> int:
        return -1 if self._sock is None else self._sock.fileno()

    def doWrite(self):
        self._pump()

    def connectionLost(self, reason):
        # The reactor saw an error or hang-up on our descriptor.
        self._writing = False
        self._lost()

    def logPrefix(self) -> str:
        return "harmony.web.sendfile"

    # -------------------------------------------------------------------- sending

    def _want_write(self):
        if not self._writing:
            self._writing = True
            self.reactor.addWriter(self)

    def _drop_write(self):
        if self._writing:
            self._writing = False
            self.reactor.removeWriter(self)

    def _pump(self):
        global spliced_total, sent_from_memory_total
        sock = self._sock
        budget = TURN_BYTES
        while self.state == _SENDING and sock is not None:
            try:
                if self._out:
                    sent = sock.send(self._out, socket.MSG_MORE if self._more else 0)
                    self._out = self._out[sent:]
                    budget -= sent
                    if self._out:
                        self._want_write()  # the socket is full
                        return
                elif self._views:
                    sent = sock.sendmsg(self._views[:_IOV_BATCH])
                    drop_sent(self._views, sent)
                    sent_from_memory_total += sent
                    self.request.sentLength += sent
                    budget -= sent
                    if self._views:
                        if budget > 0:
                            self._want_write()  # the socket is full
                            return
                elif self._left:
                    sent = os.sendfile(sock.fileno(), self._piece.fd, self._offset, min(self._left, budget))
                    if not sent:
                        self._fail(OSError(f"the file ended {self._left} bytes early"))
                        return
                    self._offset += sent
                    self._left -= sent
                    self.body.spliced += sent
                    spliced_total += sent
                    self.request.sentLength += sent
                    budget -= sent
                elif self._ended:
                    self._finish()
                    return
                else:
                    if self._piece is not None:
                        self._piece.close()
                        self._piece = None
                    if not self._next():
                        return
                    continue
            except BlockingIOError:
                self._want_write()
                return
            except OSError:
                self._lost()
                return
            if budget <= 0:
                self._want_write()  # the rest in the next turn
                return

    def _next(self) -> bool:
        """Ask for the next piece.  True when it is here already."""
        box: list = []
        d = self.body.next_piece()
        d.addBoth(box.append)  # the piece (or Failure) lands in box; d's own result is None
        if box:
            return self._take(box[0])
        self._drop_write()
        self._waiting = True
        d.addCallback(lambda _: self._arrived(box[0]))
        return False

    def _arrived(self, result):
        self._waiting = False
        if self._take(result):
            self._pump()

    def _take(self, result) -> bool:
        if isinstance(result, Failure):
            if self.state == _SENDING:
                self._fail(result)
            return False
        if self.state != _SENDING:
            if result is not None:
                result.close()  # stopped while it was on its way
            return False
        if result is None:
            self._ended = True
            self._out, self._more = self._tail, False
            self._tail = b""
            return True
        if result.buffers is not None:
            self._views = [memoryview(b).cast("B") for b in result.buffers if len(b)]
            size = sum(v.nbytes for v in self._views)
            self._piece, self._offset, self._left = result, 0, 0
        else:
            size = result.size if result.fd is not None else 0
            self._piece, self._offset, self._left = result, 0, size
        head = result.head
        if self._chunked and (head or size):
            self._out = self._tail + b"%x\r\n" % (len(head) + size) + head
            self._tail = b"\r\n"
        else:
            self._out = head
        self._more = size > 0
        self.request.sentLength += len(head)
        return True

    # ------------------------------------------------------------------- endings

    def _close(self):
        self.state = _DONE
        self._views = []
        self._drop_write()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._piece is not None:
            self._piece.close()
            self._piece = None

    def _finish(self):
        self._close()
        self.finished.callback(None)  # harmony.web.bridge finishes the request: the last chunk

    def _fail(self, why):
        self._close()
        self.finished.errback(why if isinstance(why, Failure) else Failure(why))

    def _lost(self):
        """A send failed: the client is gone.  Cutting the connection makes
        twisted.web report the request lost (a client abort), and stop() follows."""
        if self.state == _DONE:
            return
        self._close()
        self.transport.abortConnection()

    def stop(self):
        if self.state == _HEAD:
            self._restore_buffer_size()
        self._close()
        if not self.finished.called:
            self.finished.errback(Failure(ConnectionLost("the client went away mid-body")))
