"""ProtocolMetrics, Histogram and their snapshots on the active core (POOL.md §10, §16.2)."""

from __future__ import annotations

import math

import pytest

from agentpool._impl import core

EXPECTED_PROMETHEUS = """\
# HELP agent_protocol_requests_total Total requests sent to agents
# TYPE agent_protocol_requests_total counter
agent_protocol_requests_total 3

# HELP agent_protocol_responses_total Total responses received from agents
# TYPE agent_protocol_responses_total counter
agent_protocol_responses_total 2

# HELP agent_protocol_timeouts_total Total request timeouts
# TYPE agent_protocol_timeouts_total counter
agent_protocol_timeouts_total 1

# HELP agent_protocol_connection_errors_total Total connection errors
# TYPE agent_protocol_connection_errors_total counter
agent_protocol_connection_errors_total 1

# HELP agent_protocol_flow_control_pauses_total Flow control pause events
# TYPE agent_protocol_flow_control_pauses_total counter
agent_protocol_flow_control_pauses_total 2

# HELP agent_protocol_flow_control_rejections_total Requests rejected due to flow control
# TYPE agent_protocol_flow_control_rejections_total counter
agent_protocol_flow_control_rejections_total 1

# HELP agent_protocol_affinity_evictions_total Correlation affinities reclaimed by TTL sweep
# TYPE agent_protocol_affinity_evictions_total counter
agent_protocol_affinity_evictions_total 5

# HELP agent_protocol_affinity_rejections_total Affinities dropped because the map was at capacity
# TYPE agent_protocol_affinity_rejections_total counter
agent_protocol_affinity_rejections_total 7

# HELP agent_protocol_in_flight_requests Current in-flight requests
# TYPE agent_protocol_in_flight_requests gauge
agent_protocol_in_flight_requests 4

# HELP agent_protocol_correlation_affinities Current correlation affinity entries
# TYPE agent_protocol_correlation_affinities gauge
agent_protocol_correlation_affinities 12

# HELP agent_protocol_buffer_utilization_percent Buffer utilization percentage
# TYPE agent_protocol_buffer_utilization_percent gauge
agent_protocol_buffer_utilization_percent 100

# HELP agent_protocol_healthy_connections Number of healthy agent connections
# TYPE agent_protocol_healthy_connections gauge
agent_protocol_healthy_connections 3

# HELP agent_protocol_paused_connections Number of flow-control paused connections
# TYPE agent_protocol_paused_connections gauge
agent_protocol_paused_connections 1

# HELP agent_protocol_serialization_seconds Serialization time in seconds
# TYPE agent_protocol_serialization_seconds histogram
agent_protocol_serialization_seconds_bucket{le="0.000010"} 0
agent_protocol_serialization_seconds_bucket{le="0.000050"} 1
agent_protocol_serialization_seconds_bucket{le="0.000100"} 1
agent_protocol_serialization_seconds_bucket{le="0.000500"} 2
agent_protocol_serialization_seconds_bucket{le="0.001000"} 2
agent_protocol_serialization_seconds_bucket{le="0.005000"} 3
agent_protocol_serialization_seconds_bucket{le="0.010000"} 3
agent_protocol_serialization_seconds_bucket{le="0.050000"} 3
agent_protocol_serialization_seconds_bucket{le="0.100000"} 3
agent_protocol_serialization_seconds_bucket{le="0.500000"} 3
agent_protocol_serialization_seconds_bucket{le="1.000000"} 3
agent_protocol_serialization_seconds_bucket{le="+Inf"} 3
agent_protocol_serialization_seconds_sum 0.005200
agent_protocol_serialization_seconds_count 3

# HELP agent_protocol_request_duration_seconds Request duration in seconds
# TYPE agent_protocol_request_duration_seconds histogram
agent_protocol_request_duration_seconds_bucket{le="0.000010"} 1
agent_protocol_request_duration_seconds_bucket{le="0.000050"} 1
agent_protocol_request_duration_seconds_bucket{le="0.000100"} 1
agent_protocol_request_duration_seconds_bucket{le="0.000500"} 1
agent_protocol_request_duration_seconds_bucket{le="0.001000"} 1
agent_protocol_request_duration_seconds_bucket{le="0.005000"} 1
agent_protocol_request_duration_seconds_bucket{le="0.010000"} 1
agent_protocol_request_duration_seconds_bucket{le="0.050000"} 1
agent_protocol_request_duration_seconds_bucket{le="0.100000"} 1
agent_protocol_request_duration_seconds_bucket{le="0.500000"} 1
agent_protocol_request_duration_seconds_bucket{le="1.000000"} 2
agent_protocol_request_duration_seconds_bucket{le="+Inf"} 3
agent_protocol_request_duration_seconds_sum 3.250008
agent_protocol_request_duration_seconds_count 3

"""


