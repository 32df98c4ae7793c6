"""``python -m agentpool loadtest``: what one agent check costs an HTTP server, end to end.

Runs the same server with and without an agent check, interleaved, against the fast example
``bench`` agent: a plain ASGI app under uvicorn (+ httptools, uvloop) bare and wrapped in
:class:`~agentpool.asgi.AgentMiddleware`, and ``agentpool proxy`` in front of a small aiohttp
upstream with no agent and with the agent. The load comes from ``wrk`` when it is installed,
else from a bounded built-in aiohttp client loop. Reports req/s (and the ratio checked/bare)
at ``--connections`` and p50/p99 latency at one connection, as min–max over ``--repeat``
interleaved runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Result", "run_command"]

_AGENT_ENV = "AGENTPOOL_LOADTEST_AGENT"
_CONNS_ENV = "AGENTPOOL_LOADTEST_CONNECTIONS_PER_AGENT"
_BODY = b"hello, world\n"


# ------------------------------------------------------------------- servers under test


async def _plain(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"13")],
        }
    )
    await send({"type": "http.response.body", "body": _BODY})


def asgi_plain() -> Any:
    """uvicorn factory: the bare app."""
    return _plain


def asgi_checked() -> Any:
    """uvicorn factory: the app behind one agent check (request headers only)."""
    from ..asgi import AgentMiddleware
    from ..config import AgentPoolConfig

    endpoint = os.environ[_AGENT_ENV]
    conns = int(os.environ.get(_CONNS_ENV) or 4)  # 4: the AgentPoolConfig default
    return AgentMiddleware(
        _plain,
        agents={"bench": {"endpoint": endpoint, "events": ["request_headers"]}},
        config=AgentPoolConfig(connections_per_agent=conns),
    )


def upstream(argv: Any = None) -> Any:
    """``python -m aiohttp.web agentpool._bench.loadtest:upstream``: the proxy's upstream."""
    from aiohttp import web

    async def hello(request: web.Request) -> web.Response:
        return web.Response(body=_BODY, content_type="text/plain")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


# ------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(proc: subprocess.Popen[bytes], port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not ready after {timeout} s")


