"""MLLP framing (HL7 v2 over TCP): ``0x0B message 0x1C 0x0D``.

A listener must not hold more than it agreed to: :class:`MllpDecoder`
refuses a message the moment it grows past ``max_message_bytes`` (not once
its end arrives) and refuses bytes outside a frame, so a peer that sends
garbage or an endless message is cut off with bounded memory.
"""

from __future__ import annotations

START = b"\x0b"
END = b"\x1c"
CR = b"\x0d"
#: Between frames only line ends and blanks are tolerated (senders add \r\n).
_BETWEEN = frozenset(b"\r\n \t")


class FramingError(ValueError):
    """The byte stream is not MLLP; the connection should be closed."""


class MessageTooLarge(FramingError):
    pass


def frame(message: bytes) -> bytes:
    return START + message + END + CR


class MllpDecoder:
    """Feed bytes as they arrive; get complete messages (without framing).

    State is the one frame being read: the bytes buffered are never more than
    ``max_message_bytes`` + 1.
    """

    def __init__(self, max_message_bytes: int = 1024 * 1024):
        self.max_message_bytes = max_message_bytes
        self._parts: list[bytes] = []
        self._size = 0
        self._in_frame = False
        self._after_end = False  # saw 0x1C, waiting for 0x0D

    @property
    def buffered(self) -> int:
        return self._size

    @property
    def idle(self) -> bool:
        """No frame half read (a connection may end here without losing anything)."""
        return not self._in_frame and not self._after_end

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        i, n = 0, len(data)
        while i < n:
            if self._after_end:
                if data[i] != 0x0D:
                    raise FramingError("0x1C not followed by 0x0D")
                self._after_end = False
                self._in_frame = False
                out.append(b"".join(self._parts))
                self._parts, self._size = [], 0
                i += 1
                continue
            if not self._in_frame:
                start = data.find(START, i)
                stray = data[i:] if start < 0 else data[i:start]
                if any(b not in _BETWEEN for b in stray):
                    raise FramingError("data outside an MLLP frame")
                if start < 0:
                    return out
                self._in_frame = True
                i = start + 1
                continue
            end = data.find(END, i)
            chunk = data[i:] if end < 0 else data[i:end]
            if START in chunk:
                raise FramingError("0x0B inside a frame")
            self._size += len(chunk)
            if self._size > self.max_message_bytes:
                self._parts = []
                raise MessageTooLarge(f"message larger than {self.max_message_bytes} bytes")
            if chunk:
                self._parts.append(chunk)
            if end < 0:
                return out
            self._after_end = True
            i = end + 1
        return out
