"""``python -m agentpool demo``: a pool in front of two real example agents.

Starts the ``waf`` and ``echo`` example agents as subprocesses on temporary Unix sockets,
builds an :class:`~agentpool.pool.AgentPool` with four connections to each, and drives a few
thousand proxy-like requests through it: request headers to the WAF (``/admin`` is blocked),
body chunks routed by correlation affinity, request and response headers to the echo agent,
and a WebSocket-like stream pinned by a sticky session. Prints decisions by kind, latency
percentiles, ``stats()`` and the Prometheus text, then stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._command import CommandError
from ._impl import HAS_EXTENSIONS
from .config import AgentPoolConfig
from .enums import LoadBalanceStrategy
from .messages import (
    AgentResponse,
    Allow,
    Block,
    RequestBodyChunkEvent,
    RequestHeadersEvent,
    RequestMetadata,
    ResponseHeadersEvent,
)
from .pool import AgentPool

__all__ = ["run"]

_READY = "agentpool agent listening on "
_PATHS = (
    "/",
    "/index.html",
    "/api/users",
    "/api/orders?page=2",
    "/static/app.js",
    "/login",
    "/search?q=agents",
    "/admin",
    "/admin/settings",
)
_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_UAS = ("curl/8.5.0", "Mozilla/5.0 (X11; Linux x86_64)", "python-httpx/0.27")


@dataclass
class _Tally:
    decisions: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    body_chunks: int = 0
    sticky_used: int = 0
    sticky_sent: int = 0
    done: int = 0


def _kind(response: AgentResponse) -> str:
    if response.fail_open:
        return "fail-open allow"
    decision = response.decision
    if isinstance(decision, Allow):
        return "allow"
    if isinstance(decision, Block):
        return f"block {decision.status}"
    return type(decision).__name__.lower()


async def _start_agent(example: str, path: str) -> asyncio.subprocess.Process:
    env = dict(os.environ)
    env["PYTHONPATH"] = _PKG_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentpool",
        "agent",
        "--socket",
        path,
        "--example",
        example,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        env=env,
        cwd=os.path.dirname(path),  # not the caller's directory: a source tree there would shadow
        start_new_session=True,
    )
    assert proc.stdout is not None
    try:
        deadline = time.monotonic() + 15.0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CommandError(f"the {example} example agent did not listen within 15 s")
            line = await asyncio.wait_for(proc.stdout.readline(), remaining)
            if not line:
                status = await proc.wait()
                raise CommandError(f"the {example} example agent exited with status {status}")
            if line.decode(errors="replace").startswith(_READY):
                return proc
    except BaseException:
        await _stop_agent(proc)
        raise


async def _stop_agent(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 5.0)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


class _Progress:
    """A one-line progress bar on stderr (redrawn at most ~20 times a second)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._last = 0.0
        self._quarter = 0
        self._start = time.perf_counter()

    def update(self, done: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        width = 40
        filled = int(width * done / self.total) if self.total else width
        rate = done / max(now - self._start, 1e-9)
        bar = "#" * filled + "." * (width - filled)
        line = f"  [{bar}] {done}/{self.total} requests  {rate:,.0f} req/s"
        if not self.tty:  # logs: one line per quarter instead of carriage returns
            quarter = 4 * done // self.total if self.total else 4
            if quarter > self._quarter:
                self._quarter = quarter
                sys.stderr.write(line + "\n")
            return
        if not force and now - self._last < 0.05:
            return
        self._last = now
        sys.stderr.write("\r" + line + " ")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            self.update(self.total, force=True)
            if self.tty:
                sys.stderr.write("\n")
            sys.stderr.flush()


def _headers_event(cid: str, n: int, rng: random.Random) -> RequestHeadersEvent:
    path = rng.choice(_PATHS)
    method = "POST" if path.startswith("/api") and n % 3 == 0 else "GET"
    headers = {
        ":authority": ["demo.example"],
        "user-agent": [rng.choice(_UAS)],
        "accept": ["*/*"],
        "x-request-id": [cid],
    }
    if method == "POST":
        headers["content-type"] = ["application/json"]
    meta = RequestMetadata(
        correlation_id=cid,
        request_id=cid,
        client_ip=f"192.0.2.{n % 250 + 1}",
        client_port=40000 + n % 20000,
        server_name="demo.example",
        route_id="default",
    )
    return RequestHeadersEvent(metadata=meta, method=method, uri=path, headers=headers)


async def _one_request(pool: AgentPool, n: int, tally: _Tally, rng: random.Random) -> None:
    cid = f"demo-{n:06d}"
    event = _headers_event(cid, n, rng)
    started = time.perf_counter()
    try:
        waf = await pool.send_request_headers("waf", cid, event)
        kind = _kind(waf)
        if isinstance(waf.decision, Allow):
            if event.method == "POST":
                body = b'{"items": [1, 2, 3], "note": "' + b"x" * 200 + b'"}'
                chunks = [body[i : i + 96] for i in range(0, len(body), 96)]
                sent = 0
                for index, chunk in enumerate(chunks):
                    sent += len(chunk)
                    await pool.send_request_body_chunk(
                        "waf",
                        cid,
                        RequestBodyChunkEvent(
                            correlation_id=cid,
                            data=chunk,
                            is_last=index == len(chunks) - 1,
                            total_size=len(body),
                            chunk_index=index,
                            bytes_received=sent,
                        ),
                    )
                    tally.body_chunks += 1
            await pool.send_request_headers("echo", cid, event)
            await pool.send_response_headers(
                "echo",
                cid,
                ResponseHeadersEvent(
                    correlation_id=cid, status=200, headers={"content-type": ["text/html"]}
                ),
            )
        tally.latencies.append(time.perf_counter() - started)
        tally.decisions[kind] += 1
    except Exception as exc:
        tally.errors[type(exc).__name__] += 1
    finally:
        pool.clear_correlation_affinity(cid)
        tally.done += 1


async def _websocket_session(pool: AgentPool, tally: _Tally, frames: int) -> None:
    """A long-lived upgrade pinned to one echo connection by a sticky session."""
    session = "ws-session-1"
    pool.create_sticky_session(session, "echo")
    for i in range(frames):
        cid = f"ws-{i:04d}"
        meta = RequestMetadata(
            correlation_id=cid, request_id=cid, client_ip="198.51.100.7", client_port=51000
        )
        event = RequestHeadersEvent(
            metadata=meta,
            method="GET",
            uri="/chat",
            headers={"upgrade": ["websocket"], "connection": ["Upgrade"], "x-frame": [str(i)]},
        )
        try:
            _, used = await pool.send_request_headers_with_sticky_session(
                session, "echo", cid, event
            )
            tally.sticky_sent += 1
            tally.sticky_used += int(used)
        except Exception as exc:
            tally.errors[type(exc).__name__] += 1
        finally:
            pool.clear_correlation_affinity(cid)
        await asyncio.sleep(0)
    pool.clear_sticky_session(session)


def _percentile(sorted_values: Sequence[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


async def _drive(pool: AgentPool, total: int, concurrency: int, progress: _Progress) -> _Tally:
    tally = _Tally()
    rng = random.Random(7)
    counter = iter(range(total))

    async def worker() -> None:
        for n in counter:
            await _one_request(pool, n, tally, rng)
            progress.update(tally.done)

    ws = asyncio.create_task(_websocket_session(pool, tally, max(10, total // 50)))
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await ws
    progress.finish()
    return tally


async def _run(args: argparse.Namespace) -> int:
    tmp = tempfile.mkdtemp(prefix="ap-demo-", dir="/tmp")
    procs: list[asyncio.subprocess.Process] = []
    out = sys.stdout
    try:
        print("starting example agents (waf, echo) ...", file=sys.stderr)
        paths = {name: os.path.join(tmp, f"{name}.sock") for name in ("waf", "echo")}
        procs = list(await asyncio.gather(*(_start_agent(n, p) for n, p in paths.items())))
        config = AgentPoolConfig(
            connections_per_agent=args.connections,
            load_balance_strategy=LoadBalanceStrategy[args.strategy.upper()],
            request_timeout=5.0,
            connect_timeout=5.0,
            health_check_interval=1.0,
            encoding=args.encoding,
        )
        async with AgentPool(config) as pool:
            for name, path in paths.items():
                await pool.add_agent(name, f"unix:{path}")
                if not pool.is_agent_healthy(name):
                    print(f"error: could not connect to the {name} agent", file=sys.stderr)
                    return 1
            caps = await pool.agent_capabilities("waf")
            print(
                f"pool ready: {len(pool.agent_ids())} agents x {args.connections} connections "
                f"({config.load_balance_strategy.name}, {args.encoding}); waf = "
                f"{caps.name if caps else '?'}; core: "
                f"{'compiled' if HAS_EXTENSIONS else 'pure Python'}",
                file=sys.stderr,
            )
            progress = _Progress(args.requests, enabled=not args.quiet)
            t0 = time.perf_counter()
            tally = await _drive(pool, args.requests, args.concurrency, progress)
            elapsed = time.perf_counter() - t0
            await pool.run_maintenance_once()

            print(
                f"\n== {args.requests} requests in {elapsed:.2f}s "
                f"({args.requests / elapsed:,.0f} req/s, concurrency {args.concurrency})",
                file=out,
            )
            print("\n-- WAF decisions by kind", file=out)
            for kind, count in tally.decisions.most_common():
                print(f"  {kind:<16} {count:>7}", file=out)
            if tally.errors:
                print("\n-- errors", file=out)
                for kind, count in tally.errors.most_common():
                    print(f"  {kind:<16} {count:>7}", file=out)
            print(f"\n  body chunks via affinity: {tally.body_chunks}", file=out)
            print(
                f"  sticky session frames:    {tally.sticky_sent} "
                f"({tally.sticky_used} on the pinned connection)",
                file=out,
            )
            lat = sorted(tally.latencies)
            print("\n-- end-to-end latency per request (all agent calls)", file=out)
            for p in (50, 90, 99, 99.9):
                print(f"  p{p:<5} {_percentile(lat, p) * 1e3:8.3f} ms", file=out)
            if lat:
                print(f"  max    {lat[-1] * 1e3:8.3f} ms", file=out)
            print("\n-- stats()", file=out)
            for s in sorted(await pool.stats(), key=lambda s: s.agent_id):
                print(
                    f"  {s.agent_id:<5} connections={s.active_connections} "
                    f"healthy={s.healthy_connections} in_flight={s.total_in_flight} "
                    f"requests={s.total_requests} errors={s.total_errors} "
                    f"error_rate={s.error_rate:.4f} healthy={s.is_healthy}",
                    file=out,
                )
            print("\n-- export_prometheus()", file=out)
            print(pool.export_prometheus(), file=out)
        print("pool shut down; stopping agents", file=sys.stderr)
        return 1 if tally.errors else 0
    finally:
        await asyncio.gather(*(_stop_agent(p) for p in procs), return_exceptions=True)
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed ``agentpool demo`` options; the process exit code.

    0 when every request succeeded. Options are declared in :mod:`agentpool.cli`.
    """
    use_uvloop = args.loop == "uvloop"
    if args.loop == "auto":
        try:
            import uvloop

            use_uvloop = True
        except ImportError:
            use_uvloop = False
    if use_uvloop:
        import uvloop

        return uvloop.run(_run(args))
    return asyncio.run(_run(args))