def _wait_path(proc: subprocess.Popen[bytes], path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            return
        time.sleep(0.05)
    raise RuntimeError(f"agent socket {path} not ready after {timeout} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _spawn(args: list[str], **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def _start(target: str, agent: str, upstream_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    py = sys.executable
    if target in ("asgi", "asgi+agent"):
        factory = (
            "agentpool._bench.loadtest:asgi_checked"
            if target == "asgi+agent"
            else ("agentpool._bench.loadtest:asgi_plain")
        )
        args = [
            py,
            "-m",
            "uvicorn",
            "--factory",
            factory,
            "--port",
            str(port),
            "--http",
            "httptools",
            "--loop",
            "uvloop",
            "--no-access-log",
            "--log-level",
            "warning",
        ]
    else:
        args = [
            py,
            "-m",
            "agentpool",
            "proxy",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            upstream_url,
        ]
        if target == "proxy+agent":
            args += ["--config", agent]
    proc = _spawn(args, **{_AGENT_ENV: f"unix:{agent}" if target == "asgi+agent" else ""})
    _wait_port(proc, port)
    return proc, f"http://127.0.0.1:{port}/"


# ------------------------------------------------------------------- load generators


@dataclass
class Result:
    """One load run: requests per second, latency percentiles and CPU per request (µs)."""

    rps: float
    p50_us: float
    p99_us: float
    errors: int = 0
    requests: int = 0
    server_cpu_us: float = float("nan")
    agent_cpu_us: float = float("nan")


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu(pids: Sequence[int]) -> float:
    """User + system CPU seconds of ``pids`` and their children threads (from /proc)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


_UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def _wrk(url: str, connections: int, duration: float) -> Result:
    threads = max(1, min(2, connections))
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = re.search(r"(\d+) requests in", out)

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out)
        return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return Result(
        rps,
        pct("50"),
        pct("99"),
        int(errors.group(1)) if errors else 0,
        int(total.group(1)) if total else 0,
    )


async def _builtin(url: str, connections: int, duration: float) -> Result:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal errors
            perf = time.perf_counter
            while perf() < stop_at:
                t0 = perf()
                async with session.get(url) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                latencies.append(perf() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    n = len(latencies)
    return Result(
        n / elapsed,
        latencies[n // 2] * 1e6 if n else float("nan"),
        latencies[min(n - 1, int(n * 0.99))] * 1e6 if n else float("nan"),
        errors,
        n,
    )


def _load(url: str, connections: int, duration: float, tool: str) -> Result:
    if tool == "wrk":
        return _wrk(url, connections, duration)
    try:
        import uvloop

        return uvloop.run(_builtin(url, connections, duration))
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency
        return asyncio.run(_builtin(url, connections, duration))


# ------------------------------------------------------------------- the run


def _measure(
    url: str, server_pid: int, agent_pid: int, load: int, duration: float, tool: str
) -> Result:
    before = _cpu([server_pid]), _cpu([agent_pid])
    r = _load(url, load, duration, tool)
    after = _cpu([server_pid]), _cpu([agent_pid])
    if r.requests:
        r.server_cpu_us = (after[0] - before[0]) * 1e6 / r.requests
        r.agent_cpu_us = (after[1] - before[1]) * 1e6 / r.requests
    return r


def _span(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    """``median (min–max)``."""
    lo, mid, hi = min(values), statistics.median(values), max(values)
    return f"{fmt.format(mid)} ({fmt.format(lo)}–{fmt.format(hi)})"


def run(
    pairs: Sequence[str],
    *,
    connections: int,
    duration: float,
    repeat: int,
    tool: str,
    out: Any = sys.stdout,
) -> dict[str, dict[str, list[Result]]]:
    """Interleaved runs of each pair (``asgi``, ``proxy``): bare and checked, at
    ``connections`` and at 1 connection. Returns the raw results per target and load."""
    results: dict[str, dict[str, list[Result]]] = {}
    tmp = tempfile.mkdtemp(prefix="agentpool-loadtest-")
    sock = os.path.join(tmp, "bench.sock")
    config = os.path.join(tmp, "proxy.json")
    with open(config, "w", encoding="utf-8") as f:
        json.dump(
            {"agents": {"bench": {"endpoint": f"unix:{sock}", "events": ["request_headers"]}}}, f
        )
    agent = _spawn(
        [sys.executable, "-m", "agentpool", "agent", "--example", "bench", "--socket", sock]
    )
    procs: list[subprocess.Popen[bytes]] = [agent]
    try:
        _wait_path(agent, sock)
        up_port = _free_port()
        up = _spawn(
            [
                sys.executable,
                "-m",
                "aiohttp.web",
                "-H",
                "127.0.0.1",
                "-P",
                str(up_port),
                "agentpool._bench.loadtest:upstream",
            ]
        )
        procs.append(up)
        _wait_port(up, up_port)
        up_url = f"http://127.0.0.1:{up_port}"
        targets = [t for pair in pairs for t in (pair, pair + "+agent")]
        servers: dict[str, str] = {}
        pids: dict[str, int] = {}
        for target in targets:
            proc, url = _start(target, config if target == "proxy+agent" else sock, up_url)
            procs.append(proc)
            servers[target] = url
            pids[target] = proc.pid
            _load(url, connections, min(1.0, duration), tool)  # warm-up
        for rep in range(repeat):
            for pair in pairs:
                for load in (connections, 1):
                    # bare and checked back to back, order alternating between repetitions
                    order = (pair, pair + "+agent") if rep % 2 == 0 else (pair + "+agent", pair)
                    for target in order:
                        r = _measure(servers[target], pids[target], agent.pid, load, duration, tool)
                        results.setdefault(target, {}).setdefault(str(load), []).append(r)
                        print(
                            f"  run {rep + 1}/{repeat} {target:<12} c={load:<3} {r.rps:>9.0f} req/s"
                            f"  p50 {r.p50_us:>7.0f} µs  p99 {r.p99_us:>7.0f} µs"
                            f"  CPU/req server {r.server_cpu_us:>5.0f} µs"
                            f" agent {r.agent_cpu_us:>4.0f} µs"
                            + (f"  errors {r.errors}" if r.errors else ""),
                            file=out,
                            flush=True,
                        )
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def table(results: dict[str, dict[str, list[Result]]], connections: int) -> str:
    """The markdown table of a :func:`run`."""
    c = str(connections)
    lines = [
        f"| server | req/s bare (c={c}) | req/s with agent | ratio | p50 added (c=1) "
        "| p99 added (c=1) |",
        "|---|---|---|---|---|---|",
    ]
    for pair in ("asgi", "proxy"):
        if pair not in results:
            continue
        bare, checked = results[pair], results[pair + "+agent"]
        ratios = [b.rps and a.rps / b.rps for a, b in zip(checked[c], bare[c])]
        p50 = [a.p50_us - b.p50_us for a, b in zip(checked["1"], bare["1"])]
        p99 = [a.p99_us - b.p99_us for a, b in zip(checked["1"], bare["1"])]
        name = "ASGI, uvicorn + httptools" if pair == "asgi" else "agentpool proxy (aiohttp)"
        lines.append(
            f"| {name} | {_span([r.rps for r in bare[c]])} | {_span([r.rps for r in checked[c]])} "
            f"| {_span(ratios, '{:.2f}')} | {_span(p50)} µs | {_span(p99)} µs |"
        )
    return "\n".join(lines)


def run_command(args: argparse.Namespace) -> int:
    """Run ``agentpool loadtest`` with parsed options."""
    from .._command import CommandError

    if not 0 < args.duration <= 60 or not 0 < args.repeat <= 20 or args.connections < 1:
        raise CommandError(
            "--duration must be in (0, 60], --repeat in 1..20, --connections >= 1", 2
        )
    for module in ("uvicorn", "aiohttp"):
        try:
            __import__(module)
        except ImportError:
            raise CommandError(
                f"{module} is needed: pip install 'agentpool[asgi,aiohttp]' uvicorn httptools"
            ) from None
    tool = args.tool
    if tool == "auto":
        tool = "wrk" if shutil.which("wrk") else "builtin"
    elif tool == "wrk" and not shutil.which("wrk"):
        raise CommandError("--tool wrk: wrk is not installed (apt-get install wrk)")
    pairs = ["asgi", "proxy"] if args.target == "both" else [args.target]
    print(
        f"load: {tool}, {args.connections} connections and 1, {args.duration:g} s per run, "
        f"{args.repeat} interleaved repetitions; agent: example 'bench' on a Unix socket",
        flush=True,
    )
    results = run(
        pairs,
        connections=args.connections,
        duration=args.duration,
        repeat=args.repeat,
        tool=tool,
    )
    print()
    print(table(results, args.connections))
    return 0
