"""AgentPool.fan_out and send_batch: many requests, one await, each verdict to its own event."""

from __future__ import annotations

import asyncio

import pytest
from _helpers import hdrs, pool_config
from agents import AgentProc

from agentpool import AgentNotFound, ConnectionClosed, DuplicateCorrelationId, Timeout
from agentpool.messages import (
    Allow,
    Block,
    RequestBodyChunkEvent,
)
from agentpool.pool import AgentPool

cfg = pool_config(request_timeout=5.0)


def settled(pool: AgentPool) -> None:
    snap = pool.protocol_metrics.snapshot()
    assert snap.in_flight_requests == 0
    for entry in pool._agents.values():
        assert [st.in_flight for st in entry.conns] == [0] * len(list(entry.conns))


async def test_fan_out_results_per_agent(waf: AgentProc, control: AgentProc) -> None:
    async with AgentPool(cfg()) as pool:
        await pool.add_agent("waf", waf.endpoint)
        await pool.add_agent("control", control.endpoint)
        out = await pool.fan_out(["waf", "control", "nope"], "f1", hdrs("f1", "/admin/x"))
        assert list(out) == ["waf", "control", "nope"]
        waf_r, control_r, missing = out["waf"], out["control"], out["nope"]
        assert not isinstance(waf_r, Exception) and isinstance(waf_r.decision, Block)
        assert not isinstance(control_r, Exception) and isinstance(control_r.decision, Allow)
        assert control_r.routing_metadata["cid"] == "f1"
        assert isinstance(missing, AgentNotFound)
        # the affinity is stored with each agent: a body chunk follows the headers
        chunk = RequestBodyChunkEvent(correlation_id="f1", data=b"x", is_last=True)
        out2 = await pool.fan_out(["waf", "control"], "f1", chunk)
        assert all(not isinstance(r, Exception) for r in out2.values())
        snap = pool.protocol_metrics.snapshot()
        assert (snap.requests_total, snap.responses_total) == (2, 2)
        assert snap.request_duration.count == 2
        pool.clear_correlation_affinity("f1")
        assert pool.correlation_affinity_count() == 0
        settled(pool)


async def test_batch_each_verdict_answers_its_own_event(waf: AgentProc) -> None:
    async with AgentPool(cfg()) as pool:
        await pool.add_agent("waf", waf.endpoint)
        uris = ["/admin/y" if i % 3 == 0 else f"/p{i}" for i in range(60)]
        items = [(f"b{i}", hdrs(f"b{i}", uris[i])) for i in range(60)]
        results = await pool.send_batch("waf", items)
        assert len(results) == 60
        for i, r in enumerate(results):
            assert not isinstance(r, Exception), r
            assert isinstance(r.decision, Block) == (i % 3 == 0), i
        snap = pool.protocol_metrics.snapshot()
        assert (snap.requests_total, snap.responses_total) == (60, 60)
        settled(pool)


async def test_batch_over_the_slot_limit_waits_for_slots(control: AgentProc) -> None:
    async with AgentPool(cfg(max_concurrent_per_connection=2, connections_per_agent=1)) as pool:
        await pool.add_agent("c", control.endpoint)
        items = [(f"s{i}", hdrs(f"s{i}", delay=0.01)) for i in range(9)]
        results = await pool.send_batch("c", items)
        for i, r in enumerate(results):
            assert not isinstance(r, Exception), r
            assert r.routing_metadata["cid"] == f"s{i}"
        snap = pool.protocol_metrics.snapshot()
        assert (snap.requests_total, snap.responses_total) == (9, 9)
        settled(pool)


async def test_batch_one_failure_does_not_raise_for_the_others(control: AgentProc) -> None:
    async with AgentPool(cfg(request_timeout=0.3)) as pool:
        await pool.add_agent("c", control.endpoint)
        items = [
            ("t0", hdrs("t0")),
            ("t1", hdrs("t1", delay=3.0)),
            ("t2", hdrs("t2")),
            ("t2", hdrs("t2")),  # the same id again while t2 is in flight: refused
        ]
        results = await pool.send_batch("c", items)
        assert not isinstance(results[0], Exception)
        assert results[0].routing_metadata["cid"] == "t0"
        assert isinstance(results[1], Timeout)
        assert not isinstance(results[2], Exception)
        assert results[2].routing_metadata["cid"] == "t2"
        assert isinstance(results[3], DuplicateCorrelationId)
        snap = pool.protocol_metrics.snapshot()
        assert snap.timeouts_total == 1 and snap.responses_total == 2
        assert pool.total_errors == 1
        settled(pool)


async def test_cancelled_batch_abandons_its_requests(control: AgentProc) -> None:
    async with AgentPool(cfg()) as pool:
        await pool.add_agent("c", control.endpoint)
        items = [(f"x{i}", hdrs(f"x{i}", delay=2.0)) for i in range(5)]
        task = asyncio.ensure_future(pool.send_batch("c", items))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        settled(pool)
        abandoned = sum(st.conn.protocol_core.abandoned_pending for st in pool._agents["c"].conns)
        assert abandoned == 5
        # a fresh request still gets its own verdict
        r = await pool.send_request_headers("c", "after", hdrs("after"))
        assert r.routing_metadata["cid"] == "after"


async def test_not_an_event_is_refused_before_anything_is_sent(waf: AgentProc) -> None:
    async with AgentPool(cfg()) as pool:
        await pool.add_agent("waf", waf.endpoint)
        with pytest.raises(TypeError, match="not an event"):
            await pool.send_batch("waf", [("z", object())])  # type: ignore[list-item]
        settled(pool)


async def test_batch_fails_fast_when_the_connection_closes(control: AgentProc) -> None:
    async with AgentPool(cfg(connections_per_agent=1)) as pool:
        await pool.add_agent("c", control.endpoint)
        items = [(f"k{i}", hdrs(f"k{i}", delay=30.0)) for i in range(4)]
        task = asyncio.ensure_future(pool.send_batch("c", items))
        await asyncio.sleep(0.2)
        st = next(iter(pool._agents["c"].conns))
        st.conn.protocol_core.abort()
        results = await asyncio.wait_for(task, 5.0)
        assert all(isinstance(r, ConnectionClosed) for r in results), results
        assert pool.protocol_metrics.snapshot().connection_errors_total == 4
        settled(pool)
