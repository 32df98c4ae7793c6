"""MetricsCollector: recording, limits, expiry and the upstream text format (POOL.md §11, §16.3)."""

from __future__ import annotations

import logging
import math

import pytest
from _helpers import FakeClock
from prometheus_client.parser import text_string_to_metric_families

from agentpool.messages import (
    CounterMetric,
    GaugeMetric,
    HistogramBucket,
    HistogramMetric,
    MetricsReport,
)
from agentpool.metrics import (
    MetricsCollector,
    MetricsCollectorConfig,
    escape_label_value,
    format_le,
    format_value,
    rust_f64_display,
)


def report(
    agent_id: str = "agent-1",
    counters: list[CounterMetric] | None = None,
    gauges: list[GaugeMetric] | None = None,
    histograms: list[HistogramMetric] | None = None,
) -> MetricsReport:
    return MetricsReport(
        agent_id=agent_id,
        timestamp_ms=1_700_000_000_000,
        interval_ms=10_000,
        counters=counters or [],
        gauges=gauges or [],
        histograms=histograms or [],
    )


def counter(name: str, value: int, help: str | None = None, **labels: str) -> CounterMetric:
    return CounterMetric(name=name, value=value, help=help, labels=dict(labels))


def gauge(name: str, value: float, help: str | None = None, **labels: str) -> GaugeMetric:
    return GaugeMetric(name=name, value=value, help=help, labels=dict(labels))


def histogram(
    name: str,
    sum_: float,
    count: int,
    buckets: list[tuple[float, int]],
    help: str | None = None,
    **labels: str,
) -> HistogramMetric:
    return HistogramMetric(
        name=name,
        sum=sum_,
        count=count,
        buckets=[HistogramBucket(le=le, count=c) for le, c in buckets],
        help=help,
        labels=dict(labels),
    )


# ---------------------------------------------------------------- value formatting


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (5.0, "5"),
        (0.0, "0"),
        (-0.0, "0"),
        (-3.0, "-3"),
        (42.0, "42"),
        (0.1, "0.1"),
        (10.5, "10.5"),
        (1e-7, "0.0000001"),
        (1.5e-7, "0.00000015"),
        (123.456, "123.456"),
        (-2.25, "-2.25"),
        (1e15, "1000000000000000"),
        (1e16, "10000000000000000"),
        (9007199254740993.0, "9007199254740992"),
        (1e21, "1000000000000000000000"),
        (2.0**70, "1180591620717411300000"),
        (0.30000000000000004, "0.30000000000000004"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_format_value(value: float, text: str) -> None:
    assert format_value(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.0, "1"),
        (0.1, "0.1"),
        (0.005, "0.005"),
        (2.5, "2.5"),
        (1e-7, "0.0000001"),
        (1e21, "1000000000000000000000"),
        (-0.0, "-0"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
    ],
)
def test_format_le(value: float, text: str) -> None:
    assert format_le(value) == text


def test_rust_f64_display() -> None:
    assert rust_f64_display(1.0) == "1"
    assert rust_f64_display(1e300).startswith("1000000000")
    assert "e" not in rust_f64_display(1e300)
    assert rust_f64_display(5e-324) == "0." + "0" * 323 + "5"
    assert rust_f64_display(math.inf) == "inf"
    assert rust_f64_display(-math.inf) == "-inf"
    assert rust_f64_display(math.nan) == "NaN"


def test_escape_label_value() -> None:
    assert escape_label_value('with"quotes') == 'with\\"quotes'
    assert escape_label_value("back\\slash") == "back\\\\slash"
    assert escape_label_value("new\nline") == "new\\nline"
    assert escape_label_value('\\"\n') == '\\\\\\"\\n'


# ---------------------------------------------------------------- §16.3 checklist


def test_config_defaults() -> None:
    cfg = MetricsCollectorConfig()
    assert cfg.max_age == 300.0
    assert cfg.max_series == 10_000
    assert cfg.include_agent_id_label is True


def test_record_counter_and_gauge() -> None:
    mc = MetricsCollector()
    mc.record(report(counters=[counter("requests_total", 100)], gauges=[gauge("in_flight", 5.0)]))
    assert mc.series_count() == 2
    assert mc.active_agents() == ["agent-1"]
    assert mc.dropped_series() == 0


def test_max_series_drops_new_but_updates_existing() -> None:
    mc = MetricsCollector(MetricsCollectorConfig(max_series=2))
    mc.record(report(counters=[counter("a", 1), counter("b", 2), counter("c", 3)]))
    assert mc.series_count() == 2
    assert mc.dropped_series() == 1
    mc.record(report(counters=[counter("a", 42)]))
    assert mc.series_count() == 2
    assert mc.dropped_series() == 1
    text = mc.export_prometheus()
    assert 'a{agent_id="agent-1"} 42\n' in text
    assert "\nc{" not in text and not text.startswith("c{")


