"""One proxy connection on the agent side, v2 framing (:class:`AgentSession`).

On the wire a session behaves like an upstream Rust agent (docs/protocol.md, "Agent side"):
it answers the JSON handshake with its capabilities and the negotiated encoding, replies to
every event (guardrail included) with ``version: 2`` and the correlation id in
``audit.custom``, echoes pings verbatim and treats framing errors as fatal for the connection.
An event it cannot decode, or whose handler fails, is answered by the :class:`ErrorPolicy`
``on_error`` (Block 500 by default; Rust agents fail open). Unlike a Rust agent it handles the
events of one connection concurrently, at most the advertised ``max_concurrency`` at a time,
and answers them in completion order; a new event for a correlation id supersedes the one
still in progress. It can also push health, metrics, config update requests and flow control
signals to the proxy.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import logging
import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, cast

from .. import codec as _codec
from .._impl import core
from ..enums import CancelReason, FlowAction, HealthState, MessageType
from ..errors import AgentProtocolError, ConnectionClosed, Timeout
from ..messages import (
    AgentCapabilities,
    AgentResponse,
    ConfigUpdateRequest,
    ConfigUpdateResponse,
    FlowControlSignal,
    HandshakeRequest,
    HandshakeResponse,
    HealthStatus,
    MetricsReport,
    now_ms,
)
from ._flusher import Flusher
from .base import Agent, event_correlation_id, handle_event

if TYPE_CHECKING:
    from .server import AgentServer

__all__ = ["AgentSession", "current_session"]

log = logging.getLogger(__name__)

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


def _advertised_limit(caps: AgentCapabilities) -> int:
    """The handler limit a handshake advertised (``concurrent_requests``; 0 counts as 1)."""
    return max(1, int(caps.features.concurrent_requests or 0))


class AgentSession(Flusher, asyncio.Protocol):
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
        super().__init__(server)
        self.on_error = server.on_error
        self._decoder = core.FrameDecoder()
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
        cid = event_correlation_id(event)
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
            agent_id=self.agent.agent_id, state=state, message=message, timestamp_ms=now_ms()
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
            action=action, correlation_id=correlation_id, timestamp_ms=now_ms()
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
        req = ConfigUpdateRequest(update_type=update_type, request_id=rid, timestamp_ms=now_ms())
        try:
            self.send_frame(MessageType.CONFIG_UPDATE_REQUEST, self.codec.encode_control(req))
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise Timeout(timeout) from None
        finally:
            self._config_waiters.pop(rid, None)
