"""End-to-end HTTP benchmark and the in-process breakdown of one agent check.

``python benchmarks/bench_http.py`` runs ``python -m agentpool loadtest`` (its options pass
through). ``python benchmarks/bench_http.py --breakdown`` measures, in one process and one
connection to the ``bench`` example agent, where the time of one checked request goes: the bare
ASGI call, the pool round trip alone, and the middleware call (round trip + request to event +
decision applied), as medians over interleaved repetitions.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from agentpool import AgentPool, AgentPoolConfig, RequestHeadersEvent, RequestMetadata
from agentpool.asgi import AgentMiddleware
from agentpool.loadtest import _plain, _wait_path
from agentpool.loadtest import main as loadtest_main

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


async def _breakdown(sock: str, n: int, reps: int) -> None:
    mw = AgentMiddleware(
        _plain,
        agents={"bench": {"endpoint": f"unix:{sock}", "events": ["request_headers"]}},
        config=AgentPoolConfig(connections_per_agent=1),
    )
    await mw.glue.start()
    pool = AgentPool(AgentPoolConfig(connections_per_agent=1))
    await pool.start()
    await pool.add_agent("bench", f"unix:{sock}")

    async def bare() -> None:
        for _ in range(n):
            await _plain(dict(SCOPE), _receive, _send)

    async def roundtrip() -> None:
        for i in range(n):
            cid = f"c{i}"
            event = RequestHeadersEvent(
                RequestMetadata(cid, cid, "127.0.0.1", 50000), "GET", "/", {"host": ["x"]}
            )
            await pool.send_request_headers("bench", cid, event)
            pool.clear_correlation_affinity(cid)

    async def middleware() -> None:
        for _ in range(n):
            await mw(dict(SCOPE), _receive, _send)

    cases = {"bare ASGI call": bare, "pool round trip": roundtrip, "middleware call": middleware}
    results: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            await fn()
            results[name].append((time.perf_counter() - t0) / n * 1e6)
    for name, values in results.items():
        print(
            f"{name:<18} median {statistics.median(values):6.1f} µs/request"
            f"  (min {min(values):.1f}, max {max(values):.1f})"
        )
    added = [m - b for m, b in zip(results["middleware call"], results["bare ASGI call"])]
    glue = [m - r for m, r in zip(added, results["pool round trip"])]
    print(f"{'added by the check':<18} median {statistics.median(added):6.1f} µs")
    print(f"{'of which glue':<18} median {statistics.median(glue):6.1f} µs (added - round trip)")
    await mw.glue.shutdown()
    await pool.shutdown()


def breakdown(n: int = 5000, reps: int = 5) -> None:
    tmp = tempfile.mkdtemp()
    sock = os.path.join(tmp, "bench.sock")
    agent = subprocess.Popen(
        [sys.executable, "-m", "agentpool", "agent", "--example", "bench", "--socket", sock]
    )
    try:
        _wait_path(agent, sock)
        import uvloop

        uvloop.run(_breakdown(sock, n, reps))
    finally:
        agent.terminate()
        agent.wait(10)


if __name__ == "__main__":
    if "--breakdown" in sys.argv:
        breakdown()
    else:
        sys.exit(loadtest_main(sys.argv[1:]))
