"""The verdict-integrity stress run: zero verdicts delivered to the wrong event.

Requests at concurrency 256, each a RequestHeaders event then one or two body chunks with the
same correlation id (as a proxy sends them), against an agent process
(tests/agents/integrity_agent.py) that answers each event at once, after a random delay (out of
order), after the request timeout, twice in one write, or never, at random. Every reply names
the event it answers.
The run asserts that no response reached the wrong event, that every in-flight gauge is back
to 0 and that RSS stayed flat after warm-up. docs/reliability.md has the full run's figures;
``AGENTPOOL_STRESS_REQUESTS`` sets the count (CI: 100,000 on the compiled core, fewer on the
pure-Python one).
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from functools import partial
from typing import Any

import pytest
from _helpers import hdrs, rss_bytes
from agents import StressAgentProc

from agentpool import AgentPool, AgentPoolConfig
from agentpool._impl import HAS_EXTENSIONS
from agentpool.errors import AgentProtocolError, ConnectionFailed
from agentpool.messages import RequestBodyChunkEvent

CONCURRENCY = 256
TIMEOUT = 0.25
DEFAULT_REQUESTS = 100_000 if HAS_EXTENSIONS else 20_000


def rss_mb() -> float:
    return rss_bytes() / 1e6


headers = partial(hdrs, method="POST", host="x")


async def run(pool: AgentPool, total: int, warm: int) -> dict[str, Any]:
    counts: dict[str, int] = {"ok": 0, "wrong": 0, "events": 0}
    wrong: list[tuple[str, str]] = []
    rss: dict[str, float] = {}
    next_id = 0

    def check(resp: Any, tag: str) -> None:
        counts["events"] += 1
        got = resp.routing_metadata.get("ev")
        if got != tag:
            counts["wrong"] += 1
            wrong.append((tag, str(got)))

    def failed(exc: BaseException) -> None:
        name = type(exc).__name__
        counts[name] = counts.get(name, 0) + 1

    async def one(i: int) -> None:
        cid = f"r{i}"
        j = -1
        try:
            check(await pool.send_request_headers("s", cid, headers(cid)), f"16:{cid}:")
            for j in range(1 + i % 2):
                chunk = RequestBodyChunkEvent(cid, b"k=v", is_last=j == i % 2, chunk_index=j)
                check(await pool.send_request_body_chunk("s", cid, chunk), f"17:{cid}:{j}")
            counts["ok"] += 1
        except AgentProtocolError as exc:
            failed(exc)
            if isinstance(exc, ConnectionFailed):  # all connections unhealthy: let them recover
                await asyncio.sleep(0.01)
            elif i % 3 == 0:
                # a proxy that keeps going after a timeout: the next chunk is refused while
                # the late reply is owed, or gets its own verdict
                chunk = RequestBodyChunkEvent(cid, b"k=v", is_last=True, chunk_index=j + 1)
                try:
                    check(await pool.send_request_body_chunk("s", cid, chunk), f"17:{cid}:{j + 1}")
                except AgentProtocolError as again:
                    failed(again)
        finally:
            pool.clear_correlation_affinity(cid)

    async def worker() -> None:
        nonlocal next_id
        while next_id < total:
            i = next_id
            next_id += 1
            if i == warm:
                gc.collect()
                rss["warm"] = rss_mb()
            await one(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    counts["seconds"] = round(time.perf_counter() - t0, 1)  # type: ignore[assignment]
    gc.collect()
    rss["end"] = rss_mb()
    return {"counts": counts, "wrong": wrong[:10], "rss": rss}


@pytest.mark.slow
async def test_no_verdict_reaches_the_wrong_event_under_misbehaviour() -> None:
    total = int(os.environ.get("AGENTPOOL_STRESS_REQUESTS", DEFAULT_REQUESTS))
    config = AgentPoolConfig(
        connections_per_agent=4,
        request_timeout=TIMEOUT,
        connect_timeout=2.0,
        reconnect_interval=0.05,
        health_check_interval=0.05,
        circuit_breaker=None,
        keepalive=False,
        max_abandoned_replies=200,  # so the never-answered replies recycle connections
    )
    with StressAgentProc(late=TIMEOUT * 1.2, seed=total) as agent:
        async with AgentPool(config) as pool:
            await pool.add_agent("s", agent.endpoint)
            result = await run(pool, total, warm=total // 5)
            counts, rss = result["counts"], result["rss"]
            print(f"\nstress: {total} requests: {counts} rss {rss}")
            assert counts["wrong"] == 0, result["wrong"]
            assert counts["ok"] > total // 2  # most requests went through
            assert counts.get("Timeout", 0) > 0  # the late and silent replies happened
            # every in-flight gauge back to 0
            assert pool.protocol_metrics.in_flight_requests == 0
            stats = await pool.agent_stats("s")
            assert stats is not None and stats.total_in_flight == 0
            for st in pool._agents["s"].conns:
                assert st.in_flight == 0 and st.conn.in_flight == 0
            assert pool.correlation_affinity_count() == 0
            assert rss["end"] - rss["warm"] < 16.0, rss
