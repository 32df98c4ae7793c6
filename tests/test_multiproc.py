"""MultiprocessExporter: pool metrics copied into prometheus_client by delta.

Two real worker processes (each a pool talking to a real agent) write to one
PROMETHEUS_MULTIPROC_DIR; one scrape through MultiProcessCollector shows their sum.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import hdrs
from agents import AgentProc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString as go

from agentpool.config import AgentPoolConfig
from agentpool.multiproc import MultiprocessExporter
from agentpool.pool import AgentPool

WORKER = str(Path(__file__).with_name("multiproc_worker.py"))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(path: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return samples(generate_latest(registry).decode())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_two_workers_one_scrape(waf: AgentProc, tmp_path: Path, loop: str) -> None:
    mp_dir = str(tmp_path)
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=mp_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(WORKER).parent), env.get("PYTHONPATH", "")])
    counts = (37, 55)
    workers = [
        subprocess.Popen(
            [sys.executable, WORKER, waf.endpoint, str(n), loop],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n in counts
    ]
    try:
        for w in workers:
            assert w.stdout is not None
            assert w.stdout.readline().strip() == "done"
        total = sum(counts)
        s = scrape(mp_dir)
        assert s[("agent_protocol_requests_total", ())] == total
        assert s[("agent_protocol_responses_total", ())] == total
        assert s[("agent_protocol_request_duration_seconds_count", ())] == total
        inf = ("agent_protocol_request_duration_seconds_bucket", (("le", "+Inf"),))
        assert s[inf] == total
        assert s[("agent_protocol_request_duration_seconds_sum", ())] > 0
        assert s[("agent_protocol_healthy_connections", ())] == 4
        assert s[("agent_protocol_agent_connections", (("agent_id", "waf"),))] == 4
        assert s[("agent_protocol_agent_healthy", (("agent_id", "waf"),))] == 1
        assert s[("agent_protocol_in_flight_requests", ())] == 0

        # one worker exits: its counts stay, its live gauges go
        first = workers[0]
        assert first.stdin is not None
        first.stdin.close()
        assert first.wait(timeout=10) == 0
        mark_process_dead(first.pid, mp_dir)
        s = scrape(mp_dir)
        assert s[("agent_protocol_requests_total", ())] == total
        assert s[("agent_protocol_request_duration_seconds_count", ())] == total
        assert s[("agent_protocol_healthy_connections", ())] == 2
        assert s[("agent_protocol_agent_connections", (("agent_id", "waf"),))] == 2
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait(timeout=10)
            if w.stdin is not None and not w.stdin.closed:
                w.stdin.close()
            if w.stdout is not None:
                w.stdout.close()


async def test_deltas_are_exact_and_never_double_counted(waf: AgentProc) -> None:
    """Single process: repeated copies add only what changed; histograms match slot by slot."""
    registry = CollectorRegistry()
    config = AgentPoolConfig(connections_per_agent=2, connect_timeout=5.0, request_timeout=5.0)
    async with AgentPool(config) as pool:
        await pool.add_agent("waf", waf.endpoint)
        exporter = MultiprocessExporter(pool, registry=registry, interval=60)
        for rnd in range(3):
            for i in range(10):
                await pool.send_request_headers("waf", f"r{rnd}-{i}", hdrs(f"r{rnd}-{i}"))
            exporter.update()
            exporter.update()
        s = samples(generate_latest(registry).decode())
        snap = pool.protocol_metrics.snapshot()
        assert s[("agent_protocol_requests_total", ())] == snap.requests_total == 30
        hist = snap.request_duration
        running = 0
        for bound, n in zip(hist.buckets, hist.counts):
            running += n
            key = ("agent_protocol_request_duration_seconds_bucket", (("le", go(bound / 1e6)),))
            assert s[key] == running
        assert s[("agent_protocol_request_duration_seconds_count", ())] == hist.count
        assert s[("agent_protocol_request_duration_seconds_sum", ())] == pytest.approx(
            hist.sum / 1e6
        )
        await pool.remove_agent("waf")
        exporter.update()
        s = samples(generate_latest(registry).decode())
        assert s[("agent_protocol_agent_connections", (("agent_id", "waf"),))] == 0
        with pytest.raises(ValueError):
            MultiprocessExporter(pool, interval=0)
