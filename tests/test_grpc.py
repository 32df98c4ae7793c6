"""gRPC transport against real gRPC agent processes (tests/agents/grpc_agent.py on grpcio).

Handshake, decisions, body chunks, ping, cancel, timeouts, killed agents, malformed
messages, the 4 MiB message limit, TLS, the pool on gRPC endpoints and the CLI's --grpc.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

pytest.importorskip("grpc")
pytest.importorskip("google.protobuf")

from _helpers import hdrs, until
from agents import AgentProc, running, start_process

from agentpool import (
    ConnectionClosed,
    ConnectionFailed,
    DuplicateCorrelationId,
    FlowControlPaused,
    InvalidMessage,
    MessageTooLarge,
    Timeout,
    WrongConnectionType,
)
from agentpool.config import AgentPoolConfig
from agentpool.connection import AgentConnection
from agentpool.enums import CancelReason, EventType, HealthState
from agentpool.grpc import (
    GrpcAgentConnection,
    GrpcTLS,
    parse_grpc_endpoint,
)
from agentpool.messages import (
    Allow,
    Block,
    ConfigureEvent,
    GuardrailInspectEvent,
    HealthStatus,
    MetricsReport,
    Redirect,
    RequestBodyChunkEvent,
    RequestCompleteEvent,
    ResponseHeadersEvent,
    WebSocketFrameEvent,
)
from agentpool.pool import AgentPool

T = 10.0
_AGENT_SCRIPT = str(Path(__file__).resolve().parent / "agents" / "grpc_agent.py")


class GrpcAgentProc(AgentProc):
    """tests/agents/grpc_agent.py in a subprocess, on a loopback port (kept across restarts)."""

    def __init__(self, *extra: str) -> None:
        super().__init__("grpc-test", tcp=True, extra_args=extra)

    def argv(self) -> list[str]:
        return [
            sys.executable,
            _AGENT_SCRIPT,
            "--listen",
            f"{self.host}:{self.port}",
            *self.extra_args,
        ]


@pytest.fixture(scope="module")
def agent() -> Iterator[GrpcAgentProc]:
    with running(GrpcAgentProc()) as proc:
        yield proc


async def spawn(*extra: str) -> GrpcAgentProc:
    proc = GrpcAgentProc(*extra)
    proc.start()
    await proc.await_ready()
    return proc


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.changed = asyncio.Event()

    def _add(self, name: str, value: Any) -> None:
        self.events.append((name, value))
        self.changed.set()

    def on_health(self, conn: AgentConnection, status: HealthStatus) -> None:
        self._add("health", status)

    def on_flow_control(self, conn: AgentConnection, paused: bool) -> None:
        self._add("flow", paused)

    def on_metrics(self, conn: AgentConnection, report: MetricsReport) -> None:
        self._add("metrics", report)

    def on_closed(self, conn: AgentConnection, exc: BaseException | None) -> None:
        self._add("closed", exc)

    async def wait_for(self, name: str, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            for n, v in self.events:
                if n == name:
                    return v
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {name} event")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass


def tcp_connections_to(port: int) -> set[int]:
    """Local ports of established TCP connections to remote ``port`` (from /proc/net/tcp*)."""
    ports = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):  # grpcio uses v4-mapped IPv6 sockets
        with open(name, encoding="ascii") as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def open_conn(endpoint: str, **kw: Any) -> GrpcAgentConnection:
    kw.setdefault("request_timeout", 5.0)
    kw.setdefault("connect_timeout", 5.0)
    conn = await AgentConnection.open(endpoint, agent_id="g", **kw)
    assert isinstance(conn, GrpcAgentConnection)
    return conn


async def closing(conn: AgentConnection) -> None:
    conn.close()
    await asyncio.wait_for(conn.wait_closed(), T)


# -- no agent needed ------------------------------------------------------------------------


def test_core_does_not_import_grpc() -> None:
    code = (
        "import sys, agentpool, agentpool.pool, agentpool.connection, agentpool.agent\n"
        "assert 'grpc' not in sys.modules and 'google.protobuf' not in sys.modules, "
        "sorted(m for m in sys.modules if 'grpc' in m or 'protobuf' in m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_parse_grpc_endpoint() -> None:
    assert parse_grpc_endpoint("grpc://waf.internal:50051") == (False, "waf.internal:50051")
    assert parse_grpc_endpoint("grpcs://127.0.0.1:443/") == (True, "127.0.0.1:443")
    assert parse_grpc_endpoint("grpc://[::1]:9") == (False, "[::1]:9")
    for bad in ("grpc://host", "grpc://:1", "grpc://h:0", "grpc://h:x", "tcp://h:1"):
        with pytest.raises(ConnectionFailed, match="invalid endpoint"):
            parse_grpc_endpoint(bad)


def test_wire_numbers_of_the_proto() -> None:
    """The numbers Zentinel peers rely on (docs/protocol.md, "The wire contract")."""
    from agentpool.grpc import agent_v2_pb2 as pb

    def numbers(msg: Any, oneof: str | None = None) -> dict[str, int]:
        d = msg.DESCRIPTOR
        fields = d.oneofs_by_name[oneof].fields if oneof else d.fields
        return {f.name: f.number for f in fields}

    assert pb.DESCRIPTOR.package == "zentinel.agent.v2"
    service = pb.DESCRIPTOR.services_by_name["AgentServiceV2"]
    stream = service.methods_by_name["ProcessStream"]
    assert stream.input_type.name == "ProxyToAgent" and stream.output_type.name == "AgentToProxy"
    assert numbers(pb.ProxyToAgent, "message") == {
        "handshake": 1, "request_headers": 2, "request_body_chunk": 3, "response_headers": 4,
        "response_body_chunk": 5, "websocket_frame": 6, "guardrail": 7, "request_complete": 8,
        "cancel": 9, "configure": 10, "ping": 11,
    }  # fmt: skip
    assert numbers(pb.AgentToProxy, "message") == {
        "handshake": 1, "response": 2, "health": 3, "metrics": 4, "config_update": 5,
        "flow_control": 6, "pong": 7, "log": 8,
    }  # fmt: skip
    assert numbers(pb.AgentResponse) == {
        "correlation_id": 1, "allow": 2, "block": 3, "redirect": 4, "challenge": 5,
        "request_headers": 10, "response_headers": 11, "audit": 12, "processing_time_ms": 13,
        "needs_more": 14,
    }  # fmt: skip
    assert numbers(pb.RequestMetadata)["timestamp_ms"] == 10
    assert "tls_cipher" not in numbers(pb.RequestMetadata)
    assert numbers(pb.BodyChunkEvent) == {
        "correlation_id": 1, "chunk_index": 2, "data": 3, "is_last": 4, "total_size": 5,
        "bytes_transferred": 6, "proxy_buffer_available": 7, "timestamp_ms": 8,
    }  # fmt: skip


async def test_ssl_option_only_for_grpcs() -> None:
    with pytest.raises(ValueError, match="grpcs://"):
        await AgentConnection.open("grpc://127.0.0.1:1", agent_id="g", ssl=GrpcTLS())
    with pytest.raises(ValueError, match="grpcs://"):
        await AgentConnection.open("tcp://127.0.0.1:1", agent_id="g", ssl=GrpcTLS())
    with pytest.raises(ValueError, match="v2 only"):
        await AgentConnection.open("grpc://127.0.0.1:1", agent_id="g", protocol="v1")


async def test_unreachable_agent_is_a_typed_error() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    t0 = time.monotonic()
    with pytest.raises((ConnectionFailed, Timeout)):
        await open_conn(f"grpc://127.0.0.1:{port}", connect_timeout=2.0)
    assert time.monotonic() - t0 < 5.0


# -- one shared agent -------------------------------------------------------------------------


async def test_handshake_and_decisions(agent: GrpcAgentProc) -> None:
    conn = await open_conn(agent.endpoint)
    try:
        caps = conn.capabilities
        assert caps is not None and caps.agent_id == "grpc-test" and caps.protocol_version == 2
        # what gRPC cannot deliver is not advertised on a gRPC connection
        assert not caps.features.config_push and not caps.features.guardrails
        assert not caps.features.websocket and caps.features.streaming_body
        assert EventType.GUARDRAIL_INSPECT not in caps.supported_events
        assert EventType.REQUEST_BODY_CHUNK in caps.supported_events
        assert not conn.supports_event(EventType.WEBSOCKET_FRAME)
        assert conn.encoding == "protobuf" and conn.is_connected
        headers = {"x-multi": ["a", "b"], "x-one": ["1"]}
        r = await conn.request(hdrs("a1", "/x", headers=headers), "a1")
        assert isinstance(r.decision, Allow)
        assert [(op.op, op.name, op.value) for op in r.request_headers] == [
            ("set", "x-checked", "1")
        ]
        custom = r.audit.custom
        assert custom["cid"] == "a1" and custom["pid"] == str(agent.pid)
        # multi-valued headers were flattened on the wire and grouped again by the agent
        seen = orjson.loads(custom["headers"])
        assert seen["x-multi"] == ["a", "b"] and seen["x-one"] == ["1"]
        r = await conn.request(hdrs("a2", "/admin/x"), "a2")
        assert r.decision == Block(status=403, body="Forbidden", headers={"x-blocked": "1"})
        assert r.audit.tags == ["grpc-test"]
        r = await conn.request(hdrs("a3", "/old"), "a3")
        assert r.decision == Redirect("https://example.test/new", 301)
        # audit custom values are strings on gRPC
        r = await conn.request(
            RequestBodyChunkEvent(correlation_id="a4", data=b"ok", is_last=True, chunk_index=3),
            "a4",
        )
        assert r.audit.custom["size"] == "2" and r.audit.custom["chunk_index"] == "3"
    finally:
        await closing(conn)


async def test_body_chunks_and_other_events(agent: GrpcAgentProc) -> None:
    conn = await open_conn(agent.endpoint)
    try:
        raw = bytes(range(256))  # raw bytes, not text: no base64 on gRPC
        chunks = [raw, b"--ev", b"il--"]
        for i, data in enumerate(chunks):
            ev = RequestBodyChunkEvent(
                correlation_id="b1", data=data, is_last=i == 2, chunk_index=i, total_size=264
            )
            r = await conn.request(ev, "b1")
            if i < 2:
                assert r.needs_more and isinstance(r.decision, Allow)
        assert r.decision == Block(status=422) and r.audit.custom["size"] == "264"
        r = await conn.request(
            ResponseHeadersEvent(
                correlation_id="b2", status=201, headers={"set-cookie": ["a", "b"]}
            ),
            "b2",
        )
        assert r.audit.custom["status"] == "201"
        assert orjson.loads(r.audit.custom["headers"]) == {"set-cookie": ["a", "b"]}
        done = RequestCompleteEvent(
            correlation_id="b3",
            status=502,
            duration_ms=5,
            request_body_size=1,
            response_body_size=2,
            upstream_attempts=1,
            error="upstream reset",
        )
        r = await conn.request(done, "b3")
        assert r.audit.custom["status"] == "502" and r.audit.custom["error"] == "upstream reset"
    finally:
        await closing(conn)


async def test_events_gRPC_cannot_answer_are_refused(agent: GrpcAgentProc) -> None:
    conn = await open_conn(agent.endpoint)
    try:
        refused = [
            WebSocketFrameEvent(
                correlation_id="w",
                opcode="text",
                data=b"x",
                client_to_server=True,
                frame_index=0,
                fin=True,
            ),
            GuardrailInspectEvent(correlation_id="g", inspection_type="pii", content="x"),
            ConfigureEvent(config={"a": 1}, correlation_id="c"),
        ]
        for ev in refused:
            with pytest.raises(WrongConnectionType, match="cannot be sent over gRPC"):
                conn.send(ev, ev.correlation_id)
        with pytest.raises(WrongConnectionType):
            await conn.configure({"a": 1})
        assert conn.in_flight == 0
        r = await conn.request(hdrs("after"), "after")
        assert isinstance(r.decision, Allow)
    finally:
        await closing(conn)


async def test_a_uds_payload_never_reaches_the_stream(
    agent: GrpcAgentProc, caplog: pytest.LogCaptureFixture
) -> None:
    from agentpool.enums import MessageType

    conn = await open_conn(agent.endpoint)
    try:
        conn.protocol_core.write_frame(MessageType.CANCEL, b'{"correlation_id":"x"}')
        r = await conn.request(hdrs("u1"), "u1")
        assert r.audit.custom["cid"] == "u1" and conn.is_connected
        assert "is not a ProxyToAgent message; not sent" in caplog.text
    finally:
        await closing(conn)


async def test_concurrent_requests_each_get_their_own_reply(agent: GrpcAgentProc) -> None:
    conn = await open_conn(agent.endpoint)
    try:
        cids = [f"m{i}" for i in range(300)]
        futs = [
            conn.send(hdrs(cid, delay=0.02 if i % 3 == 0 else None), cid)
            for i, cid in enumerate(cids)
        ]
        replies = await asyncio.wait_for(asyncio.gather(*futs), T)
        assert [r.audit.custom["cid"] for r in replies] == cids
        assert conn.in_flight == 0
        core = conn.protocol_core
        assert core.requests_sent >= 300 and core.responses_received >= 300
    finally:
        await closing(conn)


async def test_ping_and_cancel(agent: GrpcAgentProc) -> None:
    conn = await open_conn(agent.endpoint)
    try:
        rtt = await conn.ping(timeout=5.0)
        assert 0 < rtt < 5 and conn.last_rtt == rtt
        fut = conn.send(hdrs("c1", delay=2.0), "c1")
        await asyncio.sleep(0.05)
        assert await conn.cancel("c1", CancelReason.CLIENT_DISCONNECT)
        with pytest.raises(ConnectionClosed, match="cancelled"):
            await fut
        slow = [conn.send(hdrs(f"c{i}", delay=2.0), f"c{i}") for i in (2, 3)]
        await asyncio.sleep(0.05)
        assert await conn.cancel_all(CancelReason.TIMEOUT) == 2
        for f in slow:
            with pytest.raises(ConnectionClosed):
                await f
        # the agent saw every Cancel with its reason (1-based on the wire, same enum here)
        for _ in range(200):
            r = await conn.request(hdrs("q", actions="cancelled"), "q")
            seen = set(r.audit.custom["cancelled"].split(","))
            if {"c1:0", "c2:1", "c3:1"} <= seen:
                break
            await asyncio.sleep(0.02)
        assert {"c1:0", "c2:1", "c3:1"} <= seen
    finally:
        await closing(conn)


async def test_timeout_and_late_reply_dropped(agent: GrpcAgentProc) -> None:
    conn = await open_conn(agent.endpoint)
    try:
        core = conn.protocol_core
        with pytest.raises(Timeout):
            await conn.request(hdrs("t1", delay=0.4), "t1", timeout=0.1)
        matched = core.responses_received
        # the reply the agent may still send (unless the core cancelled the request) arrives
        # meanwhile and answers nothing
        await asyncio.sleep(0.6)
        assert core.responses_received == matched
        r = await conn.request(hdrs("t2"), "t2")
        assert r.audit.custom["cid"] == "t2" and conn.is_connected
    finally:
        await closing(conn)


async def test_late_reply_never_answers_a_reused_correlation_id(agent: GrpcAgentProc) -> None:
    """The first rule on gRPC: the core's routing applies (the same code as on UDS)."""
    conn = await open_conn(agent.endpoint)
    try:
        with pytest.raises(Timeout):
            await conn.request(hdrs("dup", delay=0.3), "dup", timeout=0.05)
        # the same correlation id again: refused while the first still owes its reply, or
        # answered with its own reply, never with the stale one
        try:
            r = await conn.request(hdrs("dup", delay=0.6, headers={"x-second": ["1"]}), "dup")
        except DuplicateCorrelationId:
            pass
        else:
            assert "x-second" in orjson.loads(r.audit.custom["headers"])
    finally:
        await closing(conn)


