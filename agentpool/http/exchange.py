"""One request: the agents' side of one HTTP request or WebSocket connection.

The per-request hot path (events out, verdicts in, bodies held and released), apart from the
configuration and the :class:`~agentpool.http.Glue` that makes it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from ..errors import AgentProtocolError
from ..messages import (
    AgentResponse,
    HeaderOp,
    RequestBodyChunkEvent,
    RequestCompleteEvent,
    RequestHeadersEvent,
    RequestMetadata,
    ResponseBodyChunkEvent,
    ResponseHeadersEvent,
    WebSocketClose,
    WebSocketFrameEvent,
)
from .guard import Headers, Reply, Stop, _mutated, apply_header_ops, decision_reply
from .plan import _Agent, _Plan

if TYPE_CHECKING:
    from .glue import Glue

__all__ = ["Exchange"]

log = logging.getLogger("agentpool.http")

_HAS_TIMEOUT = hasattr(asyncio, "timeout")
_CLOSED_BODY = b"Service unavailable"
_NO_NAMES: frozenset[str] = frozenset()
_monotonic = time.monotonic


_stamp_sec = -1
_stamp_prefix = ""


def _timestamp() -> str:
    """RFC 3339 UTC with nanoseconds, like :func:`~agentpool.messages.rfc3339_now`, cheaper."""
    global _stamp_sec, _stamp_prefix
    ns = time.time_ns()
    secs = ns // 1_000_000_000
    if secs != _stamp_sec:
        _stamp_sec = secs
        _stamp_prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(secs))
    # the nanoseconds zero-padded to 9 digits: 1e9 added, its leading "1" cut
    return _stamp_prefix + str(ns - secs * 1_000_000_000 + 1_000_000_000)[1:] + "+00:00"


async def _timed(coro: Awaitable[AgentResponse], timeout: float | None) -> AgentResponse:
    if timeout is None:
        return await coro
    if _HAS_TIMEOUT:
        async with asyncio.timeout(timeout):
            return await coro
    return await asyncio.wait_for(coro, timeout)  # pragma: no cover - Python 3.10


def _failure_reply(agent: _Agent) -> Reply | None:
    policy = agent.failure
    if policy == "open":
        return None
    if policy == "closed":
        return Reply(503, [("content-type", "text/plain; charset=utf-8")], _CLOSED_BODY)
    headers = [("content-type", "text/plain; charset=utf-8")]
    if agent.retry_after is not None:
        headers.append(("retry-after", str(agent.retry_after)))
    return Reply(int(policy), headers, _CLOSED_BODY)


class _BodyStage:
    """One agent's view of a body: chunk by chunk (held until a final verdict) or buffered."""

    __slots__ = ("agent", "buffer", "disabled", "held", "index", "seen")

    def __init__(self, agent: _Agent) -> None:
        self.agent = agent
        self.index = 0
        self.seen = 0
        self.held: list[list[Any]] = []
        self.buffer: list[bytes] = []
        self.disabled = False


