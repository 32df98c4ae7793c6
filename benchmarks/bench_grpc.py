"""gRPC round trips: the pool over gRPC vs grpcio's own bidi client vs the pool over UDS.

``python benchmarks/bench_grpc.py [--reps 5 --duration 2 --in-flight 64]`` starts one agent
process (``python -m agentpool agent --example bench --socket P --grpc 127.0.0.1:0``: the same
Agent serves both transports) and measures, interleaved within each repetition:

* ``pool-grpc``: ``AgentPool.send_request_headers`` to ``grpc://127.0.0.1:PORT`` (the
  20-header benchmark event, converted to protobuf by the pool);
* ``grpcio``: a plain grpcio aio client on the same ``ProcessStream``: one protobuf template
  per stream whose correlation id is set per request, replies parsed and routed by a dict of
  Futures (what an application would write by hand);
* ``pool-uds``: the pool over the agent's Unix socket (JSON), for scale.

It also times the conversion that the gRPC path adds on the proxy (event to ProxyToAgent
bytes, AgentToProxy bytes to AgentResponse) next to the JSON codec doing the same work.
Figures are medians (min-max) over the repetitions; ratios are per repetition.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from agentpool._bench.process import Processes
from agentpool._bench.scenarios import measure, process_cpu_reader
from agentpool._bench.workload import AGENT_ID, make_event


class PoolClient:
    def __init__(self, endpoint: str, connections: int) -> None:
        self.endpoint = endpoint
        self.connections = connections
        self.pool: Any = None
        self._ids = itertools.count()

    async def setup(self) -> None:
        from agentpool.config import AgentPoolConfig
        from agentpool.pool import AgentPool

        self.pool = AgentPool(AgentPoolConfig(connections_per_agent=self.connections))
        await self.pool.add_agent(AGENT_ID, self.endpoint)
        for n in range(2 * self.connections):
            await asyncio.wait_for(
                self.pool.send_request_headers(AGENT_ID, f"p{n}", make_event()), 5
            )
            self.pool.clear_correlation_affinity(f"p{n}")

    def make_rt(self, worker: int) -> Callable[[], Awaitable[None]]:
        send = self.pool.send_request_headers
        clear = self.pool.clear_correlation_affinity
        event = make_event()
        ids = self._ids

        async def rt() -> None:
            cid = f"{next(ids):032x}"
            await send(AGENT_ID, cid, event)
            clear(cid)

        return rt

    async def close(self) -> None:
        await asyncio.wait_for(self.pool.shutdown(), 10)


class GrpcioClient:
    """grpcio aio bidi streaming on ProcessStream, written directly against the stubs."""

    def __init__(self, target: str, streams: int) -> None:
        self.target = target
        self.n_streams = streams
        self.channels: list[Any] = []
        self.streams: list[dict[str, Any]] = []
        self.tasks: list[asyncio.Task[None]] = []
        self._ids = itertools.count()

    async def setup(self) -> None:
        import grpc

        from agentpool.grpc import PROCESS_STREAM
        from agentpool.grpc import agent_v2_pb2 as pb
        from agentpool.grpc._convert import encode_event

        self.pb = pb
        template = pb.ProxyToAgent.FromString(encode_event(make_event(), "0" * 32))
        for _ in range(self.n_streams):
            # one TCP connection per stream, as the pool has one per connection
            channel = grpc.aio.insecure_channel(
                self.target, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            self.channels.append(channel)
            call = channel.stream_stream(
                PROCESS_STREAM,
                request_serializer=pb.ProxyToAgent.SerializeToString,
                response_deserializer=pb.AgentToProxy.FromString,
            )()
            hs = pb.ProxyToAgent()
            hs.handshake.supported_versions.append(2)
            hs.handshake.config_json = "{}"
            await call.write(hs)
            reply = await call.read()
            assert reply.WhichOneof("message") == "handshake" and reply.handshake.success
            st: dict[str, Any] = {
                "call": call,
                "waiters": {},
                "queue": asyncio.Queue(),
                "template": template,
            }
            self.streams.append(st)
            self.tasks.append(asyncio.ensure_future(self._writer(st)))
            self.tasks.append(asyncio.ensure_future(self._reader(st, grpc.aio.EOF)))

    @staticmethod
    async def _writer(st: dict[str, Any]) -> None:
        call, queue = st["call"], st["queue"]
        while True:
            await call.write(await queue.get())

    @staticmethod
    async def _reader(st: dict[str, Any], eof: Any) -> None:
        call, waiters = st["call"], st["waiters"]
        while True:
            msg = await call.read()
            if msg is eof:
                return
            fut = waiters.pop(msg.response.correlation_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg.response)

    def make_rt(self, worker: int) -> Callable[[], Awaitable[None]]:
        st = self.streams[worker % len(self.streams)]
        put, waiters = st["queue"].put_nowait, st["waiters"]
        loop = asyncio.get_running_loop()
        ids = self._ids
        pb = self.pb
        template = st["template"]

        async def rt() -> None:
            cid = f"{next(ids):032x}"
            msg = pb.ProxyToAgent()
            msg.CopyFrom(template)
            msg.request_headers.metadata.correlation_id = cid
            fut: asyncio.Future[Any] = loop.create_future()
            waiters[cid] = fut
            put(msg)
            await fut

        return rt

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for st in self.streams:
            st["call"].cancel()
        for ch in self.channels:
            await ch.close(0.5)


def conversion_costs(n: int = 20000) -> dict[str, float]:
    """µs per call: the gRPC conversion vs the JSON codec, for the benchmark event and reply."""
    from agentpool.codec import get_codec
    from agentpool.grpc import _convert
    from agentpool.grpc import agent_v2_pb2 as pb
    from agentpool.messages import AgentResponse

    event = make_event()
    json_codec = get_codec("json")
    allow_pb = _convert.response_to_proto(AgentResponse.allow(), "0" * 32).SerializeToString()
    allow_json = json_codec.encode_response(AgentResponse.allow(), "0" * 32)
    cases: dict[str, Callable[[], Any]] = {
        "encode event: gRPC (protobuf)": lambda: _convert.encode_event(event, "0" * 32),
        "encode event: UDS (JSON)": lambda: json_codec.encode_event(event, "0" * 32),
        "decode Allow: gRPC (protobuf)": lambda: _convert.decode_response(allow_pb),
        "decode Allow: UDS (JSON)": lambda: json_codec.decode_response(allow_json),
        "reframe a reply for the core": lambda: (
            (len(allow_pb) + 1).to_bytes(4, "big") + b"\x20" + allow_pb
        ),
    }
    del pb
    out: dict[str, float] = {}
    for name, fn in cases.items():
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter() - t0) / n * 1e6)
        out[name] = best
    return out


def _fmt(values: list[float], fmt: str = "{:,.0f}") -> str:
    med, lo, hi = statistics.median(values), min(values), max(values)
    return f"{fmt.format(med)} ({fmt.format(lo)}-{fmt.format(hi)})"


async def run(args: argparse.Namespace, uds: str, grpc_ep: str, pid: int) -> str:
    server_cpu = process_cpu_reader(pid)
    wide = args.in_flight
    specs = [
        ("pool-grpc", 1, 1),
        ("grpcio", 1, 1),
        ("pool-uds", 1, 1),
        ("pool-grpc", wide, 1),
        ("grpcio", wide, 1),
        ("pool-uds", wide, 1),
        ("pool-grpc", wide, 4),
        ("grpcio", wide, 4),
        ("pool-uds", wide, 4),
    ]
    clients: dict[tuple[str, int, int], Any] = {}
    for kind, fl, conns in specs:
        if kind == "pool-grpc":
            c: Any = PoolClient(grpc_ep, conns)
        elif kind == "pool-uds":
            c = PoolClient(f"unix:{uds}", conns)
        else:
            c = GrpcioClient(grpc_ep.removeprefix("grpc://"), conns)
        await c.setup()
        clients[(kind, fl, conns)] = c
    rates: dict[tuple[str, int, int], list[float]] = {k: [] for k in clients}
    cpu: dict[tuple[str, int, int], list[float]] = {k: [] for k in clients}
    srv: dict[tuple[str, int, int], list[float]] = {k: [] for k in clients}
    try:
        for rep in range(args.reps):
            order = list(clients) if rep % 2 == 0 else list(reversed(clients))
            for key in order:
                rate, c_us, s_us = await measure(
                    clients[key].make_rt, key[1], args.warmup, args.duration, server_cpu
                )
                rates[key].append(rate)
                cpu[key].append(c_us)
                srv[key].append(s_us)
                print(
                    f"  [{rep + 1}/{args.reps}] {key} {rate:,.0f} rt/s client {c_us:.1f} µs/rt",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for c in clients.values():
            with contextlib.suppress(Exception):
                await c.close()
    lines = [
        "| client | in flight x conns | round trips/s median (min-max) | client CPU µs/rt "
        "| agent CPU µs/rt | pool-grpc vs this (paired) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key in clients:
        kind, fl, conns = key
        ref = rates[("pool-grpc", fl, conns)]
        ratio = [a / b for a, b in zip(ref, rates[key])] if kind != "pool-grpc" else []
        lines.append(
            f"| {kind} | {fl}x{conns} | {_fmt(rates[key])} | {statistics.median(cpu[key]):.1f} "
            f"| {statistics.median(srv[key]):.1f} | {_fmt(ratio, '{:.2f}x') if ratio else '-'} |"
        )
    lines += ["", "| conversion step (best of 5) | µs per call |", "|---|---:|"]
    for name, us in conversion_costs().items():
        lines.append(f"| {name} | {us:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--in-flight", type=int, default=64)
    args = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="apg-", dir="/tmp")
    uds = os.path.join(tmp, "a.sock")
    procs = Processes()
    cmd = [
        sys.executable,
        "-m",
        "agentpool",
        "agent",
        "--example",
        "bench",
        "--loop",
        "uvloop",
        "--socket",
        uds,
        "--grpc",
        "127.0.0.1:0",
    ]
    try:
        pid, endpoints = procs.start_listening(cmd, "bench agent", count=2)
        grpc_ep = next(e for e in endpoints if e.startswith("grpc://"))
        try:
            import uvloop

            runner: Any = uvloop.run
        except ImportError:  # pragma: no cover
            runner = asyncio.run
        print(runner(run(args, uds, grpc_ep, pid)))
    finally:
        procs.stop_all()
        with contextlib.suppress(OSError):
            os.unlink(uds)
            os.rmdir(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
