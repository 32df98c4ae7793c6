"""AgentPoolCollector: prometheus_client collector over a pool's metrics (DECISIONS 12)."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agentpool._impl import core
from agentpool.messages import (
    CounterMetric,
    GaugeMetric,
    HistogramBucket,
    HistogramMetric,
    MetricsReport,
)
from agentpool.metrics import AgentPoolCollector, MetricsCollector, MetricsCollectorConfig


@dataclass
class Stats:
    """Same fields as the pool's AgentPoolStats."""

    agent_id: str
    active_connections: int = 0
    healthy_connections: int = 0
    total_in_flight: int = 0
    total_requests: int = 0
    total_errors: int = 0
    error_rate: float = 0.0
    is_healthy: bool = False


class FakePool:
    def __init__(self, collector_config: MetricsCollectorConfig | None = None) -> None:
        self.protocol_metrics = core.ProtocolMetrics()
        self.metrics_collector = MetricsCollector(collector_config)
        self.stats: list[Stats] = []
        self.stats_calls = 0

    def agent_stats_sync(self) -> Sequence[Stats]:
        self.stats_calls += 1
        return list(self.stats)


class ExplodingPool:
    @property
    def protocol_metrics(self) -> Any:
        raise AssertionError("describe() must not read protocol_metrics")

    @property
    def metrics_collector(self) -> MetricsCollector:
        raise AssertionError("describe() must not read metrics_collector")

    def agent_stats_sync(self) -> Sequence[Any]:
        raise AssertionError("describe() must not read agent stats")


Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(collector: AgentPoolCollector) -> tuple[dict[str, str], Series]:
    """Register in a fresh registry, render, parse back: (family -> type, series -> value)."""
    registry = CollectorRegistry()
    registry.register(collector)
    return parse(generate_latest(registry).decode())


def parse(text: str) -> tuple[dict[str, str], Series]:
    types: dict[str, str] = {}
    series: Series = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            labels = dict(s.labels)
            if "le" in labels:
                labels["le"] = repr(float(labels["le"]))
            key = (s.name, tuple(sorted(labels.items())))
            assert key not in series, f"duplicate series {key}"
            series[key] = s.value
    return types, series


def report(agent_id: str, **kw: Any) -> MetricsReport:
    return MetricsReport(agent_id=agent_id, timestamp_ms=1, interval_ms=1000, **kw)


P = "agent_protocol"


def test_describe_does_not_touch_pool_and_register_does_not_collect() -> None:
    collector = AgentPoolCollector(ExplodingPool())  # type: ignore[arg-type]
    names = {m.name for m in collector.describe()}
    assert f"{P}_requests" in names  # counter families drop the _total suffix
    assert f"{P}_request_duration_seconds" in names
    assert f"{P}_agent_healthy" in names
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    with pytest.raises(AssertionError):
        generate_latest(registry)