def test_max_series_counts_all_kinds_and_all_agents() -> None:
    mc = MetricsCollector(MetricsCollectorConfig(max_series=3))
    mc.record(report("x", counters=[counter("a", 1)], gauges=[gauge("g", 1.0)]))
    mc.record(report("y", histograms=[histogram("h", 1.0, 1, [(math.inf, 1)])]))
    mc.record(report("z", gauges=[gauge("g", 2.0)]))
    assert mc.series_count() == 3
    assert mc.dropped_series() == 1
    assert mc.active_agents() == ["x", "y", "z"]


def test_expire_with_zero_max_age_then_accepts_new() -> None:
    mc = MetricsCollector(MetricsCollectorConfig(max_age=0.0, max_series=1))
    mc.record(report(counters=[counter("a", 1)]))
    assert mc.series_count() == 1
    assert mc.expire_old_metrics() == 1
    assert mc.series_count() == 0
    mc.record(report(counters=[counter("b", 1)]))
    assert mc.series_count() == 1
    assert mc.dropped_series() == 0


def test_expire_respects_max_age_with_clock() -> None:
    clock = FakeClock(500.0)
    mc = MetricsCollector(MetricsCollectorConfig(max_age=300.0), clock=clock)
    mc.record(report(counters=[counter("old", 1)], gauges=[gauge("g", 1.0)]))
    clock.now += 200
    mc.record(report(counters=[counter("new", 1)], gauges=[gauge("g", 2.0)]))
    clock.now += 99.999
    assert mc.expire_old_metrics() == 0
    clock.now += 0.001  # "old" is now exactly max_age old
    assert mc.expire_old_metrics() == 1
    assert mc.series_count() == 2
    assert mc.last_report("agent-1") == 700.0
    clock.now += 1000
    assert mc.expire_old_metrics() == 2
    assert mc.active_agents() == ["agent-1"]  # last_report entries never expire


def test_labels_in_export() -> None:
    mc = MetricsCollector()
    mc.record(report(counters=[counter("requests_total", 7, route="/api")]))
    text = mc.export_prometheus()
    assert "requests_total" in text
    assert 'route="/api"' in text
    assert 'agent_id="agent-1"' in text


def test_help_in_export() -> None:
    mc = MetricsCollector()
    mc.record(report(counters=[counter("http_requests_total", 123, "Total HTTP requests")]))
    text = mc.export_prometheus()
    assert "# HELP http_requests_total Total HTTP requests\n" in text
    assert "# TYPE http_requests_total counter\n" in text
    assert "123" in text


def test_histogram_export_without_agent_label() -> None:
    mc = MetricsCollector(MetricsCollectorConfig(include_agent_id_label=False))
    mc.record(
        report(
            histograms=[
                histogram(
                    "request_duration_seconds",
                    10.5,
                    100,
                    [(0.01, 10), (0.1, 50), (1.0, 90), (math.inf, 100)],
                )
            ]
        )
    )
    assert mc.export_prometheus() == (
        "# TYPE request_duration_seconds histogram\n"
        'request_duration_seconds_bucket{le="0.01"} 10\n'
        'request_duration_seconds_bucket{le="0.1"} 50\n'
        'request_duration_seconds_bucket{le="1"} 90\n'
        'request_duration_seconds_bucket{le="+Inf"} 100\n'
        "request_duration_seconds_sum 10.5\n"
        "request_duration_seconds_count 100\n"
    )


def test_label_escaping_in_export() -> None:
    mc = MetricsCollector(MetricsCollectorConfig(include_agent_id_label=False))
    mc.record(report(gauges=[gauge("g", 1.0, path='with"quotes\\and\nnewline')]))
    assert mc.export_prometheus() == (
        '# TYPE g gauge\ng{path="with\\"quotes\\\\and\\nnewline"} 1\n'
    )


def test_snapshot_counts() -> None:
    mc = MetricsCollector()
    mc.record(report(counters=[counter("c", 1)], gauges=[gauge("g", 1.0)]))
    snap = mc.snapshot()
    assert snap.counter_count() == 1
    assert snap.gauge_count() == 1
    assert snap.histogram_count() == 0
    assert snap.counters[0].labels == (("agent_id", "agent-1"),)
    assert snap.gauges[0].value == 1.0


# ---------------------------------------------------------------- exact format