def known_state() -> core.ProtocolMetrics:
    m = core.ProtocolMetrics()
    for _ in range(3):
        m.inc_requests()
    m.inc_responses()
    m.inc_responses()
    m.inc_timeouts()
    m.inc_connection_errors()
    for _ in range(4):
        m.inc_serialization_errors()
    m.record_flow_pause()
    m.record_flow_pause()
    m.record_flow_resume()
    m.record_flow_rejection()
    m.inc_affinity_evictions(5)
    for _ in range(7):
        m.inc_affinity_rejections()
    m.set_in_flight(4)
    m.set_correlation_affinities(12)
    m.set_buffer_utilization(150)
    m.set_healthy_connections(3)
    m.set_paused_connections(1)
    for d in (50e-6, 150e-6, 5e-3):
        m.record_serialization_time(d)
    for d in (8e-6, 2.5, 0.75):
        m.record_request_duration(d)
    return m


def test_to_prometheus_exact_text() -> None:
    assert known_state().to_prometheus() == EXPECTED_PROMETHEUS
    assert known_state().to_prometheus("agent_protocol") == EXPECTED_PROMETHEUS


def test_to_prometheus_custom_prefix() -> None:
    text = known_state().to_prometheus("zentinel_agent")
    assert text == EXPECTED_PROMETHEUS.replace("agent_protocol_", "zentinel_agent_")
    assert "agent_protocol" not in text


def test_to_prometheus_leaves_out_unexported_counters() -> None:
    text = known_state().to_prometheus()
    assert "serialization_errors" not in text
    assert "resumes" not in text


def test_upstream_prometheus_checks() -> None:
    m = core.ProtocolMetrics()
    m.inc_requests()
    m.set_healthy_connections(3)
    text = m.to_prometheus("agent_protocol")
    assert "agent_protocol_requests_total 1\n" in text
    assert "agent_protocol_healthy_connections 3\n" in text
    assert "agent_protocol_serialization_seconds" in text


def test_counters_snapshot() -> None:
    m = core.ProtocolMetrics()
    m.inc_requests()
    m.inc_requests()
    m.inc_responses()
    snap = m.snapshot()
    assert snap.requests_total == 2
    assert snap.responses_total == 1
    assert isinstance(snap, core.ProtocolMetricsSnapshot)


def test_in_flight_gauge() -> None:
    m = core.ProtocolMetrics()
    m.set_in_flight(5)
    m.inc_in_flight()
    m.dec_in_flight()
    assert m.in_flight_requests == 5
    assert m.snapshot().in_flight_requests == 5


def test_dec_in_flight_never_underflows() -> None:
    m = core.ProtocolMetrics()
    m.dec_in_flight()
    m.dec_in_flight()
    assert m.in_flight_requests == 0
    m.inc_in_flight()
    assert m.in_flight_requests == 1


def test_flow_control_counters() -> None:
    m = core.ProtocolMetrics()
    m.record_flow_pause()
    m.record_flow_pause()
    m.record_flow_rejection()
    m.record_flow_resume()
    snap = m.snapshot()
    assert snap.flow_control_pauses_total == 2
    assert snap.flow_control_rejections_total == 1
    assert snap.flow_control_resumes_total == 1


def test_every_field_via_property_and_snapshot() -> None:
    m = known_state()
    snap = m.snapshot()
    expected = {
        "requests_total": 3,
        "responses_total": 2,
        "timeouts_total": 1,
        "connection_errors_total": 1,
        "serialization_errors_total": 4,
        "flow_control_pauses_total": 2,
        "flow_control_resumes_total": 1,
        "flow_control_rejections_total": 1,
        "affinity_evictions_total": 5,
        "affinity_rejections_total": 7,
        "in_flight_requests": 4,
        "correlation_affinities": 12,
        "buffer_utilization_percent": 100,
        "healthy_connections": 3,
        "paused_connections": 1,
    }
    for name, value in expected.items():
        assert getattr(m, name) == value, name
        assert getattr(snap, name) == value, name
        with pytest.raises(AttributeError):
            setattr(m, name, 0)


def test_gauge_setters_clamp() -> None:
    m = core.ProtocolMetrics()
    m.set_buffer_utilization(42)
    assert m.buffer_utilization_percent == 42
    m.set_buffer_utilization(101)
    assert m.buffer_utilization_percent == 100
    m.set_buffer_utilization(-3)
    assert m.buffer_utilization_percent == 0
    m.set_healthy_connections(-1)
    assert m.healthy_connections == 0
    m.inc_affinity_evictions(0)
    m.inc_affinity_evictions(2)
    m.inc_affinity_evictions(3)
    assert m.affinity_evictions_total == 5


def test_snapshot_is_a_copy() -> None:
    m = core.ProtocolMetrics()
    m.record_request_duration(0.001)
    snap = m.snapshot()
    m.inc_requests()
    m.record_request_duration(0.001)
    assert snap.requests_total == 0
    assert snap.request_duration.count == 1
    snap.request_duration.counts[0] = 99
    assert m.request_duration.snapshot().counts[0] == 0


# --- histograms ----------------------------------------------------------------------------------