async def test_control_messages_reach_the_listener(agent: GrpcAgentProc) -> None:
    rec = Recorder()
    conn = await open_conn(agent.endpoint, listener=rec)
    try:
        await conn.request(hdrs("h1", actions="health:2,metrics,pause"), "h1")
        status = await rec.wait_for("health")
        assert status.state == HealthState.DEGRADED and status.message == "test"
        assert conn.health_state == HealthState.DEGRADED
        report = await rec.wait_for("metrics")
        assert report.counters[0].name == "agent_requests_total" and report.counters[0].value == 7
        assert await rec.wait_for("flow") is True and conn.is_paused
        await conn.request(hdrs("h2", actions="resume"), "h2")
        await until(lambda: not conn.is_paused)
    finally:
        await closing(conn)
    assert await rec.wait_for("closed") is None


async def test_malformed_messages(agent: GrpcAgentProc) -> None:
    conn = await open_conn(agent.endpoint)
    try:
        # a reply with no decision fails its own request at once, never as Allow
        with pytest.raises(InvalidMessage, match="no decision"):
            await conn.request(hdrs("n1", actions="no-decision"), "n1", timeout=5.0)
        # bytes that are not an AgentToProxy cannot be attributed: dropped, request times out
        with pytest.raises(Timeout):
            await conn.request(hdrs("n2", actions="garbage"), "n2", timeout=0.3)
        # a reply the agent cannot express on gRPC becomes its error policy's Block, never Allow
        r = await conn.request(hdrs("n3", actions="mutate"), "n3")
        assert r.decision == Block(status=500) and r.audit.tags == ["agent-error"]
        r = await conn.request(hdrs("n4"), "n4")
        assert r.audit.custom["cid"] == "n4" and conn.is_connected
    finally:
        await closing(conn)