def test_import_registers_nothing_and_does_not_import_prometheus_client() -> None:
    code = (
        "import sys, agentpool.metrics as m\n"
        "assert 'prometheus_client' not in sys.modules, 'imported at import time'\n"
        "pool = type('P', (), {})()\n"
        "m.AgentPoolCollector(pool)\n"
        "assert 'prometheus_client' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_empty_pool_scrape() -> None:
    types, series = scrape(AgentPoolCollector(FakePool()))
    assert types[f"{P}_requests"] == "counter"
    assert types[f"{P}_in_flight_requests"] == "gauge"
    assert types[f"{P}_request_duration_seconds"] == "histogram"
    assert series[(f"{P}_requests_total", ())] == 0.0
    assert series[(f"{P}_request_duration_seconds_count", ())] == 0.0
    assert series[(f"{P}_request_duration_seconds_bucket", (("le", "inf"),))] == 0.0
    assert not any(name.startswith(f"{P}_agent_") for name, _ in series)


def test_protocol_metrics_values() -> None:
    pool = FakePool()
    pm = pool.protocol_metrics
    for _ in range(3):
        pm.inc_requests()
    pm.inc_responses()
    pm.inc_responses()
    pm.inc_timeouts()
    pm.inc_connection_errors()
    pm.record_flow_pause()
    pm.record_flow_rejection()
    pm.inc_affinity_evictions(4)
    pm.inc_affinity_rejections()
    pm.set_in_flight(7)
    pm.set_correlation_affinities(9)
    pm.set_buffer_utilization(55)
    pm.set_healthy_connections(3)
    pm.set_paused_connections(1)
    pm.record_request_duration(0.0002)  # 200 µs -> le 0.0005
    pm.record_request_duration(0.003)  # 3 ms -> le 0.005
    pm.record_request_duration(2.0)  # overflow
    pm.record_serialization_time(0.000005)

    _, s = scrape(AgentPoolCollector(pool))
    expected_scalars = {
        "requests_total": 3,
        "responses_total": 2,
        "timeouts_total": 1,
        "connection_errors_total": 1,
        "flow_control_pauses_total": 1,
        "flow_control_rejections_total": 1,
        "affinity_evictions_total": 4,
        "affinity_rejections_total": 1,
        "in_flight_requests": 7,
        "correlation_affinities": 9,
        "buffer_utilization_percent": 55,
        "healthy_connections": 3,
        "paused_connections": 1,
    }
    for name, value in expected_scalars.items():
        assert s[(f"{P}_{name}", ())] == value, name
    # upstream never exports these two
    assert not any("serialization_errors" in n or "resumes" in n for n, _ in s)

    h = f"{P}_request_duration_seconds"
    bounds_us = [10, 50, 100, 500, 1_000, 5_000, 10_000, 50_000, 100_000, 500_000, 1_000_000]
    cumulative = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2]
    for b, c in zip(bounds_us, cumulative):
        assert s[(f"{h}_bucket", (("le", repr(b / 1e6)),))] == c, b
    assert s[(f"{h}_bucket", (("le", "inf"),))] == 3
    assert s[(f"{h}_count", ())] == 3
    assert s[(f"{h}_sum", ())] == pytest.approx(2.0032)
    ser = f"{P}_serialization_seconds"
    assert s[(f"{ser}_bucket", (("le", repr(1e-05)),))] == 1
    assert s[(f"{ser}_sum", ())] == pytest.approx(0.000005)


def test_protocol_series_match_to_prometheus() -> None:
    pool = FakePool()
    pm = pool.protocol_metrics
    pm.inc_requests()
    pm.set_healthy_connections(3)
    for d in (0.00001, 0.0004, 0.07, 0.07, 9.0):
        pm.record_request_duration(d)
        pm.record_serialization_time(d / 10)
    _, from_text = parse(pm.to_prometheus(P))
    _, from_collector = scrape(AgentPoolCollector(pool))
    protocol_only = {k: v for k, v in from_collector.items() if not k[0].startswith(f"{P}_agent_")}
    assert protocol_only.keys() == from_text.keys()
    for key, value in from_text.items():
        assert protocol_only[key] == pytest.approx(value, abs=1e-6), key


def test_custom_prefix() -> None:
    pool = FakePool()
    pool.protocol_metrics.inc_requests()
    pool.stats = [Stats("waf", active_connections=1)]
    types, s = scrape(AgentPoolCollector(pool, prefix="zentinel_agents"))
    assert s[("zentinel_agents_requests_total", ())] == 1
    assert s[("zentinel_agents_agent_connections", (("agent_id", "waf"),))] == 1
    assert not any(n.startswith(P) for n in types)


