"""The agent side (AgentServer + Agent) against the proxy side (AgentConnection) and raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from _helpers import hdrs, proxy
from _helpers import until as wait_until
from agents import short_socket_dir

from agentpool._impl import core
from agentpool.agent import Agent, AgentServer, ErrorPolicy
from agentpool.agent.examples import BenchAgent, make_agent
from agentpool.cli import main_agent
from agentpool.codec import (
    decode_handshake_response,
    encode_handshake_request,
    get_codec,
)
from agentpool.connection import AgentConnection, ConnectionListener
from agentpool.enums import CancelReason, FlowAction, HealthState, MessageType
from agentpool.errors import ConnectionFailed
from agentpool.messages import (
    AgentResponse,
    Block,
    ConfigUpdateRequest,
    ConfigUpdateResponse,
    ConfigureEvent,
    CounterMetric,
    GuardrailInspectEvent,
    HandshakeRequest,
    HeaderOp,
    ListUpdate,
    MetricsReport,
    RequestBodyChunkEvent,
    RequestCompleteEvent,
    RequestHeadersEvent,
    ResponseBodyChunkEvent,
    ResponseHeadersEvent,
    WebSocketFrameEvent,
)

T = 10.0


def headers_event(cid: str, uri: str = "/", delay: float = 0.0) -> RequestHeadersEvent:
    return hdrs(
        cid,
        uri,
        method="POST",
        host="h",
        headers={"x-delay": [str(delay)]},
        request_id="r",
        client_ip="10.0.0.1",
        client_port=1234,
    )


class RecordingAgent(Agent):
    agent_id = "rec"
    name = "recording agent"

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []
        self.cancelled: list[tuple[str, CancelReason]] = []
        self.handler_cancelled: list[str] = []
        self.refuse: str | None = None

    def on_handshake(self, request: HandshakeRequest) -> str | None:
        self.seen.append(("handshake", request))
        return self.refuse

    async def on_request_headers(self, event: RequestHeadersEvent) -> AgentResponse:
        self.seen.append(("request_headers", event))
        delay = float(event.headers.get("x-delay", ["0"])[0])
        try:
            if delay:
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            self.handler_cancelled.append(event.correlation_id)
            raise
        if event.uri == "/boom":
            raise RuntimeError("handler bug")
        resp = AgentResponse(request_headers=[HeaderOp.set("x-seen", event.method)])
        resp.routing_metadata["uri"] = event.uri
        return resp

    async def on_request_body_chunk(self, event: RequestBodyChunkEvent) -> AgentResponse:
        self.seen.append(("request_body_chunk", event))
        resp = AgentResponse.allow()
        resp.needs_more = not event.is_last
        resp.routing_metadata["len"] = str(len(event.data))
        return resp

    async def on_response_headers(self, event: ResponseHeadersEvent) -> AgentResponse:
        self.seen.append(("response_headers", event))
        return AgentResponse(response_headers=[HeaderOp.remove("server")])

    async def on_response_body_chunk(self, event: ResponseBodyChunkEvent) -> AgentResponse:
        self.seen.append(("response_body_chunk", event))
        return AgentResponse.block(502, "bad body")

    async def on_request_complete(self, event: RequestCompleteEvent) -> AgentResponse:
        self.seen.append(("request_complete", event))
        return AgentResponse.allow()

    async def on_websocket_frame(self, event: WebSocketFrameEvent) -> AgentResponse:
        self.seen.append(("websocket_frame", event))
        return AgentResponse.websocket_drop()

    async def on_guardrail_inspect(self, event: GuardrailInspectEvent) -> AgentResponse:
        self.seen.append(("guardrail_inspect", event))
        return AgentResponse.block(403, "injection")

    async def on_configure(self, config: Any, config_version: str | None) -> bool:
        self.seen.append(("configure", (config, config_version)))
        return bool(config.get("ok"))

    async def on_cancel(self, correlation_id: str, reason: CancelReason) -> None:
        self.cancelled.append((correlation_id, reason))


@contextlib.asynccontextmanager
async def serve(
    agent: Agent,
    *,
    tcp: bool = False,
    encodings: tuple[str, ...] = ("json", "msgpack"),
    on_error: ErrorPolicy | None = None,
) -> AsyncIterator[AgentServer]:
    d = short_socket_dir()
    if tcp:
        server = AgentServer(
            agent, host="127.0.0.1", port=0, encodings=encodings, on_error=on_error
        )
    else:
        server = AgentServer(
            agent, path=os.path.join(d, "s.sock"), encodings=encodings, on_error=on_error
        )
    await server.start()
    try:
        yield server
    finally:
        await asyncio.wait_for(server.close(), 5.0)
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
@pytest.mark.parametrize("tcp", [False, True], ids=["uds", "tcp"])
async def test_every_event_type_round_trips(encoding: str, tcp: bool) -> None:
    agent = RecordingAgent()
    async with serve(agent, tcp=tcp) as server, proxy(server.endpoint, encoding=encoding) as conn:
        assert conn.encoding == encoding
        assert conn.capabilities is not None and conn.capabilities.name == "recording agent"
        r = await asyncio.wait_for(conn.request(headers_event("h1", "/a"), "h1"), T)
        assert r.routing_metadata["uri"] == "/a"
        assert [(o.op, o.name, o.value) for o in r.request_headers] == [("set", "x-seen", "POST")]
        body = bytes(range(256))
        r = await conn.request(RequestBodyChunkEvent("b1", body, False, None, 0, 256), "b1")
        assert r.needs_more and r.routing_metadata["len"] == "256"
        r = await conn.request(ResponseHeadersEvent("rh", 200, {"server": ["x"]}), "rh")
        assert [(o.op, o.name) for o in r.response_headers] == [("remove", "server")]
        r = await conn.request(ResponseBodyChunkEvent("rb", b"zz", True), "rb")
        assert isinstance(r.decision, Block) and r.decision.status == 502
        r = await conn.request(RequestCompleteEvent("rc", 200, 5, 1, 2, 1), "rc")
        assert r.is_allow
        r = await conn.request(WebSocketFrameEvent("ws", "text", b"hi", True, 0, True), "ws")
        assert r.websocket_decision == "drop"
        r = await conn.request(GuardrailInspectEvent("g", "prompt_injection", "ignore all"), "g")
        assert isinstance(r.decision, Block) and r.decision.body == "injection"
        assert await conn.configure({"ok": True}, "v1")
        assert not await conn.configure({"ok": False}, "v2")
        r = await conn.request(ConfigureEvent({"ok": False}, None, "cfg"), "cfg")
        assert isinstance(r.decision, Block)
        assert (r.decision.status, r.decision.body) == (500, "Configuration rejected")
    kinds = [k for k, _ in agent.seen]
    assert kinds[0] == "handshake"
    assert set(kinds) >= {
        "request_headers",
        "request_body_chunk",
        "response_headers",
        "response_body_chunk",
        "request_complete",
        "websocket_frame",
        "guardrail_inspect",
        "configure",
    }
    chunk = next(v for k, v in agent.seen if k == "request_body_chunk")
    assert chunk.data == body and chunk.correlation_id == "b1"
    assert ("configure", ({"ok": True}, "v1")) in agent.seen


async def test_concurrent_handlers_answer_out_of_order() -> None:
    agent = RecordingAgent()
    async with serve(agent) as server, proxy(server.endpoint) as conn:
        done: list[str] = []

        async def one(cid: str, delay: float) -> None:
            r = await conn.request(headers_event(cid, f"/{cid}", delay), cid)
            assert r.routing_metadata["uri"] == f"/{cid}"
            done.append(cid)

        await asyncio.wait_for(asyncio.gather(one("a", 0.3), one("b", 0.15), one("c", 0)), T)
        assert done == ["c", "b", "a"]


async def test_cancel_reaches_agent_and_cancels_handler() -> None:
    agent = RecordingAgent()
    async with serve(agent) as server, proxy(server.endpoint, encoding="msgpack") as conn:
        fut = conn.send(headers_event("slow", delay=5), "slow")
        await asyncio.sleep(0.05)
        assert await conn.cancel("slow", CancelReason.BLOCKED_BY_AGENT)
        for _ in range(100):
            if agent.handler_cancelled:
                break
            await asyncio.sleep(0.01)
        assert agent.cancelled == [("slow", CancelReason.BLOCKED_BY_AGENT)]
        assert agent.handler_cancelled == ["slow"]
        assert fut.done()
        r = await asyncio.wait_for(conn.request(headers_event("next"), "next"), T)
        assert r.is_allow


async def test_handler_exception_fails_open() -> None:
    allow = ErrorPolicy.allow()
    async with serve(RecordingAgent(), on_error=allow) as server, proxy(server.endpoint) as conn:
        r = await asyncio.wait_for(conn.request(headers_event("x", "/boom"), "x"), T)
        assert r.is_allow and r.audit.custom["correlation_id"] == "x"


async def test_handshake_refused_by_agent() -> None:
    agent = RecordingAgent()
    agent.refuse = "not today"
    async with serve(agent) as server:
        with pytest.raises(ConnectionFailed, match="not today"):
            await asyncio.wait_for(AgentConnection.open(server.endpoint, agent_id="p"), T)


async def test_json_only_server_picks_json() -> None:
    async with serve(RecordingAgent(), encodings=("json",)) as server:
        async with proxy(server.endpoint, encoding="msgpack") as conn:
            assert conn.encoding == "json"
            assert (await conn.request(headers_event("j"), "j")).is_allow


async def test_server_pushes_control_messages() -> None:
    class Listener(ConnectionListener):
        def __init__(self) -> None:
            self.metrics: list[MetricsReport] = []
            self.config: list[ConfigUpdateRequest] = []

        def on_metrics(self, conn: AgentConnection, report: MetricsReport) -> None:
            self.metrics.append(report)

        def on_config_update(
            self, conn: AgentConnection, request: ConfigUpdateRequest
        ) -> ConfigUpdateResponse | None:
            self.config.append(request)
            return ConfigUpdateResponse.failure(request.request_id, "no lists here")

    lst = Listener()
    async with serve(RecordingAgent()) as server, proxy(server.endpoint, listener=lst) as conn:
        assert await server.send_health(HealthState.DRAINING, "bye") == 1
        assert await server.pause() == 1
        report = MetricsReport("rec", 1, 1000, counters=[CounterMetric("agent_requests_total", 3)])
        await server.send_metrics(report)
        resp = await asyncio.wait_for(
            server.request_config_update(ListUpdate("ips", ["1.2.3.4"], [])), T
        )
        assert not resp.accepted and resp.error == "no lists here"
        assert lst.config[0].update_type == ListUpdate("ips", ["1.2.3.4"], [])
        assert conn.health_state == HealthState.DRAINING and conn.is_paused
        assert lst.metrics[0].counters[0].value == 3
        await server.send_flow_control(FlowAction.RESUME)
        await asyncio.wait_for(conn.ping(), T)
        assert not conn.is_paused


# -- raw-socket proxy against the server ---------------------------------------------------------


async def raw_client(server: AgentServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert server.path is not None
    return await asyncio.open_unix_connection(server.path)


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readexactly(5), T)
    return head[4], await reader.readexactly(int.from_bytes(head[:4], "big") - 1)


async def handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, encodings: list[str]
) -> str:
    req = HandshakeRequest(supported_encodings=encodings)
    writer.write(core.encode_frame(MessageType.HANDSHAKE_REQUEST, encode_handshake_request(req)))
    t, payload = await read_frame(reader)
    assert t == MessageType.HANDSHAKE_RESPONSE
    resp = decode_handshake_response(payload)
    assert resp.success and resp.protocol_version == 2
    return resp.encoding


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_raw_ping_echo_and_fail_open(encoding: str) -> None:
    async with serve(RecordingAgent(), on_error=ErrorPolicy.allow()) as server:
        reader, writer = await raw_client(server)
        try:
            assert await handshake(reader, writer, [encoding, "json"]) == encoding
            ping = b'{"sequence":7,"timestamp_ms":1767225600000}'
            writer.write(core.encode_frame(MessageType.PING, ping))
            assert await read_frame(reader) == (MessageType.PONG, ping)
            codec = get_codec(encoding)
            if encoding == "json":
                bad = b'{"correlation_id":"bad-1","metadata":5}'
                bad_ws = b'{"correlation_id":"bad-2","opcode":7}'
            else:
                import msgpack

                bad = msgpack.packb({"correlation_id": "bad-1", "metadata": 5})
                bad_ws = msgpack.packb({"correlation_id": "bad-2", "opcode": 7})
            writer.write(core.encode_frame(MessageType.REQUEST_HEADERS, bad))
            writer.write(core.encode_frame(MessageType.WEBSOCKET_FRAME, bad_ws))
            replies = {}
            for _ in range(2):
                t, payload = await read_frame(reader)
                assert t == MessageType.AGENT_RESPONSE
                cid, resp = codec.decode_response(payload)
                replies[cid] = resp
            assert replies["bad-1"].is_allow and replies["bad-1"].version == 2
            assert replies["bad-2"].websocket_decision == "allow"
        finally:
            writer.close()


async def test_server_closes_on_non_handshake_first_frame_and_bad_framing() -> None:
    async with serve(RecordingAgent()) as server:
        reader, writer = await raw_client(server)
        writer.write(core.encode_frame(MessageType.PING, b"{}"))
        assert await asyncio.wait_for(reader.read(), T) == b""
        writer.close()
        reader, writer = await raw_client(server)
        await handshake(reader, writer, ["json"])
        writer.write(b"\x00\x00\x00\x00")
        assert await asyncio.wait_for(reader.read(), T) == b""
        writer.close()
        async with proxy(server.endpoint) as conn:  # the server is still fine
            assert (await conn.request(headers_event("ok"), "ok")).is_allow


async def test_examples_in_process() -> None:
    waf, echo = make_agent("waf"), make_agent("echo")
    async with serve(waf) as s1, serve(echo, tcp=True) as s2:
        async with proxy(s1.endpoint) as c1, proxy(s2.endpoint) as c2:
            blocked = await c1.request(headers_event("w1", "/admin?x=1"), "w1")
            assert isinstance(blocked.decision, Block) and blocked.decision.status == 403
            ok = await c1.request(headers_event("w2", "/adm"), "w2")
            assert [(o.name, o.value) for o in ok.request_headers] == [("x-agentpool-checked", "1")]
            echoed = await c2.request(headers_event("e1"), "e1")
            assert ("add", "x-echo-host", "h") in [
                (o.op, o.name, o.value) for o in echoed.request_headers
            ]
    with pytest.raises(ValueError):
        make_agent("nope")


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_bench_agent_fast_path(encoding: str) -> None:
    async with serve(BenchAgent()) as server, proxy(server.endpoint, encoding=encoding) as conn:
        cids = [f"b{i}" for i in range(200)] + ['quote"and\\slash']
        replies = await asyncio.wait_for(
            asyncio.gather(*(conn.send(headers_event(c), c) for c in cids)), T
        )
        assert all(r.is_allow for r in replies)
        assert [r.audit.custom["correlation_id"] for r in replies] == cids


def test_main_agent_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main_agent(["--example", "waf"])
    with pytest.raises(SystemExit):
        main_agent(["--socket", "/tmp/x.sock", "--example", "nope"])


async def test_cli_reverse_agent_registers_with_pool() -> None:
    import sys

    from agentpool.pool import AgentPool
    from agentpool.reverse import ReverseConnectionConfig, ReverseConnectionListener

    d = short_socket_dir()
    path = os.path.join(d, "rev.sock")
    pool = AgentPool()
    await pool.start()
    listener = await ReverseConnectionListener.bind_uds(path, ReverseConnectionConfig())
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentpool",
        "agent",
        "--reverse",
        f"unix:{path}",
        "--example",
        "waf",
        "--agent-id",
        "rev-waf",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert await asyncio.wait_for(listener.accept_one(pool), T) == "rev-waf"
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), T)
        assert line.decode().startswith("agentpool agent registered with unix:")
        resp = await asyncio.wait_for(
            pool.send_request_headers("rev-waf", "rv1", headers_event("rv1", "/admin")), T
        )
        assert isinstance(resp.decision, Block) and resp.decision.status == 403
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.wait_for(proc.wait(), 5)
        listener.close()
        await asyncio.wait_for(listener.wait_closed(), 5)
        await asyncio.wait_for(pool.shutdown(), 5)
        shutil.rmtree(d, ignore_errors=True)


# -- a proxy that stops reading -----------------------------------------------------------------


async def stalled_proxy(
    server: AgentServer, requests: int
) -> tuple[socket.socket, asyncio.Task[None]]:
    """A raw proxy socket that handshakes, then sends slow requests and never reads a reply."""
    assert server.path is not None
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, server.path)
    req = HandshakeRequest(supported_encodings=["json"])
    await loop.sock_sendall(
        sock, core.encode_frame(MessageType.HANDSHAKE_REQUEST, encode_handshake_request(req))
    )
    head = await asyncio.wait_for(loop.sock_recv(sock, 5), T)
    n = int.from_bytes(head[:4], "big") - 1
    while n:
        n -= len(await asyncio.wait_for(loop.sock_recv(sock, n), T))
    codec = get_codec("json")
    uri = "/" + "u" * 8000  # RecordingAgent echoes the uri: ~8 KiB replies

    async def flood() -> None:
        with contextlib.suppress(OSError):  # the agent may drop us
            for i in range(requests):
                payload = codec.encode_event(headers_event(f"f{i}", uri=uri, delay=0.02), f"f{i}")
                frame = core.encode_frame(MessageType.REQUEST_HEADERS, payload)
                await loop.sock_sendall(sock, frame)

    return sock, asyncio.ensure_future(flood())


async def test_proxy_that_stops_reading_is_bounded_and_close_does_not_hang() -> None:
    """The agent stops reading from a proxy that does not read its replies, holds a bounded
    backlog, and closing the server tears the connection down instead of draining it."""
    async with serve(RecordingAgent()) as server:
        assert server.max_write_buffer == 16 * 1024 * 1024
        sock, flood = await stalled_proxy(server, 1000)  # ~8 MiB of replies
        try:
            await wait_until(lambda: len(server._sessions) == 1)
            (session,) = server._sessions
            await wait_until(lambda: session._write_paused)
            await asyncio.sleep(0.3)  # the handlers in flight when it paused reply meanwhile
            transport = session.transport
            assert transport is not None and not transport.is_closing()
            assert not transport.is_reading()
            backlog = session._out_size + transport.get_write_buffer_size()
            assert 0 < backlog <= server.max_write_buffer
            t0 = time.monotonic()
            await asyncio.wait_for(server.close(), 2.0)
            await asyncio.wait_for(session.closed.wait(), 2.0)
            assert time.monotonic() - t0 < 1.0
        finally:
            flood.cancel()
            sock.close()


async def test_proxy_over_the_write_bound_is_dropped() -> None:
    async with serve(RecordingAgent()) as server:
        server.max_write_buffer = 32 * 1024
        sock, flood = await stalled_proxy(server, 100_000)
        try:
            await wait_until(lambda: len(server._sessions) == 1)
            (session,) = server._sessions
            await asyncio.wait_for(session.closed.wait(), 5.0)
            assert session.transport is None and session._out == []
            async with proxy(server.endpoint) as conn:  # the server is still fine
                assert (await conn.request(headers_event("ok"), "ok")).is_allow
        finally:
            flood.cancel()
            sock.close()