async def test_message_size_limit(agent: GrpcAgentProc) -> None:
    conn = await open_conn(agent.endpoint)
    try:
        big = RequestBodyChunkEvent(
            correlation_id="s1", data=b"x" * (4 * 1024 * 1024), is_last=True
        )
        with pytest.raises(MessageTooLarge):
            conn.send(big, "s1")
        ok = RequestBodyChunkEvent(
            correlation_id="s2", data=b"x" * (4 * 1024 * 1024 - 100), is_last=True
        )
        r = await conn.request(ok, "s2")
        assert r.audit.custom["size"] == str(4 * 1024 * 1024 - 100)
        # a reply over the limit fails the call with a typed error, never a verdict
        with pytest.raises(MessageTooLarge) as info:
            await conn.request(hdrs("s3", actions="huge"), "s3")
        assert info.value.size > info.value.max == 4 * 1024 * 1024
        await asyncio.wait_for(conn.wait_closed(), T)
        assert not conn.is_connected
    finally:
        await closing(conn)


# -- agents of their own --------------------------------------------------------------------


async def test_agent_killed_mid_flight_then_pool_reconnects() -> None:
    proc = await spawn()
    try:
        cfg = AgentPoolConfig(
            request_timeout=5.0,
            connect_timeout=2.0,
            reconnect_interval=0.05,
            circuit_breaker=None,
            connections_per_agent=2,
        )
        async with AgentPool(cfg) as pool:
            await pool.add_agent("g", proc.endpoint)
            assert pool.is_agent_healthy("g")
            r = await pool.send_request_headers("g", "k0", hdrs("k0"))
            assert r.audit.custom["cid"] == "k0"
            in_flight = [
                asyncio.ensure_future(
                    pool.send_request_headers("g", f"k{i}", hdrs(f"k{i}", delay=5))
                )
                for i in range(1, 5)
            ]
            await asyncio.sleep(0.1)
            proc.kill()
            results = await asyncio.wait_for(asyncio.gather(*in_flight, return_exceptions=True), T)
            assert all(isinstance(x, ConnectionClosed) for x in results), results
            await until(lambda: not pool.is_agent_healthy("g"))
            with pytest.raises(ConnectionFailed):
                await pool.send_request_headers("g", "down", hdrs("down"))
            await proc.arestart()
            await asyncio.sleep(0.1)
            await pool.run_maintenance_once()
            assert pool.is_agent_healthy("g")
            r = await pool.send_request_headers("g", "back", hdrs("back"))
            assert r.audit.custom["pid"] == str(proc.pid)
    finally:
        proc.cleanup()


