"""The proxy side of a gRPC agent connection (``grpc://`` and ``grpcs://`` endpoints).

:class:`GrpcAgentConnection` is an :class:`~agentpool.connection.AgentConnection` whose
protocol core runs over a :class:`_StreamTransport` instead of a socket: the core encodes
each event straight to a serialized ``ProxyToAgent`` message (its encoder is
:func:`~agentpool.grpc._convert.encode_event`) and writes it as a frame; the transport takes
the frames apart and writes each payload as one message on the connection's ``ProcessStream``.
Replies come back the same way: every ``AgentToProxy{response}`` is handed to the core as an
AgentResponse frame, so routing by correlation id, timeouts, write bounds and counters are the
core's, exactly as on UDS. Control messages (health, flow control, metrics, config update
requests, pongs, logs) are handled here.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import ssl as _ssl
import time
from dataclasses import dataclass
from typing import Any

from .._impl import core
from .._version import __version__
from ..connection import AgentConnection, ConnectionListener
from ..enums import EventType, FlowAction, HealthState, MessageType
from ..errors import (
    AgentProtocolError,
    ConnectionClosed,
    ConnectionFailed,
    InvalidMessage,
    MessageTooLarge,
    Timeout,
    WrongConnectionType,
)
from ..messages import ConfigUpdateRequest, FlowControlSignal, HealthStatus, MetricsReport
from . import _convert

__all__ = [
    "PROCESS_STREAM",
    "GrpcAgentConnection",
    "GrpcTLS",
    "channel_credentials",
    "parse_grpc_endpoint",
]

log = logging.getLogger("agentpool.grpc")

#: The method path of ``zentinel.agent.v2.AgentServiceV2/ProcessStream``.
PROCESS_STREAM = "/zentinel.agent.v2.AgentServiceV2/ProcessStream"

# First byte of a serialized AgentToProxy whose oneof is `response` (field 2, length-delimited).
_RESPONSE_TAG = 0x12
_AGENT_RESPONSE_TYPE = bytes((int(MessageType.AGENT_RESPONSE),))
# First bytes a serialized ProxyToAgent can start with: the tags of its fields 1-11.
_PROXY_TO_AGENT_TAGS = frozenset(bytes(((f << 3) | 2,)) for f in range(1, 12))
_NOT_ON_GRPC = frozenset(
    {EventType.CONFIGURE, EventType.GUARDRAIL_INSPECT, EventType.WEBSOCKET_FRAME}
)
# Messages queued for the stream beyond which the core is told to stop writing.
_HIGH_WATER = 1024 * 1024
_LOW_WATER = 256 * 1024
# After a local close, how long the agent may take to end its side of the stream.
_CLOSE_GRACE = 0.25


def grpc_module() -> Any:
    """Import grpcio lazily: only gRPC endpoints need it (``pip install 'agentpool[grpc]'``)."""
    try:
        import grpc
        import grpc.aio
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ConnectionFailed(
            "gRPC endpoints need grpcio and protobuf: pip install 'agentpool[grpc]'"
        ) from exc
    return grpc


@dataclass(frozen=True, slots=True)
class GrpcTLS:
    """TLS settings for ``grpcs://`` endpoints (PEM bytes, as grpcio takes them).

    ``root_certificates`` None uses the system roots; ``certificate_chain`` and
    ``private_key`` together enable a client certificate; ``server_hostname`` checks the
    agent's certificate against that name instead of the endpoint's host.
    """

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_hostname: str | None = None

    def channel_credentials(self) -> Any:
        return grpc_module().ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


def channel_credentials(ssl: Any) -> tuple[Any, str | None]:
    """``(grpc.ChannelCredentials, server name override)`` for a ``grpcs://`` connection.

    ``ssl`` is None (system roots), a :class:`GrpcTLS`, ready ``grpc.ChannelCredentials``, or
    an :class:`ssl.SSLContext`, of which gRPC can use the CA certificates loaded from files
    (``load_verify_locations(cafile=...)``; none loaded means the system roots). grpcio has its
    own TLS stack: a context's client certificate, ciphers or ``check_hostname=False`` cannot
    be carried over, and a context that does not verify the agent is refused (ValueError).
    """
    if ssl is None:
        return GrpcTLS().channel_credentials(), None
    if isinstance(ssl, GrpcTLS):
        return ssl.channel_credentials(), ssl.server_hostname
    if isinstance(ssl, _ssl.SSLContext):
        if ssl.verify_mode == _ssl.CERT_NONE:
            raise ValueError(
                "gRPC always verifies the agent's certificate; this SSLContext does not"
            )
        ders = ssl.get_ca_certs(binary_form=True)
        roots = "".join(_ssl.DER_cert_to_PEM_cert(d) for d in ders).encode() if ders else None
        return GrpcTLS(root_certificates=roots).channel_credentials(), None
    return ssl, None


def parse_grpc_endpoint(endpoint: str) -> tuple[bool, str]:
    """``grpc://host:port`` / ``grpcs://host:port`` as ``(tls, "host:port")``."""
    ep = endpoint.strip()
    if ep.startswith("grpcs://"):
        tls, rest = True, ep[8:]
    elif ep.startswith("grpc://"):
        tls, rest = False, ep[7:]
    else:
        raise ConnectionFailed(f"invalid endpoint {endpoint!r}: expected grpc:// or grpcs://")
    rest = rest.rstrip("/")
    host, sep, port_s = rest.rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ConnectionFailed(f"invalid endpoint {endpoint!r}: expected grpc://host:port")
    return tls, rest


