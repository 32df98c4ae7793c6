"""Endpoint syntax, unknown agents, "no connections" details and the maintenance loop.

What a new user runs into first: a typo in an endpoint fails at ``add_agent``; an agent that
is down registers and comes back by itself (also when ``run_maintenance()`` is spawned the
way upstream documents it); errors say which agent and what the last connect attempt said.
"""

from __future__ import annotations

import asyncio
import os
from functools import partial

import pytest
from _helpers import hdrs
from agents import aspawn_agent, short_socket_dir

from agentpool import (
    AgentNotFound,
    AgentPool,
    AgentPoolConfig,
    ConnectionFailed,
    InvalidEndpoint,
    InvalidMessage,
    Unavailable,
)
from agentpool.endpoint import SCHEMES, parse_endpoint


def _cfg(**kw: object) -> AgentPoolConfig:
    base: dict[str, object] = {
        "connections_per_agent": 2,
        "connect_timeout": 2.0,
        "health_check_interval": 0.05,
    }
    base.update(kw)
    return AgentPoolConfig(**base)  # type: ignore[arg-type]


_event = partial(hdrs, host="example.com")


BAD = [
    ("", "empty"),
    ("   ", "empty"),
    ("tcp://127.0.0.1", "no port"),
    ("127.0.0.1", "no port"),
    ("tcp://127.0.0.1:99999", "port 99999 out of range"),
    ("tcp://127.0.0.1:0", "port 0 out of range"),
    ("localhost:http", "is not a number"),
    ("tcp://:80", "no host"),
    ("unx:/tmp/waf.sock", "unknown scheme 'unx'"),
    ("tpc://127.0.0.1:9000", "unknown scheme 'tpc'"),
    ("http://127.0.0.1:9000", "unknown scheme 'http'"),
    ("unix:", "empty socket path"),
    ("unix:/" + "x" * 200, "longer than 107 bytes"),
]


@pytest.mark.parametrize(("endpoint", "problem"), BAD)
def test_parse_endpoint_rejects(endpoint: str, problem: str) -> None:
    with pytest.raises(InvalidEndpoint) as info:
        parse_endpoint(endpoint)
    assert problem in str(info.value)
    assert info.value.endpoint == endpoint
    assert isinstance(info.value, ConnectionFailed)


def test_parse_endpoint_accepts() -> None:
    assert parse_endpoint("unix:/run/waf.sock") == ("unix", "/run/waf.sock", 0)
    assert parse_endpoint("unix:///run/waf.sock") == ("unix", "/run/waf.sock", 0)
    assert parse_endpoint("/run/waf") == ("unix", "/run/waf", 0)
    assert parse_endpoint("waf.sock") == ("unix", "waf.sock", 0)
    assert parse_endpoint("tcp://127.0.0.1:9000") == ("tcp", "127.0.0.1", 9000)
    assert parse_endpoint("localhost:9000") == ("tcp", "localhost", 9000)
    assert parse_endpoint("[::1]:9000") == ("tcp", "::1", 9000)
    # transports added beside the Unix/TCP one share the same syntax check
    assert parse_endpoint("grpc://agent:50051") == ("grpc", "agent", 50051)
    assert parse_endpoint("grpcs://[::1]:443") == ("grpcs", "::1", 443)
    assert parse_endpoint("tls://agent.internal:8443") == ("tls", "agent.internal", 8443)
    assert {"unix", "tcp", "tls", "grpc", "grpcs"} <= set(SCHEMES)


@pytest.mark.parametrize(("endpoint", "problem"), BAD[:3] + BAD[8:10])
async def test_add_agent_refuses_impossible_endpoints(endpoint: str, problem: str) -> None:
    async with AgentPool(_cfg()) as pool:
        with pytest.raises(InvalidEndpoint, match=problem):
            await asyncio.wait_for(pool.add_agent("waf", endpoint), 1.0)
        assert pool.agent_ids() == []


async def test_unreachable_agent_registers_says_why_and_reconnects_by_itself() -> None:
    tmp = short_socket_dir()
    path = os.path.join(tmp, "late.sock")
    pool = AgentPool(_cfg(health_check_interval=0.05, reconnect_interval=0.05))
    try:
        await pool.add_agent("late", f"unix:{path}")
        assert pool.agent_ids() == ["late"] and not pool.is_agent_healthy("late")
        with pytest.raises(ConnectionFailed) as info:
            await pool.send_request_headers("late", "r1", _event("r1"))
        text = str(info.value)
        assert text.startswith("Connection failed: No connections available for agent late (")
        assert "last connect error at " in text and " UTC: " in text
        assert path in text and "No such file or directory" in text
        # upstream's usage: spawn run_maintenance() as a task; it reconnects until shutdown
        task = asyncio.ensure_future(pool.run_maintenance())
        async with aspawn_agent("waf", extra_args=()) as agent:
            os.symlink(agent.path, path)  # the agent appears at the registered path
            for _ in range(200):
                if pool.is_agent_healthy("late"):
                    break
                await asyncio.sleep(0.05)
            assert pool.is_agent_healthy("late")
            caps = await pool.agent_capabilities("late")
            assert caps is not None
            response = await pool.send_request_headers("late", "r2", _event("r2"))
            assert response is not None
            assert not task.done()
            await pool.shutdown()
            await asyncio.wait_for(task, 2.0)  # returns at shutdown, no cancel needed
    finally:
        await pool.shutdown()
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)


async def test_unknown_agent_is_agent_not_found_everywhere() -> None:
    async with AgentPool(_cfg()) as pool:
        calls = [
            pool.send_request_headers("ghost", "r", _event("r")),
            pool.remove_agent("ghost"),
            pool.cancel_request("ghost", "r"),
        ]
        for call in calls:
            with pytest.raises(AgentNotFound) as info:
                await call
            assert str(info.value) == "Invalid message format: Agent ghost not found"
            assert isinstance(info.value, InvalidMessage) and info.value.agent_id == "ghost"
        with pytest.raises(AgentNotFound):
            pool.create_sticky_session("s", "ghost")
        assert await pool.agent_capabilities("ghost") is None
        assert await pool.agent_stats("ghost") is None


async def test_calls_after_shutdown_are_unavailable() -> None:
    async with aspawn_agent("waf") as agent:
        pool = AgentPool(_cfg())
        await pool.start()
        await pool.add_agent("waf", agent.endpoint)
        await pool.shutdown()
        with pytest.raises(Unavailable, match="pool is shut down"):
            await pool.send_request_headers("waf", "r", _event("r"))
        with pytest.raises(Unavailable):
            await pool.add_agent("waf", agent.endpoint)
        with pytest.raises(Unavailable):
            await pool.cancel_request("waf", "r")
        # run_maintenance() on a shut-down pool returns at once
        await asyncio.wait_for(pool.run_maintenance(), 1.0)


def test_timeout_names_phase_agent_and_request() -> None:
    from agentpool import Timeout

    assert str(Timeout(30.0)) == "Timeout after 30s"  # upstream's text, unchanged
    err = Timeout(0.5, agent_id="waf", phase="connect")
    assert str(err) == "Timeout after 500ms (connect, agent 'waf')"
    err = Timeout(2.0, agent_id="waf", correlation_id="req-7")
    assert str(err) == "Timeout after 2s (request, agent 'waf', correlation id 'req-7')"
    assert (err.timeout, err.agent_id, err.phase, err.correlation_id) == (
        2.0,
        "waf",
        "request",
        "req-7",
    )
    assert isinstance(err, TimeoutError)