class Exchange:
    """The agents' side of one HTTP request (or WebSocket connection)."""

    __slots__ = (
        "_connection_tokens",
        "_event",
        "_lock",
        "_req_stages",
        "_resp_stages",
        "_ws_index",
        "client_ip",
        "complete_sent",
        "correlation_id",
        "edited",
        "glue",
        "headers",
        "method",
        "plan",
        "pool",
        "request_bytes",
        "response_bytes",
        "response_ops",
        "routing_metadata",
        "skipped",
        "started",
        "status",
        "uri",
    )

    def __init__(
        self,
        glue: Glue,
        plan: _Plan,
        method: str,
        uri: str,
        headers: Headers,
        client_ip: str,
        client_port: int,
        server_name: str | None,
        protocol: str,
        tls_version: str | None,
        tls_cipher: str | None,
    ) -> None:
        self.glue = glue
        self.pool = glue.pool
        self.plan = plan
        self.method = method
        self.uri = uri
        self.headers = headers
        self.client_ip = client_ip
        self.started = _monotonic()
        hdrs: dict[str, list[str]] = {}
        for name, value in headers:
            values = hdrs.get(name)
            if values is None:
                hdrs[name] = [value]
            else:
                values.append(value)
        rid_name = glue.request_id_header
        found = hdrs.get(rid_name) if rid_name is not None else None
        cid = glue.correlation_id()
        request_id = found[-1] if found else cid
        found = hdrs.get("traceparent")
        traceparent = found[-1] if found else None
        self.correlation_id = cid
        found = hdrs.get("connection")
        self._connection_tokens = (
            frozenset(t.strip().lower() for v in found for t in v.split(","))
            if found
            else _NO_NAMES
        )
        self._event = RequestHeadersEvent(
            RequestMetadata(
                cid,
                request_id,
                client_ip,
                client_port,
                server_name,
                protocol,
                tls_version,
                tls_cipher,
                plan.route,
                None,
                _timestamp(),
                traceparent,
            ),
            method,
            uri,
            hdrs,
        )
        self.skipped: frozenset[str] = _NO_NAMES
        self.response_ops: list[HeaderOp] = []
        self.routing_metadata: dict[str, str] = {}
        self.status = 0
        self.request_bytes = 0
        self.response_bytes = 0
        self.complete_sent = False
        self.edited = False
        self._req_stages = [_BodyStage(a) for a in plan.request_body] if plan.request_body else []
        self._resp_stages = (
            [_BodyStage(a) for a in plan.response_body] if plan.response_body else []
        )
        self._ws_index = 0
        self._lock: asyncio.Lock | None = None

    # -- request headers

    async def _ask(
        self, agent: _Agent, coro: Awaitable[AgentResponse]
    ) -> AgentResponse | Reply | None:
        """Await one agent call: its response, a failure Reply, or None (fail open: skip)."""
        try:
            if agent.timeout is None:
                return await coro
            return await _timed(coro, agent.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._failed(agent, exc)

    def _failed(self, agent: _Agent, exc: Exception) -> Reply | None:
        """Log an agent failure, skip the agent from now on; its policy's Reply or None."""
        if isinstance(exc, (AgentProtocolError, TimeoutError, OSError)):
            log.warning(
                "agent %r failed for %s (%s): %s",
                agent.agent,
                self.correlation_id,
                type(exc).__name__,
                exc,
            )
        else:
            log.error("agent %r call failed for %s", agent.agent, self.correlation_id, exc_info=exc)
        self.skipped = self.skipped | {agent.agent}
        return _failure_reply(agent)

    def _absorb(
        self, agent: _Agent, result: AgentResponse | Reply | None, request_ops: bool
    ) -> Reply | None:
        if result is None or isinstance(result, Reply):
            return result
        if result.routing_metadata:
            self.routing_metadata.update(result.routing_metadata)
        reply = decision_reply(result)
        if reply is not None:
            if result.response_headers:
                self.glue.refused_header_ops += apply_header_ops(
                    reply.headers, result.response_headers, self.glue.guard, agent.agent
                )
            return reply
        if request_ops and result.request_headers:
            self.edited = True
            self.glue.refused_header_ops += apply_header_ops(
                self.headers,
                result.request_headers,
                self.glue.guard,
                agent.agent,
                self._connection_tokens,
            )
        if result.response_headers:
            self.response_ops.extend(result.response_headers)
        if (
            request_ops
            and result.needs_more
            and agent.request_body == "none"
            and agent.body_capable
            and all(s.agent.agent != agent.agent for s in self._req_stages)
        ):
            # the agent wants the body to decide: it gets the body streamed
            self._req_stages.append(_BodyStage(dataclasses.replace(agent, request_body="stream")))
        return None

    async def request_headers(self, session: bool = False) -> Reply | None:
        """Ask the route's agents about the request headers; a Reply stops the request.

        On None, ``headers`` carries the guarded edits. ``session=True`` (WebSocket) binds a
        sticky session per agent, keyed by the correlation id.
        """
        agents = self.plan.headers
        pool = self.pool
        cid = self.correlation_id
        event = self._event
        if len(agents) == 1 and not session:
            agent = agents[0]
            if agent.timeout is None:
                try:  # the common case without the extra coroutine layer of _ask
                    response = await pool.send_request_headers(agent.agent, cid, event)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    return self._absorb(agent, self._failed(agent, exc), True)
                return self._absorb(agent, response, True)
            return self._absorb(
                agent,
                await self._ask(agent, pool.send_request_headers(agent.agent, cid, event)),
                True,
            )
        if session or self.plan.sequential:
            for agent in agents:
                if session:
                    coro = self._sticky(agent)
                else:
                    event.headers = self._header_map()
                    coro = pool.send_request_headers(agent.agent, cid, event)
                reply = self._absorb(agent, await self._ask(agent, coro), True)
                if reply is not None:
                    return reply
            return None
        tasks = [
            asyncio.ensure_future(self._ask(a, pool.send_request_headers(a.agent, cid, event)))
            for a in agents
        ]
        try:
            for agent, task in zip(agents, tasks):
                reply = self._absorb(agent, await task, True)
                if reply is not None:
                    return reply  # the agents after it are not waited for
            return None
        finally:
            pending = [t for t in tasks if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _sticky(self, agent: _Agent) -> AgentResponse:
        self.pool.create_sticky_session(self.correlation_id, agent.agent)
        response, _ = await self.pool.send_request_headers_with_sticky_session(
            self.correlation_id, agent.agent, self.correlation_id, self._event
        )
        return response

    def _header_map(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, value in self.headers:
            out.setdefault(name, []).append(value)
        return out

    # -- bodies

    @property
    def inspects_request_body(self) -> bool:
        return bool(self._req_stages)

    @property
    def inspects_response(self) -> bool:
        return bool(self.plan.response_headers or self._resp_stages or self.response_ops)

    @property
    def inspects_response_body(self) -> bool:
        return bool(self._resp_stages)

    @property
    def buffers_response_body(self) -> bool:
        return any(s.agent.response_body == "buffer" for s in self._resp_stages)

    def too_large(self, size: int) -> Reply | None:
        """The 413 reply when a request body of ``size`` bytes is over the route's limit."""
        limit = self.plan.max_request_body
        if limit is not None and size > limit:
            return Reply(
                413, [("content-type", "text/plain; charset=utf-8")], b"Request body too large"
            )
        return None

    async def request_body(self, data: bytes, last: bool) -> bytes:
        """Pass one request body chunk through the body agents; returns what to forward.

        Raises :class:`Stop` with a Reply for a block, a failure or a body over the limit.
        """
        self.request_bytes += len(data)
        reply = self.too_large(self.request_bytes)
        if reply is not None:
            raise Stop(reply)
        for stage in self._req_stages:
            data = await self._stage(stage, data, last, True)
        return data

    async def response_body(self, data: bytes, last: bool) -> bytes:
        """Pass one response body chunk through the body agents; returns what to send."""
        self.response_bytes += len(data)
        for stage in self._resp_stages:
            data = await self._stage(stage, data, last, False)
        return data

    async def _stage(self, stage: _BodyStage, data: bytes, last: bool, request: bool) -> bytes:
        agent = stage.agent
        if stage.disabled or agent.agent in self.skipped:
            return b"".join([*(h[1] for h in stage.held), *stage.buffer, data])
        mode = agent.request_body if request else agent.response_body
        stage.seen += len(data)
        if mode == "buffer":
            if stage.seen > agent.max_body_size:
                if request:
                    raise Stop(
                        self.too_large(stage.seen) or Reply(413, [], b"Request body too large")
                    )
                raise Stop(Reply(502, [], b"Response body too large for inspection"))
            stage.buffer.append(data)
            if not last:
                return b""
            data = b"".join(stage.buffer)
            stage.buffer.clear()
        elif stage.seen > agent.max_body_size and request:
            raise Stop(Reply(413, [], b"Request body too large"))
        index = stage.index
        stage.index += 1
        cid = self.correlation_id
        total = stage.seen if last else None
        if request:
            coro = self.pool.send_request_body_chunk(
                agent.agent, cid, RequestBodyChunkEvent(cid, data, last, total, index, stage.seen)
            )
        else:
            coro = self.pool.send_response_body_chunk(
                agent.agent, cid, ResponseBodyChunkEvent(cid, data, last, total, index, stage.seen)
            )
        stage.held.append([index, data])
        async with self._serial():
            result = await self._ask(agent, coro)
        if result is None:
            stage.disabled = True
        elif isinstance(result, Reply):
            raise Stop(result)
        else:
            reply = self._absorb(agent, result, False)
            if reply is not None:
                raise Stop(reply)
            mutation = result.request_body_mutation if request else result.response_body_mutation
            if mutation is not None:
                try:
                    new = _mutated(data, mutation)
                except AgentProtocolError as exc:
                    log.warning("agent %r: %s", agent.agent, exc)
                    self.skipped = self.skipped | {agent.agent}
                    failed = _failure_reply(agent)
                    if failed is not None:
                        raise Stop(failed) from None
                    new = None
                if new is not None:
                    target = next(
                        (h for h in stage.held if h[0] == mutation.chunk_index), stage.held[-1]
                    )
                    target[1] = new
            if result.needs_more and not last:
                return b""
        out = b"".join(h[1] for h in stage.held)
        stage.held.clear()
        return out

    # -- response headers

    async def response_headers(self, status: int, headers: Headers) -> Reply | None:
        """Apply the request-phase response edits, ask the response-header agents; a Reply
        replaces the response (only possible before it starts)."""
        self.status = status
        if self.response_ops:
            self.glue.refused_header_ops += apply_header_ops(
                headers, self.response_ops, self.glue.guard, "request phase"
            )
        agents = [a for a in self.plan.response_headers if a.agent not in self.skipped]
        if not agents:
            return None
        cid = self.correlation_id
        hdrs: dict[str, list[str]] = {}
        for name, value in headers:
            hdrs.setdefault(name, []).append(value)
        event = ResponseHeadersEvent(cid, status, hdrs)
        async with self._serial():
            results = await asyncio.gather(
                *(
                    self._ask(a, self.pool.send_response_headers(a.agent, cid, event))
                    for a in agents
                )
            )
        for agent, result in zip(agents, results):
            if result is None or isinstance(result, Reply):
                if result is not None:
                    return result
                continue
            reply = decision_reply(result)
            if reply is not None:
                return reply
            if result.response_headers:
                self.glue.refused_header_ops += apply_header_ops(
                    headers, result.response_headers, self.glue.guard, agent.agent
                )
        return None

    # -- websocket

    async def websocket_frame(
        self, opcode: str, data: bytes, client_to_server: bool
    ) -> WebSocketClose | bool:
        """Ask the WebSocket agents about one frame: True forward, False drop, or a close."""
        async with self._serial():
            return await self._websocket_frame(opcode, data, client_to_server)

    async def _websocket_frame(
        self, opcode: str, data: bytes, client_to_server: bool
    ) -> WebSocketClose | bool:
        index = self._ws_index
        self._ws_index += 1
        cid = self.correlation_id
        event = WebSocketFrameEvent(
            cid, opcode, data, client_to_server, index, True, self.plan.route, self.client_ip
        )
        for agent in self.plan.websocket:
            if agent.agent in self.skipped:
                continue
            result = await self._ask(
                agent, self.pool.send_websocket_frame(agent.agent, cid, event, cid)
            )
            if result is None:
                continue
            if isinstance(result, Reply):
                return WebSocketClose(1011, "agent unavailable")
            decision = result.websocket_decision
            if isinstance(decision, WebSocketClose):
                return decision
            if decision == "drop":
                return False
        return True

    def _serial(self) -> asyncio.Lock:
        """One event of this request at a time per agent: an agent handles one event per
        correlation id and a newer one supersedes it (request body chunks, response events
        and WebSocket frames of both directions can be produced concurrently)."""
        lock = self._lock
        if lock is None:
            lock = self._lock = asyncio.Lock()
        return lock

    # -- end

    def finish(self, error: str | None = None) -> None:
        """Send RequestComplete in the background (agents that want it) and clear affinity."""
        if self.complete_sent:
            return
        self.complete_sent = True
        complete = self.plan.complete
        agents = [a for a in complete if a.agent not in self.skipped] if complete else complete
        if not agents:
            self.pool.clear_correlation_affinity(self.correlation_id)
            return
        self.glue.spawn(self._complete(agents, error))

    def finish_websocket(self) -> None:
        """End a WebSocket exchange: drop its sticky sessions and affinity."""
        self.complete_sent = True
        self.pool.clear_sticky_session(self.correlation_id)
        self.pool.clear_correlation_affinity(self.correlation_id)

    async def _complete(self, agents: list[_Agent], error: str | None) -> None:
        cid = self.correlation_id
        event = RequestCompleteEvent(
            cid,
            self.status,
            int((_monotonic() - self.started) * 1000),
            self.request_bytes,
            self.response_bytes,
            1,
            error,
        )
        try:
            results = await asyncio.gather(
                *(
                    _timed(self.pool.send_request_complete(a.agent, cid, event), a.timeout)
                    for a in agents
                ),
                return_exceptions=True,
            )
            for agent, result in zip(agents, results):
                if isinstance(result, BaseException):
                    log.debug("RequestComplete to %r failed: %s", agent.agent, result)
        finally:
            self.pool.clear_correlation_affinity(cid)
