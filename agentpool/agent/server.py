"""Serving an agent: :class:`AgentServer` listens on a Unix socket or a TCP port (optionally
TLS) and runs one :class:`~agentpool.agent.AgentSession` (v2) or
:class:`~agentpool.agent.session_v1.V1Session` (legacy v1) per proxy connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as _ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .._unixsock import FileId, bind_unix, unlink_if_ours
from ..enums import FlowAction, HealthState
from ..errors import ConnectionClosed
from ..messages import ConfigUpdateResponse, MetricsReport
from ._flusher import DEFAULT_MAX_WRITE_BUFFER
from .base import Agent, ErrorPolicy
from .session import AgentSession
from .session_v1 import V1Session

__all__ = ["AgentServer"]


class AgentServer:
    """Serve an :class:`Agent` on a Unix socket (``path``) or TCP (``host``/``port``).

    ``encodings`` lists what the agent supports; it picks the first of the proxy's offered
    encodings found there (JSON when nothing matches), as Rust agents do.
    ``max_write_buffer`` bounds the replies held for a proxy that does not read them; a
    connection over it is dropped. ``ssl`` (e.g. :func:`agentpool.tls.server_context`)
    serves TCP over TLS; proxies then connect to ``tls://host:port``. ``on_error`` overrides
    the agent's :attr:`Agent.on_error` (what undecodable events and failed handlers are
    answered).

    A Unix socket ``path`` where another process is listening, or that is not a socket,
    raises :class:`~agentpool.errors.AddressInUse` on :meth:`start`; a stale socket file is
    replaced. :meth:`close` removes the path only if it is still the file this server bound.

    ``send_health``, ``send_metrics``, ``send_flow_control``, ``pause``, ``resume`` and
    ``request_config_update`` are the :class:`AgentSession` coroutines applied to every
    connected proxy (the first one for ``request_config_update``); they return how many
    proxies got the frame.
    """

    def __init__(
        self,
        agent: Agent,
        *,
        path: str | None = None,
        host: str | None = None,
        port: int | None = None,
        encodings: Iterable[str] = ("json", "msgpack"),
        protocol: str = "v2",
        v1_reply_version: int = 2,
        v1_sdk_replies: bool = False,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
        ssl: _ssl.SSLContext | None = None,
        on_error: ErrorPolicy | None = None,
    ) -> None:
        if on_error is not None and not isinstance(on_error, ErrorPolicy):
            raise TypeError(f"on_error must be an ErrorPolicy, not {type(on_error).__name__}")
        if (path is None) == (host is None and port is None):
            raise ValueError("give either path (Unix socket) or host/port (TCP)")
        if protocol not in ("v1", "v2"):
            raise ValueError(f"unknown protocol {protocol!r}")
        if ssl is not None and path is not None:
            raise ValueError("ssl needs TCP (host/port), not a Unix socket")
        self.agent = agent
        self.path = path
        self.host = host or "127.0.0.1"
        self.port = port or 0
        self.encodings = tuple(encodings)
        self.protocol = protocol
        self.v1_reply_version = v1_reply_version
        self.v1_sdk_replies = v1_sdk_replies
        self.max_write_buffer = max_write_buffer
        self.ssl = ssl
        self.on_error: ErrorPolicy = agent.on_error if on_error is None else on_error
        self._server: asyncio.AbstractServer | None = None
        self._sessions: set[Any] = set()
        self._file_id: FileId | None = None

    @property
    def endpoint(self) -> str:
        """Where proxies connect: ``unix:/path``, ``tcp://host:port`` or ``tls://host:port``."""
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{'tcp' if self.ssl is None else 'tls'}://{host}:{self.port}"

    @property
    def sessions(self) -> list[AgentSession]:
        """The connected v2 proxy sessions that completed the handshake."""
        return [s for s in self._sessions if isinstance(s, AgentSession) and s.handshaken]

    def _factory(self) -> asyncio.Protocol:
        if self.protocol == "v1":
            return V1Session(self)
        return AgentSession(self)

    async def start(self) -> None:
        """Listen (see the class docstring for what an existing socket path does)."""
        loop = asyncio.get_running_loop()
        if self.path is not None:
            sock, self._file_id = bind_unix(self.path)
            try:
                self._server = await loop.create_unix_server(self._factory, sock=sock)
            except BaseException:
                sock.close()
                unlink_if_ours(self.path, self._file_id)
                self._file_id = None
                raise
        else:
            self._server = await loop.create_server(
                self._factory, self.host, self.port, ssl=self.ssl
            )
            sock = self._server.sockets[0]
            self.port = sock.getsockname()[1]

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        for session in list(self._sessions):
            session.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        if self.path is not None:
            unlink_if_ours(self.path, self._file_id)
            self._file_id = None

    async def __aenter__(self) -> AgentServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the AgentSession methods, for every connected proxy -----------------------------

    async def _broadcast(self, send: Callable[[AgentSession], Awaitable[None]]) -> int:
        """Run ``send`` on every session at once; returns how many were still connected."""
        sessions = self.sessions
        if not sessions:
            return 0
        results = await asyncio.gather(*(send(s) for s in sessions), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, ConnectionClosed):
                raise r
        return sum(1 for r in results if not isinstance(r, BaseException))

    async def send_health(self, state: HealthState, message: str | None = None) -> int:
        """Report health to every connected proxy; returns how many got it."""
        return await self._broadcast(lambda s: s.send_health(state, message))

    async def send_metrics(self, report: MetricsReport) -> int:
        """Send a MetricsReport to every connected proxy; returns how many got it."""
        return await self._broadcast(lambda s: s.send_metrics(report))

    async def send_flow_control(self, action: FlowAction, correlation_id: str | None = None) -> int:
        """Send a flow control signal to every connected proxy; returns how many got it."""
        return await self._broadcast(lambda s: s.send_flow_control(action, correlation_id))

    async def pause(self) -> int:
        """``send_flow_control(FlowAction.PAUSE)``."""
        return await self.send_flow_control(FlowAction.PAUSE)

    async def resume(self) -> int:
        """``send_flow_control(FlowAction.RESUME)``."""
        return await self.send_flow_control(FlowAction.RESUME)

    async def request_config_update(
        self, update_type: Any, *, timeout: float = 5.0, request_id: str | None = None
    ) -> ConfigUpdateResponse:
        """Ask the (first) connected proxy for a config update; returns its response."""
        sessions = self.sessions
        if not sessions:
            raise ConnectionClosed("no proxy connected")
        return await sessions[0].request_config_update(
            update_type, timeout=timeout, request_id=request_id
        )
