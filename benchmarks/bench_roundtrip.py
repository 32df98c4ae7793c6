"""pytest-benchmark variant of the round-trip harness, plus the protocol core's routing cost.

``test_roundtrip``: raw uvloop client vs the pool against a real agent process.

Each benchmark round runs a batch of round trips against the built-in benchmark agent (a
subprocess on a /tmp Unix socket); the per-round-trip time is the round time divided by
``BATCH``. Run with::

    pytest benchmarks/bench_roundtrip.py -o python_files='bench_*.py' -p no:randomly

The main harness (``python -m agentpool bench``) is the reference: it interleaves repetitions
and prints paired ratios; this file exists so the figures can be tracked with pytest-benchmark's
``--benchmark-compare``.

``test_core_routing`` / ``python benchmarks/bench_roundtrip.py``: the compiled protocol core vs
its pure-Python twin on the per-request work without I/O — ``AgentProtocolCore.request`` for 64
events, one flush, then one ``data_received`` carrying the 64 Allow replies (frame decode,
``decode_response``, waiter lookup, Future resolution); and ``data_received`` alone on replies
nobody waits for (frame decode + decode + lookup); each for the canonical Allow reply and for a
Block with header ops and an audit.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import timeit
import types
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from agentpool._bench.clients import PoolClient, RawClient
from agentpool._bench.process import Processes
from agentpool._bench.workload import event_json, response_json
from agentpool.codec import JSON_CODEC

BATCH = 2000


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    try:
        import uvloop

        lp = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def agent_path() -> Iterator[str]:
    tmp = tempfile.mkdtemp(prefix="apbench-", dir="/tmp")
    path = os.path.join(tmp, "agent.sock")
    procs = Processes()
    try:
        procs.start(
            [sys.executable, "-m", "agentpool", "bench", "--serve-agent", path], path, "agent"
        )
        yield path
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


async def _batch(
    rt_factory: Callable[[int], Callable[[], Awaitable[None]]], in_flight: int
) -> None:
    per_worker = BATCH // in_flight

    async def worker(rt: Callable[[], Awaitable[None]]) -> None:
        for _ in range(per_worker):
            await rt()

    await asyncio.gather(*(worker(rt_factory(i)) for i in range(in_flight)))


def _client(kind: str, path: str, encoding: str, connections: int) -> Any:
    if kind == "raw":
        return RawClient(path, connections)
    return PoolClient(path, connections, encoding, clear_affinity=True)


@pytest.mark.parametrize(
    ("kind", "encoding", "in_flight", "connections"),
    [
        ("raw", "json", 1, 1),
        ("pool", "json", 1, 1),
        ("pool", "msgpack", 1, 1),
        ("raw", "json", 64, 1),
        ("pool", "json", 64, 1),
        ("pool", "json", 64, 4),
        ("pool", "msgpack", 64, 4),
    ],
)
def test_roundtrip(
    benchmark: Any,
    loop: asyncio.AbstractEventLoop,
    agent_path: str,
    kind: str,
    encoding: str,
    in_flight: int,
    connections: int,
) -> None:
    client = _client(kind, agent_path, encoding, connections)
    loop.run_until_complete(asyncio.wait_for(client.setup(), 15.0))
    try:
        benchmark.extra_info["round_trips_per_round"] = BATCH
        benchmark.pedantic(
            lambda: loop.run_until_complete(_batch(client.make_rt, in_flight)),
            rounds=10,
            warmup_rounds=1,
        )
    finally:
        loop.run_until_complete(client.close())


class _NullTransport:
    """Accepts writes and drops them: the core's own work without syscalls."""

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def block_json(cid: str) -> bytes:
    """A non-Allow reply as a WAF sends it: Block, two header ops, an audit with tags/rules."""
    from agentpool.messages import AgentResponse, AuditMetadata, Block, HeaderOp

    return JSON_CODEC.encode_response(
        AgentResponse(
            decision=Block(403, "Forbidden"),
            request_headers=[HeaderOp.set("x-waf", "block"), HeaderOp.remove("x-debug")],
            audit=AuditMetadata(tags=["waf", "sqli"], rule_ids=["942100"], confidence=0.9),
        ),
        cid,
    )


def routing_round(
    core: types.ModuleType, waited: bool, n: int = 64, reply: str = "allow"
) -> tuple[Any, Callable[[], None]]:
    """(loop, one round): n requests + one read of n replies, or (waited=False) the read only;
    ``reply`` is ``allow`` (the canonical Allow) or ``block`` (see :func:`block_json`)."""
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    proto = core.AgentProtocolCore(loop, lambda t, p: None, lambda e: None)
    proto.connection_made(_NullTransport())
    proto.set_decoder(JSON_CODEC.decode_response)
    # as a connection does: the core's own Allow recogniser first (built by the core measured)
    from agentpool.codec import response as _codec

    proto.set_fast_paths(None, _codec._response_factory(core), "json")
    cids = [f"{i:032x}" for i in range(n)]
    payload = event_json(cids[0])
    make = response_json if reply == "allow" else block_json
    replies = b"".join(core.encode_frame(0x20, make(c)) for c in cids)
    request, flush, feed = proto.request, proto._flush, proto.data_received

    def full() -> None:
        for cid in cids:
            request(0x10, payload, cid)
        flush()
        feed(replies)

    def read_only() -> None:
        feed(replies)

    return loop, full if waited else read_only


@pytest.mark.parametrize("waited", [True, False], ids=["request+route", "route-only"])
def test_core_routing(benchmark: Any, core_impl: types.ModuleType, waited: bool) -> None:
    loop, rnd = routing_round(core_impl, waited)
    try:
        benchmark.extra_info["requests_per_round"] = 64
        benchmark(rnd)
    finally:
        loop.close()


def _summary() -> None:
    from agentpool import _core, _core_py

    print(f"{'ns per request (64 per read)':44}{'compiled':>10}{'pure':>10}{'ratio':>8}")
    for waited, reply, label in (
        (True, "allow", "request + frame decode + routing"),
        (False, "allow", "frame decode + routing"),
        (True, "block", "request + decode + routing (Block reply)"),
        (False, "block", "frame decode + routing (Block reply)"),
    ):
        res = {}
        for name, core in (("compiled", _core), ("pure", _core_py)):
            loop, rnd = routing_round(core, waited, reply=reply)
            rnd()
            res[name] = min(timeit.repeat(rnd, number=300, repeat=7)) / 300 / 64 * 1e9
            loop.close()
        ratio = res["pure"] / res["compiled"]
        print(f"{label:44}{res['compiled']:>10.0f}{res['pure']:>10.0f}{ratio:>7.1f}x")


if __name__ == "__main__":
    _summary()
