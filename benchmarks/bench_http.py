"""End-to-end HTTP benchmark and the in-process breakdown of one agent check.

``python benchmarks/bench_http.py`` runs ``python -m agentpool loadtest`` (its options pass
through). ``python benchmarks/bench_http.py --breakdown`` measures, in one process and one
connection to the ``bench`` example agent, where the time of one checked request goes: the bare
ASGI call, the pool round trip alone, and the middleware call (round trip + request to event +
decision applied), as medians over interleaved repetitions. ``--glue [bare|middleware] [N]``
runs the middleware with the pool's replies given at once in process (the glue alone).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from agentpool import AgentPool, AgentPoolConfig, RequestHeadersEvent, RequestMetadata
from agentpool._bench.loadtest import _plain, _wait_path
from agentpool.asgi import AgentMiddleware
from agentpool.cli import main as cli_main

HEADERS = [
    (b"host", b"127.0.0.1:8000"),
    (b"user-agent", b"wrk"),
    (b"accept", b"*/*"),
]
SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "query_string": b"",
    "headers": HEADERS,
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Any) -> None:
    return None


async def _breakdown(sock: str, n: int, reps: int, concurrency: int) -> None:
    mw = AgentMiddleware(
        _plain,
        agents={"bench": {"endpoint": f"unix:{sock}", "events": ["request_headers"]}},
        config=AgentPoolConfig(connections_per_agent=1),
    )
    await mw.glue.start()
    pool = AgentPool(AgentPoolConfig(connections_per_agent=1))
    await pool.start()
    await pool.add_agent("bench", f"unix:{sock}")

    per = n // concurrency

    async def fan(fn: Any) -> None:
        await asyncio.gather(*(fn(k) for k in range(concurrency)))

    async def bare_one(k: int) -> None:
        for _ in range(per):
            await _plain(dict(SCOPE), _receive, _send)

    async def roundtrip_one(k: int) -> None:
        for i in range(per):
            cid = f"c{k}-{i}"
            event = RequestHeadersEvent(
                RequestMetadata(cid, cid, "127.0.0.1", 50000), "GET", "/", {"host": ["x"]}
            )
            await pool.send_request_headers("bench", cid, event)
            pool.clear_correlation_affinity(cid)

    async def middleware_one(k: int) -> None:
        for _ in range(per):
            await mw(dict(SCOPE), _receive, _send)

    cases = {
        "bare ASGI call": bare_one,
        "pool round trip": roundtrip_one,
        "middleware call": middleware_one,
    }
    results: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            c0 = time.process_time()
            await fan(fn)
            results[name].append((time.perf_counter() - t0) / (per * concurrency) * 1e6)
            cpu[name].append((time.process_time() - c0) / (per * concurrency) * 1e6)
    for name, values in results.items():
        print(
            f"{name:<18} wall {statistics.median(values):6.1f} µs/request"
            f" ({min(values):.1f}-{max(values):.1f}),"
            f" CPU {statistics.median(cpu[name]):6.1f} µs/request"
            f" ({min(cpu[name]):.1f}-{max(cpu[name]):.1f})"
        )
    for what, data in (("wall", results), ("CPU", cpu)):
        added = [m - b for m, b in zip(data["middleware call"], data["bare ASGI call"])]
        glue = [m - r for m, r in zip(added, data["pool round trip"])]
        print(
            f"{what}: added by the check {statistics.median(added):.1f} µs,"
            f" of which glue (added - round trip) {statistics.median(glue):.1f} µs"
        )
    await mw.glue.shutdown()
    await pool.shutdown()


def breakdown(n: int = 6400, reps: int = 5, concurrency: int = 1) -> None:
    tmp = tempfile.mkdtemp()
    sock = os.path.join(tmp, "bench.sock")
    agent = subprocess.Popen(
        [sys.executable, "-m", "agentpool", "agent", "--example", "bench", "--socket", sock]
    )
    try:
        _wait_path(agent, sock)
        import uvloop

        print(f"-- {concurrency} concurrent caller(s), one connection to the bench agent")
        uvloop.run(_breakdown(sock, n, reps, concurrency))
    finally:
        agent.terminate()
        agent.wait(10)


async def _glue(n: int, mode: str) -> None:
    """The middleware with the pool's sends answered at once in process: what is left is the
    glue alone (scope to event, correlation id, decision applied, finish)."""
    from agentpool.enums import EventType
    from agentpool.messages import AgentCapabilities, AgentResponse

    allow = AgentResponse()
    mw = AgentMiddleware(_plain, agents={"bench": "unix:/nonexistent"})
    pool: Any = mw.glue.pool
    caps = AgentCapabilities("bench", "bench", "1", [EventType.REQUEST_HEADERS])

    async def send_request_headers(agent: str, cid: str, event: Any) -> AgentResponse:
        return allow

    pool.send_request_headers = send_request_headers
    pool.clear_correlation_affinity = lambda cid: None
    pool.agent_capabilities_sync = lambda name: caps
    mw.glue._started = True
    app: Any = _plain if mode == "bare" else mw
    c0 = time.process_time()
    for _ in range(n):
        await app(dict(SCOPE), _receive, _send)
    print(f"{mode}: CPU {(time.process_time() - c0) / n * 1e6:.2f} µs/request")


if __name__ == "__main__":
    if "--glue" in sys.argv:
        # --glue [bare|middleware] [N]: under `valgrind --tool=callgrind` the difference of the
        # two modes' instruction counts divided by N is the glue's instructions per request
        args = sys.argv[sys.argv.index("--glue") + 1 :]
        modes = [args[0]] if args else ["bare", "middleware"]
        for mode in modes:
            asyncio.run(_glue(int(args[1]) if len(args) > 1 else 50000, mode))
    elif "--breakdown" in sys.argv:
        breakdown(concurrency=1)
        breakdown(concurrency=32)
    else:
        sys.exit(cli_main(["loadtest", *sys.argv[1:]]))
