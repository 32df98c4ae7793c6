"""AgentServer/AgentSession: one async method set, the on_error policy, bounded handlers.

Real sockets throughout: the proxy side is either :class:`AgentConnection` or a raw socket
speaking the v2 framing, so pipelining and not-reading can be driven byte by byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import shutil
import socket
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import pytest
from _helpers import hdrs, proxy
from _helpers import rss_bytes as _rss
from _helpers import until as wait_until
from agents import short_socket_dir

from agentpool._impl import core
from agentpool.agent import Agent, AgentServer, AgentSession, ErrorPolicy, current_session
from agentpool.codec import (
    decode_handshake_response,
    encode_cancel,
    encode_handshake_request,
    get_codec,
)
from agentpool.connection import AgentConnection, ConnectionListener
from agentpool.enums import CancelReason, FlowAction, HealthState, MessageType
from agentpool.errors import ConnectionClosed
from agentpool.messages import (
    AgentResponse,
    CounterMetric,
    HandshakeRequest,
    MetricsReport,
    RequestHeadersEvent,
    RequestReload,
    WebSocketClose,
)

T = 10.0


headers_event = partial(hdrs, host="h", request_id="r", client_ip="10.0.0.1", client_port=1234)


@contextlib.asynccontextmanager
async def serve(agent: Agent, **kw: Any) -> AsyncIterator[AgentServer]:
    d = short_socket_dir()
    server = AgentServer(agent, path=os.path.join(d, "s.sock"), **kw)
    await server.start()
    try:
        yield server
    finally:
        await asyncio.wait_for(server.close(), 5.0)
        shutil.rmtree(d, ignore_errors=True)


class RawProxy:
    """A proxy on a raw non-blocking socket: frames out, frames in, nothing hidden."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.decoder = core.FrameDecoder()
        self.frames: list[tuple[int, bytes]] = []
        self.codec = get_codec("json")

    @classmethod
    async def connect(cls, server: AgentServer) -> RawProxy:
        assert server.path is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, server.path)
        raw = cls(sock)
        req = HandshakeRequest(supported_encodings=["json"])
        await raw.send(MessageType.HANDSHAKE_REQUEST, encode_handshake_request(req))
        t, payload = await raw.read_frame()
        assert t == MessageType.HANDSHAKE_RESPONSE
        assert decode_handshake_response(payload).success
        return raw

    async def send(self, msg_type: int, payload: bytes) -> None:
        await self.loop.sock_sendall(self.sock, core.encode_frame(msg_type, payload))

    async def send_event(self, cid: str, uri: str = "/") -> None:
        payload = self.codec.encode_event(headers_event(cid, uri), cid)
        await self.send(MessageType.REQUEST_HEADERS, payload)

    async def read_frame(self) -> tuple[int, bytes]:
        while not self.frames:
            data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 1 << 16), T)
            assert data, "agent closed the connection"
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    async def read_response(self) -> tuple[str, AgentResponse]:
        t, payload = await self.read_frame()
        assert t == MessageType.AGENT_RESPONSE
        cid, resp = self.codec.decode_response(payload)
        return cid, resp

    def close(self) -> None:
        self.sock.close()


def only_session(server: AgentServer) -> AgentSession:
    (session,) = server._sessions
    assert isinstance(session, AgentSession)
    return session


# -- one method set, one async-ness ----------------------------------------------------------

PUSH_METHODS = (
    "send_health",
    "send_metrics",
    "send_flow_control",
    "pause",
    "resume",
    "request_config_update",
)


def test_server_and_session_share_one_async_method_set() -> None:
    for name in PUSH_METHODS:
        assert inspect.iscoroutinefunction(getattr(AgentServer, name)), name
        assert inspect.iscoroutinefunction(getattr(AgentSession, name)), name
        server_params = list(inspect.signature(getattr(AgentServer, name)).parameters)
        session_params = list(inspect.signature(getattr(AgentSession, name)).parameters)
        assert server_params == session_params, name


