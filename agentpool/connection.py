"""The proxy side of one agent connection (v2 over UDS or TCP, or legacy v1 via agentpool.v1).

Long on purpose (over 800 lines): a connection's life, from opening (Unix socket, TCP, TLS,
an accepted reverse connection, v1) through the handshake and control messages to closing, is
one state machine in one class, and splitting it would scatter its states across files.

:class:`AgentConnection` owns a socket to one agent. The per-frame work (decoding, routing
replies to waiters by correlation id, timeouts, write coalescing, counters) happens in the
core's :class:`AgentProtocolCore`; this module does the handshake, the control messages and
the lifecycle.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import socket
import ssl as _ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack
import orjson

from . import codec as _codec
from . import v1 as _v1
from ._impl import core
from ._version import __version__
from .endpoint import parse_endpoint
from .enums import CancelReason, FlowAction, HealthState, MessageType
from .errors import (
    AgentProtocolError,
    ConnectionClosed,
    ConnectionFailed,
    DuplicateCorrelationId,
    InvalidMessage,
    MessageTooLarge,
    RequestCancelled,
    Timeout,
    VersionMismatch,
    WrongConnectionType,
)
from .messages import (
    AgentCapabilities,
    AgentResponse,
    ConfigUpdateRequest,
    ConfigUpdateResponse,
    ConfigureEvent,
    FlowControlSignal,
    HandshakeRequest,
    HealthStatus,
    MetricsReport,
)

if TYPE_CHECKING:
    from .tls import TLSStream

__all__ = [
    "AgentConnection",
    "ConnectionListener",
    "parse_endpoint",
]

log = logging.getLogger("agentpool.connection")


class ConnectionListener:
    """Callbacks for what an agent pushes; all optional, sync, called on the loop.

    Subclass and override what you need (or pass any object with some of these methods).
    Exceptions raised by a callback are logged and never reach the connection.
    """

    def on_health(self, conn: AgentConnection, status: HealthStatus) -> None:
        """The agent reported its health (``conn.health_state`` is already updated)."""

    def on_flow_control(self, conn: AgentConnection, paused: bool) -> None:
        """The agent paused or resumed this connection (``conn.is_paused`` updated)."""

    def on_metrics(self, conn: AgentConnection, report: MetricsReport) -> None:
        """The agent sent a metrics report."""

    def on_config_update(
        self, conn: AgentConnection, request: ConfigUpdateRequest
    ) -> ConfigUpdateResponse | None:
        """The agent asks for a config change; a returned response is sent back to it."""
        return None

    def on_closed(self, conn: AgentConnection, exc: BaseException | None) -> None:
        """The connection is gone (``exc`` None after a local close)."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _cancel_payload(correlation_id: str, reason: int) -> bytes:
    return _codec.encode_cancel(correlation_id, reason, _now_ms())


def check_timeout(timeout: float | None, name: str = "timeout") -> None:
    """Raise ValueError unless ``timeout`` is None or a positive finite number of seconds."""
    if timeout is not None and not 0.0 < timeout < math.inf:
        raise ValueError(f"{name} must be a positive finite number of seconds, not {timeout!r}")


# Longest agent-supplied text (handshake refusal) quoted in errors and logs.
_MAX_QUOTED = 256


def _clip(text: str) -> str:
    if len(text) <= _MAX_QUOTED:
        return text
    return f"{text[:_MAX_QUOTED]}... ({len(text)} characters)"


def _is_grpc(endpoint: str) -> bool:
    """gRPC endpoints are served by agentpool.grpc (imported lazily, with grpcio)."""
    return endpoint.lstrip().startswith(("grpc://", "grpcs://"))


