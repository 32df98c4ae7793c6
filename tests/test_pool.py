"""AgentPool against real agent processes: config, API, selection, affinity, sessions, flow
control, circuit breaker, concurrency limit (POOL.md §16.1 adapted to DECISIONS.md)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from _helpers import FakeClock, hdrs, pool_config, states
from agents import AgentProc

import agentpool.pool
from agentpool import (
    CircuitBreakerOpen,
    ConnectionClosed,
    ConnectionFailed,
    FlowControlMode,
    FlowControlPaused,
    InvalidMessage,
    LoadBalanceStrategy,
    Timeout,
)
from agentpool.circuit import CircuitBreakerConfig, CircuitState
from agentpool.config import AgentPoolConfig
from agentpool.messages import (
    Allow,
    Block,
    GuardrailInspectEvent,
    RequestBodyChunkEvent,
    RequestReload,
    ResponseBodyChunkEvent,
    ResponseHeadersEvent,
)
from agentpool.pool import AgentPool, AgentPoolStats, is_uds_endpoint

cfg = pool_config(request_timeout=5.0, connect_timeout=5.0)


def body(cid: str, index: int = 0, last: bool = False) -> RequestBodyChunkEvent:
    return RequestBodyChunkEvent(
        correlation_id=cid, data=b"chunk-%d" % index, is_last=last, chunk_index=index
    )


def counts(pool: AgentPool, agent_id: str) -> list[int]:
    return [st.request_count for st in states(pool, agent_id)]


def served_by(before: list[int], after: list[int]) -> int:
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    assert len(changed) == 1, (before, after)
    return changed[0]


# --------------------------------------------------------------------------- config (16.1)


def test_config_defaults() -> None:
    c = AgentPoolConfig()
    assert c.connections_per_agent == 4
    assert c.load_balance_strategy is LoadBalanceStrategy.ROUND_ROBIN
    assert c.connect_timeout == 5.0
    assert c.request_timeout == 30.0
    assert c.reconnect_interval == 5.0
    assert c.max_reconnect_attempts == 3
    assert c.drain_timeout == 30.0
    assert c.max_concurrent_per_connection == 100
    assert c.health_check_interval == 10.0
    assert c.channel_buffer_size == 64
    assert c.flow_control_mode is FlowControlMode.FAIL_CLOSED
    assert c.flow_control_wait_timeout == 0.1
    assert c.sticky_session_timeout == 300.0
    assert c.correlation_affinity_ttl == 300.0
    assert c.max_correlation_affinities == 100_000
    assert c.encoding == "json"
    assert isinstance(c.circuit_breaker, CircuitBreakerConfig)
    assert c.circuit_breaker.failure_threshold == 5
    assert c.max_reconnect_backoff == 120.0


def test_config_custom_values_kept() -> None:
    c = AgentPoolConfig(
        connections_per_agent=8,
        channel_buffer_size=128,
        flow_control_mode=FlowControlMode.FAIL_OPEN,
        flow_control_wait_timeout=0.5,
        sticky_session_timeout=60.0,
        circuit_breaker=None,
        encoding="msgpack",
    )
    assert (c.connections_per_agent, c.channel_buffer_size) == (8, 128)
    assert c.flow_control_mode is FlowControlMode.FAIL_OPEN
    assert c.flow_control_wait_timeout == 0.5
    assert c.sticky_session_timeout == 60.0
    assert c.circuit_breaker is None
    c2 = AgentPoolConfig(
        flow_control_mode=FlowControlMode.WAIT_AND_RETRY,
        flow_control_wait_timeout=0.25,
        sticky_session_timeout=None,
        load_balance_strategy=1,  # type: ignore[arg-type]
    )
    assert c2.flow_control_mode is FlowControlMode.WAIT_AND_RETRY
    assert c2.flow_control_wait_timeout == 0.25
    assert c2.sticky_session_timeout is None
    assert c2.load_balance_strategy is LoadBalanceStrategy.LEAST_CONNECTIONS
    assert AgentPool(AgentPoolConfig(connections_per_agent=8)).config.connections_per_agent == 8


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"connections_per_agent": 0}, "connections_per_agent"),
        ({"max_concurrent_per_connection": -1}, "max_concurrent_per_connection"),
        ({"request_timeout": 0}, "request_timeout"),
        ({"connect_timeout": float("nan")}, "connect_timeout"),
        ({"drain_timeout": -1.0}, "drain_timeout"),
        ({"health_check_interval": 0}, "health_check_interval"),
        ({"encoding": "xml"}, "encoding"),
        ({"load_balance_strategy": 9}, "load_balance_strategy"),
        ({"flow_control_mode": "fast"}, "flow_control_mode"),
        ({"sticky_session_timeout": -5}, "sticky_session_timeout"),
        ({"max_correlation_affinities": 0}, "max_correlation_affinities"),
        ({"circuit_breaker": {"failure_threshold": 1}}, "circuit_breaker"),
        ({"connections_per_agent": True}, "connections_per_agent"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AgentPoolConfig(**kwargs)


def test_reconnect_backoff_stretches_and_caps() -> None:
    c = AgentPoolConfig(reconnect_interval=5.0, max_reconnect_attempts=3)
    delays = [c.reconnect_delay(n) for n in range(1, 12)]
    assert delays[:3] == [5.0, 5.0, 5.0]
    assert delays[3:6] == [10.0, 20.0, 40.0]
    assert max(delays) == 120.0 and delays[-1] == 120.0


@pytest.mark.parametrize(
    ("endpoint", "uds"),
    [
        ("unix:/var/run/agent.sock", True),
        ("unix:agent.sock", True),
        ("/var/run/agent.sock", True),
        ("/tmp/test.sock", True),
        ("agent.sock", True),
        ("http://localhost:8080", False),
        ("localhost:50051", False),
        ("127.0.0.1:8080", False),
    ],
)
def test_endpoint_classification(endpoint: str, uds: bool) -> None:
    assert is_uds_endpoint(endpoint) is uds


async def test_empty_pool() -> None:
    pool = AgentPool()
    assert pool.total_requests == 0 and pool.total_errors == 0
    assert pool.agent_ids() == []
    assert await pool.stats() == []
    assert await pool.agent_stats("nonexistent") is None
    assert pool.is_agent_healthy("nonexistent") is False
    assert await pool.agent_capabilities("nonexistent") is None
    assert pool.sticky_session_count() == 0
    assert pool.has_sticky_session("nonexistent") is False
    pool.clear_sticky_session("nonexistent")
    assert pool.cleanup_expired_sessions() == 0
    assert pool.correlation_affinity_count() == 0
    assert pool.cleanup_expired_affinities() == 0
    with pytest.raises(InvalidMessage, match="Agent ghost not found"):
        await pool.send_request_headers("ghost", "c1", hdrs("c1"))
    with pytest.raises(InvalidMessage, match="Agent ghost not found"):
        await pool.remove_agent("ghost")
    with pytest.raises(InvalidMessage, match="Agent ghost not found"):
        await pool.cancel_request("ghost", "c1")
    with pytest.raises(InvalidMessage, match="Agent ghost not found"):
        pool.create_sticky_session("s", "ghost")
    assert pool.push_config_to_all(RequestReload()) == []
    assert pool.protocol_metrics.snapshot().in_flight_requests == 0
    await pool.shutdown()


# --------------------------------------------------------------------------- basics


async def test_add_agent_and_decisions(waf: AgentProc) -> None:
    async with AgentPool(cfg()) as pool:
        await pool.add_agent("waf", waf.endpoint)
        assert pool.agent_ids() == ["waf"]
        assert pool.is_agent_healthy("waf")
        caps = await pool.agent_capabilities("waf")
        assert caps is not None and caps.name == "agentpool example WAF"
        assert pool.config_pusher.get_agent("waf") is not None
        stats = await pool.agent_stats("waf")
        assert stats == AgentPoolStats("waf", 4, 4, 0, 0, 0, 0.0, True)

        ok = await pool.send_request_headers("waf", "r1", hdrs("r1", "/index.html"))
        assert isinstance(ok.decision, Allow) and not ok.fail_open
        assert [(op.name, op.value) for op in ok.request_headers] == [("x-agentpool-checked", "1")]
        blocked = await pool.send_request_headers("waf", "r2", hdrs("r2", "/admin/users"))
        assert isinstance(blocked.decision, Block) and blocked.decision.status == 403
        chunk = await pool.send_request_body_chunk("waf", "r1", body("r1", 0, True))
        assert isinstance(chunk.decision, Allow)
        resp = await pool.send_response_headers(
            "waf", "r1", ResponseHeadersEvent(correlation_id="r1", status=200, headers={})
        )
        assert isinstance(resp.decision, Allow)
        rb = await pool.send_response_body_chunk(
            "waf", "r1", ResponseBodyChunkEvent(correlation_id="r1", data=b"x", is_last=True)
        )
        assert isinstance(rb.decision, Allow)
        g = await pool.send_guardrail_inspect(
            "waf",
            "r3",
            GuardrailInspectEvent(
                correlation_id="r3", inspection_type="prompt_injection", content="hi"
            ),
        )
        assert isinstance(g.decision, Allow)

        snap = pool.protocol_metrics.snapshot()
        # H, H and G are tracked (upstream); chunk and response events are not.
        assert (snap.requests_total, snap.responses_total, snap.in_flight_requests) == (3, 3, 0)
        assert snap.request_duration.count == 2
        assert snap.healthy_connections == 4
        assert pool.total_requests == 6
        stats = await pool.agent_stats("waf")
        assert stats is not None and stats.total_requests == 6 and stats.total_errors == 0
        text = pool.export_prometheus()
        assert "agent_protocol_requests_total 3\n" in text
        assert "agent_protocol_healthy_connections 4\n" in text
        assert "agent_protocol_request_duration_seconds_count 2\n" in text
    assert pool.agent_ids() == []


async def test_remove_agent_closes_connections_and_state(control: AgentProc) -> None:
    async with AgentPool(cfg(connections_per_agent=2)) as pool:
        await pool.add_agent("c", control.endpoint)
        conns = [st.conn for st in states(pool, "c")]
        await pool.send_request_headers("c", "x1", hdrs("x1"))
        pool.create_sticky_session("s1", "c")
        assert pool.correlation_affinity_count() == 1 and pool.sticky_session_count() == 1
        await pool.remove_agent("c")
        assert pool.agent_ids() == []
        assert all(not c.is_connected for c in conns)
        assert pool.correlation_affinity_count() == 0
        assert pool.sticky_session_count() == 0
        assert pool.config_pusher.get_agent("c") is None
        with pytest.raises(InvalidMessage, match="Agent c not found"):
            await pool.send_request_headers("c", "x2", hdrs("x2"))


async def test_add_agent_again_replaces_and_closes_old(control: AgentProc) -> None:
    async with AgentPool(cfg(connections_per_agent=2)) as pool:
        await pool.add_agent("c", control.endpoint)
        old = [st.conn for st in states(pool, "c")]
        await pool.add_agent("c", control.endpoint)
        assert all(not c.is_connected for c in old)
        assert len(states(pool, "c")) == 2
        assert isinstance((await pool.send_request_headers("c", "a", hdrs("a"))).decision, Allow)


# --------------------------------------------------------------------------- selection


async def test_round_robin_distribution(control: AgentProc) -> None:
    async with AgentPool(cfg()) as pool:
        await pool.add_agent("c", control.endpoint)
        for i in range(40):
            await pool.send_request_headers("c", f"rr{i}", hdrs(f"rr{i}"))
        assert counts(pool, "c") == [10, 10, 10, 10]


async def test_least_connections_distribution(control: AgentProc) -> None:
    config = cfg(load_balance_strategy=LoadBalanceStrategy.LEAST_CONNECTIONS)
    async with AgentPool(config) as pool:
        await pool.add_agent("c", control.endpoint)
        # One slow request per connection first, then more: each new one goes to the least busy.
        await asyncio.gather(
            *(pool.send_request_headers("c", f"lc{i}", hdrs(f"lc{i}", delay=0.2)) for i in range(8))
        )
        assert counts(pool, "c") == [2, 2, 2, 2]
        first = states(pool, "c")[0]
        slow = asyncio.ensure_future(
            pool.send_request_headers("c", "slow", hdrs("slow", delay=0.5))
        )
        await asyncio.sleep(0.05)
        assert first.in_flight == 1
        before = counts(pool, "c")
        await pool.send_request_headers("c", "quick", hdrs("quick"))
        assert served_by(before, counts(pool, "c")) == 1
        await slow


async def test_health_based_prefers_lowest_error_rate(control: AgentProc) -> None:
    config = cfg(
        load_balance_strategy=LoadBalanceStrategy.HEALTH_BASED,
        connections_per_agent=2,
        request_timeout=0.2,
        circuit_breaker=None,
    )
    async with AgentPool(config) as pool:
        await pool.add_agent("c", control.endpoint)
        for i in range(5):
            await pool.send_request_headers("c", f"hb{i}", hdrs(f"hb{i}"))
        assert counts(pool, "c") == [5, 0]  # ties go to the first connection
        with pytest.raises(Timeout):
            await pool.send_request_headers("c", "hb-fail", hdrs("hb-fail", actions="no-reply"))
        assert states(pool, "c")[0].error_count == 1
        before = counts(pool, "c")
        await pool.send_request_headers("c", "hb-next", hdrs("hb-next"))
        assert served_by(before, counts(pool, "c")) == 1


async def test_random_distribution(control: AgentProc) -> None:
    async with AgentPool(cfg(load_balance_strategy=LoadBalanceStrategy.RANDOM)) as pool:
        await pool.add_agent("c", control.endpoint)
        for i in range(200):
            await pool.send_request_headers("c", f"rd{i}", hdrs(f"rd{i}"))
        spread = counts(pool, "c")
        assert sum(spread) == 200
        assert min(spread) >= 20, spread
        # serialization time is sampled on one tracked send in 64
        assert pool.protocol_metrics.snapshot().serialization_time.count == 3


async def test_max_concurrent_per_connection_waits(control: AgentProc) -> None:
    config = cfg(connections_per_agent=1, max_concurrent_per_connection=2)
    async with AgentPool(config) as pool:
        await pool.add_agent("c", control.endpoint)
        st = states(pool, "c")[0]
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, st.in_flight, st.conn.in_flight)
                await asyncio.sleep(0.005)

        watcher = asyncio.ensure_future(watch())
        t0 = time.monotonic()
        results = await asyncio.gather(
            *(pool.send_request_headers("c", f"mc{i}", hdrs(f"mc{i}", delay=0.1)) for i in range(6))
        )
        elapsed = time.monotonic() - t0
        watcher.cancel()
        assert all(isinstance(r.decision, Allow) for r in results)
        assert peak == 2
        assert elapsed >= 0.28  # three waves of two
        assert st.in_flight == 0 and not pool._slot_waiters


async def test_cancelled_waiter_leaves_nothing_behind(control: AgentProc) -> None:
    config = cfg(connections_per_agent=1, max_concurrent_per_connection=1)
    async with AgentPool(config) as pool:
        await pool.add_agent("c", control.endpoint)
        busy = asyncio.ensure_future(pool.send_request_headers("c", "b1", hdrs("b1", delay=0.2)))
        await asyncio.sleep(0.02)
        waiting = asyncio.ensure_future(pool.send_request_headers("c", "b2", hdrs("b2")))
        await asyncio.sleep(0.02)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await busy
        assert await pool.send_request_headers("c", "b3", hdrs("b3"))
        assert states(pool, "c")[0].in_flight == 0
        assert pool.protocol_metrics.snapshot().in_flight_requests == 0
        assert not pool._slot_waiters


# --------------------------------------------------------------------------- affinity (§6)


async def test_affinity_survives_interleaved_requests(control: AgentProc) -> None:
    async with AgentPool(cfg()) as pool:
        await pool.add_agent("c", control.endpoint)
        cids = ["a", "b", "c", "d"]
        owner: dict[str, int] = {}
        for cid in cids:
            before = counts(pool, "c")
            await pool.send_request_headers("c", cid, hdrs(cid))
            owner[cid] = served_by(before, counts(pool, "c"))
        assert sorted(owner.values()) == [0, 1, 2, 3]
        order = ["d", "a", "c", "b", "a", "d", "b", "c", "a"]
        for n, cid in enumerate(order):
            before = counts(pool, "c")
            if n % 2:
                await pool.send_response_body_chunk(
                    "c", cid, ResponseBodyChunkEvent(correlation_id=cid, data=b"r", is_last=False)
                )
            else:
                await pool.send_request_body_chunk("c", cid, body(cid, n))
            assert served_by(before, counts(pool, "c")) == owner[cid], cid
        assert pool.correlation_affinity_count() == 4
        pool.clear_correlation_affinity("a")
        assert pool.correlation_affinity_count() == 3
        assert pool.protocol_metrics.snapshot().correlation_affinities == 3


async def test_affinity_is_per_agent(control: AgentProc) -> None:
    async with AgentPool(cfg(connections_per_agent=2)) as pool:
        await pool.add_agent("one", control.endpoint)
        await pool.add_agent("two", control.endpoint)
        await pool.send_request_headers("one", "shared", hdrs("shared"))
        await pool.send_request_headers("two", "x", hdrs("x"))
        await pool.send_request_headers("two", "shared", hdrs("shared"))
        one_before, two_before = counts(pool, "one"), counts(pool, "two")
        await pool.send_request_body_chunk("one", "shared", body("shared"))
        assert served_by(one_before, counts(pool, "one")) == 0
        assert counts(pool, "two") == two_before
        await pool.send_request_body_chunk("two", "shared", body("shared"))
        assert served_by(two_before, counts(pool, "two")) == 1
        assert pool.correlation_affinity_count() == 3
        pool.clear_correlation_affinity("shared")
        assert pool.correlation_affinity_count() == 1


async def test_affinity_clear_touches_only_the_agents_that_hold_it(control: AgentProc) -> None:
    async with AgentPool(cfg(connections_per_agent=2)) as pool:
        for agent_id in ("one", "two", "three"):
            await pool.add_agent(agent_id, control.endpoint)
        await pool.send_request_headers("one", "s", hdrs("s"))
        await pool.send_request_headers("three", "s", hdrs("s"))
        await pool.send_request_headers("two", "k", hdrs("k"))
        await pool.send_request_headers("three", "k", hdrs("k"))
        # "k" goes to the connection of "three" that "s" did not use
        await pool.send_request_headers("three", "only", hdrs("only"))
        assert pool.correlation_affinity_count() == 5
        pool.clear_correlation_affinity("s")
        assert pool.correlation_affinity_count() == 3
        pool.clear_correlation_affinity("s")  # twice: nothing left to clear
        assert pool.correlation_affinity_count() == 3
        # "k" keeps its bindings on both agents
        for agent_id in ("two", "three"):
            before = counts(pool, agent_id)
            await pool.send_request_body_chunk(agent_id, "k", body("k"))
            after = counts(pool, agent_id)
            await pool.send_request_body_chunk(agent_id, "k", body("k", 1))
            assert served_by(after, counts(pool, agent_id)) == served_by(before, after)
        # a body chunk for a cleared id is sent by normal selection, and stores nothing
        await pool.send_request_body_chunk("one", "s", body("s"))
        assert pool.correlation_affinity_count() == 3
        # an id stored again after its clear is cleared again
        await pool.send_request_headers("one", "s", hdrs("s"))
        assert pool.correlation_affinity_count() == 4
        pool.clear_correlation_affinity("s")
        pool.clear_correlation_affinity("k")
        assert pool.correlation_affinity_count() == 1
        assert pool.protocol_metrics.snapshot().correlation_affinities == 1


async def test_affinity_clear_across_agents_joining_and_leaving(control: AgentProc) -> None:
    async with AgentPool(cfg(connections_per_agent=1)) as pool:
        await pool.add_agent("first", control.endpoint)
        await pool.send_request_headers("first", "early", hdrs("early"))  # the only agent
        await pool.add_agent("second", control.endpoint)
        await pool.send_request_headers("first", "late", hdrs("late"))
        await pool.send_request_headers("second", "late", hdrs("late"))
        await pool.send_request_headers("second", "early", hdrs("early"))
        assert pool.correlation_affinity_count() == 4
        pool.clear_correlation_affinity("early")
        assert pool.correlation_affinity_count() == 2
        await pool.remove_agent("first")
        await pool.send_request_headers("second", "alone", hdrs("alone"))
        assert pool.correlation_affinity_count() == 2
        pool.clear_correlation_affinity("late")
        pool.clear_correlation_affinity("alone")
        assert pool.correlation_affinity_count() == 0
        await pool.add_agent("first", control.endpoint)
        await pool.send_request_headers("first", "again", hdrs("again"))
        await pool.send_request_headers("second", "again", hdrs("again"))
        pool.clear_correlation_affinity("again")
        assert pool.correlation_affinity_count() == 0


async def test_affinity_index_does_not_outlive_its_bindings(control: AgentProc) -> None:
    """Ids whose binding went away without a clear (agent removed, refused at capacity) are
    forgotten by the next sweep; ids still bound are kept and still clear."""
    config = cfg(connections_per_agent=1, max_correlation_affinities=2)
    async with AgentPool(config) as pool:
        await pool.add_agent("a", control.endpoint)
        await pool.add_agent("b", control.endpoint)
        for i in range(5):  # 2 stored, 3 refused at capacity
            await pool.send_request_headers("a", f"a{i}", hdrs(f"a{i}"))
        await pool.send_request_headers("b", "kept", hdrs("kept"))
        await pool.remove_agent("a")
        assert pool.correlation_affinity_count() == 1
        assert pool.cleanup_expired_affinities() == 0
        assert set(pool._affinity_index) == {"kept"}
        pool.clear_correlation_affinity("kept")
        assert pool.correlation_affinity_count() == 0 and not pool._affinity_index


async def test_affinity_capacity(control: AgentProc) -> None:
    async with AgentPool(cfg(connections_per_agent=1, max_correlation_affinities=3)) as pool:
        await pool.add_agent("c", control.endpoint)
        for i in range(10):
            await pool.send_request_headers("c", f"cap{i}", hdrs(f"cap{i}"))
        assert pool.correlation_affinity_count() == 3
        assert pool.protocol_metrics.snapshot().affinity_rejections_total == 7
    async with AgentPool(cfg(connections_per_agent=1, max_correlation_affinities=1)) as pool:
        await pool.add_agent("c", control.endpoint)
        await pool.send_request_headers("c", "same", hdrs("same"))
        await pool.send_request_headers("c", "same", hdrs("same"))
        assert pool.correlation_affinity_count() == 1
        assert pool.protocol_metrics.snapshot().affinity_rejections_total == 0


async def test_affinity_clear_and_ttl_sweep(control: AgentProc) -> None:
    async with AgentPool(cfg(connections_per_agent=1, correlation_affinity_ttl=0.0)) as pool:
        await pool.add_agent("c", control.endpoint)
        await pool.send_request_headers("c", "t1", hdrs("t1"))
        pool.clear_correlation_affinity("t1")
        assert pool.correlation_affinity_count() == 0
        assert pool.protocol_metrics.snapshot().correlation_affinities == 0
        pool.clear_correlation_affinity("never-stored")
        await pool.send_request_headers("c", "t2", hdrs("t2"))
        await pool.send_request_headers("c", "t3", hdrs("t3"))
        await asyncio.sleep(0.01)
        assert pool.cleanup_expired_affinities() == 2
        assert pool.correlation_affinity_count() == 0
        snap = pool.protocol_metrics.snapshot()
        assert snap.affinity_evictions_total == 2 and snap.correlation_affinities == 0


# --------------------------------------------------------------------------- sticky sessions (§7)


async def test_sticky_session_pins_connection(control: AgentProc) -> None:
    async with AgentPool(cfg()) as pool:
        await pool.add_agent("c", control.endpoint)
        pool.create_sticky_session("ws", "c")
        assert pool.sticky_session_agent("ws") == "c"
        assert pool.sticky_session_count() == 1
        pinned = pool._sessions.peek("ws")
        idx = states(pool, "c").index(pinned)
        for i in range(6):
            before = counts(pool, "c")
            resp, used = await pool.send_request_headers_with_sticky_session(
                "ws", "c", f"ws{i}", hdrs(f"ws{i}")
            )
            assert used is True and isinstance(resp.decision, Allow)
            assert served_by(before, counts(pool, "c")) == idx
        # unknown session: normal selection, no session created
        _, used = await pool.send_request_headers_with_sticky_session("nope", "c", "n1", hdrs("n1"))
        assert used is False and not pool.has_sticky_session("nope")
        pool.clear_sticky_session("ws")
        assert pool.sticky_session_count() == 0 and pool.sticky_session_agent("ws") is None


async def test_sticky_session_for_other_agent_is_not_used(control: AgentProc) -> None:
    async with AgentPool(cfg(connections_per_agent=1)) as pool:
        await pool.add_agent("a", control.endpoint)
        await pool.add_agent("b", control.endpoint)
        pool.create_sticky_session("s", "a")
        before = counts(pool, "b")
        _, used = await pool.send_request_headers_with_sticky_session("s", "b", "x", hdrs("x"))
        assert used is False
        assert counts(pool, "b") == [before[0] + 1]


async def test_sticky_falls_back_when_connection_is_gone(control: AgentProc) -> None:
    async with AgentPool(cfg(connections_per_agent=2, circuit_breaker=None)) as pool:
        await pool.add_agent("c", control.endpoint)
        pool.create_sticky_session("ws", "c")
        pinned = pool._sessions.peek("ws")
        # The agent closes the pinned connection while answering.
        with pytest.raises(ConnectionClosed):
            await pool.send_request_headers_with_sticky_session(
                "ws", "c", "k1", hdrs("k1", actions="close")
            )
        await _until(lambda: pinned.closed)
        assert not pool.has_sticky_session("ws")
        assert pool.sticky_session_count() == 0
        resp, used = await pool.send_request_headers_with_sticky_session(
            "ws", "c", "k2", hdrs("k2")
        )
        assert used is False and isinstance(resp.decision, Allow)


async def test_sticky_expiry_has_is_pure_refresh_refreshes(
    control: AgentProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the pool's session clock, moved by hand: a loaded machine cannot stretch the sleeps
    clock = FakeClock()
    monkeypatch.setattr(agentpool.pool, "_monotonic", clock)
    async with AgentPool(cfg(connections_per_agent=1, sticky_session_timeout=0.3)) as pool:
        await pool.add_agent("c", control.endpoint)
        pool.create_sticky_session("pure", "c")
        pool.create_sticky_session("kept", "c")
        clock.advance(0.2)
        assert pool.has_sticky_session("pure")  # does not refresh
        assert pool.refresh_sticky_session("kept")  # refreshes
        clock.advance(0.2)
        assert not pool.has_sticky_session("pure")
        assert pool.has_sticky_session("kept")
        assert pool.sticky_session_count() == 2  # expired ones count until swept
        assert pool.cleanup_expired_sessions() == 1
        assert pool.sticky_session_count() == 1
        assert not pool.refresh_sticky_session("pure")
    async with AgentPool(cfg(connections_per_agent=1, sticky_session_timeout=None)) as pool:
        await pool.add_agent("c", control.endpoint)
        pool.create_sticky_session("forever", "c")
        assert pool.cleanup_expired_sessions() == 0
        assert pool.has_sticky_session("forever")


# --------------------------------------------------------------------------- flow control (§5)


async def _paused_pool(control: AgentProc, mode: FlowControlMode, wait: float = 0.1) -> AgentPool:
    pool = AgentPool(
        cfg(connections_per_agent=1, flow_control_mode=mode, flow_control_wait_timeout=wait)
    )
    await pool.start()
    await pool.add_agent("c", control.endpoint)
    await pool.send_request_headers("c", "p0", hdrs("p0", actions="pause"))
    st = states(pool, "c")[0]
    await _until(lambda: st.paused)
    return pool


async def test_flow_fail_closed(control: AgentProc) -> None:
    pool = await _paused_pool(control, FlowControlMode.FAIL_CLOSED)
    try:
        with pytest.raises(FlowControlPaused, match="agent 'c' requested backpressure"):
            await pool.send_request_headers("c", "p1", hdrs("p1"))
        with pytest.raises(FlowControlPaused):
            await pool.send_request_body_chunk("c", "p1", body("p1"))
        # response headers skip the flow check (upstream)
        r = await pool.send_response_headers(
            "c", "p1", ResponseHeadersEvent(correlation_id="p1", status=200, headers={})
        )
        assert isinstance(r.decision, Allow)
        snap = pool.protocol_metrics.snapshot()
        assert snap.flow_control_rejections_total == 2
        assert snap.flow_control_pauses_total == 1
        assert snap.paused_connections == 1
        assert snap.in_flight_requests == 0
        assert pool.is_agent_healthy("c")
    finally:
        await pool.shutdown()


async def test_flow_fail_open_marks_synthetic_allow(control: AgentProc) -> None:
    pool = await _paused_pool(control, FlowControlMode.FAIL_OPEN)
    try:
        before = counts(pool, "c")
        r = await pool.send_request_headers("c", "p1", hdrs("p1"))
        assert isinstance(r.decision, Allow) and r.fail_open is True
        assert counts(pool, "c") == before  # the agent was not asked
        real = await pool.send_response_headers(
            "c", "p1", ResponseHeadersEvent(correlation_id="p1", status=200, headers={})
        )
        assert real.fail_open is False
        assert pool.protocol_metrics.snapshot().flow_control_rejections_total == 1
    finally:
        await pool.shutdown()


async def test_flow_wait_and_retry_times_out(control: AgentProc) -> None:
    pool = await _paused_pool(control, FlowControlMode.WAIT_AND_RETRY, wait=0.15)
    try:
        t0 = time.monotonic()
        with pytest.raises(FlowControlPaused):
            await pool.send_request_headers("c", "p1", hdrs("p1"))
        assert time.monotonic() - t0 >= 0.14
        assert pool.protocol_metrics.snapshot().flow_control_rejections_total == 1
    finally:
        await pool.shutdown()


async def test_flow_wait_and_retry_proceeds_on_resume(control: AgentProc) -> None:
    config = cfg(
        connections_per_agent=1,
        flow_control_mode=FlowControlMode.WAIT_AND_RETRY,
        flow_control_wait_timeout=3.0,
    )
    async with AgentPool(config) as pool:
        await pool.add_agent("c", control.endpoint)
        st = states(pool, "c")[0]
        # in flight before the pause; the agent resumes when it answers it (after 0.2 s)
        resumer = asyncio.ensure_future(
            pool.send_request_headers("c", "r0", hdrs("r0", delay=0.2, actions="resume"))
        )
        await asyncio.sleep(0.02)
        await pool.send_request_headers("c", "p0", hdrs("p0", actions="pause"))
        await _until(lambda: st.paused)
        t0 = time.monotonic()
        r = await pool.send_request_headers("c", "p1", hdrs("p1"))
        waited = time.monotonic() - t0
        await resumer
        assert isinstance(r.decision, Allow) and not r.fail_open
        assert 0.05 < waited < 2.0
        snap = pool.protocol_metrics.snapshot()
        assert snap.flow_control_resumes_total == 1
        assert snap.flow_control_rejections_total == 0


async def test_flow_prefers_unpaused_connection(control: AgentProc) -> None:
    async with AgentPool(cfg(connections_per_agent=2)) as pool:
        await pool.add_agent("c", control.endpoint)
        await pool.send_request_headers("c", "p0", hdrs("p0", actions="pause"))
        paused = [st for st in states(pool, "c")]
        await _until(lambda: any(st.paused for st in paused))
        for i in range(4):
            r = await pool.send_request_headers("c", f"u{i}", hdrs(f"u{i}"))
            assert isinstance(r.decision, Allow) and not r.fail_open


# --------------------------------------------------------------------------- breaker, errors


async def test_circuit_breaker_fails_fast_and_recovers(control: AgentProc) -> None:
    config = cfg(
        connections_per_agent=2,
        request_timeout=0.15,
        circuit_breaker=CircuitBreakerConfig(failure_threshold=2, success_threshold=2, timeout=0.3),
    )
    async with AgentPool(config) as pool:
        await pool.add_agent("c", control.endpoint)
        for i in range(2):
            with pytest.raises(Timeout):
                await pool.send_request_headers("c", f"f{i}", hdrs(f"f{i}", actions="no-reply"))
        before = pool.protocol_metrics.snapshot().requests_total
        with pytest.raises(CircuitBreakerOpen, match="circuit breaker open for agent 'c'"):
            await pool.send_request_headers("c", "fast", hdrs("fast"))
        # failed fast: the agent was not asked
        assert pool.protocol_metrics.snapshot().requests_total == before
        await asyncio.sleep(0.35)
        for i in range(2):
            r = await pool.send_request_headers("c", f"ok{i}", hdrs(f"ok{i}"))
            assert isinstance(r.decision, Allow)
        assert pool._agents["c"].breaker.state is CircuitState.CLOSED
        snap = pool.protocol_metrics.snapshot()
        assert snap.timeouts_total == 2 and snap.in_flight_requests == 0


async def test_three_consecutive_errors_mark_connection_unhealthy(control: AgentProc) -> None:
    config = cfg(connections_per_agent=1, request_timeout=0.1, circuit_breaker=None)
    async with AgentPool(config) as pool:
        await pool.add_agent("c", control.endpoint)
        st = states(pool, "c")[0]
        for i in range(3):
            with pytest.raises(Timeout):
                await pool.send_request_headers("c", f"e{i}", hdrs(f"e{i}", actions="no-reply"))
        assert st.healthy is False and not pool.is_agent_healthy("c")
        with pytest.raises(ConnectionFailed, match="No healthy connections for agent c"):
            await pool.send_request_headers("c", "e4", hdrs("e4"))
        # maintenance probes it with a ping; the agent answers, so it is back on probation
        await pool.run_maintenance_once()
        assert st.healthy is True and pool.is_agent_healthy("c")
        r = await pool.send_request_headers("c", "e5", hdrs("e5"))
        assert isinstance(r.decision, Allow) and st.consecutive_errors == 0
        stats = await pool.agent_stats("c")
        assert stats is not None and stats.total_errors == 3 and stats.total_requests == 4
        assert stats.error_rate == 0.75
        assert pool.total_errors == 3
        assert pool.protocol_metrics.snapshot().in_flight_requests == 0


async def test_cancel_request(control: AgentProc) -> None:
    async with AgentPool(cfg(connections_per_agent=2)) as pool:
        await pool.add_agent("c", control.endpoint)
        slow = asyncio.ensure_future(pool.send_request_headers("c", "slow", hdrs("slow", delay=2)))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await pool.cancel_request("c", "slow")
        with pytest.raises(ConnectionClosed):
            await slow
        assert time.monotonic() - t0 < 1.0
        r = await pool.send_request_headers("c", "q", hdrs("q", actions="cancelled"))
        assert "slow:5" in r.routing_metadata.get("cancelled", "")
        assert all(st.in_flight == 0 for st in states(pool, "c"))
        assert pool.protocol_metrics.snapshot().in_flight_requests == 0


async def test_health_report_takes_effect(control: AgentProc) -> None:
    async with AgentPool(cfg(connections_per_agent=1)) as pool:
        await pool.add_agent("c", control.endpoint)
        await pool.send_request_headers("c", "h1", hdrs("h1", actions="health:4"))
        await _until(lambda: not pool.is_agent_healthy("c"))
        with pytest.raises(ConnectionFailed, match="No healthy connections"):
            await pool.send_request_headers("c", "h2", hdrs("h2"))
        await pool.run_maintenance_once()  # still reported unhealthy
        assert not pool.is_agent_healthy("c")
        assert (await pool.agent_stats("c")).is_healthy is False  # type: ignore[union-attr]


async def test_agent_metrics_and_config_requests_reach_the_pool(control: AgentProc) -> None:
    async with AgentPool(cfg(connections_per_agent=1)) as pool:
        await pool.add_agent("c", control.endpoint)
        r = await pool.send_request_headers("c", "m1", hdrs("m1", actions="metrics,config-update"))
        assert r.routing_metadata["config_update"].endswith(":True:None")
        await _until(lambda: pool.metrics_collector.series_count() >= 2)
        text = pool.export_prometheus()
        assert text.index("agent_protocol_requests_total") < text.index("agent_requests_total")
        # labelled with the id the pool knows the agent by, not the one in the report
        assert 'agent_requests_total{agent_id="c"} 7' in text
        assert pool.config_update_handler.pending_count() == 1
        collected = pool.agent_stats_sync()
        assert [s.agent_id for s in collected] == ["c"]


async def _until(pred: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- send path


async def test_send_methods_return_coroutines_that_clean_up_on_cancel(control: AgentProc) -> None:
    async with AgentPool(cfg(connections_per_agent=1)) as pool:
        await pool.add_agent("c", control.endpoint)
        coro = pool.send_request_headers("c", "k1", hdrs("k1"))
        assert asyncio.iscoroutine(coro)
        reply = await asyncio.wait_for(asyncio.create_task(coro), 10.0)
        assert isinstance(reply.decision, Allow)
        body_coro = pool.send_request_body_chunk("c", "k1", body("k1", last=True))
        assert asyncio.iscoroutine(body_coro)
        assert isinstance((await asyncio.wait_for(body_coro, 10.0)).decision, Allow)
        missing = pool.send_response_headers("ghost", "k1", ResponseHeadersEvent("k1", 200, {}))
        with pytest.raises(InvalidMessage, match="Agent ghost not found"):
            await missing  # raised when awaited, as with a coroutine function
        slow = asyncio.create_task(pool.send_request_headers("c", "k2", hdrs("k2", delay=2)))
        await asyncio.sleep(0.05)
        st = states(pool, "c")[0]
        assert st.in_flight == 1 and st.conn.in_flight == 1
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert st.in_flight == 0 and st.conn.in_flight == 0
        snap = pool.protocol_metrics.snapshot()
        assert snap.in_flight_requests == 0 and snap.requests_total == 2
        assert snap.responses_total == 1 and pool.total_errors == 0