async def test_pool_features_on_grpc(agent: GrpcAgentProc) -> None:
    cfg = AgentPoolConfig(request_timeout=5.0, connections_per_agent=3, circuit_breaker=None)
    before = tcp_connections_to(agent.port)
    async with AgentPool(cfg) as pool:
        await pool.add_agent("g", agent.endpoint)
        # each pooled connection is its own TCP connection (no shared subchannel)
        assert len(tcp_connections_to(agent.port) - before) == 3
        caps: Any = pool.agent_capabilities("g")
        if asyncio.iscoroutine(caps):
            caps = await caps
        assert caps.agent_id == "grpc-test"
        # affinity: the body goes to the connection that got the headers
        await pool.send_request_headers("g", "p1", hdrs("p1"))
        st = pool._agents["g"].affinity.get("p1", time.monotonic())
        assert st is not None
        before = st.request_count
        r = await pool.send_request_body_chunk(
            "g", "p1", RequestBodyChunkEvent(correlation_id="p1", data=b"evil", is_last=True)
        )
        assert r.decision == Block(status=422) and st.request_count == before + 1
        # sticky sessions
        pool.create_sticky_session("s", "g")
        r, used = await pool.send_request_headers_with_sticky_session("s", "g", "p2", hdrs("p2"))
        assert used and r.audit.custom["cid"] == "p2"
        # metrics and stats
        stats = await pool.agent_stats("g")
        assert stats is not None and stats.active_connections == 3
        snap = pool.protocol_metrics.snapshot()
        assert snap.requests_total == snap.responses_total >= 2
        # pings in maintenance
        await pool.run_maintenance_once()
        assert pool.is_agent_healthy("g")


