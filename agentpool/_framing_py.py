"""Pure-Python twin of the framing layer in ``_framing.pxi``."""

from __future__ import annotations

from . import errors as _errors
from .enums import MessageType

MAX_MESSAGE_SIZE = 16 * 1024 * 1024

_TYPE_TABLE: list[MessageType | None] = [None] * 256
for _mt in MessageType:
    _TYPE_TABLE[int(_mt)] = _mt


def encode_frame(msg_type: int, payload: bytes | bytearray | memoryview) -> bytes:
    """Frame ``payload`` as one v2 message: ``LEN(u32 BE) | TYPE | PAYLOAD``."""
    if not 0 <= msg_type <= 255 or _TYPE_TABLE[msg_type] is None:
        raise _errors.InvalidMessage(f"Unknown message type: 0x{msg_type & 0xff:02x}")
    n = len(payload)
    if n > MAX_MESSAGE_SIZE:
        raise _errors.MessageTooLarge(n, MAX_MESSAGE_SIZE)
    return (n + 1).to_bytes(4, "big") + bytes((msg_type,)) + bytes(payload)


class FrameDecoder:
    """Incremental v2 frame decoder (see the compiled twin for the contract)."""

    __slots__ = ("_buf", "_error", "_max_size", "_start")

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        if max_size < 1:
            raise ValueError("max_size must be positive")
        self._buf = bytearray()
        self._start = 0
        self._max_size = max_size
        self._error: Exception | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._start

    @property
    def failed(self) -> bool:
        return self._error is not None

    def _parse(
        self, data: bytes | bytearray, start: int, out: list[tuple[MessageType, bytes]]
    ) -> int:
        pos = start
        size = len(data)
        max_size = self._max_size
        while size - pos >= 4:
            length = int.from_bytes(data[pos : pos + 4], "big")
            if length == 0:
                self._error = _errors.InvalidMessage("Zero-length message")
                break
            if length > max_size:
                self._error = _errors.MessageTooLarge(length, max_size)
                break
            if size - pos < 5:
                break
            t = data[pos + 4]
            mt = _TYPE_TABLE[t]
            if mt is None:
                self._error = _errors.InvalidMessage(f"Unknown message type: 0x{t:02x}")
                break
            if size - pos - 4 < length:
                break
            out.append((mt, bytes(data[pos + 5 : pos + 4 + length])))
            pos += 4 + length
        if self._error is not None and not out:
            raise self._error
        return pos

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[MessageType, bytes]]:
        """Add ``data``; return the frames it completes, in order."""
        if self._error is not None:
            raise self._error
        out: list[tuple[MessageType, bytes]] = []
        if len(self._buf) == self._start:
            chunk = data if isinstance(data, (bytes, bytearray)) else bytes(data)
            consumed = self._parse(chunk, 0, out)
            if consumed < len(chunk):
                if self._start:
                    del self._buf[:]
                    self._start = 0
                self._buf += chunk[consumed:]
            return out
        self._buf += data
        self._start = self._parse(self._buf, self._start, out)
        if self._start == len(self._buf):
            del self._buf[:]
            self._start = 0
        elif self._start > 65536 and self._start * 2 > len(self._buf):
            del self._buf[: self._start]
            self._start = 0
        return out
