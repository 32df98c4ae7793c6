"""The agent side of the protocol: write Zentinel agents in Python.

Subclass :class:`Agent`, override the handlers you need, and serve it with
:class:`AgentServer` on a Unix socket or a TCP port. On the wire the server behaves like an
upstream Rust agent (PROTOCOL.md §14 "Agent side"): it answers the JSON handshake with its
capabilities and the negotiated encoding, replies to every event (guardrail included) with
``version: 2`` and the correlation id in ``audit.custom``, fails open with Allow on an event it
cannot decode, echoes pings verbatim and treats framing errors as fatal for the connection.
Unlike a Rust agent it handles the events of one connection concurrently and answers them in
completion order. It can also push health, metrics, config update requests and flow control
signals to the connected proxies.

A legacy v1 mode (``protocol="v1"``: 4-byte length + JSON envelope, one request at a time) lets
tests drive the proxy's v1 client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import functools
import itertools
import logging
import os
import signal
import ssl as _ssl
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, cast

from . import codec as _codec
from ._impl import core
from ._version import __version__
from .enums import CancelReason, EventType, FlowAction, HealthState, MessageType
from .errors import AgentProtocolError, ConnectionClosed, InvalidMessage, Timeout
from .messages import (
    AgentCapabilities,
    AgentFeatures,
    AgentLimits,
    AgentResponse,
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
    WebSocketFrameEvent,
)

__all__ = [
    "Agent",
    "AgentServer",
    "AgentSession",
    "current_session",
    "handle_event",
    "main_agent",
]

log = logging.getLogger("agentpool.server")

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
DEFAULT_MAX_WRITE_BUFFER = 16 * 1024 * 1024
# After close(), how long the transport may take to hand its last bytes to the kernel before
# it is aborted (a proxy that stopped reading would otherwise keep it open forever).
_CLOSE_GRACE = 0.25


def _now_ms() -> int:
    return int(time.time() * 1000)


def _fail_open(msg_type: int) -> AgentResponse:
    """The reply a Rust agent sends for an event it could not decode (or handle)."""
    resp = AgentResponse.allow()
    if msg_type == MessageType.WEBSOCKET_FRAME:
        resp.websocket_decision = "allow"
    return resp


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
                concurrent_requests=100,
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
        return _fail_open(MessageType.WEBSOCKET_FRAME)

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


async def handle_event(agent: Agent, msg_type: int, event: Any, cid: str = "") -> AgentResponse:
    """Run the agent's handler for one decoded event; a failing handler fails open."""
    try:
        if msg_type == MessageType.REQUEST_HEADERS:
            return await agent.on_request_headers(event)
        if msg_type == MessageType.REQUEST_BODY_CHUNK:
            return await agent.on_request_body_chunk(event)
        if msg_type == MessageType.RESPONSE_HEADERS:
            return await agent.on_response_headers(event)
        if msg_type == MessageType.RESPONSE_BODY_CHUNK:
            return await agent.on_response_body_chunk(event)
        if msg_type == MessageType.REQUEST_COMPLETE:
            return await agent.on_request_complete(event)
        if msg_type == MessageType.WEBSOCKET_FRAME:
            return await agent.on_websocket_frame(event)
        if msg_type == MessageType.GUARDRAIL_INSPECT:
            return await agent.on_guardrail_inspect(event)
        assert isinstance(event, ConfigureEvent)
        accepted = await agent.on_configure(event.config, event.config_version)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("handler for event 0x%02x (%r) failed; failing open", msg_type, cid)
        return _fail_open(msg_type)
    if accepted:
        return AgentResponse.allow()
    return AgentResponse(decision=Block(status=500, body="Configuration rejected"))


class _Flusher:
    """Write coalescing and backpressure shared by both session kinds.

    The frames of one loop turn go out in one write. While the proxy does not read (the
    transport paused writing) the session stops reading from it and holds its replies back;
    a proxy whose unread replies exceed the server's ``max_write_buffer`` is dropped, and
    closing never waits on a proxy that does not read.
    """

    transport: asyncio.Transport | None
    server: AgentServer
    peer: Any
    _out: list[bytes]
    _out_size: int
    _flush_scheduled: bool
    _write_paused: bool
    _loop: asyncio.AbstractEventLoop

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

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self._flush()

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


