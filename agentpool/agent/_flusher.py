"""Write coalescing and backpressure shared by the v2 and v1 agent sessions."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..errors import ConnectionClosed

if TYPE_CHECKING:
    from .server import AgentServer

__all__ = ["CLOSE_GRACE", "DEFAULT_MAX_WRITE_BUFFER", "Flusher"]

log = logging.getLogger(__name__)

DEFAULT_MAX_WRITE_BUFFER = 16 * 1024 * 1024
# After close(), how long the transport may take to hand its last bytes to the kernel before
# it is aborted (a proxy that stopped reading would otherwise keep it open forever).
CLOSE_GRACE = 0.25


class Flusher:
    """Write coalescing and backpressure shared by both session kinds.

    The frames of one loop turn go out in one write. While the proxy does not read (the
    transport paused writing) the session stops reading from it and holds its replies back;
    a proxy whose unread replies exceed the server's ``max_write_buffer`` is dropped, and
    closing never waits on a proxy that does not read. Coroutines that push control frames
    wait in :meth:`_drain` until the proxy reads again.
    """

    def __init__(self, server: AgentServer) -> None:
        self.server = server
        self.agent = server.agent
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None
        self.closed = asyncio.Event()
        self._out: list[bytes] = []
        self._out_size = 0
        self._flush_scheduled = False
        self._write_paused = False
        self._backlog_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._out.append(data)
        self._out_size += len(data)
        if self._write_paused:
            unsent = self._out_size + transport.get_write_buffer_size()
            if unsent > self.server.max_write_buffer:
                log.warning(
                    "proxy %s is not reading (%d bytes unsent); dropping the connection",
                    self.peer,
                    unsent,
                )
                self._out = []
                self._out_size = 0
                transport.abort()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out or self._write_paused:
            return
        self._out = []
        self._out_size = 0
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _sync_reading(self) -> None:
        """Read from the proxy unless it stopped reading us or our event backlog is full."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        want = not (self._write_paused or self._backlog_paused)
        if want != transport.is_reading():
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._sync_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._sync_reading()
        self._flush()
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _drain(self) -> None:
        """Wait until the proxy reads again (at once if it does); ConnectionClosed if gone."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionClosed("proxy disconnected")
        if not self._write_paused:
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiters.append(fut)
        await fut

    def _fail_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_exception(ConnectionClosed("proxy disconnected"))

    def _close_transport(self) -> None:
        """Close after flushing what is queued, aborting if the proxy does not read it."""
        self._flush()
        transport = self.transport
        if transport is None:
            return
        if self._write_paused:
            self._out = []
            self._out_size = 0
            transport.abort()
            return
        pending = transport.get_write_buffer_size()
        transport.close()
        if pending:
            self._loop.call_later(CLOSE_GRACE, self._grace_abort, transport)

    def _grace_abort(self, transport: asyncio.Transport) -> None:
        if self.transport is transport:
            transport.abort()
