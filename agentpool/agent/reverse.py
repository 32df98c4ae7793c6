"""The agent's side of reverse connections: dial a proxy's listener and register (docs/reverse.md).

:func:`connect_reverse` dials, sends the registration frame and, once the proxy accepts,
serves requests on that socket like an :class:`~agentpool.agent.AgentServer` connection
(JSON, no handshake). The proxy's side is :class:`agentpool.reverse.ReverseConnectionListener`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl as _ssl
from typing import Any

from .. import codec
from .._registration import PROTOCOL_VERSION, Sock, read_frame, send_all
from .._registration import encode as encode_frame
from ..endpoint import parse_endpoint
from ..enums import MessageType
from ..errors import ConnectionClosed, ConnectionFailed, Timeout
from ..messages import RegistrationRequest, RegistrationResponse
from .base import Agent
from .server import AgentServer
from .session import AgentSession

__all__ = [
    "ReverseAgentConnection",
    "connect_reverse",
    "register_reverse",
    "serve_reverse",
]


class ReverseAgentConnection:
    """An agent's registered, serving connection to a proxy's reverse listener.

    ``session`` is the :class:`~agentpool.agent.AgentSession` serving requests on the
    socket, so ``await session.send_health(...)``, ``send_metrics`` and
    ``request_config_update`` work as on a normal agent connection.
    """

    def __init__(
        self, session: AgentSession, response: RegistrationResponse, agent_id: str
    ) -> None:
        self.session = session
        self.agent_id = agent_id
        self.connection_id = response.connection_id
        self.proxy_id = response.proxy_id
        self.proxy_version = response.proxy_version

    @property
    def is_closed(self) -> bool:
        return self.session.closed.is_set()

    def close(self) -> None:
        """Close the connection (the proxy drops it from its pool)."""
        self.session.close()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed by either side."""
        await self.session.closed.wait()

    async def __aenter__(self) -> ReverseAgentConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


async def _dial(target: str, timeout: float) -> socket.socket:
    kind, host, port = parse_endpoint(target)
    loop = asyncio.get_running_loop()
    if kind == "unix":
        assert host is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: Any = host
    else:
        assert host is not None
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConnectionFailed(f"{target}: {exc}") from exc
        family, socktype, proto, _, address = infos[0]
        sock = socket.socket(family, socktype, proto)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, address), timeout)
    except asyncio.TimeoutError:
        sock.close()
        raise Timeout(timeout) from None
    except OSError as exc:
        sock.close()
        raise ConnectionFailed(f"{target}: {exc.strerror or exc}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


async def register_reverse(
    target: str,
    request: RegistrationRequest,
    *,
    timeout: float = 10.0,
    max_response_size: int = 64 * 1024,
    ssl: _ssl.SSLContext | None = None,
) -> tuple[Sock, RegistrationResponse]:
    """Dial ``target``, send ``request`` and read the proxy's answer (bounded by ``timeout``).

    ``ssl`` (or a ``tls://`` target) runs TLS first; the connection is then a
    :class:`~agentpool.tls.TLSStream` instead of a socket.

    Returns the connected socket and a successful response; a refusal raises
    ``ConnectionFailed("Registration rejected: <proxy's error>")`` after closing the socket.
    """
    loop = asyncio.get_running_loop()
    raw = await _dial(target, timeout)
    sock: Sock = raw
    if ssl is not None or target.startswith("tls://"):
        from ..tls import default_client_context, socket_tls

        host = parse_endpoint(target)[1]
        ctx = ssl if ssl is not None else default_client_context()
        sock = await socket_tls(raw, ctx, timeout, server_side=False, server_hostname=host)
    try:
        frame = encode_frame(
            MessageType.HANDSHAKE_REQUEST, codec.encode_registration_request(request)
        )
        await send_all(loop, sock, frame, timeout)
        try:
            payload = await asyncio.wait_for(
                read_frame(
                    loop,
                    sock,
                    max_response_size,
                    MessageType.HANDSHAKE_RESPONSE,
                    "registration response (HandshakeResponse)",
                ),
                timeout,
            )
        except asyncio.TimeoutError:
            raise Timeout(timeout) from None
        except ConnectionClosed:
            raise ConnectionClosed(
                "proxy closed the connection without a registration response"
            ) from None
        except OSError as exc:
            raise ConnectionClosed(str(exc)) from exc
        response = codec.decode_registration_response(payload)
        if not response.success:
            raise ConnectionFailed(f"Registration rejected: {response.error or 'no reason given'}")
    except BaseException:
        sock.close()
        raise
    return sock, response


async def connect_reverse(
    agent: Agent,
    target: str,
    *,
    agent_id: str | None = None,
    auth_token: str | None = None,
    metadata: Any = None,
    timeout: float = 10.0,
    ssl: _ssl.SSLContext | None = None,
) -> ReverseAgentConnection:
    """Dial a proxy's reverse listener, register ``agent`` and serve requests on that socket.

    ``ssl`` (e.g. :func:`agentpool.tls.client_context` with the agent's certificate) or a
    ``tls://host:port`` target dials over TLS.

    ``target`` is ``unix:/path``, ``/path``, ``tcp://host:port`` or ``host:port``.
    ``agent_id`` defaults to the id in ``agent.capabilities()``. After registration the
    socket is served exactly like an :class:`~agentpool.agent.AgentServer` connection
    (JSON, no handshake). Registration errors raise; the returned handle closes the
    connection and waits for it to end.
    """
    caps = agent.capabilities()
    request = RegistrationRequest(
        protocol_version=PROTOCOL_VERSION,
        agent_id=caps.agent_id if agent_id is None else agent_id,
        capabilities=caps,
        auth_token=auth_token,
        metadata=metadata,
    )
    sock, response = await register_reverse(target, request, timeout=timeout, ssl=ssl)
    # An unstarted server holds the agent and session set an AgentSession expects.
    server = AgentServer(agent, host="127.0.0.1", encodings=("json",))
    session = AgentSession(server)
    session.handshaken = True
    loop = asyncio.get_running_loop()
    try:
        if not isinstance(sock, socket.socket):
            rest = sock.detach(session)
            if rest:
                session.data_received(rest)
        elif sock.family == socket.AF_UNIX:
            await loop.create_unix_connection(lambda: session, sock=sock)
        else:
            await loop.create_connection(lambda: session, sock=sock)
    except BaseException:
        sock.close()
        raise
    return ReverseAgentConnection(session, response, request.agent_id)


async def serve_reverse(
    agent: Agent,
    target: str,
    *,
    agent_id: str | None = None,
    auth_token: str | None = None,
    metadata: Any = None,
    timeout: float = 10.0,
    ssl: _ssl.SSLContext | None = None,
) -> None:
    """Register with :func:`connect_reverse` and serve until the proxy closes the connection."""
    conn = await connect_reverse(
        agent,
        target,
        agent_id=agent_id,
        auth_token=auth_token,
        metadata=metadata,
        timeout=timeout,
        ssl=ssl,
    )
    try:
        await conn.wait_closed()
    finally:
        conn.close()
