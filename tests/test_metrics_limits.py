"""What an agent can make the metrics collector keep is bounded, labelled with the pool's id,
and the exposition stays valid for any report (checked with prometheus_client's parser)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import shutil
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from _helpers import rss_bytes as _rss
from agents import short_socket_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agentpool._impl import core
from agentpool.agent import Agent, AgentServer
from agentpool.config import AgentPoolConfig
from agentpool.enums import MessageType
from agentpool.messages import (
    CounterMetric,
    GaugeMetric,
    HistogramBucket,
    HistogramMetric,
    MetricsReport,
)
from agentpool.metrics import (
    DROP_REASONS,
    AgentPoolCollector,
    MetricsCollector,
    MetricsCollectorConfig,
)
from agentpool.pool import AgentPool

T = 10.0


def report(
    agent_id: str = "a",
    counters: Sequence[CounterMetric] = (),
    gauges: Sequence[GaugeMetric] = (),
    histograms: Sequence[HistogramMetric] = (),
) -> MetricsReport:
    return MetricsReport(agent_id, 1, 1000, list(counters), list(gauges), list(histograms))


# -- caps and limits --------------------------------------------------------------------------


def test_defaults_are_documented_values() -> None:
    cfg = MetricsCollectorConfig()
    assert (cfg.max_series, cfg.max_series_per_agent, cfg.max_agents) == (10_000, 1_000, 1_000)
    assert (cfg.max_labels, cfg.max_name_length, cfg.max_agent_id_length) == (32, 256, 256)
    assert (cfg.max_label_value_length, cfg.max_help_length) == (1_024, 1_024)


def test_series_per_agent_cap_counts_drops_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mc = MetricsCollector(MetricsCollectorConfig(max_series_per_agent=3))
    with caplog.at_level(logging.WARNING, logger="agentpool.metrics"):
        mc.record(report("a", gauges=[GaugeMetric(f"g{i}", 1.0) for i in range(10)]))
        mc.record(report("a", gauges=[GaugeMetric(f"h{i}", 1.0) for i in range(10)]))
        mc.record(report("b", gauges=[GaugeMetric("g0", 1.0)]))
    assert mc.agent_series_count("a") == 3 and mc.agent_series_count("b") == 1
    assert mc.drops()["max_series_per_agent"] == 17 and mc.dropped_series() == 17
    assert len(caplog.records) == 1 and "max_series_per_agent=3" in caplog.text
    mc.record(report("a", gauges=[GaugeMetric("g0", 5.0)]))  # existing series still update
    assert 'g0{agent_id="a"} 5' in mc.export_prometheus()


def test_agent_cap_forgets_idle_agents_first_then_refuses() -> None:
    clock = [0.0]
    mc = MetricsCollector(
        MetricsCollectorConfig(max_agents=2, max_age=10.0), clock=lambda: clock[0]
    )
    assert mc.record(report("a", gauges=[GaugeMetric("g", 1.0)]))
    clock[0] = 1.0
    assert mc.record(report("b", gauges=[GaugeMetric("g", 1.0)]))
    assert not mc.record(report("c", gauges=[GaugeMetric("g", 1.0)]))
    assert mc.drops()["max_agents"] == 1 and mc.dropped_reports() == 1
    clock[0] = 10.5  # a's series expire; b's do not
    assert mc.expire_old_metrics() == 1
    assert mc.record(report("c", gauges=[GaugeMetric("g", 1.0)]))
    assert sorted(mc.active_agents()) == ["b", "c"]


def test_oversized_names_ids_and_labels_are_refused_or_cut() -> None:
    cfg = MetricsCollectorConfig()
    mc = MetricsCollector(cfg)
    huge = "x" * (cfg.max_name_length + 1)
    mc.record(
        report(
            "a",
            gauges=[
                GaugeMetric(huge, 1.0),
                GaugeMetric("ok_label_key", 1.0, labels={huge: "v"}),
                GaugeMetric("many", 1.0, labels={f"l{i}": "v" for i in range(cfg.max_labels + 1)}),
                GaugeMetric("long_value", 2.0, "h" * 5000, labels={"v": "y" * 5000}),
            ],
        )
    )
    assert mc.drops()["too_large"] == 3
    (g,) = mc.snapshot().gauges
    assert g.name == "long_value" and dict(g.labels)["v"] == "y" * cfg.max_label_value_length
    assert g.help == "h" * cfg.max_help_length
    assert not mc.record(report("i" * (cfg.max_agent_id_length + 1), gauges=[GaugeMetric("g", 1)]))
    assert mc.drops()["agent_id_too_long"] == 1 and mc.active_agents() == ["a"]
    assert set(mc.drops()) == set(DROP_REASONS)


def test_the_given_agent_id_wins_over_the_reported_one() -> None:
    mc = MetricsCollector()
    mc.record(report("victim", gauges=[GaugeMetric("g", 1.0, labels={"agent_id": "x"})]), "pool-id")
    assert mc.active_agents() == ["pool-id"]
    assert mc.export_prometheus() == '# TYPE g gauge\ng{agent_id="pool-id"} 1\n'


def test_one_name_as_counter_and_gauge_yields_one_family() -> None:
    mc = MetricsCollector()
    mc.record(report("a", counters=[CounterMetric("dup", 1)], gauges=[GaugeMetric("dup", 2.0)]))
    mc.record(
        report(
            "b",
            gauges=[GaugeMetric("lat_count", 1.0), GaugeMetric("req", 3.0)],
            counters=[CounterMetric("req_total", 4)],
            histograms=[HistogramMetric("lat", 1.0, 1, [HistogramBucket(math.inf, 1)])],
        )
    )
    text = mc.export_prometheus()
    assert text.count("# TYPE dup ") == 1 and "# TYPE dup counter" in text
    assert "# TYPE lat " not in text and "# TYPE lat_count gauge" in text
    assert "# TYPE req " not in text and "# TYPE req_total counter" in text
    assert_valid_exposition(text)


# -- the exposition is valid for any input ------------------------------------------------------

_TYPE_LINE = re.compile(r"# TYPE (\S+) (\S+)")


def assert_valid_exposition(text: str) -> None:
    """Parsed by prometheus_client, one TYPE per family, each sample inside its own family."""
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), names
    owner: dict[str, str] = {}
    for f in families:
        for s in f.samples:
            assert owner.setdefault(s.name, f.name) == f.name, (s.name, f.name)
    typed = [m.group(1) for m in _TYPE_LINE.finditer(text)]
    assert len(typed) == len(set(typed)), typed


names = st.one_of(
    st.sampled_from(["x", "x_total", "x_count", "x_sum", "x_bucket", "y", "le", "agent_id"]),
    st.text(min_size=0, max_size=12),
    st.from_regex(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,8}", fullmatch=True),
)
label_keys = st.one_of(
    st.sampled_from(["le", "agent_id", "__x", "route", "quantile"]),
    st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,5}", fullmatch=True),
    st.text(max_size=6),
)
labels = st.dictionaries(label_keys, st.text(max_size=10), max_size=3)
floats = st.floats(allow_nan=True, allow_infinity=True)
helps = st.one_of(st.none(), st.text(max_size=12))
counters = st.builds(CounterMetric, names, st.integers(0, 2**64 - 1), helps, labels)
gauges = st.builds(GaugeMetric, names, floats, helps, labels)
histograms = st.builds(
    HistogramMetric,
    names,
    floats,
    st.integers(0, 2**64 - 1),
    st.lists(st.builds(HistogramBucket, floats, st.integers(0, 2**64 - 1)), max_size=3),
    helps,
    labels,
)
reports = st.builds(
    report,
    st.sampled_from(["a", "b", "agent_protocol"]),
    st.lists(counters, max_size=4),
    st.lists(gauges, max_size=4),
    st.lists(histograms, max_size=3),
)


@dataclass
class _Stats:
    agent_id: str
    active_connections: int = 1
    healthy_connections: int = 1
    total_in_flight: int = 0
    total_requests: int = 0
    total_errors: int = 0
    error_rate: float = 0.0
    is_healthy: bool = True


class _Pool:
    def __init__(self, collector: MetricsCollector) -> None:
        self.protocol_metrics = core.ProtocolMetrics()
        self.metrics_collector = collector

    def agent_stats_sync(self) -> Sequence[Any]:
        return [_Stats("a"), _Stats("b")]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(reports, max_size=4), st.booleans(), st.sampled_from([None, "agent_protocol_"]))
def test_exposition_is_valid_for_any_reports(
    batch: list[MetricsReport], agent_label: bool, reserved: str | None
) -> None:
    mc = MetricsCollector(MetricsCollectorConfig(include_agent_id_label=agent_label))
    for r in batch:
        mc.record(r, r.agent_id)
    assert_valid_exposition(mc.export_prometheus(reserved_prefix=reserved))
    registry = CollectorRegistry()
    registry.register(AgentPoolCollector(_Pool(mc)))
    assert_valid_exposition(generate_latest(registry).decode())


# -- through a pool, with a real agent: the figures ---------------------------------


@contextlib.asynccontextmanager
async def pool_with_agent() -> AsyncIterator[tuple[AgentPool, AgentServer]]:
    d = short_socket_dir()
    server = AgentServer(Agent(), path=os.path.join(d, "m.sock"), encodings=("json",))
    await server.start()
    pool = AgentPool(AgentPoolConfig(connections_per_agent=1, health_check_interval=60.0))
    try:
        async with pool:
            await pool.add_agent("the-agent", server.endpoint)
            yield pool, server
    finally:
        await asyncio.wait_for(server.close(), T)
        shutil.rmtree(d, ignore_errors=True)


async def _push_raw(server: AgentServer, frames: Any) -> None:
    """Send pre-encoded MetricsReport frames from the agent, honouring backpressure."""
    (session,) = server.sessions
    for frame in frames:
        session.write_raw(frame)
        await session._drain()
        await asyncio.sleep(0)


async def _wait_for_marker(pool: AgentPool, server: AgentServer, value: float) -> None:
    await server.send_metrics(report("marker", gauges=[GaugeMetric("marker", value)]))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    while True:
        gauges = [g for g in pool.metrics_collector.snapshot().gauges if g.name == "marker"]
        if gauges and gauges[0].value == value:
            return
        assert loop.time() < deadline, "the pool never processed the reports"
        await asyncio.sleep(0.02)


def _frames(template: bytes, marker: bytes, ids: Any, per_write: int) -> Any:
    batch: list[bytes] = []
    for agent_id in ids:
        batch.append(
            core.encode_frame(MessageType.METRICS_REPORT, template.replace(marker, agent_id))
        )
        if len(batch) == per_write:
            yield b"".join(batch)
            batch = []
    if batch:
        yield b"".join(batch)


async def test_200k_reports_with_fresh_agent_ids_stay_under_the_pools_id() -> None:
    """Before: 200k reports with fresh ids grew RSS 26 -> 109 MB and exported foreign ids."""
    async with pool_with_agent() as (pool, server):
        codec = server.sessions[0].codec
        marker = b"ID-0000000000"
        template = codec.encode_control(
            report(marker.decode(), counters=[CounterMetric("requests_total", 1)])
        )
        assert marker in template
        await _wait_for_marker(pool, server, 0.0)
        rss0 = _rss()
        ids = (f"ID-{i:010d}".encode() for i in range(200_000))
        await _push_raw(server, _frames(template, marker, ids, 2000))
        await _wait_for_marker(pool, server, 1.0)
        grown = _rss() - rss0
        mc = pool.metrics_collector
        assert mc.active_agents() == ["the-agent"]
        assert mc.series_count() == 2  # requests_total and the marker
        text = pool.export_prometheus()
        assert 'requests_total{agent_id="the-agent"} 1' in text and "ID-" not in text
        assert grown < 40 * 1024 * 1024, grown


async def test_100_reports_with_1mib_ids_keep_none_of_them() -> None:
    """Before: 100 reports with 1 MiB agent ids grew RSS to 299 MB."""
    async with pool_with_agent() as (pool, server):
        codec = server.sessions[0].codec
        await _wait_for_marker(pool, server, 0.0)
        rss0 = _rss()
        for i in range(100):
            big = "x" * (1 << 20) + f"{i:03d}"
            frame = core.encode_frame(
                MessageType.METRICS_REPORT,
                codec.encode_control(
                    report(big, gauges=[GaugeMetric("g", float(i), labels={"k": big})])
                ),
            )
            await _push_raw(server, [frame])
            del big, frame
        await _wait_for_marker(pool, server, 1.0)
        grown = _rss() - rss0
        mc = pool.metrics_collector
        assert mc.active_agents() == ["the-agent"]
        (g,) = [g for g in mc.snapshot().gauges if g.name == "g"]
        assert g.value == 99.0 and len(dict(g.labels)["k"]) == 1024
        assert len(pool.export_prometheus()) < 10_000
        assert grown < 60 * 1024 * 1024, grown


def test_200k_reports_with_fresh_ids_on_a_bare_collector_stay_within_max_agents() -> None:
    """Used without a pool, ids come from the reports: then max_agents bounds them."""
    mc = MetricsCollector()
    for i in range(200_000):
        mc.record(report(f"id-{i}", counters=[CounterMetric("c_total", i)]))
    assert len(mc.active_agents()) == 1_000 and mc.series_count() == 1_000
    assert mc.dropped_reports() == 199_000
    mc2 = MetricsCollector(MetricsCollectorConfig(max_series_per_agent=0))
    for i in range(5_000):  # agents without series make room for newer ones
        mc2.record(report(f"id-{i}", counters=[CounterMetric("c_total", i)]))
    assert mc2.active_agents()[-1] == "id-4999" and len(mc2.active_agents()) == 1_000
