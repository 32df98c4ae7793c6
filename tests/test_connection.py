"""AgentConnection against real agent processes (and raw-socket fake agents) over UDS and TCP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from agents import AgentProc, aspawn_agent, short_socket_dir, spawn_agent

from agentpool._impl import core
from agentpool.codec import (
    decode_cancel,
    decode_handshake_request,
    decode_ping,
    encode_handshake_response,
    get_codec,
)
from agentpool.connection import AgentConnection, ConnectionListener, parse_endpoint
from agentpool.enums import CancelReason, HealthState, MessageType
from agentpool.errors import (
    ConnectionClosed,
    ConnectionFailed,
    DuplicateCorrelationId,
    InvalidMessage,
    MessageTooLarge,
    Timeout,
    Unavailable,
)
from agentpool.messages import (
    AgentCapabilities,
    AgentResponse,
    Block,
    ConfigUpdateRequest,
    ConfigUpdateResponse,
    HandshakeResponse,
    HealthStatus,
    MetricsReport,
    RequestHeadersEvent,
    RequestMetadata,
)

T = 10.0  # outer bound for every awaited step


def event(
    cid: str,
    uri: str = "/",
    *,
    action: str | None = None,
    delay: float | None = None,
    headers: dict[str, list[str]] | None = None,
) -> RequestHeadersEvent:
    hdrs = {"host": ["example.com"], **(headers or {})}
    if action:
        hdrs["x-test-action"] = [action]
    if delay is not None:
        hdrs["x-test-delay"] = [str(delay)]
    return RequestHeadersEvent(
        metadata=RequestMetadata(
            correlation_id=cid, request_id=f"r-{cid}", client_ip="127.0.0.1", client_port=40000
        ),
        method="GET",
        uri=uri,
        headers=hdrs,
    )


async def bounded(aw: Awaitable[Any], timeout: float = T) -> Any:
    return await asyncio.wait_for(aw, timeout)


class Recorder(ConnectionListener):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.changed = asyncio.Event()
        self.config_reply: ConfigUpdateResponse | None = None

    def _add(self, name: str, value: Any) -> None:
        self.events.append((name, value))
        self.changed.set()

    def on_health(self, conn: AgentConnection, status: HealthStatus) -> None:
        self._add("health", status)

    def on_flow_control(self, conn: AgentConnection, paused: bool) -> None:
        self._add("flow", paused)

    def on_metrics(self, conn: AgentConnection, report: MetricsReport) -> None:
        self._add("metrics", report)

    def on_config_update(
        self, conn: AgentConnection, request: ConfigUpdateRequest
    ) -> ConfigUpdateResponse | None:
        self._add("config", request)
        return ConfigUpdateResponse.success(request.request_id)

    def on_closed(self, conn: AgentConnection, exc: BaseException | None) -> None:
        self._add("closed", exc)

    def of(self, name: str) -> list[Any]:
        return [v for n, v in self.events if n == name]

    async def wait_for(self, name: str, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while not self.of(name):
            self.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"listener never got {name!r}: {self.events}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return self.of(name)[-1]


@pytest.fixture(scope="module")
def control_agent() -> Iterator[AgentProc]:
    with spawn_agent("control", encoding="msgpack") as agent:
        yield agent


@pytest.fixture(scope="module")
def waf_agent() -> Iterator[AgentProc]:
    with spawn_agent("waf", encoding="msgpack") as agent:
        yield agent


@pytest.fixture(scope="module")
def waf_agent_tcp() -> Iterator[AgentProc]:
    with spawn_agent("waf", encoding="msgpack", tcp=True) as agent:
        yield agent


@contextlib.asynccontextmanager
async def connect(endpoint: str, **kw: Any) -> AsyncIterator[AgentConnection]:
    kw.setdefault("agent_id", "test")
    kw.setdefault("connect_timeout", 5.0)
    kw.setdefault("request_timeout", 5.0)
    conn = await AgentConnection.open(endpoint, **kw)
    try:
        yield conn
    finally:
        conn.close()
        await bounded(conn.wait_closed(), 5.0)


# -- endpoints -------------------------------------------------------------------------------


def test_parse_endpoint() -> None:
    assert parse_endpoint("unix:/tmp/a.sock") == ("unix", "/tmp/a.sock", 0)
    assert parse_endpoint("/run/agent") == ("unix", "/run/agent", 0)
    assert parse_endpoint("agent.sock") == ("unix", "agent.sock", 0)
    assert parse_endpoint("tcp://127.0.0.1:9000") == ("tcp", "127.0.0.1", 9000)
    assert parse_endpoint("localhost:80") == ("tcp", "localhost", 80)
    assert parse_endpoint("[::1]:7") == ("tcp", "::1", 7)
    for bad in ("nonsense", "host:", "host:99999", "unix:"):
        with pytest.raises(ConnectionFailed):
            parse_endpoint(bad)


# -- handshake -------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
@pytest.mark.parametrize("transport", ["uds", "tcp"])
async def test_handshake_and_request(
    encoding: str, transport: str, waf_agent: AgentProc, waf_agent_tcp: AgentProc
) -> None:
    agent = waf_agent if transport == "uds" else waf_agent_tcp
    async with connect(agent.endpoint, encoding=encoding) as conn:
        assert conn.is_connected
        assert conn.encoding == encoding
        assert conn.protocol_version == 2
        caps = conn.capabilities
        assert caps is not None and caps.agent_id == "waf" and caps.features.cancellation
        blocked = await bounded(conn.request(event("a1", "/admin/x"), "a1"))
        assert isinstance(blocked.decision, Block) and blocked.decision.status == 403
        allowed = await bounded(conn.request(event("a2", "/public"), "a2"))
        assert allowed.is_allow
        assert [(op.op, op.name, op.value) for op in allowed.request_headers] == [
            ("set", "x-agentpool-checked", "1")
        ]
        assert conn.in_flight == 0


async def test_json_only_agent_answers_json_to_msgpack_offer() -> None:
    async with aspawn_agent("echo", encoding="json") as agent:
        async with connect(agent.endpoint, encoding="msgpack") as conn:
            assert conn.encoding == "json"
            resp = await bounded(conn.request(event("e1", headers={"x-a": ["1", "2"]}), "e1"))
            names = [(op.op, op.name, op.value) for op in resp.request_headers]
            assert ("add", "x-echo-x-a", "1") in names and ("add", "x-echo-x-a", "2") in names


async def test_connect_refused_and_missing_socket() -> None:
    d = short_socket_dir()
    try:
        with pytest.raises(ConnectionFailed):
            await bounded(AgentConnection.open(f"unix:{d}/none.sock", agent_id="x"))
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- multiplexing ------------------------------------------------------------------------------


async def test_thousand_concurrent_requests_matched(control_agent: AgentProc) -> None:
    async with connect(control_agent.endpoint) as conn:
        cids = [f"m-{i}" for i in range(1000)]
        replies = await bounded(
            asyncio.gather(*(conn.request(event(cid), cid) for cid in cids)), 30.0
        )
        assert [r.routing_metadata["cid"] for r in replies] == cids
        assert [r.audit.custom["correlation_id"] for r in replies] == cids
        assert conn.in_flight == 0
        pc = conn.protocol_core
        assert pc.requests_sent == 1000 and pc.responses_received == 1000
        assert pc.writes < pc.frames_sent  # writes of one loop iteration were coalesced


async def test_send_returns_future(control_agent: AgentProc) -> None:
    async with connect(control_agent.endpoint, encoding="msgpack") as conn:
        futs = [conn.send(event(f"f{i}"), f"f{i}") for i in range(50)]
        replies = await bounded(asyncio.gather(*futs))
        assert [r.routing_metadata["cid"] for r in replies] == [f"f{i}" for i in range(50)]


async def test_replies_out_of_order(control_agent: AgentProc) -> None:
    async with connect(control_agent.endpoint) as conn:
        order: list[str] = []

        async def one(cid: str, delay: float) -> None:
            resp = await conn.request(event(cid, delay=delay), cid)
            assert resp.routing_metadata["cid"] == cid
            order.append(cid)

        await bounded(asyncio.gather(one("slow", 0.4), one("mid", 0.2), one("fast", 0.0)))
        assert order == ["fast", "mid", "slow"]


# -- timeout / cancel / ping -------------------------------------------------------------------


async def test_request_timeout_per_call_and_default(control_agent: AgentProc) -> None:
    async with connect(control_agent.endpoint, request_timeout=0.3) as conn:
        t0 = time.monotonic()
        with pytest.raises(Timeout) as info:
            await bounded(conn.request(event("t1", action="no-reply"), "t1", timeout=0.2))
        assert info.value.timeout == 0.2
        assert 0.15 < time.monotonic() - t0 < 2.0
        t0 = time.monotonic()
        with pytest.raises(Timeout) as info:
            await bounded(conn.request(event("t2", action="no-reply"), "t2"))
        assert info.value.timeout == 0.3 and "Timeout after 300ms" in str(info.value)
        assert 0.25 < time.monotonic() - t0 < 2.0
        assert conn.in_flight == 0
        assert conn.protocol_core.timeouts == 2
        assert (await bounded(conn.request(event("t3"), "t3"))).is_allow  # still usable


async def test_cancel_fails_waiter_and_reaches_agent(control_agent: AgentProc) -> None:
    async with connect(control_agent.endpoint) as conn:
        task = asyncio.ensure_future(conn.request(event("c-1", action="no-reply"), "c-1"))
        await asyncio.sleep(0.05)
        assert conn.in_flight == 1
        assert await conn.cancel("c-1", CancelReason.CLIENT_DISCONNECT)
        with pytest.raises(ConnectionClosed):
            await bounded(task, 1.0)
        assert conn.in_flight == 0
        assert not await conn.cancel("c-1")
        resp = await bounded(conn.request(event("c-2", action="cancelled"), "c-2"))
        assert "c-1:0" in resp.routing_metadata["cancelled"].split(",")


async def test_cancel_all(control_agent: AgentProc) -> None:
    async with connect(control_agent.endpoint) as conn:
        tasks = [
            asyncio.ensure_future(conn.request(event(f"ca{i}", action="no-reply"), f"ca{i}"))
            for i in range(5)
        ]
        await asyncio.sleep(0.05)
        assert await conn.cancel_all(CancelReason.PROXY_SHUTDOWN) == 5
        results = await bounded(asyncio.gather(*tasks, return_exceptions=True), 2.0)
        assert all(isinstance(r, ConnectionClosed) for r in results)
        assert conn.in_flight == 0


async def test_caller_cancellation_cleans_up(control_agent: AgentProc) -> None:
    async with connect(control_agent.endpoint) as conn:
        task = asyncio.ensure_future(conn.request(event("cc", action="no-reply"), "cc"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert conn.in_flight == 0


async def test_duplicate_correlation_id_is_refused(control_agent: AgentProc) -> None:
    async with connect(control_agent.endpoint) as conn:
        first = asyncio.ensure_future(conn.request(event("dup", action="no-reply"), "dup"))
        await asyncio.sleep(0.02)
        sent = conn.protocol_core.requests_sent
        with pytest.raises(DuplicateCorrelationId, match="'dup'"):
            await bounded(conn.request(event("dup"), "dup"))
        assert conn.protocol_core.requests_sent == sent  # nothing written
        assert not first.done()
        first.cancel()


async def test_ping_rtt(control_agent: AgentProc) -> None:
    async with connect(control_agent.endpoint, encoding="msgpack") as conn:
        assert conn.last_rtt is None
        rtt = await bounded(conn.ping(timeout=2.0))
        assert 0 < rtt < 2.0 and conn.last_rtt == rtt
        rtts = await bounded(asyncio.gather(*(conn.ping() for _ in range(10))))
        assert all(r > 0 for r in rtts)


# -- agent -> proxy control messages ------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_flow_control_pause_resume(control_agent: AgentProc, encoding: str) -> None:
    rec = Recorder()
    async with connect(control_agent.endpoint, encoding=encoding, listener=rec) as conn:
        assert not conn.is_paused
        await bounded(conn.request(event("p1", action="pause"), "p1"))
        await rec.wait_for("flow")
        assert conn.is_paused and rec.of("flow") == [True]
        await bounded(conn.request(event("p2", action="resume"), "p2"))
        assert not conn.is_paused and rec.of("flow") == [True, False]


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_health_metrics_and_config_update(control_agent: AgentProc, encoding: str) -> None:
    rec = Recorder()
    async with connect(control_agent.endpoint, encoding=encoding, listener=rec) as conn:
        assert conn.health_state == HealthState.UNSPECIFIED
        await bounded(conn.request(event("h1", action="health:2"), "h1"))
        status = await rec.wait_for("health")
        assert status.state == HealthState.DEGRADED and conn.health_state == HealthState.DEGRADED
        await bounded(conn.request(event("h2", action="metrics"), "h2"))
        report = await rec.wait_for("metrics")
        assert report.counters[0].name == "agent_requests_total" and report.counters[0].value == 7
        resp = await bounded(conn.request(event("h3", action="config-update"), "h3"))
        request = rec.of("config")[0]
        assert resp.routing_metadata["config_update"] == f"{request.request_id}:True:None"


async def test_listener_errors_do_not_escape(control_agent: AgentProc) -> None:
    class Broken(ConnectionListener):
        def on_health(self, conn: AgentConnection, status: HealthStatus) -> None:
            raise RuntimeError("listener bug")

    async with connect(control_agent.endpoint, listener=Broken()) as conn:
        await bounded(conn.request(event("b1", action="health:4"), "b1"))
        await bounded(conn.request(event("b2"), "b2"))
        assert conn.health_state == HealthState.UNHEALTHY and conn.is_connected


# -- failures ------------------------------------------------------------------------------------


async def test_agent_killed_mid_flight_fails_all_waiters_fast() -> None:
    rec = Recorder()
    async with aspawn_agent("control") as agent:
        conn = await AgentConnection.open(
            agent.endpoint, agent_id="k", request_timeout=30.0, listener=rec
        )
        tasks = [
            asyncio.ensure_future(conn.request(event(f"k{i}", action="no-reply"), f"k{i}"))
            for i in range(20)
        ]
        await asyncio.sleep(0.1)
        assert conn.in_flight == 20
        t0 = time.monotonic()
        os.kill(agent.pid, signal.SIGKILL)
        results = await bounded(asyncio.gather(*tasks, return_exceptions=True), 5.0)
        assert time.monotonic() - t0 < 3.0
        assert all(isinstance(r, ConnectionClosed) for r in results), results
        assert conn.in_flight == 0 and not conn.is_connected
        await rec.wait_for("closed")
        assert isinstance(rec.of("closed")[0], ConnectionClosed)
        with pytest.raises(ConnectionClosed):
            await conn.request(event("after"), "after")
        conn.close()


async def test_agent_process_exit_mid_request() -> None:
    async with aspawn_agent("control") as agent:
        async with connect(agent.endpoint, request_timeout=30.0) as conn:
            slow = asyncio.ensure_future(conn.request(event("x1", action="no-reply"), "x1"))
            await asyncio.sleep(0.05)
            with pytest.raises(ConnectionClosed):
                await bounded(conn.request(event("x2", action="exit"), "x2"), 5.0)
            with pytest.raises(ConnectionClosed):
                await bounded(slow, 5.0)


@pytest.mark.parametrize(
    ("action", "error"),
    [
        ("garbage", InvalidMessage),
        ("unknown-type", InvalidMessage),
        ("oversize", MessageTooLarge),
        ("close", ConnectionClosed),
    ],
)
async def test_agent_protocol_errors_fail_every_waiter(action: str, error: type[Exception]) -> None:
    rec = Recorder()
    async with aspawn_agent("control") as agent:
        async with connect(agent.endpoint, request_timeout=30.0, listener=rec) as conn:
            waiting = [
                asyncio.ensure_future(conn.request(event(f"w{i}", action="no-reply"), f"w{i}"))
                for i in range(5)
            ]
            await asyncio.sleep(0.05)
            with pytest.raises(error):
                await bounded(conn.request(event("bad", action=action), "bad"), 5.0)
            results = await bounded(asyncio.gather(*waiting, return_exceptions=True), 5.0)
            assert all(isinstance(r, error) for r in results), results
            assert not conn.is_connected and conn.in_flight == 0
            await rec.wait_for("closed")


# -- raw-socket fake agents ----------------------------------------------------------------------

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_agent(script: Script) -> AsyncIterator[str]:
    """A raw-socket 'agent' on a fresh Unix socket running ``script`` per connection."""
    d = short_socket_dir()
    path = os.path.join(d, "f.sock")
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, path)
    try:
        yield f"unix:{path}"
    finally:
        server.close()
        for t in tasks:
            t.cancel()
        shutil.rmtree(d, ignore_errors=True)


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(5)
    n = int.from_bytes(head[:4], "big")
    return head[4], await reader.readexactly(n - 1)


def handshake_reply(encoding: str = "json", success: bool = True) -> bytes:
    resp = HandshakeResponse(
        protocol_version=2,
        capabilities=AgentCapabilities(agent_id="fake", name="fake", version="0"),
        success=success,
        error=None if success else "go away",
        encoding=encoding,
    )
    return core.encode_frame(MessageType.HANDSHAKE_RESPONSE, encode_handshake_response(resp))


async def test_fake_agent_handshake_then_reply_and_ping_echo() -> None:
    seen: list[tuple[int, bytes]] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t, payload = await read_frame(reader)
        req = decode_handshake_request(payload)
        assert t == MessageType.HANDSHAKE_REQUEST and req.supported_encodings == ["json"]
        writer.write(handshake_reply())
        while True:
            t, payload = await read_frame(reader)
            seen.append((t, payload))
            if t == MessageType.PING:
                writer.write(core.encode_frame(MessageType.PONG, payload))
            elif t == MessageType.REQUEST_HEADERS:
                cid = get_codec("json").event_correlation_id(payload)
                body = get_codec("json").encode_response(AgentResponse.block(401), cid)
                # split the reply across two writes to exercise partial frames
                frame = core.encode_frame(MessageType.AGENT_RESPONSE, body)
                writer.write(frame[:7])
                await writer.drain()
                await asyncio.sleep(0.01)
                writer.write(frame[7:])

    async with fake_agent(script) as ep:
        async with connect(ep) as conn:
            assert conn.capabilities is not None and conn.capabilities.agent_id == "fake"
            resp = await bounded(conn.request(event("q1"), "q1"))
            assert isinstance(resp.decision, Block) and resp.decision.status == 401
            await bounded(conn.ping())
            await bounded(conn.cancel("nothing", CancelReason.TIMEOUT))
            await asyncio.sleep(0.05)
    types = [t for t, _ in seen]
    assert types[:3] == [MessageType.REQUEST_HEADERS, MessageType.PING, MessageType.CANCEL]
    assert decode_ping(seen[1][1]).sequence == 0
    cancel = decode_cancel(seen[2][1])
    assert cancel.correlation_id == "nothing" and cancel.reason == CancelReason.TIMEOUT


@pytest.mark.parametrize(
    ("reply", "error", "text"),
    [
        (b"", ConnectionClosed, None),
        (b"\x00\x00\x00\x00", ConnectionFailed, "not a Zentinel v2 agent (Zero-length message)"),
        (b"\x02\x00\x00\x00\x02", ConnectionFailed, "(first bytes b'\\x02\\x00\\x00\\x00')"),
        (b"\x00\x00\x00\x03\x99{}", ConnectionFailed, "Unknown message type: 0x99"),
        (b"\x00\x00\x00\x03\x20{}", ConnectionFailed, "Expected HandshakeResponse"),
        (b"\x00\x00\x00\x03\x02{}", ConnectionFailed, "invalid HandshakeResponse"),
        (b"\x00\x00\x01\x00\x02{", ConnectionClosed, None),
        (b"HTTP/1.0 400 Bad request\r\n\r\n", ConnectionFailed, "(first bytes b'HTTP')"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", ConnectionFailed, "(first bytes b'SSH-')"),
    ],
    ids=[
        "close", "zero", "oversize", "unknown", "wrong-type", "bad-json", "partial", "http", "ssh"
    ],
)
async def test_bad_handshake_replies(
    reply: bytes, error: type[Exception], text: str | None
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)
        writer.write(reply)
        await writer.drain()
        await asyncio.sleep(0.05)

    async with fake_agent(script) as ep:
        t0 = time.monotonic()
        with pytest.raises(error) as info:
            await bounded(AgentConnection.open(ep, agent_id="x", connect_timeout=5.0))
        assert time.monotonic() - t0 < 2.0
        if text:
            assert text in str(info.value)
        if error is ConnectionFailed:
            assert str(info.value).startswith(f"Connection failed: handshake failed: {ep} ")


async def test_handshake_timeout_names_agent_and_phase() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(2.0)  # takes the handshake, never answers it

    async with fake_agent(script) as ep:
        with pytest.raises(Timeout) as info:
            await bounded(AgentConnection.open(ep, agent_id="waf", connect_timeout=0.2))
    err = info.value
    assert (err.phase, err.agent_id, err.correlation_id) == ("handshake", "waf", None)
    assert str(err) == "Timeout after 200ms (handshake, agent 'waf')"


async def test_handshake_refused_and_encoding_not_offered() -> None:
    replies = [handshake_reply(success=False), handshake_reply(encoding="msgpack")]

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)
        writer.write(replies.pop(0))
        await writer.drain()
        await asyncio.sleep(0.1)

    async with fake_agent(script) as ep:
        with pytest.raises(ConnectionFailed, match="go away"):
            await bounded(AgentConnection.open(ep, agent_id="x"))
        with pytest.raises(ConnectionFailed, match="not offered"):
            await bounded(AgentConnection.open(ep, agent_id="x", encoding="json"))


async def test_silent_agent_hits_connect_timeout() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async with fake_agent(script) as ep:
        t0 = time.monotonic()
        with pytest.raises(Timeout) as info:
            await bounded(AgentConnection.open(ep, agent_id="x", connect_timeout=0.2))
        assert info.value.timeout == 0.2
        assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_undecodable_response_fails_its_waiter_at_once(encoding: str) -> None:
    """A reply whose correlation id is readable but which does not decode fails that request
    with the decode error right away; one without a readable id is counted and dropped."""
    import msgpack

    def dump(obj: Any) -> bytes:
        return bytes(msgpack.packb(obj)) if encoding == "msgpack" else json.dumps(obj).encode()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)
        writer.write(handshake_reply(encoding))
        codec = get_codec(encoding)
        while True:
            msg_type, payload = await read_frame(reader)
            if msg_type == MessageType.CANCEL:  # sent for the timed-out "u1"
                continue
            cid = codec.event_correlation_id(payload)
            custom = {"custom": {"correlation_id": cid}}
            if cid == "u1":  # no id anywhere, then a valid reply for someone else
                writer.write(core.encode_frame(MessageType.AGENT_RESPONSE, dump({"x": 1})))
                other = codec.encode_response(AgentResponse.allow(), "someone-else")
                writer.write(core.encode_frame(MessageType.AGENT_RESPONSE, other))
            elif cid == "nover":
                body = dump({"decision": "allow", "audit": custom})
                writer.write(core.encode_frame(MessageType.AGENT_RESPONSE, body))
            elif cid == "baddec":
                body = dump({"version": 2, "decision": {"nope": 1}, "audit": custom})
                writer.write(core.encode_frame(MessageType.AGENT_RESPONSE, body))
            else:
                body = codec.encode_response(AgentResponse.block(401), cid)
                writer.write(core.encode_frame(MessageType.AGENT_RESPONSE, body))

    async with fake_agent(script) as ep:
        async with connect(ep, encoding=encoding, request_timeout=30.0) as conn:
            assert conn.encoding == encoding
            with pytest.raises(Timeout):
                await bounded(conn.request(event("u1"), "u1", timeout=0.3))
            t0 = time.monotonic()
            with pytest.raises(InvalidMessage) as info:
                await bounded(conn.request(event("nover"), "nover"), 5.0)
            assert info.value.field == "version" and "missing field `version`" in str(info.value)
            with pytest.raises(InvalidMessage):
                await bounded(conn.request(event("baddec"), "baddec"), 5.0)
            assert time.monotonic() - t0 < 5.0  # not the 30 s request timeout
            pc = conn.protocol_core
            assert pc.decode_errors == 3 and pc.unmatched_responses == 1
            assert conn.is_connected and conn.in_flight == 0
            resp = await bounded(conn.request(event("ok"), "ok"))
            assert isinstance(resp.decision, Block) and resp.decision.status == 401


async def test_close_fails_waiters_and_is_idempotent(control_agent: AgentProc) -> None:
    rec = Recorder()
    conn = await AgentConnection.open(control_agent.endpoint, agent_id="c", listener=rec)
    task = asyncio.ensure_future(conn.request(event("z", action="no-reply"), "z"))
    await asyncio.sleep(0.05)
    conn.close()
    conn.close()
    with pytest.raises(ConnectionClosed):
        await bounded(task, 1.0)
    await bounded(conn.wait_closed(), 2.0)
    assert not conn.is_connected
    assert rec.of("closed") == [None]
    with pytest.raises(ConnectionClosed):
        conn.send(event("z2"), "z2")


async def test_backpressure_bounded_write_buffer() -> None:
    """An agent that stops reading: writes pause, the queue stays bounded, sends fail typed."""
    release = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)
        writer.write(handshake_reply())
        await release.wait()

    limit = 256 * 1024
    big = {"x-big": ["v" * 60_000]}
    async with fake_agent(script) as ep:
        async with connect(ep, request_timeout=2.0) as conn:
            pc = conn.protocol_core
            pc.max_write_buffer = limit
            futs = []
            for i in range(2000):
                try:
                    futs.append(conn.send(event(f"bp{i}", headers=big), f"bp{i}"))
                except Unavailable as exc:
                    assert "write buffer full" in str(exc)
                    if pc.write_paused:
                        break
                await asyncio.sleep(0)
            else:
                raise AssertionError("writes never paused")
            assert pc.write_queue_full
            queued = pc.write_buffer_size + pc.transport.get_write_buffer_size()
            assert queued < 2 * limit + 70_000
            assert len(futs) < 200  # the kernel's socket buffers plus our bound, not 2000
            release.set()
            for f in futs:
                f.cancel()


async def test_burst_beyond_max_write_buffer_fails_fast_and_request_waits_for_room(
    control_agent: AgentProc,
) -> None:
    """Sends issued in one loop iteration are bounded too: send() raises Unavailable once
    max_write_buffer bytes are queued; request() waits for room and then goes through."""
    limit = 64 * 1024
    big = {"x-big": ["v" * 16_000]}
    async with connect(control_agent.endpoint) as conn:
        pc = conn.protocol_core
        pc.max_write_buffer = limit
        futs = []
        with pytest.raises(Unavailable, match="write buffer full"):
            for i in range(1000):  # no await: everything lands in one loop iteration
                futs.append(conn.send(event(f"b{i}", headers=big), f"b{i}"))
        assert len(futs) <= limit // 16_000 + 2
        assert pc.write_buffer_size < limit + 17_000
        assert not pc.write_paused
        replies = await bounded(asyncio.gather(*futs))
        assert [r.routing_metadata["cid"] for r in replies] == [f"b{i}" for i in range(len(futs))]
        cids = [f"w{i}" for i in range(60)]
        replies = await bounded(
            asyncio.gather(*(conn.request(event(c, headers=big), c) for c in cids))
        )
        assert [r.routing_metadata["cid"] for r in replies] == cids
        assert pc.write_buffer_size == 0


@pytest.mark.parametrize("mode", ["paused", "unpaused"])
async def test_close_does_not_wait_for_an_agent_that_stopped_reading(mode: str) -> None:
    """close() with unsent data for an agent that never reads: the transport is aborted (at
    once when writes are paused, after a short grace otherwise) and wait_closed() returns."""
    closed, done = asyncio.Event(), asyncio.Event()
    got: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)
        writer.write(handshake_reply())
        with contextlib.suppress(asyncio.TimeoutError):  # no reading while the proxy closes
            await asyncio.wait_for(closed.wait(), 5.0)
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(1 << 20):
                got.append(chunk)
        done.set()

    async with fake_agent(script) as ep:
        conn = await bounded(AgentConnection.open(ep, agent_id="x", request_timeout=30.0))
        pc = conn.protocol_core
        transport = pc.transport
        if mode == "unpaused":
            transport.set_write_buffer_limits(high=1 << 30)
        big = {"x-big": ["v" * 200_000]}
        futs = []
        for i in range(40):
            try:
                futs.append(conn.send(event(f"s{i}", headers=big), f"s{i}"))
            except Unavailable:
                pass
            await asyncio.sleep(0)
            if mode == "paused" and pc.write_paused:
                break
        assert pc.write_paused == (mode == "paused")
        assert transport.get_write_buffer_size() > 0
        t0 = time.monotonic()
        conn.close()
        await bounded(conn.wait_closed(), 2.0)
        assert time.monotonic() - t0 < 1.0
        closed.set()
        assert not conn.is_connected and pc.transport is None and pc.write_buffer_size == 0
        for f in futs:
            with pytest.raises(ConnectionClosed):
                await bounded(f, 1.0)
        await bounded(done.wait(), 5.0)  # the agent sees the connection end


async def test_idle_line_writes_directly_busy_line_coalesces(control_agent: AgentProc) -> None:
    async with connect(control_agent.endpoint) as conn:
        pc = conn.protocol_core
        for i in range(5):  # one in flight: each frame leaves in its own write, at once
            writes = pc.writes
            fut = conn.submit(event(f"d{i}"), f"d{i}", None)
            assert pc.writes == writes + 1 and pc.write_buffer_size == 0
            assert (await bounded(fut)).routing_metadata["cid"] == f"d{i}"
        slow = conn.send(event("slow", delay=0.3), "slow")
        writes = pc.writes
        futs = [conn.send(event(f"q{i}"), f"q{i}") for i in range(10)]
        assert pc.writes == writes and pc.write_buffer_size > 0  # queued behind "slow"
        replies = await bounded(asyncio.gather(*futs))
        assert pc.writes == writes + 1  # the ten frames shared one write
        assert [r.routing_metadata["cid"] for r in replies] == [f"q{i}" for i in range(10)]
        assert (await bounded(slow)).routing_metadata["cid"] == "slow"


async def test_core_send_event_needs_an_encoder() -> None:
    loop = asyncio.get_running_loop()
    pc = core.AgentProtocolCore(loop, lambda *a: None, lambda *a: None)
    with pytest.raises(TypeError, match="no event encoder"):
        pc.send_event(event("x"), "x")
    pc.set_encoder(get_codec("json").encode_event)
    fut = pc.send_event(event("x"), "x", 5.0)  # no transport yet: queued, not written
    assert pc.frames_sent == 1 and pc.write_buffer_size > 0 and pc.in_flight == 1
    pc.close()
    with pytest.raises(ConnectionClosed):
        await fut


async def test_coalesced_frames_reach_the_socket_byte_exact() -> None:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    try:
        pc = core.AgentProtocolCore(loop, lambda *x: None, lambda *x: None)
        await loop.create_unix_connection(lambda: pc, sock=a)
        payloads = [(b"p%d-" % i) * (i % 97 + 1) for i in range(500)]
        futs = [pc.request(0x10, p, f"c{i}", 5.0) for i, p in enumerate(payloads)]
        want = b"".join((len(p) + 1).to_bytes(4, "big") + b"\x10" + p for p in payloads)
        b.setblocking(False)
        got = b""
        while len(got) < len(want):
            got += await asyncio.wait_for(loop.sock_recv(b, 1 << 16), T)
        assert got == want
        assert pc.writes == 2  # the first frame at once, the other 499 in one write
        pc.close()
        results = await asyncio.gather(*futs, return_exceptions=True)
        assert all(isinstance(r, ConnectionClosed) for r in results)
    finally:
        b.close()
