"""Endpoint sets: how long ``set_endpoints`` holds the event loop, and memory per endpoint.

One agent process (the ``echo`` example on a Unix socket) and 100 symlinks to its socket make
100 distinct endpoints. For each repetition a fresh pool adds the agent with one endpoint,
then ``set_endpoints`` grows it to 100 and shrinks it to 50; a ticker task measures the
longest gap between two turns of the loop during each reconcile, in wall-clock time and in
the thread's CPU time (the loop's own work, without preemption by other processes).
Memory: tracemalloc, the Python heap per endpoint record alone, and the growth of the pool
per endpoint added with its breaker and one live connection (``connections_per_agent=1``)::

    python benchmarks/bench_endpoints.py [--loop uvloop] [--reps 5]

Figures: docs/performance.md, "Endpoint sets".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable

from agentpool._bench.process import Processes
from agentpool.config import AgentPoolConfig
from agentpool.endpoints import EndpointRecord
from agentpool.framing import HAS_EXTENSIONS
from agentpool.pool import AgentPool


async def longest_turn(action: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """Longest gap between two turns of a ticker task during ``action``: wall clock, and
    the thread's CPU time (what the loop itself spent, without the machine's preemption)."""
    worst = [0.0, 0.0]
    stop = False

    async def ticker() -> None:
        last = time.perf_counter(), time.thread_time()
        while not stop:
            await asyncio.sleep(0)
            now = time.perf_counter(), time.thread_time()
            worst[0] = max(worst[0], now[0] - last[0])
            worst[1] = max(worst[1], now[1] - last[1])
            last = now

    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.005)
    worst[:] = [0.0, 0.0]
    await action()
    stop = True
    await tick
    return worst[0], worst[1]


async def wait_drained(pool: AgentPool, count: int) -> None:
    for _ in range(2000):
        if len(pool.endpoint_stats("w")) == count:
            return
        await asyncio.sleep(0.005)
    raise RuntimeError("the removed endpoints were not closed in 10 s")


async def run(endpoints: list[str], reps: int) -> None:
    config = AgentPoolConfig(connections_per_agent=1, health_check_interval=60.0)
    adds: list[tuple[float, float]] = []
    removes: list[tuple[float, float]] = []
    for _ in range(reps):
        async with AgentPool(config) as pool:
            await pool.add_agent("w", endpoints[0])
            adds.append(await longest_turn(lambda: pool.set_endpoints("w", endpoints)))

            async def shrink() -> None:
                await pool.set_endpoints("w", endpoints[:50])
                await wait_drained(pool, 50)

            removes.append(await longest_turn(shrink))
    for name, pairs in (("add 99 (1 -> 100)", adds), ("remove 50 (100 -> 50)", removes)):
        for kind, xs in (("wall", [p[0] for p in pairs]), ("cpu ", [p[1] for p in pairs])):
            print(
                f"{name:22s} longest loop turn, {kind}: median "
                f"{statistics.median(xs) * 1e3:.2f} ms (min {min(xs) * 1e3:.2f}, "
                f"max {max(xs) * 1e3:.2f})"
            )
    # memory per endpoint: a record alone, and an endpoint with its one live connection
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    records = [EndpointRecord(e, None) for e in endpoints]
    after = tracemalloc.take_snapshot()
    rec = sum(s.size_diff for s in after.compare_to(before, "filename")) / len(records)
    async with AgentPool(config) as pool:
        await pool.add_agent("w", endpoints[0])
        before = tracemalloc.take_snapshot()
        await pool.set_endpoints("w", endpoints)
        after = tracemalloc.take_snapshot()
        per = sum(s.size_diff for s in after.compare_to(before, "filename")) / 99
    tracemalloc.stop()
    print(f"memory per endpoint: {rec:.0f} B record (no breaker), {per / 1024:.1f} KiB with")
    print("  its breaker and one live connection (connections_per_agent=1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="ap-", dir="/tmp")
    sock = os.path.join(tmp, "a.sock")
    procs = Processes()
    try:
        argv = [sys.executable, "-m", "agentpool", "agent", "--example", "echo", "--socket", sock]
        procs.start_listening(argv, "echo agent")
        endpoints = []
        for i in range(100):
            link = os.path.join(tmp, f"{i}.sock")
            os.symlink(sock, link)
            endpoints.append(f"unix:{link}")
        print(f"core: {'compiled' if HAS_EXTENSIONS else 'pure-Python'}, loop: {args.loop}")
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(run(endpoints, args.reps))
        else:
            asyncio.run(run(endpoints, args.reps))
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