class AgentSession(_Flusher, asyncio.Protocol):
    """One proxy connection on the agent side (v2 framing)."""

    def __init__(self, server: AgentServer) -> None:
        self.server = server
        self.agent = server.agent
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._decoder = core.FrameDecoder()
        self._out: list[bytes] = []
        self._out_size = 0
        self._flush_scheduled = False
        self._write_paused = False
        self.handshaken = False
        self.codec: _codec.Codec = _codec.get_codec("json")
        self.encoding = "json"
        self.proxy: HandshakeRequest | None = None
        self.tasks: dict[str, asyncio.Task[None]] = {}
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
        for task in list(self.tasks.values()):
            task.cancel()
        self.tasks.clear()
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
        self.encoding = chosen
        self.codec = _codec.get_codec(chosen)
        self.handshaken = True

    def _dispatch(self, msg_type: MessageType, payload: bytes) -> None:
        codec = self.codec
        if self._fast is not None:
            out = self._fast(msg_type, payload, codec)
            if out is not None:
                self.send_frame(MessageType.AGENT_RESPONSE, out)
                return
        try:
            event = codec.decode_event(msg_type, payload)
        except Exception as exc:
            cid = codec.event_correlation_id(payload)
            log.warning("cannot decode event 0x%02x (%s); failing open for %r", msg_type, exc, cid)
            self._reply(_fail_open(msg_type), cid)
            return
        cid = _event_correlation_id(event)
        token = current_session.set(self)
        try:
            task = self._loop.create_task(self._run(msg_type, event, cid))
        finally:
            current_session.reset(token)
        self.tasks[cid] = task
        task.add_done_callback(functools.partial(self._task_done, cid))

    def _task_done(self, cid: str, task: asyncio.Task[None]) -> None:
        if self.tasks.get(cid) is task:
            del self.tasks[cid]

    async def _run(self, msg_type: MessageType, event: Any, cid: str) -> None:
        self._reply(await handle_event(self.agent, msg_type, event, cid), cid)

    def _reply(self, response: AgentResponse, cid: str) -> None:
        self.send_frame(MessageType.AGENT_RESPONSE, self.codec.encode_response(response, cid))

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
        self._loop.create_task(self._on_cancel(cid, reason))
        task = self.tasks.pop(cid, None)
        if task is not None:
            task.cancel()

    async def _on_cancel(self, cid: str, reason: CancelReason) -> None:
        try:
            await self.agent.on_cancel(cid, reason)
        except Exception:
            log.exception("on_cancel failed")

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

    # -- agent -> proxy control messages -------------------------------------------------

    def send_health(self, state: HealthState, message: str | None = None) -> None:
        """Report health (integer ``state`` form, what a Rust proxy parses)."""
        status = HealthStatus(
            agent_id=self.agent.agent_id, state=state, message=message, timestamp_ms=_now_ms()
        )
        self.send_frame(MessageType.HEALTH_STATUS, self.codec.encode_control(status))

    def send_metrics(self, report: MetricsReport) -> None:
        self.send_frame(MessageType.METRICS_REPORT, self.codec.encode_control(report))

    def send_flow_control(self, action: FlowAction, correlation_id: str | None = None) -> None:
        signal_ = FlowControlSignal(
            action=action, correlation_id=correlation_id, timestamp_ms=_now_ms()
        )
        self.send_frame(MessageType.FLOW_CONTROL, self.codec.encode_control(signal_))

    def pause(self) -> None:
        self.send_flow_control(FlowAction.PAUSE)

    def resume(self) -> None:
        self.send_flow_control(FlowAction.RESUME)

    async def request_config_update(
        self, update_type: Any, *, timeout: float = 5.0, request_id: str | None = None
    ) -> ConfigUpdateResponse:
        """Send a ConfigUpdateRequest and wait for the proxy's ConfigUpdateResponse frame."""
        rid = request_id or f"{self.agent.agent_id}-cfg-{next(self._request_ids)}"
        fut: asyncio.Future[ConfigUpdateResponse] = self._loop.create_future()
        self._config_waiters[rid] = fut
        req = ConfigUpdateRequest(update_type=update_type, request_id=rid, timestamp_ms=_now_ms())
        self.send_frame(MessageType.CONFIG_UPDATE_REQUEST, self.codec.encode_control(req))
        try:
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

    async def _work(self) -> None:
        while True:
            doc = await self._queue.get()
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
            accepted = await self.agent.on_configure(payload.get("config"), None)
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
            except AgentProtocolError:
                event = None
            if event is None:
                resp, cid = _fail_open(msg_type), ""
            else:
                cid = _event_correlation_id(event)
                resp = await handle_event(self.agent, msg_type, event, cid)
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
    serves TCP over TLS; proxies then connect to ``tls://host:port``.
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
    ) -> None:
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
        self._server: asyncio.AbstractServer | None = None
        self._sessions: set[Any] = set()

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
        loop = asyncio.get_running_loop()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self._server = await loop.create_unix_server(self._factory, self.path)
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
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def __aenter__(self) -> AgentServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- broadcast helpers -----------------------------------------------------------------

    async def send_health(self, state: HealthState, message: str | None = None) -> int:
        """Report health to every connected proxy; returns how many got it."""
        sessions = self.sessions
        for s in sessions:
            s.send_health(state, message)
        return len(sessions)

    async def send_metrics(self, report: MetricsReport) -> int:
        sessions = self.sessions
        for s in sessions:
            s.send_metrics(report)
        return len(sessions)

    async def send_flow_control(self, action: FlowAction) -> int:
        sessions = self.sessions
        for s in sessions:
            s.send_flow_control(action)
        return len(sessions)

    async def pause(self) -> int:
        return await self.send_flow_control(FlowAction.PAUSE)

    async def resume(self) -> int:
        return await self.send_flow_control(FlowAction.RESUME)

    async def request_config_update(
        self, update_type: Any, *, timeout: float = 5.0
    ) -> ConfigUpdateResponse:
        """Ask the (first) connected proxy for a config update; returns its response."""
        sessions = self.sessions
        if not sessions:
            raise ConnectionClosed("no proxy connected")
        return await sessions[0].request_config_update(update_type, timeout=timeout)