def test_full_export_exact() -> None:
    mc = MetricsCollector()
    mc.record(
        report(
            "waf-1",
            counters=[
                counter("requests_total", 10, "Total requests", route="/api"),
                counter("blocked_total", 3),
            ],
            gauges=[gauge("queue_depth", 2.5, b="x", a="y")],
            histograms=[
                histogram(
                    "latency_seconds", 1.25, 4, [(0.1, 1), (1.0, 3), (math.inf, 4)], "Latency"
                )
            ],
        )
    )
    expected = (
        "# TYPE blocked_total counter\n"
        'blocked_total{agent_id="waf-1"} 3\n'
        "# HELP requests_total Total requests\n"
        "# TYPE requests_total counter\n"
        'requests_total{agent_id="waf-1",route="/api"} 10\n'
        "# TYPE queue_depth gauge\n"
        'queue_depth{a="y",agent_id="waf-1",b="x"} 2.5\n'
        "# HELP latency_seconds Latency\n"
        "# TYPE latency_seconds histogram\n"
        'latency_seconds_bucket{agent_id="waf-1",le="0.1"} 1\n'
        'latency_seconds_bucket{agent_id="waf-1",le="1"} 3\n'
        'latency_seconds_bucket{agent_id="waf-1",le="+Inf"} 4\n'
        'latency_seconds_sum{agent_id="waf-1"} 1.25\n'
        'latency_seconds_count{agent_id="waf-1"} 4\n'
    )
    assert mc.export_prometheus() == expected


def test_empty_export() -> None:
    assert MetricsCollector().export_prometheus() == ""


def test_series_without_labels_and_special_values() -> None:
    mc = MetricsCollector(MetricsCollectorConfig(include_agent_id_label=False))
    mc.record(
        report(
            gauges=[
                gauge("a_inf", math.inf),
                gauge("b_ninf", -math.inf),
                gauge("c_nan", math.nan),
                gauge("d_tiny", 1e-7),
                gauge("e_big", 1e21),
                gauge("f_int", 5.0),
            ],
            counters=[counter("z_big_total", 2**64 - 1)],
        )
    )
    assert mc.export_prometheus() == (
        "# TYPE z_big_total counter\n"
        "z_big_total 18446744073709552000\n"
        "# TYPE a_inf gauge\na_inf +Inf\n"
        "# TYPE b_ninf gauge\nb_ninf -Inf\n"
        "# TYPE c_nan gauge\nc_nan NaN\n"
        "# TYPE d_tiny gauge\nd_tiny 0.0000001\n"
        "# TYPE e_big gauge\ne_big 1000000000000000000000\n"
        "# TYPE f_int gauge\nf_int 5\n"
    )


def test_names_sorted_and_series_grouped_across_agents() -> None:
    mc = MetricsCollector()
    mc.record(report("b-agent", counters=[counter("zeta_total", 1), counter("alpha_total", 2)]))
    mc.record(report("a-agent", counters=[counter("alpha_total", 5, "Alpha")]))
    assert mc.export_prometheus() == (
        # HELP only when the first series of the name has one ("b-agent" recorded first)
        "# TYPE alpha_total counter\n"
        'alpha_total{agent_id="b-agent"} 2\n'
        'alpha_total{agent_id="a-agent"} 5\n'
        "# TYPE zeta_total counter\n"
        'zeta_total{agent_id="b-agent"} 1\n'
    )


def test_help_of_first_series_used() -> None:
    mc = MetricsCollector()
    mc.record(report("a", gauges=[gauge("g", 1.0, "First help")]))
    mc.record(report("b", gauges=[gauge("g", 2.0)]))
    text = mc.export_prometheus()
    assert text.startswith("# HELP g First help\n# TYPE g gauge\n")


def test_help_escaped_for_text_format() -> None:
    mc = MetricsCollector(MetricsCollectorConfig(include_agent_id_label=False))
    mc.record(report(gauges=[gauge("g", 1.0, "line1\nline2 \\ end")]))
    assert mc.export_prometheus().startswith("# HELP g line1\\nline2 \\\\ end\n")


def test_values_replaced_not_accumulated() -> None:
    mc = MetricsCollector(MetricsCollectorConfig(include_agent_id_label=False))
    mc.record(report(counters=[counter("c_total", 10, "old help")], gauges=[gauge("g", 3.0)]))
    mc.record(report(counters=[counter("c_total", 4, "new help")], gauges=[gauge("g", 1.5)]))
    assert mc.series_count() == 2
    assert mc.export_prometheus() == (
        "# HELP c_total new help\n# TYPE c_total counter\nc_total 4\n# TYPE g gauge\ng 1.5\n"
    )


