"""``agentpool bench --memory N``: the pool's own memory per request in flight."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from ..config import AgentPoolConfig
from ..pool import AgentPool
from .agent import run_loop
from .process import Processes
from .workload import AGENT_ID, cid_str, make_event


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def _memory_in_flight(path: str, n: int, connections: int) -> dict[str, Any]:
    """tracemalloc/RSS growth of the pool with ``n`` requests outstanding at a silent agent.

    The same number of tasks awaiting a bare Future is measured first and subtracted, so the
    figure is the pool's own overhead per request (waiter, affinity entry, metrics, buffered
    frame), not the caller's tasks.
    """
    import gc
    import tracemalloc

    loop = asyncio.get_running_loop()

    def rss() -> int:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    async def settle() -> None:
        for _ in range(5):
            await asyncio.sleep(0.05)
        gc.collect()

    async def sized(
        start: Callable[[], list[asyncio.Task[Any]]], ready: Callable[[], bool]
    ) -> tuple[int, int]:
        await settle()
        m0, r0 = tracemalloc.get_traced_memory()[0], rss()
        tasks = start()
        deadline = loop.time() + 60.0
        while not ready():
            if loop.time() > deadline:
                raise RuntimeError("requests did not all get in flight within 60 s")
            await asyncio.sleep(0.05)
        await settle()
        m1, r1 = tracemalloc.get_traced_memory()[0], rss()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return m1 - m0, r1 - r0

    config = AgentPoolConfig(
        connections_per_agent=connections,
        max_concurrent_per_connection=n,
        request_timeout=600.0,
    )
    pool = AgentPool(config)
    await pool.add_agent(AGENT_ID, f"unix:{path}")
    event = make_event()
    tracemalloc.start()
    try:
        futures: list[asyncio.Future[None]] = []

        def start_bare() -> list[asyncio.Task[Any]]:
            async def wait_bare(fut: asyncio.Future[None]) -> None:
                await fut

            futures[:] = [loop.create_future() for _ in range(n)]
            return [asyncio.create_task(wait_bare(f)) for f in futures]

        bare_mem, bare_rss = await sized(start_bare, lambda: True)
        futures.clear()

        def start_pool() -> list[asyncio.Task[Any]]:
            send = pool.send_request_headers
            return [asyncio.create_task(send(AGENT_ID, cid_str(i), event)) for i in range(n)]

        def all_in_flight() -> bool:
            return int(pool.protocol_metrics.in_flight_requests) >= n

        pool_mem, pool_rss = await sized(start_pool, all_in_flight)
    finally:
        tracemalloc.stop()
        await asyncio.wait_for(pool.shutdown(), 30.0)
    return {
        "requests_in_flight": n,
        "connections": connections,
        "tracemalloc_bytes_pool_plus_tasks": pool_mem,
        "tracemalloc_bytes_bare_tasks": bare_mem,
        "tracemalloc_bytes_pool_overhead": pool_mem - bare_mem,
        "bytes_per_request": (pool_mem - bare_mem) / n,
        "rss_bytes_pool_plus_tasks": pool_rss,
        "rss_bytes_bare_tasks": bare_rss,
    }


def run_memory(args: argparse.Namespace) -> int:
    tmp = tempfile.mkdtemp(prefix="apbench-", dir="/tmp")
    path = os.path.join(tmp, "agent.sock")
    procs = Processes()
    try:
        argv = [sys.executable, "-m", "agentpool", "bench", "--serve-agent", path, "--hold"]
        procs.start(argv, path, "holding agent")
        _progress(f"bench: {args.memory} requests in flight against a silent agent")
        result = run_loop(_memory_in_flight(path, args.memory, 4))
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    mib = 1024 * 1024
    print(
        f"{result['requests_in_flight']} requests in flight over {result['connections']} "
        f"connections: pool overhead {result['tracemalloc_bytes_pool_overhead'] / mib:.2f} MiB "
        f"({result['bytes_per_request']:.0f} B/request; tracemalloc, pool+tasks "
        f"{result['tracemalloc_bytes_pool_plus_tasks'] / mib:.2f} MiB minus bare tasks "
        f"{result['tracemalloc_bytes_bare_tasks'] / mib:.2f} MiB); RSS growth pool+tasks "
        f"{result['rss_bytes_pool_plus_tasks'] / mib:.2f} MiB, bare tasks "
        f"{result['rss_bytes_bare_tasks'] / mib:.2f} MiB"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"memory": result}, fh, indent=2)
    return 0