def test_per_agent_gauges() -> None:
    pool = FakePool()
    pool.stats = [
        Stats("waf", 4, 3, 2, 100, 5, 0.05, True),
        Stats("auth", 2, 0, 0, 10, 10, 1.0, False),
    ]
    types, s = scrape(AgentPoolCollector(pool))
    expected = {
        "agent_connections": (4, 2),
        "agent_healthy_connections": (3, 0),
        "agent_in_flight_requests": (2, 0),
        "agent_requests": (100, 10),
        "agent_errors": (5, 10),
        "agent_error_rate": (0.05, 1.0),
        "agent_healthy": (1, 0),
    }
    for name, (waf, auth) in expected.items():
        assert types[f"{P}_{name}"] == "gauge"
        assert s[(f"{P}_{name}", (("agent_id", "waf"),))] == waf, name
        assert s[(f"{P}_{name}", (("agent_id", "auth"),))] == auth, name


def test_built_fresh_on_every_scrape() -> None:
    pool = FakePool()
    collector = AgentPoolCollector(pool)
    registry = CollectorRegistry()
    registry.register(collector)
    _, first = parse(generate_latest(registry).decode())
    assert first[(f"{P}_requests_total", ())] == 0
    pool.protocol_metrics.inc_requests()
    pool.stats = [Stats("waf", active_connections=2)]
    pool.metrics_collector.record(report("waf", gauges=[GaugeMetric(name="queue", value=3.0)]))
    _, second = parse(generate_latest(registry).decode())
    assert second[(f"{P}_requests_total", ())] == 1
    assert second[(f"{P}_agent_connections", (("agent_id", "waf"),))] == 2
    assert second[("queue", (("agent_id", "waf"),))] == 3
    pool.stats = []
    _, third = parse(generate_latest(registry).decode())
    assert (f"{P}_agent_connections", (("agent_id", "waf"),)) not in third
    assert pool.stats_calls == 3


def test_agent_reported_series() -> None:
    pool = FakePool()
    pool.metrics_collector.record(
        report(
            "waf",
            counters=[
                CounterMetric(
                    name="waf_blocked_total", value=12, help="Blocked", labels={"rule": "x"}
                ),
                CounterMetric(name="waf_hits", value=7),
            ],
            gauges=[
                GaugeMetric(name="waf_queue_depth", value=2.5, help="Queue", labels={"q": 'a"b'})
            ],
            histograms=[
                HistogramMetric(
                    name="waf_latency_seconds",
                    sum=1.5,
                    count=4,
                    buckets=[
                        HistogramBucket(0.1, 1),
                        HistogramBucket(1.0, 3),
                        HistogramBucket(math.inf, 4),
                    ],
                    help="Latency",
                )
            ],
        )
    )
    pool.metrics_collector.record(
        report("auth", counters=[CounterMetric(name="waf_blocked_total", value=1)])
    )
    types, s = scrape(AgentPoolCollector(pool))
    assert types["waf_blocked"] == "counter"
    assert s[("waf_blocked_total", (("agent_id", "waf"), ("rule", "x")))] == 12
    assert s[("waf_blocked_total", (("agent_id", "auth"),))] == 1
    assert types["waf_hits"] == "unknown"  # no _total suffix: exported untyped, same name
    assert s[("waf_hits", (("agent_id", "waf"),))] == 7
    assert types["waf_queue_depth"] == "gauge"
    assert s[("waf_queue_depth", (("agent_id", "waf"), ("q", 'a"b')))] == 2.5
    assert types["waf_latency_seconds"] == "histogram"
    w = (("agent_id", "waf"),)
    assert s[("waf_latency_seconds_bucket", (*w, ("le", "0.1")))] == 1
    assert s[("waf_latency_seconds_bucket", (*w, ("le", "1.0")))] == 3
    assert s[("waf_latency_seconds_bucket", (*w, ("le", "inf")))] == 4
    assert s[("waf_latency_seconds_sum", w)] == 1.5
    assert s[("waf_latency_seconds_count", w)] == 4


