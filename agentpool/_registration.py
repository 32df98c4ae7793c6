"""Registration frames on a raw socket, for both ends of a reverse connection (docs/reverse.md).

The proxy's listener (:mod:`agentpool.reverse`) and the agent's dialer
(:mod:`agentpool.agent.reverse`) exchange exactly one frame each way before the socket is
handed to a connection: a registration request (0x01) and its response (0x02), framed by the
core's ``FrameDecoder`` and ``encode_frame``. A frame is read
header first, then exactly its payload, so the bytes after it (the first requests) stay in the
socket for the connection, and no more than ``max_size`` bytes are ever buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl as _ssl
from typing import TYPE_CHECKING, TypeAlias

from ._impl import core
from .enums import MessageType
from .errors import ConnectionClosed, InvalidMessage, Timeout

if TYPE_CHECKING:
    from .tls import TLSStream

__all__ = ["PROTOCOL_VERSION", "Sock", "close_socket", "encode", "read_frame", "send_all"]

PROTOCOL_VERSION = 2
_HEADER_SIZE = 5

#: A registering connection: a plain socket, or a TLS stream over one.
Sock: TypeAlias = "socket.socket | TLSStream"


def encode(msg_type: MessageType, payload: bytes) -> bytes:
    """One frame, as the core frames it."""
    return bytes(core.encode_frame(int(msg_type), payload))


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: Sock, n: int) -> bytes:
    if not isinstance(sock, socket.socket):
        try:
            return await sock.read_exactly(n)
        except OSError as exc:
            from .tls import handshake_error

            tls_error = handshake_error(sock.peer, exc, count=False)
            if isinstance(exc, _ssl.SSLError) and tls_error is not None:
                raise tls_error from exc
            raise ConnectionClosed("peer closed the connection during registration") from None
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise ConnectionClosed("peer closed the connection during registration")
        buf += chunk
    return bytes(buf)


async def read_frame(
    loop: asyncio.AbstractEventLoop,
    sock: Sock,
    max_size: int,
    expected: MessageType,
    what: str,
) -> bytes:
    """Read one frame of type ``expected`` and return its payload.

    The core's decoder checks the header (zero length, over ``max_size``, unknown type:
    InvalidMessage or MessageTooLarge) before the payload is read.
    """
    decoder = core.FrameDecoder(max_size)
    header = await _recv_exactly(loop, sock, _HEADER_SIZE)
    frames = decoder.feed(header)
    if not frames:
        length = int.from_bytes(header[:4], "big")
        frames = decoder.feed(await _recv_exactly(loop, sock, length - 1))
    ((msg_type, payload),) = frames
    if msg_type != expected:
        raise InvalidMessage(f"Expected {what}, got {MessageType(msg_type).name}")
    return bytes(payload)


async def send_all(
    loop: asyncio.AbstractEventLoop, sock: Sock, data: bytes, timeout: float
) -> None:
    """Write ``data`` (bounded by ``timeout`` on a plain socket); ConnectionClosed on errors."""
    if not isinstance(sock, socket.socket):
        try:
            sock.write(data)
        except OSError as exc:
            raise ConnectionClosed(str(exc)) from exc
        return
    try:
        await asyncio.wait_for(loop.sock_sendall(sock, data), timeout)
    except asyncio.TimeoutError:
        raise Timeout(timeout) from None
    except OSError as exc:
        raise ConnectionClosed(str(exc)) from exc


def close_socket(sock: Sock) -> None:
    with contextlib.suppress(OSError):
        sock.close()