class AgentConnection:
    """One live connection to an agent: requests multiplexed by correlation id.

    Create with :meth:`open` (connect + handshake) or :meth:`from_socket` (an already
    registered reverse connection). Thread-unsafe; use from its event loop only.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        agent_id: str,
        encoding: str = "json",
        protocol: str = "v2",
        request_timeout: float = 30.0,
        listener: ConnectionListener | None = None,
        max_abandoned: int = 1024,
    ) -> None:
        if protocol not in ("v2", "v1"):
            raise ValueError(f"unknown protocol {protocol!r} (expected 'v2' or 'v1')")
        if encoding not in ("json", "msgpack"):
            raise ValueError(f"unknown encoding {encoding!r} (expected 'json' or 'msgpack')")
        check_timeout(request_timeout, "request_timeout")
        self.agent_id = agent_id
        self.endpoint = endpoint
        self.protocol = protocol
        self.requested_encoding = encoding
        self.encoding = "json"
        self.request_timeout = float(request_timeout)
        self.listener = listener
        self.capabilities: AgentCapabilities | None = None
        self.protocol_version = 2 if protocol == "v2" else 1
        self.health_state = HealthState.UNSPECIFIED
        self.last_health: HealthStatus | None = None
        self.last_health_at = 0.0
        self.is_paused = False
        self.last_rtt: float | None = None
        self.created_at = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._codec: _codec.Codec = _codec.get_codec("json")
        self._encode_event = self._codec.encode_event
        self._connected = False
        self._closed_fut: asyncio.Future[None] = self._loop.create_future()
        self._hs_waiter: asyncio.Future[None] | None = None
        self._hs_offered: list[str] = []
        # what open() is doing, for its timeout: "connect", then "handshake"
        self._phase = "connect"
        self._ping_seq = itertools.count()
        self._pings: dict[int, tuple[asyncio.Future[float], float]] = {}
        self._core: core.AgentProtocolCore | None = None
        self._v1: _v1.V1ClientProtocol | None = None
        # send(event, correlation_id, timeout) bound to the fastest callable for this protocol
        self.submit: Callable[[object, str, float | None], asyncio.Future[AgentResponse]]
        # submit(event, correlation_id, timeout, state, affinity, flags): AgentProtocolCore.submit
        self.submit_request: Callable[
            [object, str, float | None, core.ConnState, core.AffinityMap, int],
            asyncio.Future[AgentResponse],
        ]
        if protocol == "v2":
            self._core = core.AgentProtocolCore(
                self._loop,
                self._on_frame,
                self._on_lost,
                request_timeout=self.request_timeout,
                agent_id=agent_id,
                max_abandoned=max_abandoned,
            )
            self._core.set_encoder(self._encode_event)
            self._core.set_cancel_encoder(self._encode_cancel)
            self._core.set_fast_paths(*_codec.fast_paths(self._codec.name))
            self.submit = self._core.send_event
            self.submit_request = self._core.submit
        else:
            self.submit = self.send
            self.submit_request = self._submit_v1
        self._metrics: core.ProtocolMetrics | None = None
        self._on_affinity_rejected: Callable[[], object] | None = None

    # -- construction --------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        endpoint: str,
        *,
        agent_id: str,
        encoding: str = "json",
        protocol: str = "v2",
        connect_timeout: float = 5.0,
        request_timeout: float = 30.0,
        proxy_id: str = "zentinel-proxy",
        proxy_version: str = __version__,
        config: Any = None,
        listener: ConnectionListener | None = None,
        ssl: Any = None,
        max_abandoned: int = 1024,
    ) -> AgentConnection:
        """Connect to ``endpoint`` and handshake, all within ``connect_timeout`` seconds.

        ``ssl`` (or a ``tls://`` endpoint, default context) runs TLS first; a failed TLS
        handshake raises :class:`~agentpool.tls.TLSHandshakeFailed` naming the reason.
        ``max_abandoned``: replies the connection may owe to abandoned requests before it is
        closed as broken (docs/protocol.md, "Abandoned requests").

        Raises ConnectionFailed (unreachable, refused handshake, encoding not offered),
        VersionMismatch (the agent chose a protocol version that was not offered), Timeout
        (connect + handshake too slow), ConnectionClosed (closed during the handshake),
        InvalidMessage / MessageTooLarge (the agent sent something that is not a handshake).
        ``grpc://`` / ``grpcs://`` endpoints open an :class:`agentpool.grpc.GrpcAgentConnection`
        (for ``grpcs://``, ``ssl`` may also be an :class:`agentpool.grpc.GrpcTLS`); grpcio is
        imported only then.
        """
        if _is_grpc(endpoint):
            from .grpc import GrpcAgentConnection

            return await GrpcAgentConnection.open(
                endpoint,
                agent_id=agent_id,
                protocol=protocol,
                connect_timeout=connect_timeout,
                request_timeout=request_timeout,
                proxy_id=proxy_id,
                proxy_version=proxy_version,
                config=config,
                listener=listener,
                ssl=ssl,
                max_abandoned=max_abandoned,
            )
        if ssl is not None and not isinstance(ssl, _ssl.SSLContext):
            raise ValueError(
                f"ssl for {endpoint!r} must be an ssl.SSLContext, not {type(ssl).__name__}"
                " (GrpcTLS and grpc credentials are for grpcs:// endpoints)"
            )
        conn = cls(
            endpoint,
            agent_id=agent_id,
            encoding=encoding,
            protocol=protocol,
            request_timeout=request_timeout,
            listener=listener,
            max_abandoned=max_abandoned,
        )
        try:
            await asyncio.wait_for(
                conn._connect(proxy_id, proxy_version, config, ssl), timeout=connect_timeout
            )
        except asyncio.TimeoutError as exc:
            conn._abort()
            if isinstance(exc, Timeout):
                raise
            raise Timeout(connect_timeout, agent_id=agent_id, phase=conn._phase) from None
        except (InvalidMessage, MessageTooLarge) as exc:
            conn._abort()
            raise conn._not_an_agent(exc) from exc
        except BaseException as exc:
            conn._abort()
            if (ssl is not None or endpoint.startswith("tls://")) and isinstance(
                exc, (OSError, AgentProtocolError)
            ):
                from .tls import handshake_error

                tls_error = handshake_error(endpoint, exc)
                if tls_error is not None:
                    raise tls_error from exc
            raise
        return conn

    @classmethod
    async def from_socket(
        cls,
        sock: socket.socket,
        *,
        agent_id: str,
        capabilities: AgentCapabilities,
        encoding: str = "json",
        request_timeout: float = 30.0,
        initial_data: bytes = b"",
        listener: ConnectionListener | None = None,
        endpoint: str | None = None,
        max_abandoned: int = 1024,
    ) -> AgentConnection:
        """Adopt an accepted, already registered socket (reverse connections; no handshake)."""
        if endpoint is None:
            try:
                peer = sock.getpeername()
            except OSError:
                peer = ""
            endpoint = f"reverse:{peer}" if peer else "reverse"
        conn = cls(
            endpoint,
            agent_id=agent_id,
            encoding=encoding,
            request_timeout=request_timeout,
            listener=listener,
            max_abandoned=max_abandoned,
        )
        conn._set_codec(encoding)
        conn.capabilities = capabilities
        proto = conn._core
        assert proto is not None  # a v2 connection: it has a protocol core
        sock.setblocking(False)
        if sock.family == socket.AF_UNIX:
            await conn._loop.create_unix_connection(lambda: proto, sock=sock)
        else:
            await conn._loop.create_connection(lambda: proto, sock=sock)
        conn._connected = True
        if initial_data:
            proto.data_received(initial_data)
        return conn

    @classmethod
    async def from_tls_stream(
        cls,
        stream: TLSStream,
        *,
        agent_id: str,
        capabilities: AgentCapabilities,
        encoding: str = "json",
        request_timeout: float = 30.0,
        listener: ConnectionListener | None = None,
        endpoint: str,
    ) -> AgentConnection:
        """Adopt a registered TLS connection (an :class:`agentpool.tls.TLSStream`)."""
        conn = cls(
            endpoint,
            agent_id=agent_id,
            encoding=encoding,
            request_timeout=request_timeout,
            listener=listener,
        )
        conn._set_codec(encoding)
        conn.capabilities = capabilities
        proto = conn._core
        assert proto is not None  # a v2 connection: it has a protocol core
        rest = stream.detach(proto)
        conn._connected = True
        if rest:
            proto.data_received(rest)
        return conn

    async def _connect(
        self,
        proxy_id: str,
        proxy_version: str,
        config: Any,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        kind, host, port = parse_endpoint(self.endpoint)
        if kind not in ("unix", "tcp", "tls"):
            raise ConnectionFailed(f"{self.endpoint}: no {kind}:// transport for AgentConnection")
        if kind == "tls" and ssl is None:
            from .tls import default_client_context

            ssl = default_client_context()
        if kind == "unix" and ssl is not None:
            raise ConnectionFailed(f"{self.endpoint}: TLS needs a TCP endpoint")
        factory: asyncio.Protocol
        if self.protocol == "v2":
            assert self._core is not None  # made with every v2 connection
            factory = self._core
        else:
            factory = self._v1 = _v1.V1ClientProtocol(self)
        try:
            if kind == "unix":
                assert host is not None
                await self._loop.create_unix_connection(lambda: factory, host)
            else:
                await self._loop.create_connection(
                    lambda: factory, host or "127.0.0.1", port, ssl=ssl
                )
        except OSError as exc:
            if ssl is not None and isinstance(
                exc, (_ssl.SSLError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)
            ):
                raise  # open() turns it into TLSHandshakeFailed
            raise ConnectionFailed(f"{self.endpoint}: {exc.strerror or exc}") from exc
        if self.protocol == "v1":
            self._connected = True
            return
        self._phase = "handshake"
        offered = ["msgpack", "json"] if self.requested_encoding == "msgpack" else ["json"]
        self._hs_offered = offered
        self._hs_waiter = self._loop.create_future()
        request = HandshakeRequest(
            supported_versions=[2],
            proxy_id=proxy_id,
            proxy_version=proxy_version,
            config=config,
            supported_encodings=offered,
        )
        assert self._core is not None  # v2 (v1 returned above)
        self._core.write_frame(
            MessageType.HANDSHAKE_REQUEST, _codec.encode_handshake_request(request)
        )
        try:
            await self._hs_waiter
        finally:
            self._hs_waiter = None
        self._connected = True

    def _finish_handshake(self, msg_type: MessageType, payload: bytes) -> None:
        if msg_type != MessageType.HANDSHAKE_RESPONSE:
            raise InvalidMessage(f"Expected HandshakeResponse, got {msg_type.name}")
        try:
            response = _codec.decode_handshake_response(payload)
        except AgentProtocolError as exc:
            raise ConnectionFailed(
                f"handshake failed: {self.endpoint} sent an invalid HandshakeResponse: {exc}"
            ) from exc
        if not response.success:
            raise ConnectionFailed(_clip(response.error or "Unknown handshake error"))
        if response.protocol_version != 2:
            raise VersionMismatch(2, response.protocol_version)
        chosen = str(getattr(response.encoding, "value", response.encoding))
        if chosen not in self._hs_offered:
            raise ConnectionFailed(
                f"agent chose encoding {_clip(chosen)!r}, which was not offered "
                f"({', '.join(self._hs_offered)})"
            )
        self._set_codec(chosen)
        self.capabilities = response.capabilities
        self.protocol_version = response.protocol_version

    def _not_an_agent(self, exc: InvalidMessage | MessageTooLarge) -> ConnectionFailed:
        """The peer answered the handshake with something that is not a v2 frame."""
        if isinstance(exc, MessageTooLarge):
            # the length prefix is the peer's first four bytes (b'HTTP', b'SSH-'...)
            head = exc.size.to_bytes(4, "big") if 0 <= exc.size < 1 << 32 else b""
            what = f"first bytes {head!r}"
            if head[:1] in (b"\x15", b"\x16") and head[1:2] == b"\x03":
                what += "; a TLS server? use tls://host:port"
        else:
            what = exc.reason
        return ConnectionFailed(
            f"handshake failed: {self.endpoint} is not a Zentinel v2 agent ({what})"
        )

    def _set_codec(self, encoding: str) -> None:
        self._codec = _codec.get_codec(encoding)
        self.encoding = self._codec.name
        self._encode_event = self._codec.encode_event
        if self._core is not None:
            self._core.set_decoder(self._codec.decode_response)
            self._core.set_encoder(self._encode_event)
            self._core.set_fast_paths(*_codec.fast_paths(self._codec.name))

    # -- state ---------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        """True after the handshake until the connection closes (EOF, error or close())."""
        if not self._connected:
            return False
        if self._core is not None:
            return not self._core.closed
        return self._v1 is not None and not self._v1.closed

    @property
    def is_closed(self) -> bool:
        return self._closed_fut.done() or (self._core is not None and self._core.closed)

    @property
    def in_flight(self) -> int:
        """Outstanding requests on this connection."""
        if self._core is not None:
            return int(self._core.in_flight)
        return self._v1.in_flight if self._v1 is not None else 0

    @property
    def protocol_core(self) -> core.AgentProtocolCore | None:
        """The core protocol object (counters: requests_sent, responses_received, ...)."""
        return self._core

    def is_pending(self, correlation_id: str) -> bool:
        """Whether ``correlation_id`` is in flight here or still owes a reply (abandoned)."""
        if self._core is not None:
            return bool(self._core.is_pending(correlation_id))
        return self._v1 is not None and self._v1.current_cid == correlation_id

    async def wait_writable(
        self, timeout: float | None = None, correlation_id: str | None = None
    ) -> None:
        """Wait until the write queue has room (Timeout after ``timeout``, phase ``write``)."""
        check_timeout(timeout)
        c = self._core
        if c is not None and c.write_queue_full:
            await self._wait_writable(
                c, self.request_timeout if timeout is None else timeout, correlation_id
            )

    def use_accounting(
        self,
        metrics: core.ProtocolMetrics,
        on_affinity_rejected: Callable[[], object] | None = None,
    ) -> None:
        """Account the requests of :attr:`submit_request` in ``metrics`` (the pool's
        ProtocolMetrics); ``on_affinity_rejected()`` when the affinity map is full."""
        self._metrics = metrics
        self._on_affinity_rejected = on_affinity_rejected
        if self._core is not None:
            self._core.set_accounting(metrics, on_affinity_rejected)

    def _submit_v1(
        self,
        event: Any,
        correlation_id: str,
        timeout: float | None,
        st: core.ConnState,
        affinity: core.AffinityMap,
        flags: int,
    ) -> asyncio.Future[AgentResponse]:
        """:meth:`AgentProtocolCore.submit` for a v1 connection (same accounting)."""
        if flags & core.SUBMIT_STORE_AFFINITY:
            prev = affinity.peek(correlation_id)
            if (
                prev is not None
                and prev is not st
                and not prev.closed
                and prev.conn.is_pending(correlation_id)
            ):
                raise DuplicateCorrelationId(correlation_id, f"agent {self.agent_id!r}")
        t0 = time.monotonic()
        fut = self.send(event, correlation_id, timeout)
        now = time.monotonic()
        if not flags & core.SUBMIT_BEGUN:
            st.begin(now)
        if flags & core.SUBMIT_STORE_AFFINITY and not affinity.store(correlation_id, st, now):
            if self._on_affinity_rejected is not None:
                self._on_affinity_rejected()
        pm = self._metrics
        if pm is not None and flags & core.SUBMIT_TRACK:
            pm.inc_requests()
            pm.inc_in_flight()
            if flags & core.SUBMIT_SAMPLE:
                pm.record_serialization_time(now - t0)
        fut.add_done_callback(functools.partial(self._account_v1, st, now, flags))
        return fut

    def _account_v1(
        self, st: core.ConnState, started: float, flags: int, fut: asyncio.Future[AgentResponse]
    ) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        st.finish(True)
        pm = self._metrics
        if pm is not None:
            if flags & core.SUBMIT_TRACK:
                pm.inc_responses()
                pm.dec_in_flight()
            if flags & core.SUBMIT_DURATION:
                pm.record_request_duration(time.monotonic() - started)

    def supports_event(self, event_type: Any) -> bool:
        return self.capabilities is None or self.capabilities.supports_event(event_type)

    # -- requests --------------------------------------------------------------------------

    def send(
        self, event: Any, correlation_id: str, timeout: float | None = None
    ) -> asyncio.Future[AgentResponse]:
        """Send ``event`` and return the future of its reply (the pool's hot path).

        Same errors as :meth:`request`; encoding errors, a correlation id still in flight
        (DuplicateCorrelationId), an invalid ``timeout`` (ValueError) and a closed connection
        raise here. Cancelling the returned future abandons the request (a Cancel is sent and
        the reply it still owes is consumed, never taken for another request's).
        """
        if self._core is not None:
            fut: asyncio.Future[AgentResponse] = self._core.send_event(
                event, correlation_id, timeout
            )
            fut.add_done_callback(functools.partial(self._abandon_if_cancelled, correlation_id))
            return fut
        check_timeout(timeout)
        return asyncio.ensure_future(self._request_v1(event, correlation_id, timeout))

    def _abandon_if_cancelled(self, correlation_id: str, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            assert self._core is not None  # send() adds this callback on v2 only
            self._core.discard(correlation_id, fut)

    async def request(
        self, event: Any, correlation_id: str, timeout: float | None = None
    ) -> AgentResponse:
        """Send any event and wait for the agent's AgentResponse.

        ``timeout`` defaults to ``request_timeout``. While the write queue is full (the agent
        is not reading fast enough) it waits for room, within the same timeout. Raises
        Timeout, ConnectionClosed (EOF, close(), cancel()), InvalidMessage (the agent broke
        the framing, or its reply to this request does not decode), MessageTooLarge.
        """
        check_timeout(timeout)
        if self._core is None:
            return await self._request_v1(event, correlation_id, timeout)
        c = self._core
        if c.write_queue_full:
            await self._wait_writable(
                c, self.request_timeout if timeout is None else timeout, correlation_id
            )
        fut = c.send_event(event, correlation_id, timeout)
        try:
            return await fut  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            c.discard(correlation_id, fut)
            raise

    async def _wait_writable(
        self, c: core.AgentProtocolCore, t: float, correlation_id: str | None
    ) -> None:
        deadline = self._loop.time() + t
        while (drained := c.wait_writable()) is not None:
            remaining = deadline - self._loop.time()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                await asyncio.wait_for(drained, remaining)
            except asyncio.TimeoutError:
                raise Timeout(
                    t, agent_id=self.agent_id, phase="write", correlation_id=correlation_id
                ) from None

    async def configure(
        self,
        config: Any,
        config_version: str | None = None,
        *,
        correlation_id: str | None = None,
        timeout: float | None = None,
    ) -> bool:
        """Send a Configure event; True if the agent accepted it (Allow)."""
        cid = correlation_id or f"cfg-{next(self._ping_seq)}-{_now_ms()}"
        event = ConfigureEvent(config=config, config_version=config_version, correlation_id=cid)
        resp = await self.request(event, cid, timeout)
        return resp.decision.__class__.__name__ == "Allow"

    async def cancel(self, correlation_id: str, reason: CancelReason = CancelReason.MANUAL) -> bool:
        """Send Cancel for ``correlation_id`` and fail its local waiter (RequestCancelled).

        Returns True if a request was waiting; the reply it still owes is then consumed when
        it comes (docs/protocol.md, "Abandoned requests").
        """
        if self._core is None:
            return self._cancel_v1(correlation_id)
        c = self._core
        if c.closed:
            return False
        error = RequestCancelled(f"request {correlation_id} cancelled")
        if c.cancel(correlation_id, int(reason), error):
            return True
        c.write_frame(MessageType.CANCEL, self._encode_cancel(correlation_id, int(reason)))
        return False

    async def cancel_all(self, reason: CancelReason = CancelReason.MANUAL) -> int:
        """Cancel every outstanding request (one Cancel frame each); returns how many."""
        if self._core is None:
            return 1 if self._v1 is not None and self._cancel_v1(None) else 0
        count = 0
        for cid in self._core.waiting_ids():
            if await self.cancel(cid, reason):
                count += 1
        return count

    async def ping(self, timeout: float | None = None) -> float:
        """Round-trip a Ping; returns (and stores in ``last_rtt``) the RTT in seconds."""
        if self._core is None:
            raise WrongConnectionType("ping is not supported by v1 agents")
        check_timeout(timeout)
        seq = next(self._ping_seq)
        fut: asyncio.Future[float] = self._loop.create_future()
        t0 = time.perf_counter()
        self._pings[seq] = (fut, t0)
        try:
            self._core.write_frame(MessageType.PING, self._encode_ping(seq))
            t = self.request_timeout if timeout is None else timeout
            try:
                rtt = await asyncio.wait_for(fut, t)
            except asyncio.TimeoutError:
                raise Timeout(t, agent_id=self.agent_id, phase="ping") from None
        finally:
            self._pings.pop(seq, None)
        self.last_rtt = rtt
        return rtt

    # Payloads of the control frames the connection writes itself; a transport with another
    # encoding (agentpool.grpc) overrides these two.
    @staticmethod
    def _encode_cancel(correlation_id: str, reason: int) -> bytes:
        return _cancel_payload(correlation_id, reason)

    @staticmethod
    def _encode_ping(sequence: int) -> bytes:
        return _codec.encode_ping(sequence, _now_ms())

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Fail every waiter with ConnectionClosed and close the socket; idempotent."""
        if self._core is not None:
            self._core.close()
            if self._core.transport is None:
                self._on_lost(None)
        elif self._v1 is not None:
            self._v1.close()
        else:
            self._on_lost(None)

    def _abort(self) -> None:
        if self._core is not None:
            self._core.abort()
            if self._core.transport is None:
                self._on_lost(self._core.close_error)
        elif self._v1 is not None:
            self._v1.close()

    async def wait_closed(self) -> None:
        """Wait until the socket is closed (after close(), EOF or an error)."""
        await asyncio.shield(self._closed_fut)

    # -- callbacks from the core -------------------------------------------------------------

    def _notify(self, name: str, *args: object) -> object:
        fn = getattr(self.listener, name, None)
        if fn is None:
            return None
        try:
            return fn(self, *args)
        except Exception:
            log.exception("listener %s.%s failed", type(self.listener).__name__, name)
            return None

    def _on_frame(self, msg_type: MessageType, payload: bytes) -> None:
        try:
            self._handle_frame(msg_type, payload)
        except AgentProtocolError as exc:
            log.warning("agent %r: bad frame 0x%02x ignored: %s", self.agent_id, msg_type, exc)
        except Exception:
            log.exception("agent %r: error handling frame 0x%02x", self.agent_id, msg_type)

    def _handle_frame(self, msg_type: MessageType, payload: bytes) -> None:
        c = self._core
        assert c is not None  # frames come from the (v2) protocol core
        hs = self._hs_waiter
        if hs is not None:
            # Frames the agent wrote right after its HandshakeResponse (in the same read)
            # are handled below as usual once the handshake is done.
            self._hs_waiter = None
            if hs.done():
                return
            try:
                self._finish_handshake(msg_type, payload)
            except AgentProtocolError as exc:
                hs.set_exception(exc)
                c.abort(ConnectionClosed("handshake failed"))
            else:
                hs.set_result(None)
            return
        if msg_type == MessageType.PONG:
            self._on_pong(payload)
        elif msg_type == MessageType.HEALTH_STATUS:
            status = self._codec.decode_control(msg_type, payload)
            if isinstance(status, HealthStatus):
                if status.state != HealthState.UNSPECIFIED:
                    self.health_state = HealthState(status.state)
                self.last_health = status
                self.last_health_at = time.monotonic()
                self._notify("on_health", status)
        elif msg_type == MessageType.FLOW_CONTROL:
            sig = self._codec.decode_control(msg_type, payload)
            if isinstance(sig, FlowControlSignal):
                paused = sig.action == FlowAction.PAUSE
                if paused != self.is_paused:
                    self.is_paused = paused
                    self._notify("on_flow_control", paused)
        elif msg_type == MessageType.METRICS_REPORT:
            report = self._codec.decode_control(msg_type, payload)
            if isinstance(report, MetricsReport):
                self._notify("on_metrics", report)
        elif msg_type == MessageType.CONFIG_UPDATE_REQUEST:
            req = self._codec.decode_control(msg_type, payload)
            if isinstance(req, ConfigUpdateRequest):
                resp = self._notify("on_config_update", req)
                if isinstance(resp, ConfigUpdateResponse) and not c.closed:
                    c.write_frame(
                        MessageType.CONFIG_UPDATE_REQUEST, self._codec.encode_control(resp)
                    )
        elif msg_type == MessageType.AGENT_RESPONSE:
            self._bad_response(payload)
        else:
            log.debug("agent %r: ignoring frame 0x%02x", self.agent_id, int(msg_type))

    def _bad_response(self, payload: bytes) -> None:
        """An AgentResponse the core could not decode: fail its waiter with the reason."""
        error: AgentProtocolError
        try:
            self._codec.decode_response(payload)
        except AgentProtocolError as exc:
            error = exc
        except Exception as exc:
            error = InvalidMessage(f"{type(exc).__name__}: {exc}")
        else:
            log.warning("agent %r: AgentResponse before a codec was negotiated", self.agent_id)
            return
        cid = _response_correlation_id(self.encoding, payload)
        assert self._core is not None  # the core passed this reply on
        if cid and self._core.fail_waiter(cid, error):
            log.warning(
                "agent %r: undecodable AgentResponse for %r: %s", self.agent_id, cid, error
            )
        else:
            log.warning("agent %r: undecodable AgentResponse dropped: %s", self.agent_id, error)

    def _on_pong(self, payload: bytes) -> None:
        try:
            seq = _codec.decode_ping(payload).sequence
        except AgentProtocolError:
            log.debug("agent %r: unparseable pong", self.agent_id)
            return
        entry = self._pings.pop(seq, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(time.perf_counter() - entry[1])

    def _on_lost(self, exc: BaseException | None) -> None:
        if self._closed_fut.done():
            return
        self._closed_fut.set_result(None)
        if self._connected:
            self.health_state = HealthState.UNHEALTHY
        hs = self._hs_waiter
        if hs is not None and not hs.done():
            hs.set_exception(
                core.clone_error(exc)
                if exc is not None
                else ConnectionClosed("connection closed during the handshake")
            )
        for fut, _t0 in self._pings.values():
            if not fut.done():
                fut.set_exception(ConnectionClosed("connection lost"))
        self._pings.clear()
        if self._connected:
            self._notify("on_closed", exc)

    # -- legacy v1 ---------------------------------------------------------------------------

    async def _request_v1(
        self, event: Any, correlation_id: str, timeout: float | None
    ) -> AgentResponse:
        v1 = self._v1
        if v1 is None or v1.closed:
            raise ConnectionClosed()
        frame = _v1.encode_request(event, correlation_id, self.agent_id)
        t = self.request_timeout if timeout is None else timeout
        try:
            doc = await asyncio.wait_for(v1.exchange(frame, correlation_id), t)
        except asyncio.TimeoutError as exc:
            if isinstance(exc, Timeout):
                raise
            # The late reply would be taken for the next request's: drop the connection.
            v1.close(ConnectionClosed("v1 request timed out"))
            raise Timeout(t, agent_id=self.agent_id, correlation_id=correlation_id) from None
        return _v1.parse_response(doc)

    def _cancel_v1(self, correlation_id: str | None) -> bool:
        v1 = self._v1
        if v1 is None or v1.closed or v1.current_cid is None:
            return False
        if correlation_id is not None and v1.current_cid != correlation_id:
            return False
        v1.close(ConnectionClosed(f"request {v1.current_cid} cancelled"))
        return True


def _response_correlation_id(encoding: str, payload: bytes) -> str:
    """Best-effort ``audit.custom.correlation_id`` of an AgentResponse payload; never raises.

    Maps (JSON, MessagePack) and MessagePack positional arrays (audit at index 5, custom at
    index 4 of audit) are searched; "" when there is none.
    """
    try:
        obj: Any = (
            msgpack.unpackb(payload, raw=False) if encoding == "msgpack" else orjson.loads(payload)
        )
        audit: Any = obj.get("audit") if isinstance(obj, dict) else obj[5]
        custom: Any = audit.get("custom") if isinstance(audit, dict) else audit[4]
        cid = custom.get("correlation_id")
        if isinstance(cid, bytes):
            cid = cid.decode("utf-8")
        return cid if isinstance(cid, str) else ""
    except Exception:
        return ""