class AwaitingAgent(Agent):
    """The issue's scenario: a handler that awaits the session's push methods, then blocks."""

    agent_id = "awaiting"

    async def on_request_headers(self, event: RequestHeadersEvent) -> AgentResponse:
        session = current_session.get()
        await session.send_health(HealthState.DRAINING, "draining")
        await session.send_metrics(
            MetricsReport("awaiting", 1, 1000, counters=[CounterMetric("seen_total", 1)])
        )
        await session.pause()
        await session.resume()
        await session.send_flow_control(FlowAction.PAUSE)
        return AgentResponse.block(403, "meant it")


async def test_await_inside_handler_delivers_the_handlers_verdict() -> None:
    class Listener(ConnectionListener):
        def __init__(self) -> None:
            self.metrics: list[MetricsReport] = []

        def on_metrics(self, conn: AgentConnection, report: MetricsReport) -> None:
            self.metrics.append(report)

    lst = Listener()
    async with serve(AwaitingAgent()) as server, proxy(server.endpoint, listener=lst) as conn:
        r = await asyncio.wait_for(conn.request(headers_event("c1"), "c1"), T)
        assert not r.is_allow and r.decision.status == 403  # type: ignore[union-attr]
        assert r.audit.tags == []
        await asyncio.wait_for(conn.ping(), T)  # every pushed frame has been processed
        assert conn.health_state == HealthState.DRAINING
        assert conn.is_paused
        assert [m.counters[0].name for m in lst.metrics] == ["seen_total"]
        assert await server.resume() == 1
        await asyncio.wait_for(conn.ping(), T)
        assert not conn.is_paused


async def test_push_methods_raise_connection_closed_once_the_proxy_left() -> None:
    async with serve(Agent()) as server:
        raw = await RawProxy.connect(server)
        await wait_until(lambda: len(server.sessions) == 1)
        session = server.sessions[0]
        raw.close()
        await asyncio.wait_for(session.closed.wait(), T)
        with pytest.raises(ConnectionClosed):
            await session.send_health(HealthState.HEALTHY)
        with pytest.raises(ConnectionClosed):
            await session.pause()
        assert await server.send_health(HealthState.HEALTHY) == 0


async def test_push_waits_while_the_proxy_does_not_read() -> None:
    """send_* awaits write backpressure: it returns only once the proxy reads again."""
    async with serve(Agent()) as server:
        raw = await RawProxy.connect(server)
        try:
            await wait_until(lambda: len(server.sessions) == 1)
            session = server.sessions[0]
            big = MetricsReport(
                "a", 1, 1000, counters=[CounterMetric("x" * 60_000 + f"_{i}", i) for i in range(1)]
            )
            pushes: list[asyncio.Task[None]] = []
            while not session._write_paused:  # the proxy reads nothing meanwhile
                pushes.append(asyncio.ensure_future(session.send_metrics(big)))
                await asyncio.sleep(0)
                assert len(pushes) < 10_000
            blocked = asyncio.ensure_future(session.send_health(HealthState.DEGRADED))
            await asyncio.sleep(0.1)
            assert not blocked.done()
            health_seen = False
            while not health_seen:  # now read everything
                t, _ = await raw.read_frame()
                health_seen = t == MessageType.HEALTH_STATUS
            await asyncio.wait_for(blocked, T)
            await asyncio.wait_for(asyncio.gather(*pushes), T)
            # and a waiter is released with ConnectionClosed when the proxy goes away
            while not session._write_paused:
                pushes.append(asyncio.ensure_future(session.send_metrics(big)))
                await asyncio.sleep(0)
            stuck = asyncio.ensure_future(session.send_health(HealthState.DEGRADED))
            await asyncio.sleep(0.05)
            assert not stuck.done()
            raw.close()
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(stuck, T)
            results = await asyncio.gather(*pushes, return_exceptions=True)
            assert all(r is None or isinstance(r, ConnectionClosed) for r in results)
        finally:
            raw.close()


# -- the on_error policy ---------------------------------------------------------------------


