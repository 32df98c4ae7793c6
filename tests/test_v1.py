"""Legacy v1 (length + JSON envelope, one request at a time) against v1-speaking agents."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import orjson
import pytest
from agents import AgentProc, aspawn_agent, short_socket_dir, spawn_agent

from agentpool.connection import AgentConnection
from agentpool.errors import (
    ConnectionClosed,
    InvalidMessage,
    MessageTooLarge,
    Timeout,
    VersionMismatch,
    WrongConnectionType,
)
from agentpool.messages import (
    Block,
    RequestCompleteEvent,
    RequestHeadersEvent,
    RequestMetadata,
    WebSocketFrameEvent,
)

T = 10.0


def event(cid: str, uri: str = "/", delay: float | None = None) -> RequestHeadersEvent:
    headers = {"host": ["example.com"]}
    if delay is not None:
        headers["x-test-delay"] = [str(delay)]
    return RequestHeadersEvent(
        metadata=RequestMetadata(
            correlation_id=cid, request_id="r", client_ip="127.0.0.1", client_port=1
        ),
        method="GET",
        uri=uri,
        headers=headers,
    )


@pytest.fixture(scope="module")
def v1_control() -> Iterator[AgentProc]:
    with spawn_agent("control", protocol="v1", extra_args=("--v1-reply-version", "1")) as agent:
        yield agent


@pytest.fixture(scope="module")
def v1_waf_sdk() -> Iterator[AgentProc]:
    with spawn_agent("waf", protocol="v1", tcp=True, extra_args=("--v1-sdk-replies",)) as agent:
        yield agent


@contextlib.asynccontextmanager
async def v1conn(endpoint: str, **kw: Any) -> AsyncIterator[AgentConnection]:
    kw.setdefault("request_timeout", 5.0)
    conn = await AgentConnection.open(endpoint, agent_id="legacy", protocol="v1", **kw)
    try:
        yield conn
    finally:
        conn.close()
        await asyncio.wait_for(conn.wait_closed(), 5.0)


async def test_v1_round_trip_and_queueing(v1_control: AgentProc) -> None:
    async with v1conn(v1_control.endpoint) as conn:
        assert conn.is_connected and conn.protocol_version == 1 and conn.capabilities is None
        r = await asyncio.wait_for(conn.request(event("one"), "one"), T)
        assert r.version == 1 and r.routing_metadata["cid"] == "one"
        # one request in flight per connection: the others queue and still match in order
        cids = [f"q{i}" for i in range(6)]
        t0 = time.monotonic()
        replies = await asyncio.wait_for(
            asyncio.gather(*(conn.request(event(c, delay=0.05), c) for c in cids)), T
        )
        assert [x.routing_metadata["cid"] for x in replies] == cids
        assert time.monotonic() - t0 >= 0.25  # sequential, not concurrent
        assert conn.in_flight == 0
        with pytest.raises(WrongConnectionType):
            await conn.ping()


async def test_v1_sdk_style_agent(v1_waf_sdk: AgentProc) -> None:
    async with v1conn(v1_waf_sdk.endpoint) as conn:
        r = await asyncio.wait_for(conn.request(event("a", "/admin"), "a"), T)
        assert isinstance(r.decision, Block) and r.decision.status == 403 and r.version == 2
        r = await conn.request(event("b", "/ok"), "b")
        assert [(o.name, o.value) for o in r.request_headers] == [("x-agentpool-checked", "1")]
        assert await conn.configure({"any": 1})  # {"success": true}
        r = await conn.request(RequestCompleteEvent("c", 200, 1, 0, 0, 1), "c")
        assert r.is_allow


async def test_v1_timeout_drops_connection(v1_control: AgentProc) -> None:
    async with v1conn(v1_control.endpoint, request_timeout=0.2) as conn:
        with pytest.raises(Timeout):
            await asyncio.wait_for(conn.request(event("slow", delay=2), "slow"), T)
        assert not conn.is_connected
        with pytest.raises(ConnectionClosed):
            await conn.request(event("after"), "after")


async def test_v1_agent_killed_fails_queued_requests() -> None:
    async with aspawn_agent("control", protocol="v1") as agent:
        async with v1conn(agent.endpoint, request_timeout=30.0) as conn:
            tasks = [
                asyncio.ensure_future(conn.request(event(f"k{i}", delay=20), f"k{i}"))
                for i in range(3)
            ]
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            os.kill(agent.pid, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
            assert time.monotonic() - t0 < 3.0
            assert all(isinstance(x, ConnectionClosed) for x in results), results


# -- raw v1 fake agents ------------------------------------------------------------------------

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_v1(script: Script) -> AsyncIterator[str]:
    d = short_socket_dir()
    path = os.path.join(d, "v1.sock")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await script(reader, writer)
        writer.close()

    server = await asyncio.start_unix_server(handle, path)
    try:
        yield path
    finally:
        server.close()
        shutil.rmtree(d, ignore_errors=True)


async def read_doc(reader: asyncio.StreamReader) -> bytes:
    n = int.from_bytes(await reader.readexactly(4), "big")
    return await reader.readexactly(n)


def doc(obj: Any) -> bytes:
    raw = orjson.dumps(obj) if not isinstance(obj, bytes) else obj
    return len(raw).to_bytes(4, "big") + raw


async def test_v1_request_bytes_match_upstream_and_reply_versions() -> None:
    got: list[bytes] = []
    replies = [
        doc({"version": 1, "decision": "allow", "audit": {}}),
        doc({"version": 2, "decision": {"block": {"status": 418}}}),
        doc({"version": 3, "decision": "allow"}),
    ]

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while replies:
            got.append(await read_doc(reader))
            writer.write(replies.pop(0))
        await asyncio.sleep(1)

    ev = RequestHeadersEvent(
        metadata=RequestMetadata(
            correlation_id="c1",
            request_id="r1",
            client_ip="10.0.0.5",
            client_port=40000,
            server_name="example.com",
            route_id="api",
            timestamp="2026-01-01T00:00:00+00:00",
        ),
        method="GET",
        uri="/x",
        headers={"host": ["example.com"]},
    )
    async with fake_v1(script) as path, v1conn(f"unix:{path}") as conn:
        assert (await asyncio.wait_for(conn.request(ev, "c1"), T)).is_allow
        r = await asyncio.wait_for(conn.request(ev, "c1"), T)
        assert isinstance(r.decision, Block) and r.decision.status == 418
        with pytest.raises(VersionMismatch, match="expected 1, got 3"):
            await asyncio.wait_for(conn.request(ev, "c1"), T)
    expected = (
        b'{"version":1,"event_type":"request_headers","payload":{"headers":{"host":["example.com"]},'
        b'"metadata":{"client_ip":"10.0.0.5","client_port":40000,"correlation_id":"c1",'
        b'"protocol":"HTTP/1.1","request_id":"r1","route_id":"api","server_name":"example.com",'
        b'"timestamp":"2026-01-01T00:00:00+00:00","tls_cipher":null,"tls_version":null,'
        b'"upstream_id":null},"method":"GET","uri":"/x"}}'
    )
    assert len(expected) == 376
    assert got[0] == expected


async def test_v1_websocket_event_name_and_bad_replies() -> None:
    got: list[dict[str, Any]] = []
    replies = [doc({"version": 1, "decision": "allow"}), doc(b"[1,2]"), doc(b"not json")]

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while replies:
            got.append(orjson.loads(await read_doc(reader)))
            writer.write(replies.pop(0))
        await asyncio.sleep(1)

    ws = WebSocketFrameEvent("w1", "text", b"hi", True, 0, True)
    async with fake_v1(script) as path, v1conn(path) as conn:
        await asyncio.wait_for(conn.request(ws, "w1"), T)
        for _ in range(2):
            with pytest.raises(InvalidMessage):
                await asyncio.wait_for(conn.request(ws, "w1"), T)
    assert got[0]["event_type"] == "web_socket_frame"
    assert got[0]["payload"]["correlation_id"] == "w1" and got[0]["payload"]["data"] == "aGk="


async def test_v1_oversize_reply_closes() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_doc(reader)
        writer.write((11 * 1024 * 1024).to_bytes(4, "big"))
        await asyncio.sleep(1)

    async with fake_v1(script) as path, v1conn(path) as conn:
        with pytest.raises(MessageTooLarge):
            await asyncio.wait_for(conn.request(event("big"), "big"), T)
        assert not conn.is_connected


async def test_v1_abandoned_request_drops_connection(v1_control: AgentProc) -> None:
    async with v1conn(v1_control.endpoint) as conn:
        task = asyncio.ensure_future(conn.request(event("gone", delay=2), "gone"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not conn.is_connected
        with pytest.raises(ConnectionClosed):
            await conn.request(event("next"), "next")
