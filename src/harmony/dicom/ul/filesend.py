"""Sending a data set from a file as P-DATA-TF PDUs, by ``sendfile`` when the
connection allows it.

Why: every instance Harmony sends on (a C-GET or C-MOVE sub-operation, a
forwarded C-STORE) is a file it keeps or staged, and the peer's answer gates
the next one (one outstanding operation per association).  Read into Python,
cut into PDUs and handed to Twisted, a 130 KB instance was copied four times
in user space and left only at the reactor's next turn, in 128 KiB
``send()`` calls, one turn each (bench/dimse, issue 13).  On a plain TCP
connection whose Twisted buffer is empty, the PDU headers go with
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

from twisted.internet import tcp

from harmony.dicom.ul import pdu

#: Bytes of a Part-10 file read to find where its data set starts (preamble, DICM,
#: the (0002,0000) group length element).
_HEAD = 132 + 12
_PDV_HEADER = struct.Struct(">BxIIBB")
#: Fragments at least this large go by ``sendfile`` (their PDU header sent on its
#: own); smaller ones are read and joined with their headers, a batch per ``send``.
SENDFILE_MIN = 64 * 1024
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

    def block(self, fd: int, index: int, budget: int = BATCH) -> tuple[bytes, int]:
        """PDUs *index*.. as bytes (one read, one join), up to about *budget* bytes of
        data and at least one PDU; returns (bytes, the index after the last one)."""
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
        return b"".join(parts), index + count


def direct_socket(transport) -> socket.socket | None:
    """The socket of *transport* when bytes may be written to it directly now:
    plain TCP (not TLS), connected, and nothing of Twisted's still buffered
    (flushed here when there is: a response written just before).  ``None``
    means: use the transport."""
    if not flush(transport):
        return None
    return transport.socket


def flush(transport) -> bool:
    """Write what *transport* buffered now, as the reactor would at its next turn
    (``doWrite``; an error it meets the reactor meets again there), when it is plain
    TCP: for an answer a peer waits on before it sends more.  True when nothing is
    left buffered."""
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
        return False
    if not transport.connected or transport.disconnecting:
        return False
    if _buffered(transport):
        transport.doWrite()
        return not _buffered(transport)
    return True


def _buffered(transport) -> bool:
    # Twisted keeps what write() was given in dataBuffer (from offset) and in
    # _tempDataBuffer; an attribute missing means "assume buffered" (the safe way).
    data = getattr(transport, "dataBuffer", None)
    offset = getattr(transport, "offset", None)
    temp = getattr(transport, "_tempDataLen", None)
    if data is None or offset is None or temp is None:
        return True
    return len(data) > offset or temp > 0


def send_direct(sock: socket.socket, fd: int, pdus: Plan, prefix: bytes = b"") -> tuple[int, bytes]:
    """Send *prefix*, then *pdus* from *fd*, on the non-blocking *sock* until all went
    or the socket is full.  Returns ``(index, rest)``: *rest* is what was not sent of
    the prefix or of the PDUs before *index* (to go the buffered way, then PDUs from
    *index* on); ``(len(pdus), b"")`` when everything went."""
    out = sock.fileno()
    index = 0
    pending = prefix
    while index < len(pdus):
        header, offset, length = pdus[index]
        if length >= SENDFILE_MIN:
            chunk = pending + header
            sent = _send(sock, chunk, socket.MSG_MORE)
            if sent < len(chunk):
                return index + 1, chunk[sent:] + os.pread(fd, length, offset)
            pending = b""
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
        block, following = pdus.block(fd, index, BATCH // 4)
        chunk = pending + block
        sent = _send(sock, chunk, socket.MSG_MORE if following < len(pdus) else 0)
        if sent < len(chunk):
            return following, chunk[sent:]
        pending = b""
        index = following
    if pending:   # an empty plan cannot happen (one PDU at least); kept for safety
        sent = _send(sock, pending, 0)
        return len(pdus), pending[sent:]
    return len(pdus), b""


def _send(sock: socket.socket, data: bytes, flags: int) -> int:
    try:
        return sock.send(data, flags)
    except (BlockingIOError, InterruptedError):
        return 0