async def test_pool_follows_health_and_flow_control_over_grpc(agent: GrpcAgentProc) -> None:
    cfg = AgentPoolConfig(request_timeout=5.0, connections_per_agent=1, circuit_breaker=None)
    async with AgentPool(cfg) as pool:
        await pool.add_agent("g", agent.endpoint)
        await pool.send_request_headers("g", "f1", hdrs("f1", actions="health:4"))
        await until(lambda: not pool.is_agent_healthy("g"))
        # the only connection is unhealthy: requests are refused with a typed error
        with pytest.raises(ConnectionFailed):
            await pool.send_request_headers("g", "f3", hdrs("f3"))
        conn = next(iter(pool._agents["g"].conns)).conn
        await conn.request(hdrs("f4", actions="health:1,pause"), "f4")
        await until(lambda: pool.is_agent_healthy("g") and conn.is_paused)
        with pytest.raises(FlowControlPaused):  # FAIL_CLOSED by default
            await pool.send_request_headers("g", "f5", hdrs("f5"))
        await conn.request(hdrs("f6", actions="resume"), "f6")
        await until(lambda: not conn.is_paused)
        r = await pool.send_request_headers("g", "f7", hdrs("f7"))
        assert r.audit.custom["cid"] == "f7"


def start_agent_logging_to(log: Path, *extra: str) -> subprocess.Popen[str]:
    """tests/agents/grpc_agent.py with its stderr (the agent's log) in ``log``."""
    with open(log, "w") as err:
        return start_process(
            [sys.executable, _AGENT_SCRIPT, "--listen", "127.0.0.1:0", *extra],
            stderr=err,
            text=True,
        )