class FailingAgent(Agent):
    agent_id = "failing"

    async def on_request_headers(self, event: RequestHeadersEvent) -> AgentResponse:
        if event.uri == "/raise":
            raise RuntimeError("handler bug")
        if event.uri == "/none":
            return None  # type: ignore[return-value]
        if event.uri == "/unencodable":
            return AgentResponse(routing_metadata={"k": object()})  # type: ignore[dict-item]
        return AgentResponse.allow()


def block_status(r: AgentResponse) -> int | None:
    return None if r.is_allow else r.decision.status  # type: ignore[union-attr]


async def test_handler_errors_are_blocked_by_default_and_logged_with_the_cid(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert Agent.on_error == ErrorPolicy.block(500)
    evil = "x\nINFO forged log line"
    async with serve(FailingAgent()) as server, proxy(server.endpoint) as conn:
        with caplog.at_level(logging.ERROR, logger="agentpool.agent"):
            r = await asyncio.wait_for(conn.request(headers_event(evil, "/raise"), evil), T)
        assert block_status(r) == 500 and r.audit.tags == ["agent-error"]
        assert r.audit.custom["correlation_id"] == evil
        assert repr(evil) in caplog.text and evil not in caplog.text
        for uri in ("/none", "/unencodable"):
            r = await asyncio.wait_for(conn.request(headers_event(uri, uri), uri), T)
            assert block_status(r) == 500 and r.audit.tags == ["agent-error"], uri
        r = await asyncio.wait_for(conn.request(headers_event("ok", "/"), "ok"), T)
        assert r.is_allow


async def test_on_error_policy_of_the_agent_and_of_the_server() -> None:
    class Strict(FailingAgent):
        on_error = ErrorPolicy.block(503, "agent down")

    async with serve(Strict()) as server, proxy(server.endpoint) as conn:
        r = await asyncio.wait_for(conn.request(headers_event("a", "/raise"), "a"), T)
        assert block_status(r) == 503 and r.decision.body == "agent down"  # type: ignore[union-attr]
    async with (
        serve(Strict(), on_error=ErrorPolicy.allow()) as server,
        proxy(server.endpoint) as conn,
    ):
        r = await asyncio.wait_for(conn.request(headers_event("b", "/raise"), "b"), T)
        assert r.is_allow and r.audit.tags == ["agent-error"]


@pytest.mark.parametrize("policy", [None, ErrorPolicy.allow()], ids=["default", "allow"])
async def test_undecodable_events_follow_the_policy(policy: ErrorPolicy | None) -> None:
    async with serve(Agent(), on_error=policy) as server:
        raw = await RawProxy.connect(server)
        try:
            await raw.send(MessageType.REQUEST_HEADERS, b'{"correlation_id":"bad-1","metadata":5}')
            await raw.send(MessageType.WEBSOCKET_FRAME, b'{"correlation_id":"bad-2","opcode":7}')
            replies = dict([await raw.read_response(), await raw.read_response()])
        finally:
            raw.close()
    headers, ws = replies["bad-1"], replies["bad-2"]
    assert headers.audit.tags == ["decode-error"] == ws.audit.tags
    if policy is None:
        assert block_status(headers) == 500 and block_status(ws) == 500
        assert ws.websocket_decision == WebSocketClose(1011, "agent error")
    else:
        assert headers.is_allow and ws.is_allow and ws.websocket_decision == "allow"


def test_error_policy_validation() -> None:
    with pytest.raises(ValueError, match="allow' or 'block"):
        ErrorPolicy("maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="HTTP status"):
        ErrorPolicy.block(99)
    with pytest.raises(ValueError, match="int"):
        ErrorPolicy.block("500")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ErrorPolicy"):
        AgentServer(Agent(), path="/tmp/x.sock", on_error="allow")  # type: ignore[arg-type]
    assert str(ErrorPolicy.allow()) == "allow" and str(ErrorPolicy.block(502)) == "block 502"


# -- concurrency, correlation ids, disconnects -------------------------------------------------


class GateAgent(Agent):
    """Handlers wait on a gate; records what ran, what was cancelled, and peak concurrency."""

    agent_id = "gate"

    def __init__(self, limit: int) -> None:
        self.max_concurrency = limit
        self.gate = asyncio.Event()
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.active = 0
        self.peak = 0
        self.swallow_cancel = False

    async def on_request_headers(self, event: RequestHeadersEvent) -> AgentResponse:
        cid = event.correlation_id
        self.started.append(f"{cid}{event.uri}")
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(f"{cid}{event.uri}")
            if not self.swallow_cancel:
                raise
        finally:
            self.active -= 1
        return AgentResponse(routing_metadata={"uri": event.uri})


async def test_advertised_max_concurrency_is_enforced_with_read_backpressure() -> None:
    agent = GateAgent(limit=4)
    async with serve(agent) as server:
        raw = await RawProxy.connect(server)
        try:
            session = only_session(server)
            assert session.max_concurrency == 4

            async def write_all() -> None:
                for i in range(2000):
                    await raw.send_event(f"c{i}", f"/{i}")

            writer = asyncio.ensure_future(write_all())
            await wait_until(lambda: session._backlog_paused)
            await asyncio.sleep(0.05)
            transport = session.transport
            assert transport is not None and not transport.is_reading()
            assert session.running_handlers == 4 and agent.peak == 4
            assert 4 <= session.waiting_events < 2000
            agent.gate.set()
            seen = {}
            for _ in range(2000):
                cid, resp = await raw.read_response()
                seen[cid] = resp.routing_metadata["uri"]
            await asyncio.wait_for(writer, T)
            assert seen == {f"c{i}": f"/{i}" for i in range(2000)}
            assert agent.peak == 4
            assert session.running_handlers == 0 and session.waiting_events == 0
            assert transport.is_reading()
        finally:
            raw.close()


async def test_a_reused_correlation_id_supersedes_and_disconnect_cancels_everything() -> None:
    agent = GateAgent(limit=8)
    async with serve(agent) as server:
        raw = await RawProxy.connect(server)
        session = only_session(server)
        await raw.send_event("dup", "/1")
        await wait_until(lambda: agent.started == ["dup/1"])
        await raw.send_event("dup", "/2")  # the earlier one has no taker any more
        await wait_until(lambda: agent.started == ["dup/1", "dup/2"])
        await wait_until(lambda: agent.cancelled == ["dup/1"])
        await raw.send_event("other", "/3")
        await wait_until(lambda: len(agent.started) == 3)
        assert session.running_handlers == 2 and set(session.tasks) == {"dup", "other"}
        raw.close()  # the proxy goes away: nothing may keep running
        await asyncio.wait_for(session.closed.wait(), T)
        await wait_until(lambda: session.running_handlers == 0)
        assert sorted(agent.cancelled) == ["dup/1", "dup/2", "other/3"]
        assert agent.active == 0
        assert not [t for t in asyncio.all_tasks() if "AgentSession._run" in repr(t)]


async def test_only_the_newest_event_of_a_correlation_id_is_answered() -> None:
    """A superseded or cancelled handler that swallows the cancellation is still not answered,
    so the reply that reaches the proxy is always the one of the event it waits for."""
    agent = GateAgent(limit=8)
    agent.swallow_cancel = True
    async with serve(agent) as server:
        raw = await RawProxy.connect(server)
        try:
            session = only_session(server)
            await raw.send_event("x", "/old")
            await wait_until(lambda: len(agent.started) == 1)
            await raw.send_event("x", "/new")
            await raw.send_event("y", "/cancelled")
            await wait_until(lambda: len(agent.started) == 3)
            await raw.send(MessageType.CANCEL, encode_cancel("y", int(CancelReason.TIMEOUT), 1))
            await wait_until(lambda: sorted(agent.cancelled) == ["x/old", "y/cancelled"])
            agent.gate.set()
            await raw.send_event("z", "/after")
            cid, resp = await raw.read_response()
            got = [(cid, resp.routing_metadata["uri"])]
            cid, resp = await raw.read_response()
            got.append((cid, resp.routing_metadata["uri"]))
            assert sorted(got) == [("x", "/new"), ("z", "/after")]
            await asyncio.sleep(0.1)
            assert raw.frames == []
            assert session.running_handlers == 0
        finally:
            raw.close()


async def test_100k_pipelined_events_keep_tasks_and_memory_bounded() -> None:
    """Before, every pipelined event got its own task (100k events: +346 MB)."""
    limit = 32
    n = 100_000

    class Counting(Agent):
        agent_id = "counting"
        max_concurrency = limit

        def __init__(self) -> None:
            self.active = 0
            self.peak = 0
            self.peak_tasks = 0
            self.peak_rss = 0

        async def on_request_headers(self, event: RequestHeadersEvent) -> AgentResponse:
            self.active += 1
            self.peak = max(self.peak, self.active)
            if self.active == limit:
                self.peak_tasks = max(self.peak_tasks, len(asyncio.all_tasks()))
            await asyncio.sleep(0)
            self.active -= 1
            return AgentResponse.allow()

    agent = Counting()
    async with serve(agent) as server:
        raw = await RawProxy.connect(server)
        session = only_session(server)
        codec = get_codec("json")
        template = codec.encode_event(headers_event("c0000000"), "c0000000")
        assert template.count(b"c0000000") >= 1

        async def write_all() -> None:
            batch: list[bytes] = []
            for i in range(n):
                cid = f"c{i:07d}".encode()
                batch.append(
                    core.encode_frame(
                        MessageType.REQUEST_HEADERS, template.replace(b"c0000000", cid)
                    )
                )
                if len(batch) == 500:
                    await raw.loop.sock_sendall(raw.sock, b"".join(batch))
                    batch = []
            if batch:
                await raw.loop.sock_sendall(raw.sock, b"".join(batch))

        rss0 = _rss()
        writer = asyncio.ensure_future(write_all())
        peak_waiting = 0
        peak_rss = 0
        answered = set()
        try:
            while len(answered) < n:
                data = await asyncio.wait_for(raw.loop.sock_recv(raw.sock, 1 << 18), 60)
                assert data
                for t, payload in raw.decoder.feed(data):
                    assert t == MessageType.AGENT_RESPONSE
                    answered.add(codec.decode_response(payload)[0])
                peak_waiting = max(peak_waiting, session.waiting_events)
                if len(answered) % 8192 < 64:
                    peak_rss = max(peak_rss, _rss())
            await asyncio.wait_for(writer, T)
        finally:
            writer.cancel()
            raw.close()
    assert answered == {f"c{i:07d}" for i in range(n)}
    assert agent.peak == limit
    assert agent.peak_tasks <= limit + 8  # the handlers plus this test's own few tasks
    assert peak_waiting < 5_000  # at most the backlog bound plus one read of frames
    assert peak_rss - rss0 < 80 * 1024 * 1024


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), float("inf")])
async def test_request_config_update_rejects_invalid_timeouts(timeout: float) -> None:
    async with serve(Agent()) as server, proxy(server.endpoint):
        await wait_until(lambda: len(server.sessions) == 1)
        with pytest.raises(ValueError, match="positive finite"):
            await server.sessions[0].request_config_update(RequestReload(), timeout=timeout)
        with pytest.raises(ValueError, match="positive finite"):
            await server.request_config_update(RequestReload(), timeout=timeout)


async def test_v1_sessions_follow_the_policy_too() -> None:
    class V1Failing(FailingAgent):
        async def on_configure(self, config: Any, config_version: str | None) -> bool:
            raise RuntimeError("configure bug")

    for policy, allowed in ((None, False), (ErrorPolicy.allow(), True)):
        async with serve(V1Failing(), protocol="v1", on_error=policy) as server:
            conn = await AgentConnection.open(server.endpoint, agent_id="v1", protocol="v1")
            try:
                r = await asyncio.wait_for(conn.request(headers_event("a", "/raise"), "a"), T)
                assert r.is_allow is allowed and r.audit.tags == ["agent-error"]
                assert await asyncio.wait_for(conn.configure({"k": 1}), T) is allowed
                r = await asyncio.wait_for(conn.request(headers_event("b", "/"), "b"), T)
                assert r.is_allow
            finally:
                conn.close()
                await asyncio.wait_for(conn.wait_closed(), T)
