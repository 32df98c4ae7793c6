"""Reverse connections, the proxy's side: agents dial the proxy and register (docs/reverse.md).

The proxy side is :class:`ReverseConnectionListener`. It listens on a Unix socket (mode 0600)
or a TCP port, reads exactly one registration frame (0x01) per accepted socket within
``handshake_timeout``, validates it in upstream order (version, empty id, allow list,
token), answers with a registration response frame (0x02) and hands the socket to the pool
through ``AgentPool.add_reverse_connection``. From then on the connection is a normal pool
connection, JSON only, without a handshake.

Abuse bounds: registration frames larger than ``max_registration_size`` are refused without
reading them, at most ``max_pending_handshakes`` registrations run at once (further sockets
are closed on accept), every registration is bounded by ``handshake_timeout``, and each
agent id holds at most ``max_connections_per_agent`` live connections through the listener.

The agent's side (dial, register, serve) is :func:`agentpool.agent.connect_reverse`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hmac
import logging
import os
import socket
import ssl as _ssl
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from . import codec
from ._registration import PROTOCOL_VERSION, Sock, close_socket, read_frame, send_all
from ._registration import encode as encode_frame
from ._unixsock import FileId, bind_unix, unlink_if_ours
from ._version import __version__
from .enums import MessageType
from .errors import (
    AddressInUse,
    AgentProtocolError,
    ConnectionClosed,
    ConnectionFailed,
    InvalidMessage,
    Timeout,
    VersionMismatch,
)
from .messages import AgentCapabilities, RegistrationRequest, RegistrationResponse

if TYPE_CHECKING:
    from .connection import AgentConnection

__all__ = [
    "DEFAULT_PROXY_ID",
    "ReverseConnectionConfig",
    "ReverseConnectionListener",
    "ReversePool",
    "validate_registration",
]

logger = logging.getLogger("agentpool.reverse")

DEFAULT_PROXY_ID = "zentinel-proxy"
_ACCEPT_ERROR_BACKOFF = 0.1


class ReversePool(Protocol):
    """What the listener needs from a pool (``AgentPool`` provides it)."""

    async def add_reverse_connection(
        self, agent_id: str, connection: AgentConnection, capabilities: AgentCapabilities
    ) -> None: ...


@dataclasses.dataclass(slots=True)
class ReverseConnectionConfig:
    """Listener settings; the first seven fields and their defaults are upstream's.

    ``allowed_agents`` empty means every id is allowed (exact string match otherwise).
    With ``require_auth`` the registration token must equal one of ``auth_tokens``
    (constant-time comparison); binding refuses to start when the token set is empty.
    """

    backlog: int = 128
    handshake_timeout: float = 10.0
    max_connections_per_agent: int = 4
    allowed_agents: frozenset[str] = frozenset()
    require_auth: bool = False
    auth_tokens: frozenset[str] = frozenset()
    request_timeout: float = 30.0
    max_pending_handshakes: int = 256
    max_registration_size: int = 64 * 1024
    proxy_id: str = DEFAULT_PROXY_ID
    proxy_version: str = __version__

    def __post_init__(self) -> None:
        self.allowed_agents = frozenset(self.allowed_agents)
        self.auth_tokens = frozenset(self.auth_tokens)
        for name in ("backlog", "max_connections_per_agent", "max_pending_handshakes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_registration_size < 2:
            raise ValueError("max_registration_size must be >= 2")
        if not self.handshake_timeout > 0 or not self.request_timeout > 0:
            raise ValueError("handshake_timeout and request_timeout must be positive")

    def allow_agent(self, agent_id: str) -> ReverseConnectionConfig:
        """Return a copy that also allows ``agent_id``."""
        return dataclasses.replace(self, allowed_agents=self.allowed_agents | {agent_id})

    def with_auth_tokens(self, tokens: Iterable[str]) -> ReverseConnectionConfig:
        """Return a copy that requires one of ``tokens``."""
        return dataclasses.replace(self, require_auth=True, auth_tokens=frozenset(tokens))


def _cap_error(agent_id: str, limit: int) -> ConnectionFailed:
    return ConnectionFailed(f"Agent {agent_id} already has maximum connections ({limit})")


async def _pool_cap_error(pool: ReversePool, agent_id: str) -> ConnectionFailed | None:
    """The pool's own cap, checked before answering so a full pool yields a failure reply.

    Only a hint (the pool decides in ``add_reverse_connection``); pools without
    ``agent_stats``/``config.connections_per_agent`` are not pre-checked.
    """
    limit = getattr(getattr(pool, "config", None), "connections_per_agent", None)
    agent_stats = getattr(pool, "agent_stats", None)
    if not isinstance(limit, int) or agent_stats is None:
        return None
    stats = await agent_stats(agent_id)
    if stats is not None and stats.active_connections >= limit:
        return _cap_error(agent_id, limit)
    return None


def _connection_id(agent_id: str) -> str:
    return f"{agent_id}-{int(time.time() * 1000):x}"


def _token_matches(token: str, tokens: frozenset[str]) -> bool:
    """Compare ``token`` with every configured token in constant time (no early exit)."""
    given = token.encode("utf-8", "surrogatepass")
    matched = False
    for candidate in tokens:
        matched |= hmac.compare_digest(given, candidate.encode("utf-8", "surrogatepass"))
    return matched


def validate_registration(request: RegistrationRequest, config: ReverseConnectionConfig) -> None:
    """Check a registration request in upstream order; raise the first failure."""
    if request.protocol_version != PROTOCOL_VERSION:
        raise VersionMismatch(PROTOCOL_VERSION, request.protocol_version)
    if not request.agent_id:
        raise InvalidMessage("Agent ID cannot be empty", field="agent_id")
    if config.allowed_agents and request.agent_id not in config.allowed_agents:
        raise InvalidMessage(
            f"Agent '{request.agent_id}' is not in the allowed list", field="agent_id"
        )
    if config.require_auth:
        if request.auth_token is None:
            raise InvalidMessage(
                "Authentication required but no token provided", field="auth_token"
            )
        if not _token_matches(request.auth_token, config.auth_tokens):
            raise InvalidMessage("Invalid authentication token", field="auth_token")


class ReverseConnectionListener:
    """Accepts agents that dial in, registers them and adds them to a pool."""

    def __init__(
        self,
        sock: socket.socket,
        config: ReverseConnectionConfig,
        *,
        path: str | None = None,
        file_id: FileId | None = None,
    ) -> None:
        """Wrap a bound, listening, non-blocking socket; use :meth:`bind_uds`/:meth:`bind_tcp`.

        ``file_id`` is the ``(st_dev, st_ino)`` of the socket file at ``path`` when it was
        bound; :meth:`close` removes the path only while it is still that file.
        """
        self._sock = sock
        self.config = config
        self.path = path
        if path is not None and file_id is None:
            st = os.stat(path)
            file_id = (st.st_dev, st.st_ino)
        self._file_id = file_id
        self._closed = False
        self._serve_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._accepts: set[asyncio.Future[Any]] = set()
        self._drop_warned = False
        self._ssl: _ssl.SSLContext | None = None
        self._cert_identity = False
        self._pending = 0
        self._active: dict[str, int] = {}
        self.registered = 0
        self.rejected = 0
        self.dropped = 0

    @staticmethod
    def _check_config(config: ReverseConnectionConfig) -> None:
        if config.require_auth and not config.auth_tokens:
            raise ConnectionFailed(
                "Reverse listener requires authentication but no auth tokens are configured"
            )

    @classmethod
    async def bind_uds(
        cls, path: str, config: ReverseConnectionConfig | None = None
    ) -> ReverseConnectionListener:
        """Listen on a Unix socket at ``path`` (mode 0600).

        A stale socket file there is replaced; a path where a process is listening, or that
        is not a socket, raises :class:`~agentpool.errors.AddressInUse` (docs/reverse.md).
        """
        config = config if config is not None else ReverseConnectionConfig()
        cls._check_config(config)
        try:
            sock, file_id = bind_unix(path, backlog=config.backlog, mode=0o600)
        except AddressInUse:
            raise
        except OSError as exc:
            raise ConnectionFailed(f"Failed to bind to {path}: {exc}") from exc
        return cls(sock, config, path=path, file_id=file_id)

    @classmethod
    async def bind_tcp(
        cls,
        host: str,
        port: int,
        config: ReverseConnectionConfig | None = None,
        *,
        ssl: _ssl.SSLContext | None = None,
        agent_id_from_certificate: bool = False,
    ) -> ReverseConnectionListener:
        """Listen on ``host:port`` (port 0 picks a free port; see :attr:`port`).

        ``ssl`` (e.g. :func:`agentpool.tls.server_context` with ``ca=``) runs TLS (mutual
        with a CA) before the registration frame, within ``handshake_timeout``. With
        ``agent_id_from_certificate`` the registering agent id must equal the identity in
        the verified client certificate (:func:`agentpool.tls.peer_identity`).
        """
        if agent_id_from_certificate and (ssl is None or ssl.verify_mode != _ssl.CERT_REQUIRED):
            raise ValueError("agent_id_from_certificate needs an ssl context requiring certs")
        config = config if config is not None else ReverseConnectionConfig()
        cls._check_config(config)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except OSError as exc:
            raise ConnectionFailed(f"Failed to bind to {host}:{port}: {exc}") from exc
        family, socktype, proto, _, addr = infos[0]
        sock = socket.socket(family, socktype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(config.backlog)
            sock.setblocking(False)
            listener = cls(sock, config)
            listener._ssl = ssl
            listener._cert_identity = agent_id_from_certificate
            return listener
        except OSError as exc:
            sock.close()
            raise ConnectionFailed(f"Failed to bind to {host}:{port}: {exc}") from exc

    @property
    def address(self) -> Any:
        """The bound address (path for UDS, ``(host, port, ...)`` for TCP)."""
        return self._sock.getsockname()

    @property
    def port(self) -> int | None:
        """The bound TCP port, ``None`` for a Unix socket."""
        if self._sock.family == socket.AF_UNIX:
            return None
        return int(self._sock.getsockname()[1])

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def pending_handshakes(self) -> int:
        """Registrations currently being read or answered."""
        return self._pending

    def connection_count(self, agent_id: str) -> int:
        """Live connections (plus registrations in progress) the listener holds for an agent."""
        return self._active.get(agent_id, 0)

    async def _accept(self) -> socket.socket:
        if self._closed:
            raise ConnectionClosed("listener is closed")
        loop = asyncio.get_running_loop()
        accept: asyncio.Future[tuple[socket.socket, Any]] = asyncio.ensure_future(
            loop.sock_accept(self._sock)
        )
        self._accepts.add(accept)
        try:
            conn, _ = await accept
        except asyncio.CancelledError:
            current = asyncio.current_task()
            cancelling = getattr(current, "cancelling", None)
            if self._closed and accept.cancelled() and not (cancelling and cancelling()):
                raise ConnectionClosed("listener is closed") from None
            raise
        finally:
            self._accepts.discard(accept)
        conn.setblocking(False)
        return conn

    async def accept_one(self, pool: ReversePool) -> str:
        """Accept one agent, register it with ``pool`` and return its agent id.

        Raises the registration error (after answering the agent when the protocol says so).
        """
        sock = await self._accept()
        if self._pending >= self.config.max_pending_handshakes:
            self.dropped += 1
            close_socket(sock)
            raise ConnectionFailed(
                f"Too many pending registrations ({self.config.max_pending_handshakes})"
            )
        return await self._register(sock, pool)

    def start(self, pool: ReversePool) -> asyncio.Task[None]:
        """Run :meth:`serve` as a background task (idempotent) and return it."""
        if self._serve_task is None or self._serve_task.done():
            self._serve_task = asyncio.get_running_loop().create_task(self.serve(pool))
        return self._serve_task

    async def serve(self, pool: ReversePool) -> None:
        """Accept and register agents until :meth:`close`, each registration in its own task."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            try:
                sock = await self._accept()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closed:
                    return
                if isinstance(exc, OSError) and exc.errno in (errno.EBADF, errno.EINVAL):
                    return
                logger.warning("reverse listener accept failed: %s", exc)
                await asyncio.sleep(_ACCEPT_ERROR_BACKOFF)
                continue
            if self._pending >= self.config.max_pending_handshakes:
                self.dropped += 1
                close_socket(sock)
                if not self._drop_warned:
                    self._drop_warned = True
                    logger.warning(
                        "reverse listener: %d registrations pending, dropping new connections",
                        self._pending,
                    )
                continue
            self._drop_warned = False
            task = loop.create_task(self._register_logged(sock, pool))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _register_logged(self, sock: socket.socket, pool: ReversePool) -> None:
        try:
            agent_id = await self._register(sock, pool)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("reverse registration failed: %.300s", exc)
        else:
            logger.info("reverse agent %.300r registered", agent_id)

    async def _register(self, sock: Sock, pool: ReversePool) -> str:
        self._pending += 1
        owner = [sock]
        try:
            if self._ssl is not None and isinstance(sock, socket.socket):
                from .tls import socket_tls

                sock = await socket_tls(sock, self._ssl, self.config.handshake_timeout)
                owner = [sock]
            return await self._register_inner(sock, pool, owner)
        except BaseException:
            self.rejected += 1
            if owner:
                close_socket(sock)
            raise
        finally:
            self._pending -= 1

    async def _register_inner(self, sock: Sock, pool: ReversePool, owner: list[Sock]) -> str:
        """Register ``sock``; ``owner`` is emptied once a connection object owns the socket."""
        loop = asyncio.get_running_loop()
        config = self.config
        timeout = config.handshake_timeout
        try:
            payload = await asyncio.wait_for(
                read_frame(
                    loop,
                    sock,
                    config.max_registration_size,
                    MessageType.HANDSHAKE_REQUEST,
                    "registration request (HandshakeRequest)",
                ),
                timeout,
            )
        except asyncio.TimeoutError:
            raise Timeout(timeout) from None
        except OSError as exc:
            raise ConnectionClosed(str(exc)) from exc
        try:
            request = codec.decode_registration_request(payload)
        except AgentProtocolError:
            raise
        except Exception as exc:
            raise InvalidMessage(f"Invalid registration request: {exc}") from exc

        try:
            validate_registration(request, config)
            if self._cert_identity and not isinstance(sock, socket.socket):
                identity = sock.identity
                if identity != request.agent_id:
                    raise InvalidMessage(
                        f"Agent '{request.agent_id}' does not match its client certificate "
                        f"identity {identity!r}",
                        field="agent_id",
                    )
        except AgentProtocolError as exc:
            await self._reply_failure(loop, sock, exc)
            raise

        agent_id = request.agent_id
        held = self._active.get(agent_id, 0)
        cap_error: ConnectionFailed | None = None
        if held >= config.max_connections_per_agent:
            cap_error = _cap_error(agent_id, config.max_connections_per_agent)
        else:
            cap_error = await _pool_cap_error(pool, agent_id)
        if cap_error is not None:
            await self._reply_failure(loop, sock, cap_error)
            raise cap_error

        self._active[agent_id] = held + 1
        registered = False
        try:
            response = RegistrationResponse(
                success=True,
                error=None,
                proxy_id=config.proxy_id,
                proxy_version=config.proxy_version,
                connection_id=_connection_id(agent_id),
            )
            frame = encode_frame(
                MessageType.HANDSHAKE_RESPONSE, codec.encode_registration_response(response)
            )
            await send_all(loop, sock, frame, timeout)
            conn = await self._make_connection(sock, pool, agent_id, request.capabilities)
            owner.clear()
            try:
                await pool.add_reverse_connection(agent_id, conn, request.capabilities)
            except BaseException:
                conn.close()
                raise
            registered = True
        finally:
            if not registered:
                self._release(agent_id)
        self.registered += 1
        watcher = loop.create_task(self._watch(agent_id, conn))
        self._tasks.add(watcher)
        watcher.add_done_callback(self._tasks.discard)
        return agent_id

    async def _make_connection(
        self,
        sock: Sock,
        pool: ReversePool,
        agent_id: str,
        capabilities: AgentCapabilities,
    ) -> AgentConnection:
        from .connection import AgentConnection

        if not isinstance(sock, socket.socket):
            return await AgentConnection.from_tls_stream(
                sock,
                agent_id=agent_id,
                capabilities=capabilities,
                request_timeout=self.config.request_timeout,
                listener=getattr(pool, "connection_listener", None),
                endpoint=f"reverse+tls://{agent_id}",
            )
        return await AgentConnection.from_socket(
            sock,
            agent_id=agent_id,
            capabilities=capabilities,
            encoding="json",
            request_timeout=self.config.request_timeout,
            listener=getattr(pool, "connection_listener", None),
            endpoint=f"reverse://{agent_id}",
        )

    async def _reply_failure(
        self, loop: asyncio.AbstractEventLoop, sock: Sock, error: BaseException
    ) -> None:
        response = RegistrationResponse(
            success=False,
            error=str(error),
            proxy_id=self.config.proxy_id,
            proxy_version=self.config.proxy_version,
            connection_id="",
        )
        frame = encode_frame(
            MessageType.HANDSHAKE_RESPONSE, codec.encode_registration_response(response)
        )
        try:
            await send_all(loop, sock, frame, self.config.handshake_timeout)
        except (OSError, AgentProtocolError) as exc:
            logger.debug("could not send registration failure: %s", exc)

    async def _watch(self, agent_id: str, conn: AgentConnection) -> None:
        try:
            await conn.wait_closed()
        finally:
            self._release(agent_id)

    def _release(self, agent_id: str) -> None:
        n = self._active.get(agent_id, 0) - 1
        if n > 0:
            self._active[agent_id] = n
        else:
            self._active.pop(agent_id, None)

    def close(self) -> None:
        """Stop accepting, abort pending registrations and remove the socket file.

        Registered connections belong to the pool and stay open.
        """
        if self._closed:
            return
        self._closed = True
        if self._serve_task is not None:
            self._serve_task.cancel()
        for fut in [*self._accepts, *self._tasks]:
            fut.cancel()
        # Let cancelled accepts unregister the socket from the loop before it is closed.
        try:
            asyncio.get_running_loop().call_soon(close_socket, self._sock)
        except RuntimeError:
            close_socket(self._sock)
        if self.path is not None:
            unlink_if_ours(self.path, self._file_id)

    async def wait_closed(self) -> None:
        """After :meth:`close`: wait until the accept loop and registrations have finished."""
        tasks: list[asyncio.Task[Any]] = list(self._tasks)
        if self._serve_task is not None:
            tasks.append(self._serve_task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> ReverseConnectionListener:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()