def test_serialization_histogram_sum_and_count() -> None:
    m = core.ProtocolMetrics()
    for d in (50e-6, 150e-6, 5e-3):
        m.record_serialization_time(d)
    h = m.snapshot().serialization_time
    assert isinstance(h, core.HistogramSnapshot)
    assert h.count == 3
    assert h.sum == 5200
    assert h.counts == [0, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0]
    assert m.serialization_time.count == 3
    assert m.serialization_time.sum_micros == 5200


def test_percentiles_over_1_to_100_us() -> None:
    m = core.ProtocolMetrics()
    for us in range(1, 101):
        m.record_request_duration(us / 1e6)
    h = m.snapshot().request_duration
    assert h.count == 100
    assert h.sum == 5050
    assert h.percentile_micros(50) <= 100
    # slots: 10 in <=10, 40 in <=50, 50 in <=100; target = ceil(count * p / 100)
    assert h.percentile_micros(50) == 50
    assert h.percentile_micros(10) == 10
    assert h.percentile_micros(11) == 50
    assert h.percentile_micros(50.5) == 100
    assert h.percentile_micros(99) == 100
    assert h.percentile_micros(100) == 100
    assert h.mean_micros() == 50.5


def test_histogram_default_bounds() -> None:
    h = core.Histogram()
    assert h.bounds_us == (
        10,
        50,
        100,
        500,
        1_000,
        5_000,
        10_000,
        50_000,
        100_000,
        500_000,
        1_000_000,
    )
    assert tuple(core.DEFAULT_BUCKETS_US) == h.bounds_us
    snap = h.snapshot()
    assert snap.buckets == list(h.bounds_us)
    assert snap.counts == [0] * 12
    assert (snap.sum, snap.count) == (0, 0)
    assert snap.mean_micros() == 0.0
    assert snap.percentile_micros(99) == 0


def test_histogram_bucket_bounds_are_inclusive() -> None:
    h = core.Histogram([10, 100])
    for us in (0, 10, 11, 100, 101, 5000):
        h.record_micros(us)
    snap = h.snapshot()
    assert snap.counts == [2, 2, 2]
    assert snap.sum == 5222
    assert snap.count == 6


def test_histogram_overflow_percentile_reports_last_bound() -> None:
    h = core.Histogram([10, 100])
    h.record(5.0)
    snap = h.snapshot()
    assert snap.counts == [0, 0, 1]
    assert snap.percentile_micros(50) == 100
    assert snap.sum == 5_000_000


def test_histogram_records_whole_microseconds() -> None:
    h = core.Histogram()
    h.record(50e-6)  # 5e-05 * 1e6 is 49.99999... in binary floating point
    h.record(1.9e-6)  # floor: 1
    h.record(0.001)
    h.record(0.0000004)  # below 1 µs
    assert h.sum_micros == 50 + 1 + 1000 + 0
    assert h.snapshot().counts[:5] == [2, 1, 0, 0, 1]


def test_histogram_odd_inputs() -> None:
    h = core.Histogram([10])
    h.record(-1.0)
    h.record(math.nan)
    h.record_micros(-5)
    assert h.snapshot().counts == [3, 0]
    assert h.sum_micros == 0
    h.record(math.inf)
    h.record(1e300)
    snap = h.snapshot()
    assert snap.counts == [3, 2]
    assert snap.count == 5
    assert snap.sum == 2 * 9_000_000_000_000_000


def test_histogram_reset() -> None:
    h = core.Histogram()
    h.record(0.5)
    h.reset()
    assert (h.count, h.sum_micros) == (0, 0)
    assert h.snapshot().counts == [0] * 12


@pytest.mark.parametrize("bounds", [[10, 10], [50, 10], [-1, 5]])
def test_histogram_rejects_bad_bounds(bounds: list[int]) -> None:
    with pytest.raises(ValueError):
        core.Histogram(bounds)


def test_histogram_without_bounds() -> None:
    h = core.Histogram([])
    h.record(0.1)
    snap = h.snapshot()
    assert snap.counts == [1]
    assert snap.percentile_micros(50) == 0


def test_histogram_snapshot_math() -> None:
    snap = core.HistogramSnapshot(buckets=[10, 20, 30], counts=[1, 2, 1, 0], sum=70, count=4)
    assert snap.mean_micros() == 17.5
    assert snap.percentile_micros(25) == 10
    assert snap.percentile_micros(26) == 20
    assert snap.percentile_micros(75) == 20
    assert snap.percentile_micros(76) == 30
    assert snap.percentile_micros(0) == 10


def test_custom_histogram_prometheus_free_standing() -> None:
    m = core.ProtocolMetrics()
    m.request_duration.record(0.000010)
    m.request_duration.record(0.000011)
    text = m.to_prometheus("p")
    assert 'p_request_duration_seconds_bucket{le="0.000010"} 1\n' in text
    assert 'p_request_duration_seconds_bucket{le="0.000050"} 2\n' in text
    assert "p_request_duration_seconds_sum 0.000021\n" in text
    assert "p_request_duration_seconds_count 2\n" in text