def is_grpc_endpoint(endpoint: str) -> bool:
    return endpoint.lstrip().startswith(("grpc://", "grpcs://"))


def _rpc_error(exc: Any, where: str) -> AgentProtocolError:
    """A typed error for a failed gRPC call."""
    grpc = grpc_module()
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # grpcio says "Received message larger than max (<size> vs. <max>)"
        m = re.search(r"\((\d+) vs\. (\d+)\)", details or "")
        if m is not None:
            return MessageTooLarge(int(m.group(1)), int(m.group(2)))
        return MessageTooLarge(_convert.MAX_MESSAGE_SIZE + 1, _convert.MAX_MESSAGE_SIZE)
    name = getattr(code, "name", "UNKNOWN")
    return ConnectionClosed(f"{where}: gRPC {name}: {details}")


class _StreamTransport(asyncio.Transport):
    """asyncio transport over one gRPC stream, for the protocol core.

    ``write`` receives whole frames (the core never splits one) and queues their payloads;
    one task writes them to the stream in order, another reads the agent's messages. The
    queued size is reported as the write buffer, with pause/resume_writing around it, so the
    core's write bound applies unchanged.
    """

    def __init__(self, conn: GrpcAgentConnection, call: Any, loop: asyncio.AbstractEventLoop):
        super().__init__()
        self._conn = conn
        self._core = conn._core
        self._call = call
        self._loop = loop
        self._out: collections.deque[bytes] = collections.deque()
        self._out_size = 0
        self._wake: asyncio.Future[None] | None = None
        self._paused = False
        self._closing = False
        self._torn_down = False
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._writer = self._loop.create_task(self._write_loop())
        self._reader = self._loop.create_task(self._read_loop())

    # -- asyncio.Transport ----------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:  # type: ignore[override]
        if self._closing:
            return
        mv = memoryview(data)
        i, n = 0, len(mv)
        while i < n:
            size = int.from_bytes(mv[i : i + 4], "big")
            payload = bytes(mv[i + 5 : i + 4 + size])
            i += 4 + size
            if payload[:1] not in _PROXY_TO_AGENT_TAGS:
                # never put a UDS-encoded payload on the stream (the agent would fail it)
                log.error(
                    "agent %s: frame 0x%02x is not a ProxyToAgent message; not sent",
                    self._conn.agent_id,
                    mv[i - size],
                )
                continue
            self._out.append(payload)
            self._out_size += size - 1
        w = self._wake
        if w is not None and not w.done():
            w.set_result(None)
        if not self._paused and self._out_size > _HIGH_WATER:
            self._paused = True
            self._core.pause_writing()

    def get_write_buffer_size(self) -> int:
        return self._out_size

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Send what is queued, end our side of the stream, then tear down (bounded)."""
        if self._closing:
            return
        self._closing = True
        w = self._wake
        if w is not None and not w.done():
            w.set_result(None)
        self._loop.call_later(_CLOSE_GRACE * 2, self.abort)

    def abort(self) -> None:
        self._closing = True
        self._teardown()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._conn.endpoint
        return default

    # -- tasks ------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        call = self._call
        out = self._out
        try:
            while True:
                while out:
                    msg = out[0]
                    await call.write(msg)
                    out.popleft()
                    self._out_size -= len(msg)
                    if self._paused and self._out_size <= _LOW_WATER:
                        self._paused = False
                        self._core.resume_writing()
                if self._closing:
                    break
                self._wake = self._loop.create_future()
                await self._wake
                self._wake = None
            await call.done_writing()
            # Give the agent a moment to end its side, then drop the stream.
            reader = self._reader
            if reader is not None and not reader.done():
                await asyncio.wait({reader}, timeout=_CLOSE_GRACE)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The call is over (or unusable): fail everything waiting on it, typed.
            log.debug("agent %s: gRPC write failed: %r", self._conn.agent_id, exc)
            if self._closing:
                self._teardown()
            elif isinstance(exc, grpc_module().aio.AioRpcError):
                self._core.abort(_rpc_error(exc, self._conn.endpoint))
            else:
                self._core.abort(
                    ConnectionClosed(f"{self._conn.endpoint}: gRPC write failed: {exc!r}")
                )
            return
        self._teardown()

    async def _read_loop(self) -> None:
        grpc = grpc_module()
        eof = grpc.aio.EOF
        call = self._call
        core = self._core
        conn = self._conn
        error: AgentProtocolError
        try:
            while True:
                msg = await call.read()
                if msg is eof:
                    error = ConnectionClosed("agent ended the gRPC stream")
                    break
                if msg and msg[0] == _RESPONSE_TAG:
                    core.data_received(
                        (len(msg) + 1).to_bytes(4, "big") + _AGENT_RESPONSE_TYPE + msg
                    )
                else:
                    conn._on_message(msg)
                if core.closed:
                    return
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            error = _rpc_error(exc, conn.endpoint)
        except Exception as exc:
            error = ConnectionClosed(f"{conn.endpoint}: {type(exc).__name__}: {exc}")
        if not self._closing:
            core.abort(error)
        else:
            self._teardown()

    def _teardown(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        self._closing = True
        current = asyncio.current_task(self._loop) if self._loop.is_running() else None
        for task in (self._writer, self._reader):
            if task is not None and task is not current and not task.done():
                task.cancel()
        self._call.cancel()
        self._out.clear()
        self._out_size = 0
        self._conn._close_channel()
        self._loop.call_soon(self._core.connection_lost, None)


class GrpcAgentConnection(AgentConnection):
    """One ``ProcessStream`` to a gRPC agent, driven by the same protocol core as UDS.

    Open with :meth:`open` (or ``AgentConnection.open`` with a ``grpc://``/``grpcs://``
    endpoint; ``ssl`` takes a :class:`GrpcTLS`, a ``grpc.ChannelCredentials`` or an
    :class:`ssl.SSLContext`, see :func:`channel_credentials`). One channel
    (one HTTP/2 connection) per instance, so a pool's ``connections_per_agent`` gives that
    many independent connections.
    """

    # always v2: the protocol core is made with the connection and never dropped
    _core: core.AgentProtocolCore

    def __init__(
        self,
        endpoint: str,
        *,
        agent_id: str,
        request_timeout: float = 30.0,
        listener: ConnectionListener | None = None,
        ssl: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(
            endpoint,
            agent_id=agent_id,
            protocol="v2",
            request_timeout=request_timeout,
            listener=listener,
            **options,
        )
        self._secure, self._target = parse_grpc_endpoint(endpoint)
        if ssl is not None and not self._secure:
            raise ValueError(f"ssl given for {endpoint!r}; use grpcs:// for TLS")
        self._ssl = ssl
        self.encoding = "protobuf"
        self._encode_event = _convert.encode_event
        self._core.set_encoder(_convert.encode_event)
        self._core.set_decoder(_convert.decode_response)
        self._channel: Any = None
        self._call: Any = None
        self._channel_closed: asyncio.Future[None] | None = None

    @classmethod
    async def open(  # type: ignore[override]
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
        **options: Any,
    ) -> GrpcAgentConnection:
        """Open the channel and the stream and handshake, all within ``connect_timeout``.

        ``encoding`` is ignored (gRPC is protobuf); ``protocol`` must be ``"v2"``; other
        keyword ``options`` go to :class:`~agentpool.connection.AgentConnection` (its core).
        """
        if protocol != "v2":
            raise ValueError(f"gRPC endpoints speak protocol v2 only, not {protocol!r}")
        conn = cls(
            endpoint,
            agent_id=agent_id,
            request_timeout=request_timeout,
            listener=listener,
            ssl=ssl,
            **options,
        )
        try:
            await asyncio.wait_for(
                conn._connect(proxy_id, proxy_version, config), timeout=connect_timeout
            )
        except asyncio.TimeoutError as exc:
            conn._abort()
            if isinstance(exc, Timeout):
                raise
            raise Timeout(connect_timeout) from None
        except BaseException:
            conn._abort()
            raise
        return conn

    async def _connect(
        self, proxy_id: str, proxy_version: str, config: Any, ssl: Any = None
    ) -> None:
        """Channel, stream and handshake (TLS settings come from the constructor's ``ssl``)."""
        grpc = grpc_module()
        limit = _convert.MAX_MESSAGE_SIZE
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            ("grpc.enable_retries", 0),
            # one TCP connection per GrpcAgentConnection: channels to the same target would
            # otherwise share one through grpcio's global subchannel pool
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if self._secure:
            creds, name = channel_credentials(self._ssl)
            if name:
                options.append(("grpc.ssl_target_name_override", name))
            self._channel = grpc.aio.secure_channel(self._target, creds, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(self._target, options=options)
        self._call = call = self._channel.stream_stream(PROCESS_STREAM)()
        try:
            await call.write(_convert.encode_handshake(proxy_id, proxy_version, config))
            reply = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise ConnectionFailed(
                f"{self.endpoint}: gRPC {exc.code().name}: {exc.details()}"
            ) from None
        except (asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
            raise ConnectionFailed(f"{self.endpoint}: {type(exc).__name__}: {exc}") from None
        if reply is grpc.aio.EOF:
            raise ConnectionFailed(f"{self.endpoint}: agent ended the stream during the handshake")
        msg = _convert.parse_envelope(reply)
        which = msg.WhichOneof("message")
        if which != "handshake":
            raise InvalidMessage(f"Expected HandshakeResponse, got {which}")
        hs = msg.handshake
        if not hs.success:
            raise ConnectionFailed(
                hs.error if hs.HasField("error") and hs.error else "Unknown handshake error"
            )
        caps = _convert.capabilities_from_proto(hs.capabilities)
        # Advertise only what this transport can deliver: Configure (so config push),
        # guardrail and WebSocket events are refused on gRPC.
        caps.features.config_push = caps.features.guardrails = caps.features.websocket = False
        caps.supported_events = [e for e in caps.supported_events if e not in _NOT_ON_GRPC]
        self.capabilities = caps
        self.protocol_version = hs.protocol_version
        transport = _StreamTransport(self, call, self._loop)
        self._core.connection_made(transport)
        transport.start()
        self._connected = True

    @classmethod
    async def from_socket(cls, *args: Any, **kwargs: Any) -> AgentConnection:
        """Not available: reverse connections speak the UDS framing, never gRPC."""
        raise WrongConnectionType("gRPC connections cannot adopt a socket")

    # -- overrides: messages in the gRPC encoding ----------------------------------------------

    # Cancel and Ping are written (by the connection and by the core) in the gRPC encoding.
    _encode_cancel = staticmethod(_convert.encode_cancel)
    _encode_ping = staticmethod(_convert.encode_ping)

    def close(self) -> None:
        """Fail every waiter with ConnectionClosed and close the stream; idempotent."""
        super().close()
        if self._core.transport is None:
            self._close_channel()

    def _abort(self) -> None:
        super()._abort()
        if self._core.transport is None:
            self._close_channel()

    async def wait_closed(self) -> None:
        await super().wait_closed()
        if self._channel_closed is not None:
            await asyncio.shield(self._channel_closed)

    def _close_channel(self) -> None:
        if self._channel_closed is not None:
            return
        self._channel_closed = self._loop.create_future()
        if self._call is not None:
            self._call.cancel()
        channel = self._channel
        if channel is None:
            self._channel_closed.set_result(None)
            return
        task = self._loop.create_task(channel.close())
        task.add_done_callback(self._channel_done)

    def _channel_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.debug(
                "agent %s: closing the gRPC channel failed: %r", self.agent_id, task.exception()
            )
        fut = self._channel_closed
        if fut is not None and not fut.done():
            fut.set_result(None)

    # -- messages from the agent ------------------------------------------------------------

    def _handle_frame(self, msg_type: MessageType, payload: bytes) -> None:
        """Only undecodable AgentResponse frames come here (the core routes the rest)."""
        if msg_type == MessageType.AGENT_RESPONSE:
            self._on_message(payload, bad_response=True)

    def _on_message(self, raw: bytes, *, bad_response: bool = False) -> None:
        try:
            self._dispatch(raw, bad_response)
        except AgentProtocolError as exc:
            log.warning("agent %s: bad gRPC message ignored: %s", self.agent_id, exc)
        except Exception:
            log.exception("agent %s: error handling a gRPC message", self.agent_id)

    def _dispatch(self, raw: bytes, bad_response: bool) -> None:
        msg = _convert.parse_envelope(raw)
        which = msg.WhichOneof("message")
        if which == "response":
            if not bad_response:
                # A response whose encoding does not start with its field tag: route it anyway.
                self._core.data_received(
                    (len(raw) + 1).to_bytes(4, "big") + _AGENT_RESPONSE_TYPE + raw
                )
                return
            cid = msg.response.correlation_id
            try:
                _convert.response_from_proto(msg.response)
            except AgentProtocolError as exc:
                if not self._core.fail_waiter(cid, exc):
                    raise
                log.warning(
                    "agent %s: undecodable AgentResponse for %r: %s", self.agent_id, cid, exc
                )
            return
        if which == "log":
            lm = msg.log
            level = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
            log.log(level.get(lm.level, logging.DEBUG), "agent %s: %s", self.agent_id, lm.message)
            return
        if which == "handshake" or which is None:
            log.debug("agent %s: ignoring gRPC message %s", self.agent_id, which)
            return
        item = _convert.control_from_proto(msg)
        if item is None:
            return
        kind, obj = item
        if kind == MessageType.PONG:
            entry = self._pings.pop(obj, None)
            if entry is not None and not entry[0].done():
                entry[0].set_result(time.perf_counter() - entry[1])
        elif kind == MessageType.HEALTH_STATUS:
            assert isinstance(obj, HealthStatus)
            if obj.state != HealthState.UNSPECIFIED:
                self.health_state = HealthState(obj.state)
            self.last_health = obj
            self._notify("on_health", obj)
        elif kind == MessageType.FLOW_CONTROL:
            assert isinstance(obj, FlowControlSignal)
            paused = obj.action == FlowAction.PAUSE
            if paused != self.is_paused:
                self.is_paused = paused
                self._notify("on_flow_control", paused)
        elif kind == MessageType.METRICS_REPORT:
            assert isinstance(obj, MetricsReport)
            self._notify("on_metrics", obj)
        elif kind == MessageType.CONFIG_UPDATE_REQUEST:
            assert isinstance(obj, ConfigUpdateRequest)
            # ProcessStream has no message for the answer; the listener still sees the request.
            self._notify("on_config_update", obj)
