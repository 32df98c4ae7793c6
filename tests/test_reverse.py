"""Reverse connections: agents dial the proxy's listener and register (PROTOCOL.md §7).

Every test uses real sockets. The registration tests play the agent at the byte level so the
exact frames on both sides are checked; the serving tests run a real agent process that
dials in with :func:`agentpool.agent.connect_reverse`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from _helpers import hdrs

import agentpool
from agentpool.agent import connect_reverse
from agentpool.agent.examples import make_agent
from agentpool.config import AgentPoolConfig
from agentpool.errors import (
    AddressInUse,
    ConnectionClosed,
    ConnectionFailed,
    InvalidMessage,
    MessageTooLarge,
    Timeout,
    VersionMismatch,
)
from agentpool.messages import (
    AgentCapabilities,
    RegistrationRequest,
    RegistrationResponse,
)
from agentpool.pool import AgentPool
from agentpool.reverse import (
    ReverseConnectionConfig,
    ReverseConnectionListener,
    validate_registration,
)

T = 5.0  # bound for every wait in this module
_PKG_ROOT = str(Path(agentpool.__file__).resolve().parent.parent)


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="rv-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir: str) -> str:
    return os.path.join(sock_dir, "r.sock")


@contextlib.asynccontextmanager
async def make_pool(**kw: Any) -> AsyncIterator[AgentPool]:
    kw.setdefault("circuit_breaker", None)
    pool = AgentPool(AgentPoolConfig(**kw))
    async with pool:
        yield pool


def exists(path: str) -> bool:
    return os.path.exists(path)


def write_text(path: str, text: str) -> None:
    Path(path).write_text(text)


def read_text(path: str) -> str:
    return Path(path).read_text()


def frame(msg_type: int, payload: bytes) -> bytes:
    return (len(payload) + 1).to_bytes(4, "big") + bytes((msg_type,)) + payload


def capabilities_json(agent_id: str) -> dict[str, Any]:
    return {
        "agent_id": agent_id,
        "name": f"{agent_id} agent",
        "version": "1.0.0",
        "supported_events": [1],
        "features": {
            "streaming_body": False,
            "websocket": False,
            "guardrails": False,
            "config_push": False,
            "metrics_export": False,
            "concurrent_requests": 0,
            "cancellation": False,
            "flow_control": False,
            "health_reporting": False,
        },
        "limits": {
            "max_body_size": 10485760,
            "max_concurrency": 100,
            "preferred_chunk_size": 65536,
        },
    }


def registration(
    agent_id: str = "agent-1",
    *,
    version: int = 2,
    token: str | None = None,
    metadata: Any = None,
) -> bytes:
    doc = {
        "protocol_version": version,
        "agent_id": agent_id,
        "capabilities": capabilities_json(agent_id),
        "auth_token": token,
        "metadata": metadata,
    }
    return frame(0x01, json.dumps(doc).encode())


class RawAgent:
    """The agent's end of a reverse connection, driven byte by byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def dial(cls, listener: ReverseConnectionListener) -> RawAgent:
        if listener.path is not None:
            r, w = await asyncio.wait_for(asyncio.open_unix_connection(listener.path), T)
        else:
            assert listener.port is not None
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", listener.port), T)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_frame(self) -> tuple[int, bytes]:
        header = await asyncio.wait_for(self.reader.readexactly(5), T)
        n = int.from_bytes(header[:4], "big")
        return header[4], await asyncio.wait_for(self.reader.readexactly(n - 1), T)

    async def read_response(self) -> dict[str, Any]:
        msg_type, payload = await self.read_frame()
        assert msg_type == 0x02
        doc: dict[str, Any] = json.loads(payload)
        assert list(doc) == ["success", "error", "proxy_id", "proxy_version", "connection_id"]
        return doc

    async def read_eof(self) -> bytes:
        """Everything until the proxy closes (bounded)."""
        try:
            return await asyncio.wait_for(self.reader.read(), T)
        except ConnectionResetError:
            return b""

    def close(self) -> None:
        self.writer.close()


async def register_raw(
    listener: ReverseConnectionListener, pool: AgentPool, data: bytes
) -> tuple[asyncio.Task[str], RawAgent]:
    accept = asyncio.ensure_future(listener.accept_one(pool))
    agent = await RawAgent.dial(listener)
    await agent.send(data)
    return accept, agent


