"""Scenarios and the measurement loop: workers looping on a round trip, rates and CPU per
round trip of this process and of the serving process."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

KINDS = ("raw", "rawcodec", "pool", "batch", "fanout", "grpc")


@dataclass
class Scenario:
    """One measured configuration; ``rates`` holds one round-trips/s figure per repetition."""

    name: str
    kind: str
    encoding: str
    in_flight: int
    connections: int
    client: Any = None
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    server_cpu_us: list[float] = field(default_factory=list)
    frame_size: int | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.kind} {self.encoding} {self.in_flight}x{self.connections}"


async def measure(
    rt_factory: Callable[[int], Callable[[], Awaitable[None]]],
    in_flight: int,
    warmup: float,
    duration: float,
    server_cpu: Callable[[], float] = lambda: 0.0,
    per_rt: int = 1,
) -> tuple[float, float, float]:
    """Run ``in_flight`` workers looping on a round trip.

    Returns (round trips per second, client CPU µs per round trip, server CPU µs per round
    trip), counting ``per_rt`` round trips (events) per call of a worker's ``rt``. CPU
    time of this process and of the serving process (``server_cpu`` reads its CPU seconds)
    is far less sensitive to a busy machine than throughput.
    """
    done = [0]
    running = [True]

    async def worker(rt: Callable[[], Awaitable[None]]) -> None:
        while running[0]:
            await rt()
            done[0] += per_rt

    loop = asyncio.get_running_loop()
    tasks = [asyncio.create_task(worker(rt_factory(i))) for i in range(in_flight)]
    c0 = c1 = 0
    t0 = t1 = p0 = p1 = s0 = s1 = 0.0
    try:
        if await _sleep_watching(tasks, warmup):
            c0, t0, p0, s0 = done[0], loop.time(), time.process_time(), server_cpu()
            if await _sleep_watching(tasks, duration):
                c1, t1, p1, s1 = done[0], loop.time(), time.process_time(), server_cpu()
    finally:
        running[0] = False
        _, pending = await asyncio.wait(tasks, timeout=10.0)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    errors = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
    if errors:
        raise errors[0]  # type: ignore[misc]
    if pending:
        raise RuntimeError(f"{len(pending)} round trips did not finish within 10 s")
    if t1 <= t0:
        raise RuntimeError("a worker stopped early")
    n = max(c1 - c0, 1)
    return (c1 - c0) / (t1 - t0), (p1 - p0) * 1e6 / n, (s1 - s0) * 1e6 / n


def process_cpu_reader(pid: int) -> Callable[[], float]:
    """CPU seconds (user + system, all threads) of process ``pid`` from /proc; 0 if unreadable."""
    path = f"/proc/{pid}/stat"
    tick = float(os.sysconf("SC_CLK_TCK"))

    def read() -> float:
        try:
            with open(path, encoding="ascii") as fh:
                fields = fh.read().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            return 0.0

    return read


async def _sleep_watching(tasks: list[asyncio.Task[None]], seconds: float) -> bool:
    """Sleep ``seconds``; False as soon as any worker has stopped (it failed)."""
    if seconds <= 0:
        return not any(t.done() for t in tasks)
    _, pending = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    return len(pending) == len(tasks)


def build_scenarios(args: argparse.Namespace) -> list[Scenario]:
    out: list[Scenario] = []
    wide = args.in_flight

    def add(kind: str, encoding: str, in_flight: int, conns: int) -> None:
        out.append(
            Scenario(f"{kind}-{encoding}-{in_flight}x{conns}", kind, encoding, in_flight, conns)
        )

    add("raw", "json", 1, 1)
    add("raw", "json", wide, 1)
    add("raw", "json", wide, 4)
    add("rawcodec", "json", wide, 4)
    add("batch", "json", wide, 4)
    add("fanout", "json", wide, 4)
    for enc in ("json", "msgpack"):
        add("pool", enc, 1, 1)
        add("pool", enc, wide, 1)
        add("pool", enc, wide, 4)
    if not args.no_grpc:
        add("grpc", "json", 1, 1)
        add("grpc", "json", wide, 1)
        add("grpc", "json", wide, 4)
    if args.only:
        tokens = {t.strip() for t in args.only.split(",") if t.strip()}
        out = [s for s in out if s.kind in tokens or s.name in tokens]
    return out