def test_agent_id_label_overrides_reported_label() -> None:
    mc = MetricsCollector()
    mc.record(report("real", gauges=[gauge("g", 1.0, agent_id="spoofed")]))
    assert mc.export_prometheus() == '# TYPE g gauge\ng{agent_id="real"} 1\n'


def test_agent_id_label_off_keeps_reported_label() -> None:
    mc = MetricsCollector(MetricsCollectorConfig(include_agent_id_label=False))
    mc.record(report("real", gauges=[gauge("g", 1.0, agent_id="reported")]))
    assert mc.export_prometheus() == '# TYPE g gauge\ng{agent_id="reported"} 1\n'


def test_histogram_le_merged_into_sorted_labels() -> None:
    mc = MetricsCollector()
    mc.record(
        report(
            "a",
            histograms=[histogram("h", 0.3, 2, [(0.5, 1), (math.inf, 2)], zone="eu", method="GET")],
        )
    )
    assert mc.export_prometheus() == (
        "# TYPE h histogram\n"
        'h_bucket{agent_id="a",le="0.5",method="GET",zone="eu"} 1\n'
        'h_bucket{agent_id="a",le="+Inf",method="GET",zone="eu"} 2\n'
        'h_sum{agent_id="a",method="GET",zone="eu"} 0.3\n'
        'h_count{agent_id="a",method="GET",zone="eu"} 2\n'
    )


def test_same_labels_without_agent_label_are_separate_series_per_agent() -> None:
    mc = MetricsCollector(MetricsCollectorConfig(include_agent_id_label=False))
    mc.record(report("a", gauges=[gauge("g", 1.0)]))
    mc.record(report("b", gauges=[gauge("g", 2.0)]))
    assert mc.series_count() == 2
    assert mc.export_prometheus() == "# TYPE g gauge\ng 1\ng 2\n"


def test_capacity_warning_once_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(500.0)
    mc = MetricsCollector(MetricsCollectorConfig(max_series=1, max_age=10.0), clock=clock)
    with caplog.at_level(logging.WARNING, logger="agentpool.metrics"):
        mc.record(report(counters=[counter("a", 1), counter("b", 1), counter("c", 1)]))
        mc.record(report(counters=[counter("d", 1)]))
        assert len(caplog.records) == 1
        assert "max_series=1" in caplog.records[0].getMessage()
        assert mc.dropped_series() == 3
        clock.now += 10
        mc.expire_old_metrics()  # below the cap again: re-arms the warning
        mc.record(report(counters=[counter("e", 1), counter("f", 1)]))
        assert len(caplog.records) == 2
    assert mc.dropped_series() == 4


def test_export_parses_with_prometheus_parser() -> None:
    mc = MetricsCollector()
    mc.record(
        report(
            "agent-1",
            counters=[counter("agent_requests_total", 1000, "Requests", route="/api")],
            gauges=[gauge("agent_in_flight_requests", 3.0, "In flight")],
            histograms=[
                histogram(
                    "agent_requests_duration_seconds",
                    0.75,
                    3,
                    [(0.1, 1), (0.5, 2), (math.inf, 3)],
                    "Durations",
                )
            ],
        )
    )
    mc.record(report("agent-2", gauges=[gauge("agent_in_flight_requests", 0.5, 'q"\\')]))
    fams = {f.name: f for f in text_string_to_metric_families(mc.export_prometheus())}
    assert fams["agent_requests"].type == "counter"
    (s,) = fams["agent_requests"].samples
    assert s.name == "agent_requests_total"
    assert s.labels == {"agent_id": "agent-1", "route": "/api"}
    assert s.value == 1000.0
    gauges = {s.labels["agent_id"]: s.value for s in fams["agent_in_flight_requests"].samples}
    assert gauges == {"agent-1": 3.0, "agent-2": 0.5}
    hist = fams["agent_requests_duration_seconds"]
    assert hist.type == "histogram"
    got = [(s.name, s.labels.get("le"), s.value) for s in hist.samples]
    assert got == [
        ("agent_requests_duration_seconds_bucket", "0.1", 1.0),
        ("agent_requests_duration_seconds_bucket", "0.5", 2.0),
        ("agent_requests_duration_seconds_bucket", "+Inf", 3.0),
        ("agent_requests_duration_seconds_sum", None, 0.75),
        ("agent_requests_duration_seconds_count", None, 3.0),
    ]


def test_repr() -> None:
    assert repr(MetricsCollector()) == "MetricsCollector(series=0, dropped=0)"