async def wait_for(cond: Any, what: str) -> None:
    for _ in range(int(T / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


headers_event = partial(hdrs, client_port=40000)


# -- config ------------------------------------------------------------------------------------


def test_config_defaults_are_upstreams() -> None:
    c = ReverseConnectionConfig()
    assert c.backlog == 128
    assert c.handshake_timeout == 10.0
    assert c.max_connections_per_agent == 4
    assert c.allowed_agents == frozenset()
    assert c.require_auth is False
    assert c.auth_tokens == frozenset()
    assert c.request_timeout == 30.0


def test_config_normalises_sets_and_rejects_nonsense() -> None:
    c = ReverseConnectionConfig(allowed_agents={"a"}, auth_tokens=["t"])  # type: ignore[arg-type]
    assert c.allowed_agents == frozenset({"a"}) and c.auth_tokens == frozenset({"t"})
    assert c.allow_agent("b").allowed_agents == {"a", "b"}
    assert c.with_auth_tokens(["x"]).require_auth is True
    with pytest.raises(ValueError, match="max_connections_per_agent"):
        ReverseConnectionConfig(max_connections_per_agent=0)
    with pytest.raises(ValueError, match="handshake_timeout"):
        ReverseConnectionConfig(handshake_timeout=0)


def _request(**kw: Any) -> RegistrationRequest:
    kw.setdefault("protocol_version", 2)
    kw.setdefault("agent_id", "a")
    return RegistrationRequest(capabilities=AgentCapabilities("a", "a", "1"), **kw)


def test_validation_order_first_failure_wins() -> None:
    strict = ReverseConnectionConfig(
        allowed_agents=frozenset({"a"}), require_auth=True, auth_tokens=frozenset({"s3cret"})
    )
    with pytest.raises(VersionMismatch) as vm:
        validate_registration(_request(protocol_version=99, agent_id=""), strict)
    assert (vm.value.expected, vm.value.actual) == (2, 99)
    with pytest.raises(InvalidMessage, match="Agent ID cannot be empty"):
        validate_registration(_request(agent_id=""), strict)
    with pytest.raises(InvalidMessage, match="Agent 'b' is not in the allowed list"):
        validate_registration(_request(agent_id="b"), strict)
    with pytest.raises(InvalidMessage, match="Authentication required but no token provided"):
        validate_registration(_request(), strict)
    with pytest.raises(InvalidMessage, match="Invalid authentication token"):
        validate_registration(_request(auth_token="s3cre"), strict)
    validate_registration(_request(auth_token="s3cret"), strict)
    # without require_auth a token is neither needed nor checked
    validate_registration(_request(auth_token="whatever"), ReverseConnectionConfig())


# -- binding -----------------------------------------------------------------------------------


async def test_bind_uds_mode_0600_and_close_removes_file(sock_path: str) -> None:
    listener = await ReverseConnectionListener.bind_uds(sock_path, ReverseConnectionConfig())
    try:
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert listener.path == sock_path and listener.port is None
    finally:
        listener.close()
        await listener.wait_closed()
    assert not exists(sock_path)
    listener.close()  # idempotent


async def test_bind_uds_replaces_stale_file(sock_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)  # a socket file nobody listens on, as a killed process leaves it
    stale.close()
    async with await ReverseConnectionListener.bind_uds(sock_path) as listener:
        assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
        agent = await RawAgent.dial(listener)
        agent.close()
    assert not exists(sock_path)


async def test_bind_uds_refuses_a_directory(sock_dir: str) -> None:
    with pytest.raises(ConnectionFailed, match="exists and is not a socket"):
        await ReverseConnectionListener.bind_uds(sock_dir)
    assert exists(sock_dir)


async def test_bind_uds_refuses_a_regular_file(sock_path: str) -> None:
    write_text(sock_path, "not a socket")
    with pytest.raises(AddressInUse, match="exists and is not a socket"):
        await ReverseConnectionListener.bind_uds(sock_path)
    assert read_text(sock_path) == "not a socket"


async def test_bind_refuses_auth_without_tokens(sock_path: str) -> None:
    config = ReverseConnectionConfig(require_auth=True)
    with pytest.raises(ConnectionFailed, match="no auth tokens"):
        await ReverseConnectionListener.bind_uds(sock_path, config)
    assert not exists(sock_path)
    with pytest.raises(ConnectionFailed, match="no auth tokens"):
        await ReverseConnectionListener.bind_tcp("127.0.0.1", 0, config)


async def test_close_leaves_a_replaced_file_alone(sock_path: str) -> None:
    listener = await ReverseConnectionListener.bind_uds(sock_path)
    os.unlink(sock_path)
    write_text(sock_path, "someone else's")
    listener.close()
    assert read_text(sock_path) == "someone else's"


# -- registration over UDS ---------------------------------------------------------------------


async def test_good_registration_joins_pool(sock_path: str) -> None:
    config = ReverseConnectionConfig(require_auth=True, auth_tokens=frozenset({"t1", "t2"}))
    async with (
        make_pool() as pool,
        await ReverseConnectionListener.bind_uds(sock_path, config) as listener,
    ):
        accept, agent = await register_raw(
            listener, pool, registration("agent-1", token="t2", metadata={"zone": "a"})
        )
        doc = await agent.read_response()
        assert await asyncio.wait_for(accept, T) == "agent-1"
        assert doc["success"] is True and doc["error"] is None
        assert doc["proxy_id"] == "zentinel-proxy"
        assert doc["proxy_version"] == agentpool.__version__
        assert re.fullmatch(r"agent-1-[0-9a-f]+", doc["connection_id"])
        assert pool.agent_ids() == ["agent-1"]
        caps = await pool.agent_capabilities("agent-1")
        assert caps is not None and caps.name == "agent-1 agent"
        assert [s.agent_id for s in await pool.stats()] == ["agent-1"]
        assert listener.connection_count("agent-1") == 1
        assert listener.registered == 1 and listener.pending_handshakes == 0
        agent.close()
        await wait_for(lambda: pool.agent_ids() == [], "pool to drop the agent")
        await wait_for(lambda: listener.connection_count("agent-1") == 0, "slot release")


REJECTIONS = [
    pytest.param(
        dict(version=99),
        {},
        VersionMismatch,
        "Protocol version mismatch: expected 2, got 99",
        id="version-99",
    ),
    pytest.param(
        dict(agent_id=""),
        {},
        InvalidMessage,
        "Invalid message format: Agent ID cannot be empty",
        id="empty-id",
    ),
    pytest.param(
        dict(agent_id="intruder"),
        dict(allowed_agents=frozenset({"agent-1"})),
        InvalidMessage,
        "Invalid message format: Agent 'intruder' is not in the allowed list",
        id="not-allowed",
    ),
    pytest.param(
        {},
        dict(require_auth=True, auth_tokens=frozenset({"good"})),
        InvalidMessage,
        "Invalid message format: Authentication required but no token provided",
        id="no-token",
    ),
    pytest.param(
        dict(token="bad"),
        dict(require_auth=True, auth_tokens=frozenset({"good", "other"})),
        InvalidMessage,
        "Invalid message format: Invalid authentication token",
        id="bad-token",
    ),
]


@pytest.mark.parametrize(("req", "conf", "exc_type", "message"), REJECTIONS)
async def test_rejected_registration(
    sock_path: str,
    req: dict[str, Any],
    conf: dict[str, Any],
    exc_type: type[Exception],
    message: str,
) -> None:
    req = dict(req)
    agent_id = req.pop("agent_id", "agent-1")
    async with (
        make_pool() as pool,
        await ReverseConnectionListener.bind_uds(
            sock_path, ReverseConnectionConfig(**conf)
        ) as listener,
    ):
        accept, agent = await register_raw(listener, pool, registration(agent_id, **req))
        with pytest.raises(exc_type) as info:
            await asyncio.wait_for(accept, T)
        assert str(info.value) == message
        doc = await agent.read_response()
        assert doc == {
            "success": False,
            "error": message,
            "proxy_id": "zentinel-proxy",
            "proxy_version": agentpool.__version__,
            "connection_id": "",
        }
        assert await agent.read_eof() == b""
        agent.close()
        assert pool.agent_ids() == []
        assert listener.rejected == 1 and listener.registered == 0
        assert listener.connection_count(agent_id) == 0


@pytest.mark.parametrize(
    ("data", "exc_type", "match"),
    [
        pytest.param(
            frame(0x20, b'{"version":2}'),
            InvalidMessage,
            "Expected registration request",
            id="wrong-first-frame",
        ),
        pytest.param(
            frame(0x01, b"not json{"), InvalidMessage, "Invalid message format", id="non-json"
        ),
        pytest.param(
            frame(0x01, b'{"protocol_version":2,"agent_id":"a"}'),
            InvalidMessage,
            "capabilities",
            id="missing-capabilities",
        ),
        pytest.param(
            (1 << 20).to_bytes(4, "big") + b"\x01" + b"x" * 100,
            MessageTooLarge,
            "1048576 bytes",
            id="oversize",
        ),
        pytest.param(b"\x00\x00\x00\x00\x01", InvalidMessage, "Zero-length", id="zero-length"),
        pytest.param(
            b"\x00\x00\x00\x05\x99", InvalidMessage, "Unknown message type", id="bad-type"
        ),
    ],
)
async def test_bad_first_frame_closes_without_reply(
    sock_path: str, data: bytes, exc_type: type[Exception], match: str
) -> None:
    async with make_pool() as pool, await ReverseConnectionListener.bind_uds(sock_path) as listener:
        accept, agent = await register_raw(listener, pool, data)
        with pytest.raises(exc_type, match=match):
            await asyncio.wait_for(accept, T)
        assert await agent.read_eof() == b""
        agent.close()
        assert pool.agent_ids() == []
        assert listener.pending_handshakes == 0


async def test_handshake_that_never_completes_times_out(sock_path: str) -> None:
    config = ReverseConnectionConfig(handshake_timeout=0.1)
    async with (
        make_pool() as pool,
        await ReverseConnectionListener.bind_uds(sock_path, config) as listener,
    ):
        # silent agent, then one that stalls half-way through its frame
        for data in (b"", registration()[:20]):
            accept, agent = await register_raw(listener, pool, data)
            with pytest.raises(Timeout) as info:
                await asyncio.wait_for(accept, T)
            assert info.value.timeout == 0.1
            assert str(info.value) == "Timeout after 100ms"
            assert await agent.read_eof() == b""
            agent.close()
        assert pool.agent_ids() == [] and listener.pending_handshakes == 0


async def test_peer_closing_immediately_is_an_error(sock_path: str) -> None:
    async with make_pool() as pool, await ReverseConnectionListener.bind_uds(sock_path) as listener:
        accept, agent = await register_raw(listener, pool, b"")
        agent.close()
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(accept, T)
        assert pool.agent_ids() == []


async def test_listener_cap_per_agent(sock_path: str) -> None:
    config = ReverseConnectionConfig(max_connections_per_agent=1)
    async with (
        make_pool() as pool,
        await ReverseConnectionListener.bind_uds(sock_path, config) as listener,
    ):
        accept, first = await register_raw(listener, pool, registration("capped"))
        assert (await first.read_response())["success"] is True
        assert await asyncio.wait_for(accept, T) == "capped"

        accept, second = await register_raw(listener, pool, registration("capped"))
        with pytest.raises(ConnectionFailed) as info:
            await asyncio.wait_for(accept, T)
        message = "Connection failed: Agent capped already has maximum connections (1)"
        assert str(info.value) == message
        doc = await second.read_response()
        assert doc["success"] is False and doc["error"] == message
        assert await second.read_eof() == b""
        second.close()
        assert [s.active_connections for s in await pool.stats()] == [1]

        # another agent id is unaffected; a freed slot can be reused
        accept, other = await register_raw(listener, pool, registration("other"))
        assert (await other.read_response())["success"] is True
        assert await asyncio.wait_for(accept, T) == "other"
        first.close()
        await wait_for(lambda: listener.connection_count("capped") == 0, "slot release")
        accept, third = await register_raw(listener, pool, registration("capped"))
        assert (await third.read_response())["success"] is True
        assert await asyncio.wait_for(accept, T) == "capped"
        assert sorted(pool.agent_ids()) == ["capped", "other"]
        other.close()
        third.close()


async def test_concurrent_registrations_respect_the_cap(sock_path: str) -> None:
    config = ReverseConnectionConfig(max_connections_per_agent=2)
    async with (
        make_pool() as pool,
        await ReverseConnectionListener.bind_uds(sock_path, config) as listener,
    ):
        listener.start(pool)
        agents = [await RawAgent.dial(listener) for _ in range(6)]
        await asyncio.gather(*(a.send(registration("same")) for a in agents))
        docs = await asyncio.gather(*(a.read_response() for a in agents))
        assert sorted(d["success"] for d in docs) == [False] * 4 + [True] * 2
        await wait_for(lambda: listener.registered == 2 and listener.rejected == 4, "outcomes")
        assert [s.active_connections for s in await pool.stats()] == [2]
        for a in agents:
            a.close()
        await wait_for(lambda: pool.agent_ids() == [], "pool to drop the agent")


async def test_full_pool_gets_a_failure_reply(sock_path: str) -> None:
    async with (
        make_pool(connections_per_agent=1) as pool,
        await ReverseConnectionListener.bind_uds(sock_path) as listener,
    ):
        accept, first = await register_raw(listener, pool, registration("p"))
        assert (await first.read_response())["success"] is True
        await asyncio.wait_for(accept, T)

        accept, second = await register_raw(listener, pool, registration("p"))
        message = "Connection failed: Agent p already has maximum connections (1)"
        with pytest.raises(ConnectionFailed) as info:
            await asyncio.wait_for(accept, T)
        assert str(info.value) == message
        doc = await second.read_response()
        assert doc["success"] is False and doc["error"] == message
        assert await second.read_eof() == b""
        second.close()
        assert [s.active_connections for s in await pool.stats()] == [1]
        assert listener.connection_count("p") == 1
        first.close()


class RefusingPool(AgentPool):
    """A real pool that refuses reverse connections after the pre-check (a lost race)."""

    async def add_reverse_connection(self, *args: Any, **kw: Any) -> None:
        raise ConnectionFailed("Agent p already has maximum connections (1)")


async def test_pool_refusal_after_success_closes_the_connection(sock_path: str) -> None:
    async with (
        RefusingPool(AgentPoolConfig(circuit_breaker=None)) as pool,
        await ReverseConnectionListener.bind_uds(sock_path) as listener,
    ):
        accept, agent = await register_raw(listener, pool, registration("p"))
        # upstream order: the agent was already told success when the pool refuses
        assert (await agent.read_response())["success"] is True
        with pytest.raises(ConnectionFailed, match=r"already has maximum connections \(1\)"):
            await asyncio.wait_for(accept, T)
        assert await agent.read_eof() == b""
        agent.close()
        assert pool.agent_ids() == [] and listener.connection_count("p") == 0


# -- accept loop, TCP, abuse bounds ------------------------------------------------------------


async def test_serve_registers_agents_one_after_another(sock_path: str) -> None:
    async with make_pool() as pool, await ReverseConnectionListener.bind_uds(sock_path) as listener:
        task = listener.start(pool)
        assert listener.start(pool) is task
        agents = []
        for i in range(3):
            agent = await RawAgent.dial(listener)
            await agent.send(registration(f"loop-{i}"))
            assert (await agent.read_response())["success"] is True
            agents.append(agent)
        await wait_for(lambda: len(pool.agent_ids()) == 3, "three agents")
        # a rejected agent does not stop the loop
        bad = await RawAgent.dial(listener)
        await bad.send(registration("x", version=1))
        assert (await bad.read_response())["success"] is False
        late = await RawAgent.dial(listener)
        await late.send(registration("late"))
        assert (await late.read_response())["success"] is True
        await wait_for(lambda: "late" in pool.agent_ids(), "late agent")
        for a in [*agents, bad, late]:
            a.close()
    assert task.done()


async def test_pending_handshake_limit_drops_extra_connections(sock_path: str) -> None:
    config = ReverseConnectionConfig(max_pending_handshakes=2, handshake_timeout=3.0)
    async with (
        make_pool() as pool,
        await ReverseConnectionListener.bind_uds(sock_path, config) as listener,
    ):
        listener.start(pool)
        silent = [await RawAgent.dial(listener) for _ in range(2)]
        await wait_for(lambda: listener.pending_handshakes == 2, "two pending handshakes")
        extra = await RawAgent.dial(listener)
        assert await extra.read_eof() == b""
        assert listener.dropped == 1
        extra.close()
        for a in silent:
            a.close()
        await wait_for(lambda: listener.pending_handshakes == 0, "pending handshakes to end")
        ok = await RawAgent.dial(listener)
        await ok.send(registration("after"))
        assert (await ok.read_response())["success"] is True
        ok.close()


async def test_close_aborts_pending_handshakes(sock_path: str) -> None:
    async with make_pool() as pool:
        listener = await ReverseConnectionListener.bind_uds(sock_path)
        listener.start(pool)
        agent = await RawAgent.dial(listener)
        await wait_for(lambda: listener.pending_handshakes == 1, "pending handshake")
        listener.close()
        await asyncio.wait_for(listener.wait_closed(), T)
        assert await agent.read_eof() == b""
        agent.close()
        assert listener.pending_handshakes == 0 and pool.agent_ids() == []
        with pytest.raises(ConnectionClosed):
            await listener.accept_one(pool)


async def test_close_wakes_a_pending_accept_one(sock_path: str) -> None:
    async with make_pool() as pool:
        listener = await ReverseConnectionListener.bind_uds(sock_path)
        accept = asyncio.ensure_future(listener.accept_one(pool))
        await asyncio.sleep(0.05)
        listener.close()
        with pytest.raises(ConnectionClosed, match="listener is closed"):
            await asyncio.wait_for(accept, T)
        await listener.wait_closed()
        assert not exists(sock_path)


async def test_tcp_listener_registers(sock_path: str) -> None:
    async with (
        make_pool() as pool,
        await ReverseConnectionListener.bind_tcp("127.0.0.1", 0) as listener,
    ):
        assert listener.port and listener.path is None
        accept, agent = await register_raw(listener, pool, registration("tcp-agent"))
        assert (await agent.read_response())["success"] is True
        assert await asyncio.wait_for(accept, T) == "tcp-agent"
        assert pool.agent_ids() == ["tcp-agent"]
        agent.close()
        await wait_for(lambda: pool.agent_ids() == [], "pool to drop the agent")


# -- real agents dialling in -------------------------------------------------------------------

AGENT_SCRIPT = """
import asyncio, sys
from agentpool.agent.examples import make_agent
from agentpool.agent import connect_reverse

async def main():
    target, agent_id, token = sys.argv[1], sys.argv[2], sys.argv[3] or None
    conn = await connect_reverse(make_agent("waf"), target, agent_id=agent_id, auth_token=token)
    print("registered", conn.connection_id, flush=True)
    await conn.wait_closed()

asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def reverse_agent_process(
    target: str, agent_id: str, token: str = ""
) -> AsyncIterator[asyncio.subprocess.Process]:
    env = dict(os.environ)
    env["PYTHONPATH"] = _PKG_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        AGENT_SCRIPT,
        target,
        agent_id,
        token,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await asyncio.wait_for(proc.wait(), T)


async def test_reverse_agent_process_serves_requests_and_leaves_cleanly(sock_path: str) -> None:
    config = ReverseConnectionConfig(require_auth=True, auth_tokens=frozenset({"tok"}))
    async with (
        make_pool() as pool,
        await ReverseConnectionListener.bind_uds(sock_path, config) as listener,
    ):
        listener.start(pool)
        async with reverse_agent_process(f"unix:{sock_path}", "waf-r", "tok") as proc:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 15)
            assert re.fullmatch(rb"registered waf-r-[0-9a-f]+\n", line)
            await wait_for(lambda: pool.agent_ids() == ["waf-r"], "agent in pool")

            ok = await asyncio.wait_for(
                pool.send_request_headers("waf-r", "c-1", headers_event("c-1", "/index")), T
            )
            assert ok.decision == agentpool.messages.Allow()
            assert [(h.op, h.name) for h in ok.request_headers] == [("set", "x-agentpool-checked")]
            blocked = await asyncio.wait_for(
                pool.send_request_headers("waf-r", "c-2", headers_event("c-2", "/admin")), T
            )
            assert blocked.decision == agentpool.messages.Block(status=403, body="Forbidden")
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        pool.send_request_headers("waf-r", f"m-{i}", headers_event(f"m-{i}"))
                        for i in range(50)
                    )
                ),
                T,
            )
            assert len(results) == 50

            proc.kill()
            await wait_for(lambda: pool.agent_ids() == [], "pool to drop the dead agent")
            await wait_for(lambda: listener.connection_count("waf-r") == 0, "slot release")
            with pytest.raises(agentpool.AgentProtocolError):
                await asyncio.wait_for(
                    pool.send_request_headers("waf-r", "c-3", headers_event("c-3")), T
                )


async def test_reverse_agent_process_rejected(sock_path: str) -> None:
    config = ReverseConnectionConfig(require_auth=True, auth_tokens=frozenset({"tok"}))
    async with (
        make_pool() as pool,
        await ReverseConnectionListener.bind_uds(sock_path, config) as listener,
    ):
        listener.start(pool)
        async with reverse_agent_process(sock_path, "waf-r", "wrong") as proc:
            assert await asyncio.wait_for(proc.wait(), 15) != 0
        assert pool.agent_ids() == [] and listener.rejected == 1


# -- agent side in process ---------------------------------------------------------------------


async def test_connect_reverse_in_process(sock_path: str) -> None:
    async with make_pool() as pool, await ReverseConnectionListener.bind_uds(sock_path) as listener:
        listener.start(pool)
        agent = make_agent("echo")
        async with await connect_reverse(agent, sock_path, metadata={"a": 1}) as conn:
            assert conn.agent_id == "echo" and conn.proxy_id == "zentinel-proxy"
            assert conn.connection_id.startswith("echo-")
            await wait_for(lambda: pool.agent_ids() == ["echo"], "agent in pool")
            resp = await asyncio.wait_for(
                pool.send_request_headers("echo", "e-1", headers_event("e-1")), T
            )
            assert [(h.name, h.value) for h in resp.request_headers] == [
                ("x-echo-host", "example.test")
            ]
        assert conn.is_closed
        await wait_for(lambda: pool.agent_ids() == [], "pool to drop the agent")

        # the proxy closing the connection ends the agent's session
        async with await connect_reverse(agent, f"unix:{sock_path}", agent_id="e2") as conn:
            await wait_for(lambda: pool.agent_ids() == ["e2"], "agent in pool")
            await pool.remove_agent("e2")
            await asyncio.wait_for(conn.wait_closed(), T)


async def test_connect_reverse_over_tcp_and_rejection(sock_path: str) -> None:
    config = ReverseConnectionConfig(allowed_agents=frozenset({"waf"}))
    async with (
        make_pool() as pool,
        await ReverseConnectionListener.bind_tcp("127.0.0.1", 0, config) as listener,
    ):
        listener.start(pool)
        target = f"tcp://127.0.0.1:{listener.port}"
        with pytest.raises(ConnectionFailed) as info:
            await connect_reverse(make_agent("echo"), target)
        assert str(info.value) == (
            "Connection failed: Registration rejected: "
            "Invalid message format: Agent 'echo' is not in the allowed list"
        )
        async with await connect_reverse(make_agent("waf"), f"127.0.0.1:{listener.port}"):
            await wait_for(lambda: pool.agent_ids() == ["waf"], "agent in pool")
        with pytest.raises(ConnectionFailed):
            await connect_reverse(make_agent("waf"), f"unix:{sock_path}.missing", timeout=1.0)


async def test_registration_messages_round_trip() -> None:
    from agentpool import codec

    req = RegistrationRequest(
        protocol_version=2,
        agent_id="a",
        capabilities=AgentCapabilities("a", "n", "1"),
        auth_token="tok",
        metadata={"k": [1, 2]},
    )
    back = codec.decode_registration_request(codec.encode_registration_request(req))
    assert back.auth_token == "tok" and back.metadata == {"k": [1, 2]} and back.agent_id == "a"
    for resp in (
        RegistrationResponse(True, None, "zentinel-proxy", "1", "a-1"),
        RegistrationResponse(False, "nope", "zentinel-proxy", "1", ""),
    ):
        assert codec.decode_registration_response(codec.encode_registration_response(resp)) == resp