async def test_agent_bounds_the_replies_it_queues(tmp_path: Path) -> None:
    """Replies queued for one stream never exceed max_write_buffer: over it, the call ends."""
    import grpc

    from agentpool.grpc import PROCESS_STREAM
    from agentpool.grpc import agent_v2_pb2 as pb
    from agentpool.grpc._convert import encode_event

    log = tmp_path / "agent.log"
    # a bound below one reply's size: the first reply that has to wait trips it
    proc = start_agent_logging_to(log, "--max-write-buffer", "20000")
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), T)
        endpoint = line.split(" on ", 1)[1].strip()
        async with grpc.aio.insecure_channel(endpoint.removeprefix("grpc://")) as channel:
            call = channel.stream_stream(PROCESS_STREAM)()
            hs = pb.ProxyToAgent()
            hs.handshake.supported_versions.append(2)
            await call.write(hs.SerializeToString())
            await asyncio.wait_for(call.read(), T)
            big = {"x-big": ["x" * 65536]}  # echoed in the reply's audit
            await call.write(encode_event(hdrs("b1", headers=big), "b1"))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(call.read(), T)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await until(lambda: "does not read its replies" in log.read_text())
        conn = await open_conn(endpoint)  # the agent itself is fine
        try:
            assert (await conn.request(hdrs("ok"), "ok")).audit.custom["cid"] == "ok"
        finally:
            await closing(conn)
    finally:
        proc.kill()
        proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


