"""TLS vs plaintext TCP: client CPU per round trip through the pool at 64 in flight.

Two agent processes (``python -m agentpool agent --example bench``, uvloop) on loopback TCP,
one plaintext and one with mutual TLS (certificates made now with trustme in a temporary
directory). One client process (uvloop) runs a pool against each, interleaved per
repetition, and reports client CPU µs per round trip and the per-repetition TLS/plain ratio
as median (min-max). Run: ``python benchmarks/bench_tls.py [--reps 5] [--duration 1]``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from agentpool import tls
from agentpool._bench.process import Processes
from agentpool._bench.scenarios import measure, process_cpu_reader
from agentpool._bench.workload import make_event
from agentpool.config import AgentPoolConfig
from agentpool.framing import HAS_EXTENSIONS
from agentpool.pool import AgentPool


def start_agent(procs: Processes, extra: list[str]) -> tuple[int, str]:
    argv = [sys.executable, "-m", "agentpool", "agent", "--example", "bench"]
    argv += ["--tcp", "127.0.0.1:0", "--loop", "uvloop", *extra]
    pid, (endpoint,) = procs.start_listening(argv, "bench agent")
    return pid, endpoint


async def run(args: argparse.Namespace, plain_ep: str, tls_ep: str, ctx: Any, pids: Any) -> None:
    config = AgentPoolConfig(connections_per_agent=args.connections)
    pools = {}
    for name, ep, ssl_ctx in (("tcp", plain_ep, None), ("tls", tls_ep, ctx)):
        pool = AgentPool(config)
        await pool.add_agent("bench", ep, ssl=ssl_ctx)
        pools[name] = pool
    ids = itertools.count()
    event = make_event()

    def factory(pool: AgentPool) -> Any:
        def make(_worker: int) -> Any:
            async def rt() -> None:
                cid = f"{next(ids):032x}"
                await pool.send_request_headers("bench", cid, event)
                pool.clear_correlation_affinity(cid)

            return rt

        return make

    results: dict[str, list[tuple[float, float, float]]] = {"tcp": [], "tls": []}
    for rep in range(args.reps):
        order = ["tcp", "tls"] if rep % 2 == 0 else ["tls", "tcp"]
        for name in order:
            r = await measure(
                factory(pools[name]),
                args.in_flight,
                args.warmup,
                args.duration,
                process_cpu_reader(pids[name]),
            )
            results[name].append(r)
    for pool in pools.values():
        await pool.shutdown()

    print(
        f"compiled core: {HAS_EXTENSIONS}, {args.reps} x {args.duration} s, "
        f"{args.in_flight} in flight, {args.connections} connection(s), JSON, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        "| transport | round trips/s median (min-max) | client CPU µs/rt median (min-max) "
        "| agent CPU µs/rt median |"
    )
    print("|---|---:|---:|---:|")
    for name in ("tcp", "tls"):
        rts = [r[0] for r in results[name]]
        cpu = [r[1] for r in results[name]]
        srv = [r[2] for r in results[name]]
        print(
            f"| {name} | {statistics.median(rts):,.0f} ({min(rts):,.0f}-{max(rts):,.0f}) "
            f"| {statistics.median(cpu):.1f} ({min(cpu):.1f}-{max(cpu):.1f}) "
            f"| {statistics.median(srv):.1f} |"
        )
    ratios = [t[1] / p[1] for p, t in zip(results["tcp"], results["tls"])]
    print(
        f"\nTLS / plaintext client CPU per round trip: {statistics.median(ratios):.2f}x "
        f"({min(ratios):.2f}-{max(ratios):.2f}), per repetition"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--duration", type=float, default=1.0)
    p.add_argument("--warmup", type=float, default=0.25)
    p.add_argument("--in-flight", type=int, default=64)
    p.add_argument("--connections", type=int, default=1)
    args = p.parse_args()

    import trustme
    import uvloop

    with tempfile.TemporaryDirectory() as d:
        ca = trustme.CA()
        server = ca.issue_cert("agent.test")
        client = ca.issue_cert("proxy.test")
        paths = {name: str(Path(d) / name) for name in ("ca", "server", "client")}
        ca.cert_pem.write_to_path(paths["ca"])
        server.private_key_and_cert_chain_pem.write_to_path(paths["server"])
        client.private_key_and_cert_chain_pem.write_to_path(paths["client"])
        tls_args = ["--tls-cert", paths["server"], "--tls-ca", paths["ca"]]
        with Processes() as procs:
            plain, plain_ep = start_agent(procs, [])
            secure, tls_ep = start_agent(procs, tls_args)
            ctx = tls.client_context(ca=paths["ca"], cert=paths["client"], server_name="agent.test")
            pids = {"tcp": plain, "tls": secure}
            uvloop.run(run(args, plain_ep, tls_ep, ctx, pids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
