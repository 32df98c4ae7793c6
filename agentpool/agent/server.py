"""The agent side of the protocol: write Zentinel agents in Python.

Subclass :class:`Agent`, override the handlers you need, and serve it with
:class:`AgentServer` on a Unix socket or a TCP port. On the wire the server behaves like an
upstream Rust agent (docs/protocol.md, "Agent side"): it answers the JSON handshake with its
capabilities and the negotiated encoding, replies to every event (guardrail included) with
``version: 2`` and the correlation id in ``audit.custom``, echoes pings verbatim and treats
framing errors as fatal for the connection. An event it cannot decode, or whose handler
fails, is answered by the :class:`ErrorPolicy` ``on_error`` (Block 500 by default; Rust
agents fail open). Unlike a Rust agent it handles the events of one connection concurrently,
at most the advertised ``max_concurrency`` at a time, and answers them in completion order;
a new event for a correlation id supersedes the one still in progress. It can also push
health, metrics, config update requests and flow control signals to the connected proxies.

A legacy v1 mode (``protocol="v1"``: 4-byte length + JSON envelope, one request at a time) lets
tests drive the proxy's v1 client.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import logging
import math
import ssl as _ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from .. import codec as _codec
from .._impl import core
from .._unixsock import FileId, bind_unix, unlink_if_ours
from .._version import __version__
from ..enums import CancelReason, EventType, FlowAction, HealthState, MessageType
from ..errors import AgentProtocolError, ConnectionClosed, InvalidMessage, Timeout
from ..messages import (
    AgentCapabilities,
    AgentFeatures,
    AgentLimits,
    AgentResponse,
    AuditMetadata,
    Block,
    ConfigUpdateRequest,
    ConfigUpdateResponse,
    ConfigureEvent,
    FlowControlSignal,
    GuardrailInspectEvent,
    HandshakeRequest,
    HandshakeResponse,
    HealthStatus,
    MetricsReport,
    RequestBodyChunkEvent,
    RequestCompleteEvent,
    RequestHeadersEvent,
    ResponseBodyChunkEvent,
    ResponseHeadersEvent,
    WebSocketClose,
    WebSocketFrameEvent,
)

__all__ = [
    "Agent",
    "AgentServer",
    "AgentSession",
    "ErrorPolicy",
    "current_session",
    "handle_event",
]

log = logging.getLogger("agentpool.agent.server")

#: The session whose event the running handler serves (set for every handler task).
current_session: contextvars.ContextVar[AgentSession] = contextvars.ContextVar(
    "agentpool_current_session"
)

_EVENT_TYPES = frozenset(
    {
        MessageType.REQUEST_HEADERS,
        MessageType.REQUEST_BODY_CHUNK,
        MessageType.RESPONSE_HEADERS,
        MessageType.RESPONSE_BODY_CHUNK,
        MessageType.REQUEST_COMPLETE,
        MessageType.WEBSOCKET_FRAME,
        MessageType.GUARDRAIL_INSPECT,
        MessageType.CONFIGURE,
    }
)

_V1_EVENT_TYPES: dict[str, MessageType] = {
    "request_headers": MessageType.REQUEST_HEADERS,
    "request_body_chunk": MessageType.REQUEST_BODY_CHUNK,
    "response_headers": MessageType.RESPONSE_HEADERS,
    "response_body_chunk": MessageType.RESPONSE_BODY_CHUNK,
    "request_complete": MessageType.REQUEST_COMPLETE,
    "web_socket_frame": MessageType.WEBSOCKET_FRAME,
    "guardrail_inspect": MessageType.GUARDRAIL_INSPECT,
    "configure": MessageType.CONFIGURE,
}

V1_MAX_MESSAGE_SIZE = 10 * 1024 * 1024
# v1 answers one request at a time; a proxy that pipelines more than this is not read further.
_V1_BACKLOG = 64
DEFAULT_MAX_WRITE_BUFFER = 16 * 1024 * 1024
# After close(), how long the transport may take to hand its last bytes to the kernel before
# it is aborted (a proxy that stopped reading would otherwise keep it open forever).
_CLOSE_GRACE = 0.25


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class ErrorPolicy:
    """What the agent answers for an event it cannot decode or whose handler fails.

    ``ErrorPolicy.block(status)`` (the default, status 500) answers Block: a security agent
    that crashed has not inspected the request, so letting it through would turn every bug
    or malformed event into a bypass. ``ErrorPolicy.allow()`` fails open, as upstream's Rust
    agents do, for agents whose verdict is advisory. Either way the failure is logged with
    the event's correlation id, and the reply carries the audit tag ``agent-error`` (handler
    raised, returned a non-response, or its response could not be encoded) or
    ``decode-error``. WebSocket frames also get ``websocket_decision``: ``"allow"``, or a
    close with code 1011 when blocking.
    """

    action: Literal["allow", "block"] = "block"
    status: int = 500
    body: str | None = None

    def __post_init__(self) -> None:
        if self.action not in ("allow", "block"):
            raise ValueError(f"ErrorPolicy action must be 'allow' or 'block', not {self.action!r}")
        if isinstance(self.status, bool) or not isinstance(self.status, int):
            raise ValueError(f"ErrorPolicy status must be an int, not {self.status!r}")
        if not 100 <= self.status <= 599:
            raise ValueError(f"ErrorPolicy status must be an HTTP status (100-599): {self.status}")

    @classmethod
    def allow(cls) -> ErrorPolicy:
        """Fail open: answer Allow."""
        return cls("allow")

    @classmethod
    def block(cls, status: int = 500, body: str | None = None) -> ErrorPolicy:
        """Fail closed: answer Block with ``status`` (and ``body``)."""
        return cls("block", status, body)

    def response(self, msg_type: int, tag: str = "agent-error") -> AgentResponse:
        """The reply this policy gives for a failed event of type ``msg_type``."""
        audit = AuditMetadata(tags=[tag])
        if self.action == "allow":
            resp = AgentResponse(audit=audit)
            if msg_type == MessageType.WEBSOCKET_FRAME:
                resp.websocket_decision = "allow"
            return resp
        resp = AgentResponse(decision=Block(self.status, self.body), audit=audit)
        if msg_type == MessageType.WEBSOCKET_FRAME:
            resp.websocket_decision = WebSocketClose(1011, "agent error")
        return resp

    def __str__(self) -> str:
        return "allow" if self.action == "allow" else f"block {self.status}"


DEFAULT_ERROR_POLICY = ErrorPolicy()


def _event_correlation_id(event: Any) -> str:
    if isinstance(event, RequestHeadersEvent):
        return event.metadata.correlation_id
    return str(getattr(event, "correlation_id", "") or "")


class Agent:
    """Base class for Python agents: override the ``on_*`` handlers you need.

    Every event handler returns an :class:`AgentResponse` (default: Allow). Handlers of one
    connection run concurrently as tasks; a Cancel for a running request calls
    :meth:`on_cancel` and cancels the handler task (no reply is sent for it then).
    ``fast_path`` may be overridden to answer raw payloads without decoding (benchmarks).

    ``max_concurrency`` is advertised in the handshake (``concurrent_requests``) and
    enforced: a connection never runs more handlers at once; further events wait (and the
    connection stops reading) until one finishes. ``on_error`` answers events that cannot
    be decoded or whose handler fails (see :class:`ErrorPolicy`; Block 500 by default).
    """

    agent_id: str = "python-agent"
    name: str = "Python agent"
    version: str = __version__
    supported_events: Sequence[EventType] = (
        EventType.REQUEST_HEADERS,
        EventType.REQUEST_BODY_CHUNK,
        EventType.RESPONSE_HEADERS,
        EventType.RESPONSE_BODY_CHUNK,
        EventType.REQUEST_COMPLETE,
        EventType.WEBSOCKET_FRAME,
        EventType.GUARDRAIL_INSPECT,
        EventType.CONFIGURE,
    )
    max_concurrency: int = 100
    on_error: ErrorPolicy = DEFAULT_ERROR_POLICY

    def capabilities(self) -> AgentCapabilities:
        """What the handshake advertises."""
        return AgentCapabilities(
            agent_id=self.agent_id,
            name=self.name,
            version=self.version,
            supported_events=list(self.supported_events),
            features=AgentFeatures(
                streaming_body=True,
                websocket=True,
                guardrails=True,
                config_push=True,
                metrics_export=True,
                concurrent_requests=self.max_concurrency,
                cancellation=True,
                flow_control=True,
                health_reporting=True,
            ),
            limits=AgentLimits(),
        )

    def fast_path(self, msg_type: int, payload: bytes, codec: _codec.Codec) -> bytes | None:
        """Answer an event from its raw payload (return the AgentResponse payload) or None."""
        return None

    async def on_request_headers(self, event: RequestHeadersEvent) -> AgentResponse:
        return AgentResponse.allow()

    async def on_request_body_chunk(self, event: RequestBodyChunkEvent) -> AgentResponse:
        return AgentResponse.allow()

    async def on_response_headers(self, event: ResponseHeadersEvent) -> AgentResponse:
        return AgentResponse.allow()

    async def on_response_body_chunk(self, event: ResponseBodyChunkEvent) -> AgentResponse:
        return AgentResponse.allow()

    async def on_request_complete(self, event: RequestCompleteEvent) -> AgentResponse:
        return AgentResponse.allow()

    async def on_websocket_frame(self, event: WebSocketFrameEvent) -> AgentResponse:
        return AgentResponse.websocket_allow()

    async def on_guardrail_inspect(self, event: GuardrailInspectEvent) -> AgentResponse:
        return AgentResponse.allow()

    async def on_configure(self, config: Any, config_version: str | None) -> bool:
        """Accept (True) or reject (False) a configuration pushed by the proxy."""
        return True

    async def on_cancel(self, correlation_id: str, reason: CancelReason) -> None:
        """The proxy cancelled ``correlation_id`` (its handler task is cancelled next)."""

    def on_handshake(self, request: HandshakeRequest) -> str | None:
        """Return an error string to refuse the proxy, None to accept."""
        return None


async def handle_event(
    agent: Agent,
    msg_type: int,
    event: Any,
    cid: str = "",
    on_error: ErrorPolicy | None = None,
) -> AgentResponse:
    """Run the agent's handler for one decoded event.

    A handler that raises or returns something other than an :class:`AgentResponse` is
    answered by ``on_error`` (default: the agent's :attr:`Agent.on_error`), logged with
    the correlation id.
    """
    try:
        if msg_type == MessageType.REQUEST_HEADERS:
            result: Any = await agent.on_request_headers(event)
        elif msg_type == MessageType.REQUEST_BODY_CHUNK:
            result = await agent.on_request_body_chunk(event)
        elif msg_type == MessageType.RESPONSE_HEADERS:
            result = await agent.on_response_headers(event)
        elif msg_type == MessageType.RESPONSE_BODY_CHUNK:
            result = await agent.on_response_body_chunk(event)
        elif msg_type == MessageType.REQUEST_COMPLETE:
            result = await agent.on_request_complete(event)
        elif msg_type == MessageType.WEBSOCKET_FRAME:
            result = await agent.on_websocket_frame(event)
        elif msg_type == MessageType.GUARDRAIL_INSPECT:
            result = await agent.on_guardrail_inspect(event)
        else:
            assert isinstance(event, ConfigureEvent)
            if await agent.on_configure(event.config, event.config_version):
                return AgentResponse.allow()
            return AgentResponse(decision=Block(status=500, body="Configuration rejected"))
    except asyncio.CancelledError:
        raise
    except Exception:
        policy = agent.on_error if on_error is None else on_error
        log.exception(
            "handler for event 0x%02x (correlation id %r) failed; answering %s",
            msg_type,
            cid,
            policy,
        )
        return policy.response(msg_type)
    if not isinstance(result, AgentResponse):
        policy = agent.on_error if on_error is None else on_error
        log.error(
            "handler for event 0x%02x (correlation id %r) returned %s, not an AgentResponse;"
            " answering %s",
            msg_type,
            cid,
            type(result).__name__,
            policy,
        )
        return policy.response(msg_type)
    return result


class _Flusher:
    """Write coalescing and backpressure shared by both session kinds.

    The frames of one loop turn go out in one write. While the proxy does not read (the
    transport paused writing) the session stops reading from it and holds its replies back;
    a proxy whose unread replies exceed the server's ``max_write_buffer`` is dropped, and
    closing never waits on a proxy that does not read. Coroutines that push control frames
    wait in :meth:`_drain` until the proxy reads again.
    """

    transport: asyncio.Transport | None
    server: AgentServer
    peer: Any
    _out: list[bytes]
    _out_size: int
    _flush_scheduled: bool
    _write_paused: bool
    _loop: asyncio.AbstractEventLoop
    _backlog_paused: bool = False
    _drain_waiters: list[asyncio.Future[None]]

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
            self._loop.call_later(_CLOSE_GRACE, self._grace_abort, transport)

    def _grace_abort(self, transport: asyncio.Transport) -> None:
        if self.transport is transport:
            transport.abort()


def _advertised_limit(caps: AgentCapabilities) -> int:
    """The handler limit a handshake advertised (``concurrent_requests``; 0 counts as 1)."""
    return max(1, int(caps.features.concurrent_requests or 0))


class AgentSession(_Flusher, asyncio.Protocol):
    """One proxy connection on the agent side (v2 framing).

    Handlers run as tasks, at most the advertised ``max_concurrency`` at a time. Events
    beyond that wait in arrival order, and the session stops reading from the proxy while
    ``max_concurrency`` events or more wait (it reads again when down to half), so a proxy
    that pipelines without bound holds at most one read's worth of events more.

    A correlation id has at most one event in progress. A Cancel cancels its handler (or
    drops its waiting event) and nothing is answered for it. A new event for a correlation
    id whose handler is still running or waiting supersedes it the same way: the earlier
    event is cancelled unanswered and the new one is handled (a proxy sends the next event
    of a request only after the previous one was answered or abandoned, so the earlier one
    has no taker). When the proxy disconnects every handler is cancelled; a cancelled
    handler keeps its slot until it has finished.

    ``send_health``, ``send_metrics``, ``send_flow_control``, ``pause``, ``resume`` and
    ``request_config_update`` are coroutines, as on :class:`AgentServer`: they queue the frame
    and wait while the proxy is not reading (:class:`~agentpool.errors.ConnectionClosed` if
    the connection is gone).
    """

    def __init__(self, server: AgentServer) -> None:
        self.server = server
        self.agent = server.agent
        self.on_error = server.on_error
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._decoder = core.FrameDecoder()
        self._out: list[bytes] = []
        self._out_size = 0
        self._flush_scheduled = False
        self._write_paused = False
        self._backlog_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.handshaken = False
        self.codec: _codec.Codec = _codec.get_codec("json")
        self.encoding = "json"
        self.proxy: HandshakeRequest | None = None
        #: The running handler of each correlation id (a cancelled one leaves at once).
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._waiting: OrderedDict[str, tuple[int, Any]] = OrderedDict()
        self.max_concurrency = _advertised_limit(self.agent.capabilities())
        self._config_waiters: dict[str, asyncio.Future[ConfigUpdateResponse]] = {}
        self._request_ids = itertools.count(1)
        self._fast = (
            self.agent.fast_path if type(self.agent).fast_path is not Agent.fast_path else None
        )
        self.closed = asyncio.Event()
        self.peer: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.peer = transport.get_extra_info("peername")
        self.server._sessions.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._sessions.discard(self)
        self.transport = None
        self.tasks.clear()
        self._waiting.clear()
        for task in [*self._running, *self._side_tasks]:
            task.cancel()
        self._fail_drain_waiters()
        for fut in self._config_waiters.values():
            if not fut.done():
                fut.set_exception(ConnectionClosed("proxy disconnected"))
        self._config_waiters.clear()
        self.closed.set()

    def close(self) -> None:
        """Close this connection (pending writes are flushed first, if the proxy reads)."""
        self._close_transport()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def send_frame(self, msg_type: int, payload: bytes) -> None:
        """Queue one frame (coalesced with the other frames of this loop iteration)."""
        self._write(core.encode_frame(msg_type, payload))

    def write_raw(self, data: bytes) -> None:
        """Send bytes as they are (test agents use this to misbehave)."""
        self._write(data)

    @property
    def running_handlers(self) -> int:
        """Handler tasks not finished yet (cancelled ones included until they end)."""
        return len(self._running)

    @property
    def waiting_events(self) -> int:
        """Events held back until a handler slot is free."""
        return len(self._waiting)

    # -- inbound -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except AgentProtocolError as exc:
            log.warning("framing error from proxy %s: %s; closing", self.peer, exc)
            self.abort()
            return
        for msg_type, payload in frames:
            if self.transport is None:
                return
            try:
                self._on_frame(msg_type, payload)
            except Exception:
                log.exception("error handling frame 0x%02x", msg_type)
        if self._decoder.failed:
            try:
                self._decoder.feed(b"")
            except AgentProtocolError as exc:
                log.warning("framing error from proxy %s: %s; closing", self.peer, exc)
            self.abort()

    def _on_frame(self, msg_type: MessageType, payload: bytes) -> None:
        if not self.handshaken:
            self._handshake(msg_type, payload)
        elif msg_type in _EVENT_TYPES:
            self._dispatch(msg_type, payload)
        elif msg_type == MessageType.PING:
            self.send_frame(MessageType.PONG, payload)
        elif msg_type == MessageType.CANCEL:
            self._cancel(payload)
        elif msg_type == MessageType.CONFIG_UPDATE_REQUEST:
            self._config_update_response(payload)
        else:
            log.warning("unhandled frame 0x%02x from proxy", int(msg_type))

    def _handshake(self, msg_type: MessageType, payload: bytes) -> None:
        if msg_type != MessageType.HANDSHAKE_REQUEST:
            log.warning("expected HandshakeRequest, got 0x%02x; closing", int(msg_type))
            self.abort()
            return
        try:
            request = _codec.decode_handshake_request(payload)
        except AgentProtocolError as exc:
            log.warning("bad handshake request: %s; closing", exc)
            self.abort()
            return
        self.proxy = request
        chosen = "json"
        for enc in request.supported_encodings or ():
            name = getattr(enc, "value", enc)
            if name in self.server.encodings:
                chosen = str(name)
                break
        error = self.agent.on_handshake(request)
        caps = self.agent.capabilities()
        response = HandshakeResponse(
            protocol_version=2 if error is None else 0,
            capabilities=caps,
            success=error is None,
            error=error,
            encoding=chosen,
        )
        self.send_frame(MessageType.HANDSHAKE_RESPONSE, _codec.encode_handshake_response(response))
        if error is not None:
            self.close()
            return
        self.max_concurrency = _advertised_limit(caps)
        self.encoding = chosen
        self.codec = _codec.get_codec(chosen)
        self.handshaken = True

    def _payload_cid(self, payload: bytes) -> str:
        try:
            return str(self.codec.event_correlation_id(payload) or "")
        except Exception:
            return ""

    def _dispatch(self, msg_type: MessageType, payload: bytes) -> None:
        codec = self.codec
        if self._fast is not None:
            try:
                out = self._fast(msg_type, payload, codec)
            except Exception:
                cid = self._payload_cid(payload)
                log.exception(
                    "fast_path for event 0x%02x (correlation id %r) failed; answering %s",
                    msg_type,
                    cid,
                    self.on_error,
                )
                out = codec.encode_response(self.on_error.response(msg_type), cid)
            if out is not None:
                if self.tasks or self._waiting:
                    self._supersede(self._payload_cid(payload))
                self.send_frame(MessageType.AGENT_RESPONSE, out)
                return
        try:
            event = codec.decode_event(msg_type, payload)
        except Exception as exc:
            cid = self._payload_cid(payload)
            log.warning(
                "cannot decode event 0x%02x (correlation id %r): %s; answering %s",
                msg_type,
                cid,
                exc,
                self.on_error,
            )
            self._supersede(cid)
            self._answer(msg_type, None, cid)
            return
        cid = _event_correlation_id(event)
        self._supersede(cid)
        if not self._waiting and len(self._running) < self.max_concurrency:
            self._start(cid, msg_type, event)
            return
        self._waiting[cid] = (msg_type, event)
        if len(self._waiting) >= self.max_concurrency and not self._backlog_paused:
            self._backlog_paused = True
            self._sync_reading()

    def _supersede(self, cid: str) -> None:
        """A new event for ``cid`` replaces its running or waiting one (never answered)."""
        old = self.tasks.pop(cid, None)
        if old is not None:
            old.cancel()
            log.debug("event for correlation id %r supersedes its running handler", cid)
        if self._waiting.pop(cid, None) is not None:
            log.debug("event for correlation id %r supersedes its waiting event", cid)

    def _start(self, cid: str, msg_type: int, event: Any) -> None:
        token = current_session.set(self)
        try:
            task = self._loop.create_task(self._run(msg_type, event, cid))
        finally:
            current_session.reset(token)
        self.tasks[cid] = task
        self._running.add(task)
        task.add_done_callback(functools.partial(self._task_done, cid))

    def _task_done(self, cid: str, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if self.tasks.get(cid) is task:
            del self.tasks[cid]
        if self.transport is not None:
            self._pump()

    def _pump(self) -> None:
        """Start waiting events while handler slots are free; read again when drained."""
        waiting = self._waiting
        while waiting and len(self._running) < self.max_concurrency:
            cid, (msg_type, event) = waiting.popitem(last=False)
            self._start(cid, msg_type, event)
        if self._backlog_paused and len(waiting) <= self.max_concurrency // 2:
            self._backlog_paused = False
            self._sync_reading()

    async def _run(self, msg_type: int, event: Any, cid: str) -> None:
        me = asyncio.current_task()
        response: AgentResponse | None = None
        try:
            response = await handle_event(self.agent, msg_type, event, cid, self.on_error)
        finally:
            # Not answered if cancelled, superseded or disconnected: then it is no longer
            # its correlation id's task. A handler that raised CancelledError by itself is.
            if self.tasks.get(cid) is me and self.transport is not None:
                if response is None:
                    log.error(
                        "handler for event 0x%02x (correlation id %r) was cancelled; answering %s",
                        msg_type,
                        cid,
                        self.on_error,
                    )
                    response = self.on_error.response(msg_type)
                self._answer(msg_type, response, cid)

    def _answer(self, msg_type: int, response: AgentResponse | None, cid: str) -> None:
        """Send the reply for ``cid``: ``response``, or the error policy's (None: undecodable)."""
        if response is None:
            response = self.on_error.response(msg_type, "decode-error")
        try:
            payload = self.codec.encode_response(response, cid)
        except Exception:
            log.exception(
                "cannot encode the response for correlation id %r; answering %s",
                cid,
                self.on_error,
            )
            payload = self.codec.encode_response(self.on_error.response(msg_type), cid)
        self.send_frame(MessageType.AGENT_RESPONSE, payload)

    def _cancel(self, payload: bytes) -> None:
        try:
            req = _codec.decode_cancel(payload)
        except AgentProtocolError as exc:
            log.warning("bad cancel frame: %s", exc)
            return
        cid = req.correlation_id
        try:
            reason = CancelReason(req.reason)
        except ValueError:
            reason = CancelReason.MANUAL
        side = self._loop.create_task(self._on_cancel(cid, reason))
        self._side_tasks.add(side)
        side.add_done_callback(self._side_tasks.discard)
        task = self.tasks.pop(cid, None)
        if task is not None:
            task.cancel()
        if self._waiting.pop(cid, None) is not None:
            self._pump()

    async def _on_cancel(self, cid: str, reason: CancelReason) -> None:
        try:
            await self.agent.on_cancel(cid, reason)
        except Exception:
            log.exception("on_cancel for correlation id %r failed", cid)

    def _config_update_response(self, payload: bytes) -> None:
        try:
            resp = self.codec.decode_control(MessageType.CONFIG_UPDATE_REQUEST, payload)
        except AgentProtocolError as exc:
            log.warning("bad config update response: %s", exc)
            return
        if not isinstance(resp, ConfigUpdateResponse):
            log.warning("unexpected 0x32 frame from proxy: %r", resp)
            return
        fut = self._config_waiters.pop(resp.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(resp)

    # -- agent -> proxy control messages (same methods as AgentServer) -----------------

    def _check_open(self) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionClosed("proxy disconnected")

    async def send_health(self, state: HealthState, message: str | None = None) -> None:
        """Report health (integer ``state`` form, what a Rust proxy parses)."""
        self._check_open()
        status = HealthStatus(
            agent_id=self.agent.agent_id, state=state, message=message, timestamp_ms=_now_ms()
        )
        self.send_frame(MessageType.HEALTH_STATUS, self.codec.encode_control(status))
        await self._drain()

    async def send_metrics(self, report: MetricsReport) -> None:
        """Send one MetricsReport."""
        self._check_open()
        self.send_frame(MessageType.METRICS_REPORT, self.codec.encode_control(report))
        await self._drain()

    async def send_flow_control(
        self, action: FlowAction, correlation_id: str | None = None
    ) -> None:
        """Ask the proxy to pause or resume sending (optionally for one correlation id)."""
        self._check_open()
        signal_ = FlowControlSignal(
            action=action, correlation_id=correlation_id, timestamp_ms=_now_ms()
        )
        self.send_frame(MessageType.FLOW_CONTROL, self.codec.encode_control(signal_))
        await self._drain()

    async def pause(self) -> None:
        """``send_flow_control(FlowAction.PAUSE)``."""
        await self.send_flow_control(FlowAction.PAUSE)

    async def resume(self) -> None:
        """``send_flow_control(FlowAction.RESUME)``."""
        await self.send_flow_control(FlowAction.RESUME)

    async def request_config_update(
        self, update_type: Any, *, timeout: float = 5.0, request_id: str | None = None
    ) -> ConfigUpdateResponse:
        """Send a ConfigUpdateRequest and wait for the proxy's ConfigUpdateResponse frame.

        ``timeout`` must be a positive finite number of seconds (ValueError otherwise).
        """
        if not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
            raise ValueError(f"timeout must be a positive finite number of seconds: {timeout!r}")
        self._check_open()
        rid = request_id or f"{self.agent.agent_id}-cfg-{next(self._request_ids)}"
        fut: asyncio.Future[ConfigUpdateResponse] = self._loop.create_future()
        self._config_waiters[rid] = fut
        req = ConfigUpdateRequest(update_type=update_type, request_id=rid, timestamp_ms=_now_ms())
        try:
            self.send_frame(MessageType.CONFIG_UPDATE_REQUEST, self.codec.encode_control(req))
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise Timeout(timeout) from None
        finally:
            self._config_waiters.pop(rid, None)


class V1Session(_Flusher, asyncio.Protocol):
    """One proxy connection speaking legacy v1 (length + JSON envelope, one at a time).

    ``reply_version`` sets the ``version`` of replies; ``sdk_replies`` answers configure and
    request_complete with ``{"success": ...}`` like the official Python SDK does.
    """

    def __init__(self, server: AgentServer) -> None:
        self.server = server
        self.agent = server.agent
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._out_size = 0
        self._flush_scheduled = False
        self._write_paused = False
        self._backlog_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.peer: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server._sessions.add(self)
        self._worker = self._loop.create_task(self._work())

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._sessions.discard(self)
        self.transport = None
        if self._worker is not None:
            self._worker.cancel()
        self._fail_drain_waiters()
        self.closed.set()

    def close(self) -> None:
        self._close_transport()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= 4:
            n = int.from_bytes(self._buf[:4], "big")
            if n > V1_MAX_MESSAGE_SIZE:
                log.warning("v1 message too large (%d); closing", n)
                if self.transport is not None:
                    self.transport.abort()
                return
            if len(self._buf) < 4 + n:
                break
            self._queue.put_nowait(bytes(self._buf[4 : 4 + n]))
            del self._buf[: 4 + n]
        if self._queue.qsize() >= _V1_BACKLOG and not self._backlog_paused:
            self._backlog_paused = True
            self._sync_reading()

    async def _work(self) -> None:
        while True:
            doc = await self._queue.get()
            if self._backlog_paused and self._queue.qsize() <= _V1_BACKLOG // 2:
                self._backlog_paused = False
                self._sync_reading()
            try:
                out = await self._handle(doc)
            except InvalidMessage as exc:
                log.warning("bad v1 request: %s; closing", exc)
                self.close()
                return
            self._write(len(out).to_bytes(4, "big") + out)

    async def _handle(self, doc: bytes) -> bytes:
        import orjson

        try:
            envelope = orjson.loads(doc)
            event_type = envelope["event_type"]
            payload = envelope["payload"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise InvalidMessage(f"bad v1 envelope: {exc}") from None
        srv = self.server
        msg_type = _V1_EVENT_TYPES.get(event_type)
        if msg_type is None:
            resp = AgentResponse.allow()
            cid = ""
        elif msg_type == MessageType.CONFIGURE:
            try:
                accepted = await self.agent.on_configure(payload.get("config"), None)
            except Exception:
                log.exception("v1 configure handler failed; answering %s", srv.on_error)
                resp = srv.on_error.response(msg_type)
                resp.version = srv.v1_reply_version
                return _codec.get_codec("json").encode_response(resp, "")
            if srv.v1_sdk_replies:
                body: dict[str, Any] = {"success": bool(accepted)}
                if not accepted:
                    body["error"] = "Configuration rejected"
                return orjson.dumps(body)
            resp = (
                AgentResponse.allow()
                if accepted
                else AgentResponse(decision=Block(status=500, body="Configuration rejected"))
            )
            cid = ""
        else:
            codec = _codec.get_codec("json")
            try:
                event = codec.decode_event(msg_type, orjson.dumps(payload))
            except AgentProtocolError as exc:
                log.warning(
                    "cannot decode v1 %r event: %s; answering %s", event_type, exc, srv.on_error
                )
                event = None
            if event is None:
                resp, cid = srv.on_error.response(msg_type, "decode-error"), ""
            else:
                cid = _event_correlation_id(event)
                resp = await handle_event(self.agent, msg_type, event, cid, srv.on_error)
            if msg_type == MessageType.REQUEST_COMPLETE and srv.v1_sdk_replies:
                return orjson.dumps({"success": True})
        resp.version = srv.v1_reply_version
        return _codec.get_codec("json").encode_response(resp, cid)


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
        return f"{'tcp' if self.ssl is None else 'tls'}://{self.host}:{self.port}"

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
