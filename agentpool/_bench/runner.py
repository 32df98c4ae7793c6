"""``agentpool bench``: start the servers, run every scenario interleaved, print the table."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

from .agent import grpc_module, run_agent, run_grpc_server, run_loop
from .clients import (
    BatchClient,
    FanOutClient,
    GrpcClient,
    PoolClient,
    RawClient,
    RawCodecClient,
)
from .memory import run_memory
from .process import Processes
from .report import environment, render_table, results
from .scenarios import Scenario, build_scenarios, measure, process_cpu_reader


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _client(s: Scenario, args: argparse.Namespace, agent_path: str, grpc_path: str) -> Any:
    if s.kind == "raw":
        return RawClient(agent_path, s.connections)
    if s.kind == "rawcodec":
        return RawCodecClient(agent_path, s.connections)
    if s.kind in ("pool", "batch", "fanout"):
        cls = {"pool": PoolClient, "batch": BatchClient, "fanout": FanOutClient}[s.kind]
        return cls(agent_path, s.connections, s.encoding, not args.keep_affinity)
    return GrpcClient(grpc_path, s.connections)


async def _run(
    args: argparse.Namespace,
    scenarios: list[Scenario],
    agent_path: str,
    grpc_path: str,
    server_pids: dict[str, int],
) -> None:
    readers = {kind: process_cpu_reader(pid) for kind, pid in server_pids.items()}
    for s in scenarios:
        client = _client(s, args, agent_path, grpc_path)
        try:
            await asyncio.wait_for(client.setup(), 15.0)
            s.client = client
            s.frame_size = client.frame_size
        except Exception as exc:
            s.error = f"{type(exc).__name__}: {exc}"
            _progress(f"  setup of {s.label} failed: {s.error}")
            with contextlib.suppress(Exception):
                await client.close()
    live = [s for s in scenarios if s.client is not None]
    try:
        for rep in range(args.reps):
            order = live if rep % 2 == 0 else list(reversed(live))
            for s in order:
                if s.client is None:
                    continue
                try:
                    reader = readers["grpc" if s.kind == "grpc" else "agent"]
                    per_rt = getattr(s.client, "per_rt", 1)
                    rate, cpu, server = await measure(
                        s.client.make_rt,
                        max(1, s.in_flight // per_rt),
                        args.warmup,
                        args.duration,
                        reader,
                        per_rt,
                    )
                except Exception as exc:
                    s.error = f"{type(exc).__name__}: {exc}"
                    _progress(f"  [{rep + 1}/{args.reps}] {s.label:<26} FAILED: {s.error}")
                    with contextlib.suppress(Exception):
                        await s.client.close()
                    s.client = None
                    continue
                s.rates.append(rate)
                s.cpu_us.append(cpu)
                s.server_cpu_us.append(server)
                _progress(
                    f"  [{rep + 1}/{args.reps}] {s.label:<26} {rate:>10,.0f} rt/s  "
                    f"{1e6 / rate:7.1f} µs/rt  CPU µs/rt: client {cpu:5.1f} server {server:5.1f}"
                )
    finally:
        for s in live:
            if s.client is not None:
                with contextlib.suppress(Exception):
                    await s.client.close()


def _agent_argv(impl: str, path: str) -> list[str]:
    if impl == "example":
        return [sys.executable, "-m", "agentpool", "agent", "--socket", path, "--example", "bench"]
    return [sys.executable, "-m", "agentpool", "bench", "--serve-agent", path]


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark with parsed ``agentpool bench`` options (declared in agentpool.cli)."""
    if args.serve_agent:
        return run_agent(args.serve_agent, hold=args.hold)
    if args.serve_grpc:
        return run_grpc_server(args.serve_grpc)
    if args.memory is not None:
        if args.memory < 1:
            print("bench: --memory needs a positive count", file=sys.stderr)
            return 2
        return run_memory(args)
    if args.reps is None:
        args.reps = 2 if args.quick else 5
    if args.duration is None:
        args.duration = 0.25 if args.quick else 1.0
    if args.warmup is None:
        args.warmup = 0.1 if args.quick else 0.25
    if args.reps < 1 or args.duration <= 0 or args.warmup < 0 or args.in_flight < 1:
        print("bench: --reps, --duration and --in-flight must be positive", file=sys.stderr)
        return 2
    if not args.no_grpc:
        try:
            grpc_module()
        except ImportError:
            _progress("grpcio is not installed (pip install 'agentpool[bench]'): skipping gRPC")
            args.no_grpc = True

    # auto: the example agent (the harness does not import the agent side to look for it);
    # the built-in one if the example does not start.
    impl = "example" if args.agent == "auto" else args.agent

    scenarios = build_scenarios(args)
    if not scenarios:
        print(f"bench: --only {args.only}: nothing left to run without grpcio", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="apbench-", dir="/tmp")
    agent_path = os.path.join(tmp, "agent.sock")
    grpc_path = os.path.join(tmp, "grpc.sock")
    procs = Processes()
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        _progress(f"bench: starting the {impl} agent on {agent_path}")
        pids: dict[str, int] = {}
        try:
            pids["agent"] = procs.start(_agent_argv(impl, agent_path), agent_path, f"{impl} agent")
        except RuntimeError as exc:
            if args.agent != "auto" or impl == "builtin":
                raise
            _progress(f"bench: {exc}; falling back to the built-in agent")
            impl = "builtin"
            pids["agent"] = procs.start(_agent_argv(impl, agent_path), agent_path, "builtin agent")
        if any(s.kind == "grpc" for s in scenarios):
            _progress(f"bench: starting the grpcio server on unix:{grpc_path}")
            argv_grpc = [sys.executable, "-m", "agentpool", "bench", "--serve-grpc", grpc_path]
            pids["grpc"] = procs.start(argv_grpc, grpc_path, "grpc server")
        _progress(
            f"bench: {len(scenarios)} scenarios x {args.reps} repetitions, "
            f"{args.duration:g} s each (+{args.warmup:g} s warm-up)"
        )
        run_loop(_run(args, scenarios, agent_path, grpc_path, pids))
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    elapsed = time.monotonic() - started

    env = environment(args, impl)
    print(
        f"agentpool {env['agentpool']} (compiled core: {env['compiled_core']}), "
        f"Python {env['python']}, "
        f"uvloop {env['uvloop']}, grpcio {env['grpcio']}, {env['cpus']} CPUs, agent: {impl}; "
        f"{args.reps} x {args.duration:g} s per scenario, run took {elapsed:.0f} s"
    )
    print(render_table(scenarios, args.in_flight))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results(args, env, elapsed, scenarios), fh, indent=2)
    failed = [s for s in scenarios if not s.rates]
    return 1 if failed and len(failed) == len(scenarios) else 0