async def test_agent_side_runs_at_most_max_concurrency_handlers() -> None:
    proc = await spawn("--max-concurrency", "2")
    try:
        conn = await open_conn(proc.endpoint)
        try:
            assert conn.capabilities is not None
            assert conn.capabilities.features.concurrent_requests == 2
            futs = [conn.send(hdrs(f"p{i}", delay=0.1), f"p{i}") for i in range(6)]
            assert len(await asyncio.wait_for(asyncio.gather(*futs), T)) == 6
            r = await conn.request(hdrs("q", actions="peak"), "q")
            assert r.audit.custom["peak"] == "2"
        finally:
            await closing(conn)
    finally:
        proc.cleanup()


async def test_refused_handshake_is_connection_failed() -> None:
    proc = await spawn("--refuse", "proxy not allowed")
    try:
        with pytest.raises(ConnectionFailed, match="proxy not allowed"):
            await open_conn(proc.endpoint)
        async with AgentPool(AgentPoolConfig(connections_per_agent=1)) as pool:
            await pool.add_agent("r", proc.endpoint)  # registered unhealthy, retried later
            assert not pool.is_agent_healthy("r")
    finally:
        proc.cleanup()


async def test_tls_and_mutual_tls(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca_pem = ca.cert_pem.bytes()
    proc = await spawn("--tls-dir", str(tmp_path))
    try:
        assert proc.endpoint.startswith("grpcs://")
        tls = GrpcTLS(root_certificates=ca_pem, server_hostname="localhost")
        conn = await open_conn(proc.endpoint, ssl=tls)
        try:
            r = await conn.request(hdrs("tls1", "/admin"), "tls1")
            assert isinstance(r.decision, Block)
        finally:
            await closing(conn)
        # an ssl.SSLContext lends its CA certificates (no name override: the IP SAN matches)
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        conn = await open_conn(proc.endpoint, ssl=ctx)
        try:
            r = await conn.request(hdrs("tls4"), "tls4")
            assert r.audit.custom["cid"] == "tls4"
        finally:
            await closing(conn)
        lax = ssl.create_default_context()
        lax.check_hostname = False
        lax.verify_mode = ssl.CERT_NONE
        with pytest.raises(ValueError, match="always verifies"):
            await open_conn(proc.endpoint, ssl=lax)
        # an agent whose certificate the proxy does not trust is never used
        other = trustme.CA().cert_pem.bytes()
        with pytest.raises((ConnectionFailed, Timeout)):
            await open_conn(
                proc.endpoint, ssl=GrpcTLS(root_certificates=other), connect_timeout=2.0
            )
        # the pool takes the same option
        async with AgentPool(AgentPoolConfig(connections_per_agent=1)) as pool:
            await pool.add_agent("s", proc.endpoint, ssl=tls)
            r = await pool.send_request_headers("s", "tls2", hdrs("tls2"))
            assert r.audit.custom["cid"] == "tls2"
    finally:
        proc.cleanup()
    proc = await spawn("--tls-dir", str(tmp_path), "--mtls")
    try:
        client = ca.issue_cert("proxy.test")
        with pytest.raises((ConnectionFailed, Timeout, ConnectionClosed)):
            await open_conn(proc.endpoint, ssl=tls, connect_timeout=2.0)
        mtls = GrpcTLS(
            root_certificates=ca_pem,
            certificate_chain=client.cert_chain_pems[0].bytes(),
            private_key=client.private_key_pem.bytes(),
            server_hostname="localhost",
        )
        conn = await open_conn(proc.endpoint, ssl=mtls)
        try:
            r = await conn.request(hdrs("tls3"), "tls3")
            assert r.audit.custom["cid"] == "tls3"
        finally:
            await closing(conn)
    finally:
        proc.cleanup()


async def test_cli_agent_serves_grpcs_with_the_tls_options(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    proc = AgentProc(
        "waf",
        tcp=True,
        extra_args=(
            "--grpc", "127.0.0.1:0",
            "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem"),
        ),
    )  # fmt: skip
    proc.start()
    try:
        await proc.await_ready()
        assert proc.endpoint.startswith("grpcs://")
        tls = GrpcTLS(root_certificates=ca.cert_pem.bytes(), server_hostname="localhost")
        conn = await open_conn(proc.endpoint, ssl=tls)
        try:
            r = await conn.request(hdrs("c1", "/admin"), "c1")
            assert r.decision == Block(status=403, body="Forbidden")
        finally:
            await closing(conn)
    finally:
        proc.cleanup()


async def test_cli_agent_serves_grpc_and_uds_with_the_same_handlers() -> None:
    proc = AgentProc("waf", extra_args=("--grpc", "127.0.0.1:0"))
    proc.start()
    try:
        await proc.await_ready()
        lines = [proc.endpoint]
        assert proc.proc is not None and proc.proc.stdout is not None
        lines.append(proc.proc.stdout.readline().split(" on ", 1)[1].strip())
        grpc_ep = next(x for x in lines if x.startswith("grpc://"))
        uds_ep = next(x for x in lines if x.startswith("unix:"))
        for ep in (grpc_ep, uds_ep):
            conn = await AgentConnection.open(ep, agent_id="waf", request_timeout=5.0)
            try:
                r = await conn.request(hdrs("w1", "/admin"), "w1")
                assert r.decision == Block(status=403, body="Forbidden")
                r = await conn.request(hdrs("w2", "/ok"), "w2")
                assert isinstance(r.decision, Allow)
            finally:
                await closing(conn)
    finally:
        proc.cleanup()


def test_docs_example_runs(tmp_path: Path) -> None:
    """The runnable example of docs/protocol.md's gRPC section runs as pasted."""
    import re

    text = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()
    section = text.split("## gRPC transport", 1)[1].split("### Runnable example", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    script = tmp_path / "example.py"
    script.write_text(match.group(1))
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["/index.html Allow", "/admin/users Block"]


async def test_agent_side_ignores_garbage_and_events_before_the_handshake(
    agent: GrpcAgentProc,
) -> None:
    """A raw grpcio client: the agent drops what it cannot read and keeps the stream."""
    import grpc

    from agentpool.grpc import PROCESS_STREAM
    from agentpool.grpc import agent_v2_pb2 as pb
    from agentpool.grpc._convert import encode_event

    async with grpc.aio.insecure_channel(agent.endpoint.removeprefix("grpc://")) as channel:
        call = channel.stream_stream(PROCESS_STREAM)()
        await call.write(encode_event(hdrs("early"), "early"))  # before the handshake: ignored
        await call.write(b"\xff\xff\xff not protobuf")  # undecodable: ignored
        hs = pb.ProxyToAgent()
        hs.handshake.supported_versions.append(2)
        await call.write(hs.SerializeToString())
        reply = pb.AgentToProxy.FromString(await asyncio.wait_for(call.read(), T))
        assert reply.WhichOneof("message") == "handshake" and reply.handshake.success
        await call.write(b"\x12\x05garbage")  # a truncated event: ignored
        await call.write(encode_event(hdrs("late"), "late"))
        reply = pb.AgentToProxy.FromString(await asyncio.wait_for(call.read(), T))
        assert reply.response.correlation_id == "late"  # nothing answered "early"
        # the largest timestamp still reads (its RFC 3339 form is far in the future)
        odd = pb.ProxyToAgent.FromString(encode_event(hdrs("odd"), "odd"))
        odd.request_headers.metadata.timestamp_ms = 2**64 - 1
        await call.write(odd.SerializeToString())
        reply = pb.AgentToProxy.FromString(await asyncio.wait_for(call.read(), T))
        assert reply.response.correlation_id == "odd" and reply.response.HasField("allow")
        await call.done_writing()
        assert await asyncio.wait_for(call.read(), T) is grpc.aio.EOF

        # a proxy that does not offer version 2 is refused in the handshake
        call = channel.stream_stream(PROCESS_STREAM)()
        hs = pb.ProxyToAgent()
        hs.handshake.supported_versions.append(1)
        await call.write(hs.SerializeToString())
        reply = pb.AgentToProxy.FromString(await asyncio.wait_for(call.read(), T))
        assert not reply.handshake.success and "2" in reply.handshake.error
        assert await asyncio.wait_for(call.read(), T) is grpc.aio.EOF
