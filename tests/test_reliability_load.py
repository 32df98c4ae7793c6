"""Bounded load with agent restarts (issue 7): nothing lost, recovery without help, flat RSS.

200,000 requests (compiled core; 50,000 with ``AGENTPOOL_NO_EXTENSIONS=1``; override with
``AGENTPOOL_LOAD_REQUESTS``) at concurrency 256 across three ``bench`` example agents with four
connections each. One agent is SIGKILLed and restarted twice during the run. Every request must
end in a decision or a typed :class:`AgentProtocolError` (0 unaccounted, nothing else raised),
the pool must serve the restarted agent again through its own maintenance loop, and the
process RSS at the end must be within 10 % of the RSS after warm-up. The run is bounded in
count and in time (``RUN_LIMIT``); figures are printed for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import time
from typing import Any

import pytest
from _helpers import hdrs, rss_bytes
from agents import AgentProc, aspawn_agent

from agentpool import AgentProtocolError, CircuitBreakerOpen
from agentpool.config import AgentPoolConfig
from agentpool.framing import HAS_EXTENSIONS
from agentpool.messages import RequestHeadersEvent
from agentpool.pool import AgentPool

REQUESTS = int(os.environ.get("AGENTPOOL_LOAD_REQUESTS", 200_000 if HAS_EXTENSIONS else 50_000))
CONCURRENCY = 256
AGENTS = 3
CONNECTIONS = 4
WARMUP_FRACTION = 0.15
KILL_AT = (0.35, 0.65)  # fractions of REQUESTS at which agent "a0" is killed and restarted
DOWN_TIME = 0.3
RUN_LIMIT = 110.0
RECOVERY_LIMIT = 5.0


def make_event(cid: str) -> RequestHeadersEvent:
    return hdrs(
        cid,
        "/api/items?page=2",
        host="example.com",
        headers={"user-agent": ["load/1"], "accept": ["*/*"]},
        client_ip="10.0.0.1",
        client_port=40000,
    )


class Run:
    """Counters shared by the workers (single event loop, no locking needed)."""

    def __init__(self) -> None:
        self.issued = 0
        self.ok = 0
        self.ok_by_agent: collections.Counter[str] = collections.Counter()
        self.typed: collections.Counter[str] = collections.Counter()
        self.unexpected: list[BaseException] = []
        self.warm_rss = 0
        self.warm_done = asyncio.Event()
        self.kill_marks = [int(REQUESTS * f) for f in KILL_AT]
        self.kill_signal = [asyncio.Event() for _ in KILL_AT]
        self.recovery: list[float] = []
        self.mismatched = 0
        self.probes_counted = 0
        self.probes_ok = 0


async def worker(pool: AgentPool, run: Run) -> None:
    while run.issued < REQUESTS:
        i = run.issued
        run.issued += 1
        if i == int(REQUESTS * WARMUP_FRACTION):
            run.warm_done.set()
        for n, mark in enumerate(run.kill_marks):
            if i == mark:
                run.kill_signal[n].set()
        agent_id = f"a{i % AGENTS}"
        cid = f"L{i}"
        try:
            response = await pool.send_request_headers(agent_id, cid, make_event(cid))
        except AgentProtocolError as exc:
            run.typed[type(exc).__name__] += 1
        except Exception as exc:  # anything untyped is a finding
            run.unexpected.append(exc)
        else:
            run.ok += 1
            run.ok_by_agent[agent_id] += 1
            if response.audit.custom.get("correlation_id") != cid:
                run.mismatched += 1
        finally:
            pool.clear_correlation_affinity(cid)


async def killer(pool: AgentPool, victim: AgentProc, run: Run) -> None:
    """Kill and restart ``a0`` at each mark; time until the pool serves it again unaided.

    Recovery is seen in the load itself, or, when the bounded run ends first, by probe
    requests sent after it (not counted in REQUESTS).
    """
    for event in run.kill_signal:
        await event.wait()
        victim.kill()
        await asyncio.sleep(DOWN_TIME)
        await victim.arestart()
        restarted = time.monotonic()
        before = run.ok_by_agent["a0"]
        probe = 0
        while run.ok_by_agent["a0"] == before:
            if time.monotonic() - restarted > RECOVERY_LIMIT:
                run.recovery.append(float("inf"))
                break
            if run.issued >= REQUESTS:
                probe += 1
                cid = f"probe-{probe}"
                try:
                    await pool.send_request_headers("a0", cid, make_event(cid))
                except CircuitBreakerOpen:
                    pass  # refused before the protocol counters
                except AgentProtocolError:
                    run.probes_counted += 1
                else:
                    run.probes_counted += 1
                    run.probes_ok += 1
                    run.recovery.append(time.monotonic() - restarted)
                    break
                finally:
                    pool.clear_correlation_affinity(cid)
            await asyncio.sleep(0.005)
        else:
            run.recovery.append(time.monotonic() - restarted)


@pytest.mark.slow
async def test_bounded_load_with_agent_restarts() -> None:
    config = AgentPoolConfig(
        connections_per_agent=CONNECTIONS,
        request_timeout=2.0,
        connect_timeout=2.0,
        health_check_interval=0.1,
        reconnect_interval=0.05,
        max_reconnect_backoff=0.5,
        drain_timeout=2.0,
    )
    run = Run()
    loop_errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
    async with (
        aspawn_agent("bench") as a0,
        aspawn_agent("bench") as a1,
        aspawn_agent("bench") as a2,
    ):
        before_tasks = asyncio.all_tasks()
        pool = AgentPool(config)
        await pool.start()
        for n, agent in enumerate((a0, a1, a2)):
            await pool.add_agent(f"a{n}", agent.endpoint)
        started = time.monotonic()
        workers = [asyncio.ensure_future(worker(pool, run)) for _ in range(CONCURRENCY)]
        kill_task = asyncio.ensure_future(killer(pool, a0, run))

        async def sample_warm_rss() -> None:
            await run.warm_done.wait()
            gc.collect()
            run.warm_rss = rss_bytes()

        warm_task = asyncio.ensure_future(sample_warm_rss())
        try:
            async with asyncio.timeout(RUN_LIMIT):
                await asyncio.gather(*workers)
                await kill_task
                await warm_task
        finally:
            for t in (*workers, kill_task, warm_task):
                t.cancel()
        elapsed = time.monotonic() - started
        gc.collect()
        end_rss = rss_bytes()
        snap = pool.protocol_metrics.snapshot()
        stats = {s.agent_id: s for s in pool.agent_stats_sync()}
        await asyncio.wait_for(pool.shutdown(), 10.0)
        left = {t for t in asyncio.all_tasks() - before_tasks if not t.done()}
        left.discard(asyncio.current_task())  # type: ignore[arg-type]

    accounted = run.ok + sum(run.typed.values()) + len(run.unexpected)
    report: dict[str, Any] = {
        "core": "compiled" if HAS_EXTENSIONS else "pure-Python",
        "requests": REQUESTS,
        "elapsed_s": round(elapsed, 2),
        "req_per_s": round(REQUESTS / elapsed),
        "ok": run.ok,
        "typed_errors": dict(run.typed),
        "unexpected": len(run.unexpected),
        "unaccounted": REQUESTS - accounted,
        "recovery_s": [round(r, 3) for r in run.recovery],
        "probes": run.probes_counted,
        "warm_rss_mb": round(run.warm_rss / 2**20, 1),
        "end_rss_mb": round(end_rss / 2**20, 1),
        "rss_growth_pct": round(100 * (end_rss - run.warm_rss) / run.warm_rss, 2),
        "ok_by_agent": dict(run.ok_by_agent),
        "a0_connections": (stats["a0"].active_connections, stats["a0"].healthy_connections),
    }
    loop.set_exception_handler(None)
    print("\nLOAD", report)
    assert loop_errors == [], loop_errors[:5]
    assert run.unexpected == [], run.unexpected[:5]
    assert REQUESTS - accounted == 0
    assert run.mismatched == 0
    assert snap.in_flight_requests == 0
    # calls refused by the open circuit breaker never reach the protocol counters
    expected_requests = REQUESTS - run.typed["CircuitBreakerOpen"] + run.probes_counted
    assert snap.requests_total == expected_requests
    assert snap.responses_total == run.ok + run.probes_ok
    assert len(run.recovery) == len(KILL_AT)
    assert all(r < RECOVERY_LIMIT for r in run.recovery), run.recovery
    assert stats["a0"].healthy_connections == CONNECTIONS, stats["a0"]
    # the kill may cost requests of a0 only; a1 and a2 never fail
    assert run.ok_by_agent["a1"] == len(range(1, REQUESTS, AGENTS))
    assert run.ok_by_agent["a2"] == len(range(2, REQUESTS, AGENTS))
    assert end_rss <= run.warm_rss * 1.10, report
    assert not left, left