# -- command line ------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from .examples import EXAMPLES

    p = argparse.ArgumentParser(
        prog="python -m agentpool agent", description="Run an example Zentinel v2 agent."
    )
    p.add_argument("--socket", help="Unix socket path to listen on")
    p.add_argument("--tcp", metavar="HOST:PORT", help="listen on TCP instead (port 0 = any)")
    p.add_argument(
        "--reverse",
        metavar="TARGET",
        help="dial a proxy's reverse listener instead (unix:/path or host:port)",
    )
    p.add_argument("--auth-token", default=None, help="token for --reverse registration")
    p.add_argument("--example", default="waf", choices=sorted(EXAMPLES))
    p.add_argument(
        "--encoding",
        default="json",
        choices=("json", "msgpack"),
        help="json: JSON only; msgpack: MessagePack preferred, JSON too",
    )
    p.add_argument("--protocol", default="v2", choices=("v2", "v1"))
    p.add_argument("--agent-id", default=None)
    p.add_argument("--delay", type=float, default=0.0, help="seconds to wait before each reply")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default=None)
    p.add_argument("--v1-reply-version", type=int, default=2)
    p.add_argument("--v1-sdk-replies", action="store_true")
    p.add_argument("--log-level", default="WARNING")
    p.add_argument(
        "--tls-cert",
        default=None,
        help="serve --tcp over TLS with this PEM chain (--reverse: our client certificate)",
    )
    p.add_argument("--tls-key", default=None, help="private key for --tls-cert")
    p.add_argument(
        "--tls-ca",
        default=None,
        help="require client certificates from this CA (--reverse: trust this CA)",
    )
    args = p.parse_args(argv)
    if (args.tls_key or (args.tls_ca and not args.reverse)) and not args.tls_cert:
        p.error("--tls-key and --tls-ca need --tls-cert")
    if (args.tls_cert or args.tls_ca) and args.socket:
        p.error("TLS options need --tcp or --reverse")
    if sum(bool(x) for x in (args.socket, args.tcp, args.reverse)) != 1:
        p.error("give exactly one of --socket, --tcp or --reverse")
    return args


async def _serve(args: argparse.Namespace) -> None:
    from .examples import make_agent

    agent = make_agent(args.example, delay=args.delay, agent_id=args.agent_id)
    if args.reverse:
        await _serve_reverse(agent, args)
        return
    encodings = ("json",) if args.encoding == "json" else ("msgpack", "json")
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        server = AgentServer(
            agent,
            host=host or "127.0.0.1",
            port=int(port),
            encodings=encodings,
            protocol=args.protocol,
            v1_reply_version=args.v1_reply_version,
            v1_sdk_replies=args.v1_sdk_replies,
            ssl=_tls_context(args),
        )
    else:
        server = AgentServer(
            agent,
            path=args.socket,
            encodings=encodings,
            protocol=args.protocol,
            v1_reply_version=args.v1_reply_version,
            v1_sdk_replies=args.v1_sdk_replies,
        )
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    print(f"agentpool agent listening on {server.endpoint}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.close()


def _tls_context(args: argparse.Namespace) -> _ssl.SSLContext | None:
    if not args.tls_cert:
        return None
    from .tls import server_context

    return server_context(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)


async def _serve_reverse(agent: Agent, args: argparse.Namespace) -> None:
    from .reverse import connect_reverse

    ssl_ctx = None
    if args.tls_cert or args.tls_ca:
        from .tls import client_context

        ssl_ctx = client_context(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)
    conn = await connect_reverse(
        agent, args.reverse, agent_id=args.agent_id, auth_token=args.auth_token, ssl=ssl_ctx
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    print(f"agentpool agent registered with {args.reverse}", flush=True)
    closed = asyncio.ensure_future(conn.wait_closed())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        closed.cancel()
        stopped.cancel()
        conn.close()


def main_agent(argv: list[str] | None = None) -> int:
    """``python -m agentpool agent``: run an example agent until SIGTERM/SIGINT."""
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    use_uvloop = args.loop == "uvloop" or (args.loop is None and args.example == "bench")
    runner: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    if use_uvloop:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:  # pragma: no cover - uvloop is a Linux dependency
            pass
    with contextlib.suppress(KeyboardInterrupt):
        runner(_serve(args))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_agent())
