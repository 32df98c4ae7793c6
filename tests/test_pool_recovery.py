"""AgentPool recovery against real agent processes: failover, dead-connection replacement,
agent restarts, unreachable agents, drain on shutdown, nothing left behind after failures."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest
from _helpers import hdrs, pool_config, states, until
from agents import AgentProc, aspawn_agent

from agentpool import ConnectionClosed, ConnectionFailed, Timeout, Unavailable
from agentpool.connection import AgentConnection
from agentpool.messages import (
    AgentCapabilities,
    Allow,
    RequestBodyChunkEvent,
)
from agentpool.pool import AgentPool

cfg = pool_config(
    request_timeout=5.0, connect_timeout=2.0, reconnect_interval=0.05, circuit_breaker=None
)


def assert_nothing_left(pool: AgentPool, seen: list[Any]) -> None:
    """No in-flight count or waiter is left, and no affinity or session refers to a closed
    connection (drop_state() counts the entries that still pointed at one)."""
    assert pool.protocol_metrics.snapshot().in_flight_requests == 0
    assert not pool._slot_waiters and not pool._resume_events
    for entry in pool._agents.values():
        for st in entry.conns:
            assert st.in_flight == 0
            assert st.conn.in_flight == 0
    for st in seen:
        if st.closed:
            assert st.in_flight == 0
            for entry in pool._agents.values():
                assert entry.affinity.drop_state(st) == 0
            assert pool._sessions.drop_state(st) == 0


async def test_failover_when_a_connection_dies(control: AgentProc) -> None:
    async with AgentPool(cfg()) as pool:
        await pool.add_agent("c", control.endpoint)
        # give every connection an affinity and a session
        for i in range(4):
            await pool.send_request_headers("c", f"a{i}", hdrs(f"a{i}"))
        for i in range(4):
            pool.create_sticky_session(f"s{i}", "c")
        seen = states(pool, "c")
        victim = seen[0]
        # round robin: the next request lands on connection 0, whose agent side closes it
        with pytest.raises(ConnectionClosed):
            await pool.send_request_headers("c", "boom", hdrs("boom", actions="close"))
        await until(lambda: victim.closed)
        assert pool.correlation_affinity_count() == 3
        assert pool.sticky_session_count() == 3
        assert pool.is_agent_healthy("c")
        for i in range(12):
            r = await pool.send_request_headers("c", f"f{i}", hdrs(f"f{i}"))
            assert isinstance(r.decision, Allow)
        assert (await pool.agent_stats("c")).healthy_connections == 3  # type: ignore[union-attr]
        # affinity to the dead connection is gone: its body chunk goes through selection
        r = await pool.send_request_body_chunk(
            "c", "a0", RequestBodyChunkEvent(correlation_id="a0", data=b"x", is_last=True)
        )
        assert isinstance(r.decision, Allow)
        assert_nothing_left(pool, seen)
        await pool.run_maintenance_once()
        conns = states(pool, "c")
        assert len(conns) == 4 and victim not in conns
        assert all(st.healthy and not st.closed for st in conns)
        stats = await pool.agent_stats("c")
        assert stats is not None and stats.active_connections == 4
        assert stats.total_requests >= 18  # counters of the replaced connection are kept
        assert pool.protocol_metrics.snapshot().connection_errors_total == 1
        assert_nothing_left(pool, seen + conns)


async def test_agent_restart_is_back_after_one_maintenance_pass() -> None:
    async with aspawn_agent("control") as agent, AgentPool(cfg()) as pool:
        await pool.add_agent("c", agent.endpoint)
        await pool.send_request_headers("c", "before", hdrs("before"))
        seen = states(pool, "c")
        pid_before = agent.pid
        agent.kill()
        await until(lambda: not pool.is_agent_healthy("c"))
        with pytest.raises(ConnectionFailed, match="No healthy connections for agent c"):
            await pool.send_request_headers("c", "down", hdrs("down"))
        await pool.run_maintenance_once()  # agent still down: the attempt fails and backs off
        assert not pool.is_agent_healthy("c")
        assert pool._agents["c"].reconnect_attempts == 1
        await agent.arestart()
        assert agent.pid != pid_before
        await asyncio.sleep(0.06)  # past the reconnect backoff
        await pool.run_maintenance_once()
        assert pool.is_agent_healthy("c")
        assert len(states(pool, "c")) == 4
        r = await pool.send_request_headers("c", "after", hdrs("after"))
        assert r.routing_metadata["pid"] == str(agent.pid)
        assert pool._agents["c"].reconnect_attempts == 0
        assert_nothing_left(pool, seen + states(pool, "c"))


async def test_unreachable_agent_is_registered_and_retried() -> None:
    agent = AgentProc("control")
    try:
        async with AgentPool(cfg(connections_per_agent=2)) as pool:
            await pool.add_agent("late", f"unix:{agent.path}")
            assert pool.agent_ids() == ["late"]
            assert not pool.is_agent_healthy("late")
            assert await pool.agent_capabilities("late") is None
            with pytest.raises(ConnectionFailed, match="No connections available for agent late"):
                await pool.send_request_headers("late", "x", hdrs("x"))
            stats = await pool.agent_stats("late")
            assert stats is not None and stats.active_connections == 0 and not stats.is_healthy
            agent.start()
            await agent.await_ready()
            await asyncio.sleep(0.06)
            await pool.run_maintenance_once()
            assert pool.is_agent_healthy("late")
            assert await pool.agent_capabilities("late") is not None
            assert pool.config_pusher.get_agent("late") is not None
            r = await pool.send_request_headers("late", "y", hdrs("y"))
            assert isinstance(r.decision, Allow)
    finally:
        agent.cleanup()


async def test_background_maintenance_reconnects(control: AgentProc) -> None:
    async with AgentPool(cfg(health_check_interval=0.05, connections_per_agent=2)) as pool:
        await pool.add_agent("c", control.endpoint)
        victim = states(pool, "c")[0]
        with pytest.raises(ConnectionClosed):
            await pool.send_request_headers("c", "boom", hdrs("boom", actions="close"))
        await until(lambda: victim not in states(pool, "c") and len(states(pool, "c")) == 2)
        assert all(not st.closed for st in states(pool, "c"))


async def test_reconnect_backoff_grows_and_never_gives_up() -> None:
    path = f"/tmp/agentpool-nonexistent-{time.monotonic_ns()}.sock"
    config = cfg(reconnect_interval=0.01, max_reconnect_attempts=1, max_reconnect_backoff=0.04)
    async with AgentPool(config) as pool:
        await pool.add_agent("gone", f"unix:{path}")
        entry = pool._agents["gone"]
        for _ in range(8):
            await asyncio.sleep(max(0.0, entry.next_reconnect_at - time.monotonic()) + 0.005)
            await pool.run_maintenance_once()
        assert entry.reconnect_attempts >= 8
        assert entry.next_reconnect_at - time.monotonic() <= 0.04 + 0.01


async def test_drain_waits_for_in_flight_then_closes(control: AgentProc) -> None:
    pool = AgentPool(cfg(connections_per_agent=2, drain_timeout=5.0))
    await pool.start()
    await pool.add_agent("c", control.endpoint)
    conns = [st.conn for st in states(pool, "c")]
    slow = asyncio.ensure_future(pool.send_request_headers("c", "slow", hdrs("slow", delay=0.3)))
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    shutdown = asyncio.ensure_future(pool.shutdown())
    await asyncio.sleep(0.02)
    with pytest.raises(Unavailable):  # no new requests while draining
        await pool.send_request_headers("c", "late", hdrs("late"))
    r = await slow
    await shutdown
    assert isinstance(r.decision, Allow)
    assert 0.2 <= time.monotonic() - t0 < 3.0
    assert pool.agent_ids() == []
    assert all(not c.is_connected for c in conns)
    assert pool._maintenance_task is None
    assert pool.protocol_metrics.snapshot().in_flight_requests == 0
    await pool.shutdown()  # idempotent


async def test_drain_timeout_cancels_leftovers(control: AgentProc) -> None:
    pool = AgentPool(cfg(connections_per_agent=1, drain_timeout=0.2))
    await pool.start()
    await pool.add_agent("c", control.endpoint)
    stuck = asyncio.ensure_future(pool.send_request_headers("c", "stuck", hdrs("stuck", delay=5)))
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await pool.shutdown()
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(ConnectionClosed):
        await stuck
    assert pool.protocol_metrics.snapshot().in_flight_requests == 0
    with pytest.raises(Unavailable, match="pool is shut down"):
        await pool.send_request_body_chunk(
            "c", "stuck", RequestBodyChunkEvent(correlation_id="stuck", data=b"", is_last=True)
        )


async def test_nothing_left_behind_after_failures() -> None:
    config = cfg(connections_per_agent=2, request_timeout=0.2, max_concurrent_per_connection=3)
    async with aspawn_agent("control") as agent, AgentPool(config) as pool:
        await pool.add_agent("c", agent.endpoint)
        pool.create_sticky_session("ws", "c")
        seen = states(pool, "c")
        calls = []
        for i in range(6):
            calls.append(pool.send_request_headers("c", f"ok{i}", hdrs(f"ok{i}", delay=0.05)))
            calls.append(
                pool.send_request_headers("c", f"to{i}", hdrs(f"to{i}", actions="no-reply"))
            )
        calls.append(pool.send_request_headers("c", "bye", hdrs("bye", delay=0.1, actions="exit")))
        results = await asyncio.gather(*calls, return_exceptions=True)
        kinds = {type(r).__name__ for r in results}
        assert kinds <= {"AgentResponse", "Timeout", "ConnectionClosed", "ConnectionFailed"}, kinds
        assert any(isinstance(r, (Timeout, ConnectionClosed)) for r in results)
        # the timeouts can mark both connections unhealthy before the second one's close is
        # read (gather returns once "bye"'s own connection closed): wait for both closes, since
        # the session goes away with the connection it was bound to
        await until(lambda: not pool.is_agent_healthy("c") and all(st.closed for st in seen))
        assert_nothing_left(pool, seen)
        assert pool.sticky_session_count() == 0
        assert pool.correlation_affinity_count() == 0
        stats = await pool.agent_stats("c")
        assert stats is not None and stats.total_in_flight == 0
        await pool.run_maintenance_once()
        assert_nothing_left(pool, seen)
        assert pool.protocol_metrics.snapshot().in_flight_requests == 0


async def test_reverse_connection_joins_and_leaves(control: AgentProc) -> None:
    # An agent connection made "the other way round": we connect, then hand the socket over
    # as an already-registered reverse connection (no handshake on it).
    async with AgentPool(cfg(connections_per_agent=1)) as pool:
        donor = await AgentConnection.open(control.endpoint, agent_id="rev")
        caps = donor.capabilities or AgentCapabilities("rev", "rev", "1")
        sock = donor.protocol_core.transport.get_extra_info("socket")
        dup = sock.dup() if sock is not None else None
        assert dup is not None
        donor.protocol_core.transport.pause_reading()
        conn = await AgentConnection.from_socket(
            dup, agent_id="rev", capabilities=caps, listener=pool.connection_listener
        )
        await pool.add_reverse_connection("rev", conn, caps)
        assert pool.agent_ids() == ["rev"]
        assert await pool.agent_capabilities("rev") is caps
        r = await pool.send_request_headers("rev", "r1", hdrs("r1"))
        assert isinstance(r.decision, Allow)
        extra = await AgentConnection.open(control.endpoint, agent_id="rev")
        with pytest.raises(
            ConnectionFailed, match=r"Agent rev already has maximum connections \(1\)"
        ):
            await pool.add_reverse_connection("rev", extra, caps)
        extra.close()
        with pytest.raises(ConnectionClosed):
            await pool.send_request_headers("rev", "r2", hdrs("r2", actions="close"))
        await until(lambda: "rev" not in pool.agent_ids())
        assert pool.config_pusher.get_agent("rev") is None
        donor.close()
        await pool.run_maintenance_once()
        assert pool.agent_ids() == []


async def test_request_waiting_for_a_slot_moves_when_its_connection_dies(
    control: AgentProc,
) -> None:
    config = cfg(connections_per_agent=2, max_concurrent_per_connection=1)
    async with AgentPool(config) as pool:
        await pool.add_agent("c", control.endpoint)
        seen = states(pool, "c")
        doomed = asyncio.ensure_future(
            pool.send_request_headers("c", "d", hdrs("d", delay=0.2, actions="close"))
        )
        busy = asyncio.ensure_future(pool.send_request_headers("c", "b", hdrs("b", delay=0.4)))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(pool.send_request_headers("c", "w", hdrs("w")))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        with pytest.raises(ConnectionClosed):
            await doomed
        r = await waiting
        assert isinstance(r.decision, Allow)
        assert isinstance((await busy).decision, Allow)
        assert seen[0].closed and seen[0].request_count == 1
        assert seen[1].request_count == 2
        assert_nothing_left(pool, seen)


async def test_health_report_recovers_and_is_forgotten_after_restart() -> None:
    async with aspawn_agent("control") as agent, AgentPool(cfg(connections_per_agent=1)) as pool:
        await pool.add_agent("c", agent.endpoint)
        await pool.send_request_headers("c", "h0", hdrs("h0", actions="health:4,health:1"))
        await asyncio.sleep(0.05)
        assert pool.is_agent_healthy("c")
        await pool.send_request_headers("c", "h1", hdrs("h1", actions="health:3"))  # draining
        await until(lambda: not pool.is_agent_healthy("c"))
        with pytest.raises(ConnectionFailed, match="No healthy connections"):
            await pool.send_request_headers("c", "h2", hdrs("h2"))
        await agent.arestart()
        await until(lambda: all(st.closed for st in states(pool, "c")))
        await pool.run_maintenance_once()
        assert pool.is_agent_healthy("c")
        r = await pool.send_request_headers("c", "h3", hdrs("h3"))
        assert r.routing_metadata["pid"] == str(agent.pid)


async def test_keepalive_replaces_connections_of_a_frozen_agent() -> None:
    config = cfg(
        connections_per_agent=2,
        health_check_interval=0.05,
        ping_timeout=0.2,
        connect_timeout=0.3,
    )
    async with aspawn_agent("control") as agent:
        pool = AgentPool(config)  # no background task: passes are run by hand
        try:
            await pool.add_agent("c", agent.endpoint)
            first = states(pool, "c")
            await asyncio.sleep(0.06)
            await pool.run_maintenance_once()  # idle connections are pinged and answer
            assert all(st.conn.last_rtt is not None for st in first)
            assert states(pool, "c") == first
            os.kill(agent.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(0.06)
                await pool.run_maintenance_once()  # pings time out: replaced; handshakes time out
                assert all(st.closed for st in first)
                assert not pool.is_agent_healthy("c")
            finally:
                os.kill(agent.pid, signal.SIGCONT)
            await asyncio.sleep(0.1)
            await pool.run_maintenance_once()
            assert pool.is_agent_healthy("c") and len(states(pool, "c")) == 2
            r = await pool.send_request_headers("c", "k", hdrs("k"))
            assert isinstance(r.decision, Allow)
        finally:
            await pool.shutdown()
