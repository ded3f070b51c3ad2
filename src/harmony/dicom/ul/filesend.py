"""Sending a data set from a file as P-DATA-TF PDUs, by ``sendfile`` when the
connection allows it.

Why: every instance Harmony sends on (a C-GET or C-MOVE sub-operation, a
forwarded C-STORE) is a file it keeps or staged, and the peer's answer gates
the next one (one outstanding operation per association).  Read into Python,
cut into PDUs and handed to Twisted, a 130 KB instance was copied four times
in user space and left only at the reactor's next turn, in 128 KiB
``send()`` calls, one turn each (bench/dimse, issue 13).  On a plain TCP
connection (:func:`harmony.compat.twisted.direct_socket`: Twisted's buffer
empty or taken back), the PDU headers go with
``send(MSG_MORE)`` and the fragments with ``os.sendfile`` at once: no copy in
user space and nothing waits for the reactor.  When the socket is full, or
the transport is TLS, the rest goes the buffered way, paced by the
transport's back-pressure (a slow peer still holds one block of memory).

A file is one ``open`` for its whole send: the Part-10 header is skipped by
reading its group length from the same descriptor.
"""

from __future__ import annotations

import os
import socket
import struct

from harmony.dicom.ul import pdu

#: Bytes of a Part-10 file read to find where its data set starts (preamble, DICM,
#: the (0002,0000) group length element).
_HEAD = 132 + 12
_PDV_HEADER = struct.Struct(">BxIIBB")
#: Fragments at least this large go by ``sendfile`` (their PDU header sent before);
#: smaller ones are read and sent with their headers, a batch per ``sendmsg``.
SENDFILE_MIN = 256 * 1024
#: Most bytes read into memory at once for a batch of small fragments or a
#: buffered block (what a slow peer can make Harmony hold per association).
BATCH = 1024 * 1024


def dataset_start(fd: int) -> int:
    """Where the data set starts in the Part-10 file open at *fd* (after preamble,
    ``DICM`` and group 0002); pydicom reads the header when it is not the common
    shape (group length first)."""
    head = os.pread(fd, _HEAD, 0)
    if len(head) == _HEAD and head[128:132] == b"DICM" and head[132:138] == b"\x02\x00\x00\x00UL":
        (group_length,) = struct.unpack_from("<I", head, 140)
        return _HEAD + group_length
    from pydicom.filereader import read_preamble

    from harmony.compat.pydicom import read_file_meta_info
    with os.fdopen(os.dup(fd), "rb") as f:
        read_preamble(f, False)
        read_file_meta_info(f)
        return f.tell()


class Plan:
    """The P-DATA-TF PDUs carrying bytes *start*..*end* of a file, one PDV each of at
    most *fragment* bytes (an empty data set is one empty last fragment); PDU *i* is
    ``(header, file offset, length)``, worked out when asked (a 4 GiB file in 16 KiB
    fragments must not be a list of 262,144 tuples)."""

    __slots__ = ("context_id", "start", "end", "fragment", "count")

    def __init__(self, context_id: int, start: int, end: int, fragment: int):
        self.context_id, self.start, self.end, self.fragment = context_id, start, end, fragment
        self.count = max(1, -(-(end - start) // fragment))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[bytes, int, int]:
        offset = self.start + index * self.fragment
        n = min(self.fragment, self.end - offset)
        control = 0x02 if index == self.count - 1 else 0x00
        return _PDV_HEADER.pack(pdu.P_DATA_TF, n + 6, n + 2, self.context_id, control), offset, n

    def buffers(self, fd: int, index: int, budget: int = BATCH) -> tuple[list, int]:
        """PDUs *index*.. as a list of headers and views of one read, up to about
        *budget* bytes of data and at least one PDU; and the index after the last."""
        first = self[index]
        count = max(1, min(budget // self.fragment, self.count - index))
        last_end = min(self.start + (index + count) * self.fragment, self.end)
        data = memoryview(os.pread(fd, last_end - first[1], first[1]))
        if len(data) < last_end - first[1]:
            raise OSError(f"the file ended {last_end - first[1] - len(data)} bytes early")
        parts: list = []
        for i in range(index, index + count):
            header, offset, n = self[i]
            parts += (header, data[offset - first[1]:offset - first[1] + n])
        return parts, index + count

    def block(self, fd: int, index: int, budget: int = BATCH) -> tuple[bytes, int]:
        """:meth:`buffers` joined (for Twisted, which takes bytes)."""
        parts, following = self.buffers(fd, index, budget)
        return b"".join(parts), following


def send_direct(sock: socket.socket, fd: int, pdus: Plan, prefix: bytes = b"") -> tuple[int, bytes]:
    """Send *prefix*, then *pdus* from *fd*, on the non-blocking *sock* until all went
    or the socket is full.  Returns ``(index, rest)``: *rest* is what was not sent of
    the prefix or of the PDUs before *index* (to go the buffered way, then PDUs from
    *index* on); ``(len(pdus), b"")`` when everything went.

    Up to :data:`BATCH` bytes of data go in one ``sendmsg`` with the prefix (one
    read, no join: a 130 KB instance with its command and the previous pending
    response is one syscall and one wake-up of the peer); fragments of
    :data:`SENDFILE_MIN` and more go by ``sendfile``."""
    out = sock.fileno()
    index = 0
    pending = [prefix] if prefix else []
    while index < len(pdus):
        header, offset, length = pdus[index]
        if length >= SENDFILE_MIN:
            parts = pending + [header]
            sent = _sendmsg(sock, parts, socket.MSG_MORE)
            if sent < _size(parts):
                return index + 1, _rest(parts, sent) + os.pread(fd, length, offset)
            pending = []
            done = 0
            while done < length:
                try:
                    n = os.sendfile(out, fd, offset + done, length - done)
                except (BlockingIOError, InterruptedError):
                    n = 0
                if n == 0:
                    return index + 1, os.pread(fd, length - done, offset + done)
                done += n
            index += 1
            continue
        buffers, following = pdus.buffers(fd, index, BATCH)
        parts = pending + buffers
        sent = _sendmsg(sock, parts, socket.MSG_MORE if following < len(pdus) else 0)
        if sent < _size(parts):
            return following, _rest(parts, sent)
        pending = []
        index = following
    if pending:   # cannot happen (a plan has a PDU at least); kept for safety
        sent = _sendmsg(sock, pending, 0)
        return len(pdus), _rest(pending, sent)
    return len(pdus), b""


def _size(parts) -> int:
    return sum(len(p) for p in parts)


def _rest(parts, sent: int) -> bytes:
    """The bytes of *parts* after the first *sent*."""
    out = []
    for part in parts:
        if sent >= len(part):
            sent -= len(part)
            continue
        out.append(part[sent:])
        sent = 0
    return b"".join(out)


def _sendmsg(sock: socket.socket, parts, flags: int) -> int:
    try:
        return sock.sendmsg(parts, (), flags)
    except (BlockingIOError, InterruptedError):
        return 0