def test_agent_series_match_export_prometheus() -> None:
    pool = FakePool()
    pool.metrics_collector.record(
        report(
            "a",
            counters=[CounterMetric(name="x_total", value=3, labels={"k": "v"})],
            gauges=[GaugeMetric(name="g", value=-1.25)],
            histograms=[
                HistogramMetric(
                    name="h",
                    sum=0.5,
                    count=2,
                    buckets=[HistogramBucket(0.25, 1), HistogramBucket(math.inf, 2)],
                )
            ],
        )
    )
    _, from_text = parse(pool.metrics_collector.export_prometheus())
    _, scraped = scrape(AgentPoolCollector(pool))
    for key, value in from_text.items():
        assert scraped[key] == value, key


def test_agent_metric_clashing_with_protocol_name_is_skipped() -> None:
    pool = FakePool()
    pool.protocol_metrics.inc_requests()
    pool.metrics_collector.record(
        report(
            "evil",
            counters=[CounterMetric(name=f"{P}_requests_total", value=999)],
            gauges=[
                GaugeMetric(name=f"{P}_agent_healthy", value=5.0),
                GaugeMetric(name="ok_gauge", value=1.0),
            ],
        )
    )
    _, s = scrape(AgentPoolCollector(pool))
    assert s[(f"{P}_requests_total", ())] == 1
    assert (f"{P}_requests_total", (("agent_id", "evil"),)) not in s
    assert (f"{P}_agent_healthy", (("agent_id", "evil"),)) not in s
    assert s[("ok_gauge", (("agent_id", "evil"),))] == 1


def test_same_name_in_two_kinds_keeps_first() -> None:
    pool = FakePool()
    pool.metrics_collector.record(
        report(
            "a",
            counters=[CounterMetric(name="dup", value=1)],
            gauges=[GaugeMetric(name="dup", value=2.0)],
        )
    )
    types, s = scrape(AgentPoolCollector(pool))
    assert types["dup"] == "unknown"
    assert s[("dup", (("agent_id", "a"),))] == 1


def test_duplicate_label_sets_keep_newest_without_agent_label() -> None:
    clock_now = [10.0]
    pool = FakePool()
    pool.metrics_collector = MetricsCollector(
        MetricsCollectorConfig(include_agent_id_label=False), clock=lambda: clock_now[0]
    )
    pool.metrics_collector.record(report("a", gauges=[GaugeMetric(name="g", value=1.0)]))
    clock_now[0] = 11.0
    pool.metrics_collector.record(report("b", gauges=[GaugeMetric(name="g", value=2.0)]))
    _, s = scrape(AgentPoolCollector(pool))
    assert s[("g", ())] == 2.0


def test_invalid_agent_metric_name_skipped() -> None:
    pool = FakePool()
    pool.metrics_collector.record(
        report("a", gauges=[GaugeMetric(name="", value=1.0), GaugeMetric(name="fine", value=2.0)])
    )
    _, s = scrape(AgentPoolCollector(pool))
    assert s[("fine", (("agent_id", "a"),))] == 2.0


def test_agent_metric_clashing_with_family_or_sample_names_is_skipped() -> None:
    pool = FakePool()
    pool.metrics_collector.record(
        report(
            "a",
            gauges=[
                GaugeMetric(name=f"{P}_requests", value=1.0),  # the requests counter's family
                GaugeMetric(name=f"{P}_request_duration_seconds_count", value=1.0),
                GaugeMetric(name="h_sum", value=1.0),  # clashes with the histogram below
            ],
            histograms=[HistogramMetric(name="h", sum=1.0, count=1, buckets=[])],
        )
    )
    types, s = scrape(AgentPoolCollector(pool))
    assert (f"{P}_requests", (("agent_id", "a"),)) not in s
    assert s[(f"{P}_request_duration_seconds_count", ())] == 0
    assert s[("h_sum", (("agent_id", "a"),))] == 1.0  # gauges come before histograms
    assert "h" not in types
