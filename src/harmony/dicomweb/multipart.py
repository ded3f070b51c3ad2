"""multipart/related bodies: a streaming writer and an incremental STOW parser.

The writer is an ``IBodyProducer`` that asks for the next part only when the
previous one is written, so a WADO-RS answer's first part leaves while the
PACS is still sending the rest, and a slow client pauses the whole chain.
File parts go to the socket with ``os.sendfile`` where the connection allows
(:mod:`harmony.web.sendfile`).
The parser is python-multipart's incremental ``MultipartParser`` (it accepts
parts without Content-Disposition, as DICOMweb sends them), writing each part
to its own file: an upload of any size never sits in memory.  A small body
already held whole (at most 256 KiB, read by the HTTP layer) in the canonical
form every STOW-RS client sends is cut with ``bytes.find`` into
:class:`HeldPart` s instead (:func:`split_held`): no part files at all, for a
consumer that takes instances as bytes.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from typing import TYPE_CHECKING

import attr
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser
from twisted.internet import defer
from twisted.python.failure import Failure

if TYPE_CHECKING:  # a TypedDict python-multipart declares for type checkers only
    from python_multipart.multipart import MultipartCallbacks

from harmony.errors import BadRequest, PayloadTooLarge
from harmony.storage.files import write_all
from harmony.web.sendfile import CHUNK, FileBody, Piece, file_piece

__all__ = ["CHUNK", "HeldPart", "MultipartWriter", "Part", "ReceivedPart", "StowParser", "multipart_bytes",
           "new_boundary", "parse_body", "split_held"]

PREAMBLE_LIMIT = 64 * 1024


def new_boundary() -> str:
    return uuid.uuid4().hex


@attr.s(auto_attribs=True)
class Part:
    """One part to write: in-memory ``data`` or a file at ``path``."""

    content_type: str
    data: bytes | None = None
    path: object = None
    headers: dict = attr.Factory(dict)
    #: Called once the part is written (or abandoned): releases staged files.
    release: object = None
    #: ``release`` deletes the file at ``path`` (a staged instance): the file's
    #: pages are then freed off the reactor (``harmony.web.sendfile.Piece.discard``).
    staged: bool = False
    #: The part's bytes held in memory (buffers, in order) instead of ``data`` or a file:
    #: sent with ``sendmsg``, never joined (``harmony.web.sendfile.Piece.buffers``).
    buffers: list | None = None

    def done(self):
        if self.release is not None:
            rel, self.release = self.release, None
            rel()


class MultipartWriter(FileBody):
    """Writes the parts ``next_part()`` yields (Deferreds firing with a
    :class:`Part`, or ``None`` at the end) as one multipart/related body.

    A :class:`harmony.web.sendfile.FileBody`: on a plain TCP connection each
    file part goes to the socket with ``os.sendfile``, its head with one send
    before it.  Elsewhere (TLS, gzip, tests' consumers) it is copied in
    :data:`CHUNK` blocks.  Either way, a failure from ``next_part`` or a file
    cut short after the head went out fails the body, and the HTTP layer cuts
    the connection: a truncated body must never look like a complete one.
    """

    def __init__(self, next_part, part_type: str, boundary: str | None = None, on_stop=None):
        super().__init__(self._next_piece, on_stop)
        self.next_part = next_part
        self.part_type = part_type
        self.boundary = boundary or new_boundary()
        self.parts_written = 0
        self._delim = b"--" + self.boundary.encode("ascii")
        # A part's closing CRLF rides with the next part's head: one send, or
        # one write, per part (three per part cost a retrieve of small
        # instances ~10 %, bench/archive).
        self._lead = b""
        self._closed = False
        self._part_out = False

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="{self.part_type}"; boundary={self.boundary}'

    def _next_piece(self) -> defer.Deferred:
        if self._part_out:
            self._part_out = False
            self.parts_written += 1  # the previous part is out: its next piece is asked for
        if self._closed:
            return defer.succeed(None)
        return self.next_part().addCallback(self._piece)

    def _piece(self, part: Part | None) -> Piece:
        if part is None:
            self._closed = True
            return Piece(self._lead + self._delim + b"--\r\n")
        try:
            head = [f"Content-Type: {part.content_type}"]
            head += [f"{k}: {v}" for k, v in part.headers.items()]
            first = self._lead + self._delim + b"\r\n"
            self._lead = b"\r\n"
            self._part_out = True
            if part.buffers is not None:
                size = sum(len(b) for b in part.buffers)
                head.append(f"Content-Length: {size}")
                return Piece(first + "\r\n".join(head).encode("latin-1") + b"\r\n\r\n", size=size,
                             release=part.done, buffers=part.buffers)
            if part.data is not None:
                head.append(f"Content-Length: {len(part.data)}")
                return Piece(first + "\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + part.data,
                             release=part.done)
            # One open file for the length and the bytes: the length announced
            # is the length sent, whatever happens to the path.
            piece = file_piece(b"", part.path, release=part.done, discard=part.staged)
            head.append(f"Content-Length: {piece.size}")
            piece.head = first + "\r\n".join(head).encode("latin-1") + b"\r\n\r\n"
            return piece
        except BaseException:
            part.done()
            raise


def multipart_bytes(parts: list[Part], part_type: str, boundary: str | None = None) -> tuple[bytes, str]:
    """A small multipart body in memory (frames, bulk data): (body, content type)."""
    boundary = boundary or new_boundary()
    delim = b"--" + boundary.encode("ascii")
    out = []
    for p in parts:
        head = [f"Content-Type: {p.content_type}"] + [f"{k}: {v}" for k, v in p.headers.items()]
        head.append(f"Content-Length: {len(p.data)}")
        out += [delim, b"\r\n", "\r\n".join(head).encode("latin-1"), b"\r\n\r\n", p.data, b"\r\n"]
    out += [delim, b"--\r\n"]
    return b"".join(out), f'multipart/related; type="{part_type}"; boundary={boundary}'


@attr.s(auto_attribs=True)
class ReceivedPart:
    path: str
    headers: dict
    size: int = 0
    #: The part's bytes too, when the whole body was parsed in memory
    #: (:meth:`StowParser.parse_whole`): read them here, not from the file again.
    data: bytes | None = None

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def release(self):
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class HeldPart:
    """One part of a body held in memory (:func:`split_held`): its headers and bytes,
    no file (``path`` is None; nothing to release)."""

    __slots__ = ("headers", "data")
    path = None

    def __init__(self, headers: dict, data: bytes):
        self.headers = headers
        self.data = data

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def release(self):
        self.data = b""


def split_held(body: bytes, boundary: str) -> list[HeldPart] | None:
    """The parts of a whole body in memory, when it is in the canonical form
    :meth:`StowParser.parse_whole` cuts in one pass; None for anything else (an
    odd or hostile body), which then goes through :class:`StowParser` so it gets
    the same answer as ever.  Each part's bytes are a copy of its slice: what a
    DICOM scanner and the store's journal row take."""
    cuts = _canonical_parts(body, b"--" + boundary.encode("latin-1"))
    if cuts is None:
        return None
    return [HeldPart(headers, body[start:end]) for headers, start, end in cuts]


class StowParser:
    """Incremental multipart/related parser writing each part to a file in *folder*.

    ``feed(data)`` as bytes arrive, ``close()`` at the end; malformed input
    raises :class:`BadRequest` (and removes what was written).  ``max_bytes``
    bounds the whole body.
    """

    def __init__(self, boundary: str, folder, max_bytes: int | None = None, on_part=None):
        self.folder = str(folder)
        #: Called with each :class:`ReceivedPart` as soon as it is complete
        #: (a WADO-RS answer's instances can go onward one by one).
        self.on_part = on_part
        # The folder is made when the first part file needs it (see _part_file), on
        # whichever thread parses: a makedirs here ran on the reactor for every STOW-RS
        # request (three system calls and an exception, a quarter of its reactor time).
        self.parts: list[ReceivedPart] = []
        self.max_bytes = max_bytes
        self.received = 0
        self.ended = False
        self._file = None
        self._current = None
        self._field: list[bytes] = []
        self._value: list[bytes] = []
        self._delim = b"--" + boundary.encode("latin-1")
        #: Bytes before the first delimiter (an RFC 2046 preamble) are skipped
        #: here: python-multipart expects the body to open with the delimiter.
        self._preamble: bytes | None = b""
        self._boundary = boundary
        #: python-multipart's parser, made on first use: a body in canonical form
        #: (parse_whole) never needs it.
        self._incremental: MultipartParser | None = None

    @property
    def _parser(self) -> MultipartParser:
        if self._incremental is None:
            callbacks: MultipartCallbacks = {
                "on_part_begin": self._begin, "on_part_data": self._data, "on_part_end": self._end,
                "on_header_field": lambda d, s, e: self._field.append(d[s:e]),
                "on_header_value": lambda d, s, e: self._value.append(d[s:e]),
                "on_header_end": self._header_end, "on_end": self._on_end,
            }
            self._incremental = MultipartParser(self._boundary.encode("latin-1"), callbacks)
        return self._incremental

    def _part_file(self) -> tuple[int, str]:
        """A new part file in the folder (made on first need): its descriptor and path."""
        try:
            return tempfile.mkstemp(prefix="stow-", suffix=".part", dir=self.folder)
        except FileNotFoundError:
            os.makedirs(self.folder, exist_ok=True)
            return tempfile.mkstemp(prefix="stow-", suffix=".part", dir=self.folder)

    def _begin(self):
        fd, path = self._part_file()
        self._file = os.fdopen(fd, "wb")
        self._current = ReceivedPart(path, {})
        self.parts.append(self._current)

    def _header_end(self):
        name = b"".join(self._field).decode("latin-1").strip().lower()
        value = b"".join(self._value).decode("latin-1").strip()
        self._field, self._value = [], []
        if self._current is not None and name:
            self._current.headers[name] = value

    def _data(self, data, start, end):
        self._file.write(data[start:end])
        self._current.size += end - start

    def _end(self):
        if self._file is not None:
            self._file.close()
            self._file = None
            if self.on_part is not None:
                self.on_part(self._current)

    def _on_end(self):
        self.ended = True

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self.max_bytes is not None and self.received > self.max_bytes:
            self.abort()
            raise PayloadTooLarge(f"STOW-RS body exceeds {self.max_bytes} bytes")
        if self._preamble is not None:
            data = self._skip_preamble(data)
            if not data:
                return
        try:
            self._parser.write(data)
        except MultipartParseError as e:
            self.abort()
            raise BadRequest(f"malformed multipart body: {e}") from None

    def _skip_preamble(self, data: bytes) -> bytes:
        buf = self._preamble + data
        if buf.startswith(self._delim):
            self._preamble = None
            return buf
        at = buf.find(b"\n" + self._delim)
        if at >= 0:
            self._preamble = None
            return buf[at + 1:]
        if len(buf) > PREAMBLE_LIMIT:
            self.abort()
            raise BadRequest("multipart body does not contain its boundary")
        self._preamble = buf
        return b""

    def parse_whole(self, body: bytes) -> list[ReceivedPart]:
        """Parse a complete body held in memory: ``feed(body)`` then ``close()``.

        A body in the canonical form every STOW-RS client sends (CRLF lines,
        the delimiter followed by CRLF or by ``--`` at the end, ``name: value``
        header lines) is cut in one pass with ``bytes.find`` - no per-part
        parser callbacks - and each part written with one ``os.write`` to a file
        of its own, the part's bytes kept on it (:attr:`ReceivedPart.data`).
        Anything else goes through the incremental parser, byte for byte as
        :meth:`feed` would take it, so odd or hostile bodies get the same answer.
        """
        if self.max_bytes is not None and len(body) > self.max_bytes:
            self.received = len(body)
            raise PayloadTooLarge(f"STOW-RS body exceeds {self.max_bytes} bytes")
        if self.received == 0:
            cuts = _canonical_parts(body, self._delim)
            if cuts is not None:
                self.received = len(body)
                try:
                    for headers, start, end in cuts:
                        self._write_whole(headers, body[start:end])
                except BaseException:
                    self.abort()
                    raise
                self.ended = True
                return self.parts
        self.feed(body)
        return self.close()

    def _write_whole(self, headers: dict, data: bytes) -> None:
        fd, path = self._part_file()
        part = ReceivedPart(path, headers, len(data), data)
        self.parts.append(part)  # removed by abort() from here on
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        if self.on_part is not None:
            self.on_part(part)

    def close(self) -> list[ReceivedPart]:
        if self._file is not None or not self.ended:
            self.abort()
            raise BadRequest("multipart body ends before its closing boundary")
        return self.parts

    def abort(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        for p in self.parts:
            p.release()
        self.parts = []


def _canonical_parts(body: bytes, delim: bytes) -> list[tuple[dict, int, int]] | None:
    """``(headers, start, end)`` of each part of *body* when it is in canonical form
    (see :meth:`StowParser.parse_whole`), else None: the incremental parser decides."""
    if body.startswith(delim):
        pos = len(delim)
    else:  # an RFC 2046 preamble, within the incremental parser's limit
        at = body.find(b"\r\n" + delim, 0, PREAMBLE_LIMIT + len(delim) + 2)
        if at < 0:
            return None
        pos = at + 2 + len(delim)
    sep = b"\r\n" + delim
    cuts: list[tuple[dict, int, int]] = []
    while True:
        if body.startswith(b"--", pos):
            return cuts if cuts else None  # the close delimiter; an epilogue after it is ignored
        if not body.startswith(b"\r\n", pos):
            return None  # transport padding, a bare LF, or the boundary inside data
        head = pos + 2
        blank = body.find(b"\r\n\r\n", head - 2)
        if blank <= head - 2:
            return None  # a part without headers: left to the incremental parser
        headers: dict = {}
        for line in body[head:blank].split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if not colon or not name or not name.isascii() or b" " in name or b"\t" in name:
                return None  # folded, malformed or odd: the incremental parser's call
            headers[name.decode("latin-1").lower()] = value.decode("latin-1").strip()
        start = blank + 4
        end = body.find(sep, start)
        if end < 0:
            return None
        cuts.append((headers, start, end))
        pos = end + len(sep)


#: Body bytes held on the reactor while the parser's thread is busy; past this the
#: body's producer is paused (memory stays bounded however fast the client sends).
FEED_HIGH_WATER = 4 * 1024 * 1024


def _parse_all(parser: StowParser, data: bytes, finish):
    parts = parser.parse_whole(data)
    return finish(parts) if finish is not None else parts


def _close(parser: StowParser, finish):
    parts = parser.close()
    return finish(parts) if finish is not None else parts


def _feed_batch(parser: StowParser, batch: list[bytes]) -> None:
    for chunk in batch:
        parser.feed(chunk)


def parse_body(body, parser: StowParser, run=None, finish=None) -> defer.Deferred:
    """Feed a request body (bytes or an ``IBodyProducer``) to *parser* off the
    reactor; fires with the parts (or ``finish(parts)``, computed on the same
    thread) once the body is done, or fails with the parse error (nothing kept).

    The parser writes part files, so it never runs on the reactor thread:
    ``run(fn, *args)`` runs it elsewhere and returns a Deferred (default: the
    reactor's thread pool).  One call is in flight at a time, so the parser is
    used by one thread at a time, in order.  A body arriving faster than it is
    parsed pauses its producer past :data:`FEED_HIGH_WATER` bytes.
    """
    if run is None:
        from twisted.internet import threads
        run = threads.deferToThread
    if isinstance(body, (bytes, bytearray)):
        return run(_parse_all, parser, bytes(body), finish)
    return _ThreadedFeed(body, parser, run, finish).start()


class _ThreadedFeed:
    """A producer's body fed to a parser by *run*, one batch of chunks at a time."""

    def __init__(self, producer, parser: StowParser, run, finish):
        self.producer = producer
        self.parser = parser
        self.run = run
        self.finish = finish
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.feeding = False
        self.paused = False
        self.body_done = False
        self.error: Failure | None = None
        # Our own Deferred: once we stop a producer, the one its startProducing
        # returned may never fire (IBodyProducer's contract; FileBodyProducer, which
        # twisted.web bodies over 256 KB are read through, keeps it), so waiting on it
        # after a parse error left the request hanging.
        self.outcome: defer.Deferred = defer.Deferred()

    def start(self) -> defer.Deferred:
        self.producer.startProducing(self).addCallbacks(self._ended, self._fail)
        return self.outcome

    # the consumer side, as the producer sees it
    def registerProducer(self, producer, streaming):
        pass

    def unregisterProducer(self):
        pass

    def write(self, data):
        if self.error is not None or self.outcome.called:
            return
        self.pending.append(bytes(data))
        self.pending_size += len(data)
        if self.pending_size > FEED_HIGH_WATER and not self.paused:
            self.paused = True
            self.producer.pauseProducing()
        if not self.feeding:
            self._next()

    def _next(self):
        self.feeding = True
        if self.pending:
            batch, self.pending, self.pending_size = self.pending, [], 0
            self.run(_feed_batch, self.parser, batch).addCallbacks(self._fed, self._fail_fed)
        else:
            self.run(_close, self.parser, self.finish).addCallbacks(self._closed, self._fail_fed)

    def _fed(self, _):
        self.feeding = False
        if self.error is not None:
            self._abort()
        elif self.pending or self.body_done:
            self._next()
        elif self.paused:
            self.paused = False
            self.producer.resumeProducing()

    def _closed(self, parts):
        self.feeding = False
        if not self.outcome.called:
            self.outcome.callback(parts)

    def _ended(self, _):
        if self.error is None and not self.outcome.called:
            self.body_done = True
            if not self.feeding:
                self._next()

    def _fail_fed(self, failure):
        self.feeding = False
        self._fail(failure)

    def _fail(self, failure):
        if self.error is not None or self.outcome.called:
            return None
        self.error = failure
        if not self.body_done:
            try:
                self.producer.stopProducing()
            except Exception:  # noqa: BLE001 - the producer may already be finished
                pass
        if not self.feeding:  # else the batch in flight finishes first (the parser is one thread's)
            self._abort()
        return None

    def _abort(self):
        error = self.error
        self.run(self.parser.abort).addBoth(lambda _: self.outcome.errback(error))
