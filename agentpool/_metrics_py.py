"""Pure-Python twin of ``_metrics.pxi``: proxy-side protocol counters and histograms.

:class:`ProtocolMetrics` carries upstream's counters, gauges and two µs histograms
(docs/observability.md) with upstream's method names and Prometheus text. The snapshot
classes and the text renderer defined here are shared with the compiled core, so both render
identical output.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_BUCKETS_US",
    "Histogram",
    "HistogramSnapshot",
    "ProtocolMetrics",
    "ProtocolMetricsSnapshot",
]

DEFAULT_BUCKETS_US: tuple[int, ...] = (
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
_MAX_NS = 9_000_000_000_000_000_000
_MAX_NS_F = 9e18


def _check_bounds(bounds_us: Iterable[int]) -> tuple[int, ...]:
    out = tuple(int(b) for b in bounds_us)
    prev = -1
    for b in out:
        if b < 0 or b <= prev:
            raise ValueError("histogram bounds must be non-negative and strictly increasing")
        prev = b
    return out


@dataclass(slots=True)
class HistogramSnapshot:
    """Point-in-time histogram: ``counts[i]`` observations in slot ``i`` (non-cumulative).

    ``buckets`` are the finite upper bounds in µs; ``counts`` has one more slot (overflow);
    ``sum`` is in µs.
    """

    buckets: list[int]
    counts: list[int]
    sum: int
    count: int

    def mean_micros(self) -> float:
        """Mean observation in µs (0.0 if empty)."""
        if self.count == 0:
            return 0.0
        return self.sum / self.count

    def percentile_micros(self, p: float) -> int:
        """Upper bound (µs) of the slot holding the ``p``-th percentile (0 if empty).

        The overflow slot reports the last finite bound.
        """
        if self.count == 0:
            return 0
        target = math.ceil(self.count * p / 100.0)
        cumulative = 0
        for i, c in enumerate(self.counts):
            cumulative += c
            if cumulative >= target:
                if i < len(self.buckets):
                    return self.buckets[i]
                break
        return self.buckets[-1] if self.buckets else 0


@dataclass(slots=True)
class ProtocolMetricsSnapshot:
    """Plain values of every :class:`ProtocolMetrics` field at one instant."""

    requests_total: int = 0
    responses_total: int = 0
    timeouts_total: int = 0
    connection_errors_total: int = 0
    serialization_errors_total: int = 0
    flow_control_pauses_total: int = 0
    flow_control_resumes_total: int = 0
    flow_control_rejections_total: int = 0
    affinity_evictions_total: int = 0
    affinity_rejections_total: int = 0
    in_flight_requests: int = 0
    correlation_affinities: int = 0
    buffer_utilization_percent: int = 0
    healthy_connections: int = 0
    paused_connections: int = 0
    serialization_time: HistogramSnapshot = field(
        default_factory=lambda: HistogramSnapshot(
            list(DEFAULT_BUCKETS_US), [0] * (len(DEFAULT_BUCKETS_US) + 1), 0, 0
        )
    )
    request_duration: HistogramSnapshot = field(
        default_factory=lambda: HistogramSnapshot(
            list(DEFAULT_BUCKETS_US), [0] * (len(DEFAULT_BUCKETS_US) + 1), 0, 0
        )
    )


_SCALARS: tuple[tuple[str, str, str], ...] = (
    ("requests_total", "counter", "Total requests sent to agents"),
    ("responses_total", "counter", "Total responses received from agents"),
    ("timeouts_total", "counter", "Total request timeouts"),
    ("connection_errors_total", "counter", "Total connection errors"),
    ("flow_control_pauses_total", "counter", "Flow control pause events"),
    ("flow_control_rejections_total", "counter", "Requests rejected due to flow control"),
    ("affinity_evictions_total", "counter", "Correlation affinities reclaimed by TTL sweep"),
    (
        "affinity_rejections_total",
        "counter",
        "Affinities dropped because the map was at capacity",
    ),
    ("in_flight_requests", "gauge", "Current in-flight requests"),
    ("correlation_affinities", "gauge", "Current correlation affinity entries"),
    ("buffer_utilization_percent", "gauge", "Buffer utilization percentage"),
    ("healthy_connections", "gauge", "Number of healthy agent connections"),
    ("paused_connections", "gauge", "Number of flow-control paused connections"),
)


def _render_histogram(out: list[str], name: str, help_text: str, h: HistogramSnapshot) -> None:
    out.append(f"# HELP {name} {help_text}\n# TYPE {name} histogram\n")
    cumulative = 0
    for bound, c in zip(h.buckets, h.counts):
        cumulative += c
        out.append(f'{name}_bucket{{le="{bound / 1e6:.6f}"}} {cumulative}\n')
    out.append(f'{name}_bucket{{le="+Inf"}} {h.count}\n')
    out.append(f"{name}_sum {h.sum / 1e6:.6f}\n{name}_count {h.count}\n\n")


def _render_prometheus(snap: ProtocolMetricsSnapshot, prefix: str) -> str:
    """Upstream's exact Prometheus text for a snapshot (shared by both cores)."""
    out: list[str] = []
    for attr, kind, help_text in _SCALARS:
        name = f"{prefix}_{attr}"
        out.append(
            f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n{name} {getattr(snap, attr)}\n\n"
        )
    _render_histogram(
        out,
        f"{prefix}_serialization_seconds",
        "Serialization time in seconds",
        snap.serialization_time,
    )
    _render_histogram(
        out,
        f"{prefix}_request_duration_seconds",
        "Request duration in seconds",
        snap.request_duration,
    )
    return "".join(out)


class Histogram:
    """Fixed-bucket µs histogram (non-cumulative slots plus an overflow slot).

    ``record(seconds)`` stores ``floor(µs)`` of the duration (rounded to the ns first) in the
    first slot whose bound is >= it.
    """

    __slots__ = ("_bounds", "_count", "_counts", "_sum")

    def __init__(self, bounds_us: Sequence[int] = DEFAULT_BUCKETS_US) -> None:
        self._bounds = _check_bounds(bounds_us)
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0
        self._count = 0

    @property
    def bounds_us(self) -> tuple[int, ...]:
        """Finite upper bounds in µs."""
        return self._bounds

    @property
    def count(self) -> int:
        """Number of observations."""
        return self._count

    @property
    def sum_micros(self) -> int:
        """Sum of observations in µs."""
        return self._sum

    def record(self, seconds: float) -> None:
        """Observe a duration given in seconds."""
        x = seconds * 1e9
        if x >= _MAX_NS_F:
            micros = _MAX_NS // 1000
        elif x > 0.0:
            micros = round(x) // 1000
        else:
            micros = 0
        self._sum += micros
        self._count += 1
        self._counts[bisect_left(self._bounds, micros)] += 1

    def record_micros(self, micros: int) -> None:
        """Observe a duration given in whole µs (negative counts as 0)."""
        if micros < 0:
            micros = 0
        self._sum += micros
        self._count += 1
        self._counts[bisect_left(self._bounds, micros)] += 1

    def reset(self) -> None:
        """Forget every observation."""
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0
        self._count = 0

    def snapshot(self) -> HistogramSnapshot:
        """A copy of the current state."""
        return HistogramSnapshot(list(self._bounds), list(self._counts), self._sum, self._count)

    def __repr__(self) -> str:
        return f"<Histogram count={self._count} sum_us={self._sum}>"


class ProtocolMetrics:
    """Proxy-side protocol counters, gauges and histograms (docs/observability.md), pool-global."""

    __slots__ = (
        "_affinity_evictions_total",
        "_affinity_rejections_total",
        "_buffer_utilization_percent",
        "_connection_errors_total",
        "_correlation_affinities",
        "_flow_control_pauses_total",
        "_flow_control_rejections_total",
        "_flow_control_resumes_total",
        "_healthy_connections",
        "_in_flight_requests",
        "_paused_connections",
        "_request_duration",
        "_requests_total",
        "_responses_total",
        "_serialization_errors_total",
        "_serialization_time",
        "_timeouts_total",
    )

    def __init__(self) -> None:
        self._requests_total = 0
        self._responses_total = 0
        self._timeouts_total = 0
        self._connection_errors_total = 0
        self._serialization_errors_total = 0
        self._flow_control_pauses_total = 0
        self._flow_control_resumes_total = 0
        self._flow_control_rejections_total = 0
        self._affinity_evictions_total = 0
        self._affinity_rejections_total = 0
        self._in_flight_requests = 0
        self._correlation_affinities = 0
        self._buffer_utilization_percent = 0
        self._healthy_connections = 0
        self._paused_connections = 0
        self._serialization_time = Histogram()
        self._request_duration = Histogram()

    # counters
    def inc_requests(self) -> None:
        """A request was sent to an agent."""
        self._requests_total += 1

    def inc_responses(self) -> None:
        """A response was received from an agent."""
        self._responses_total += 1

    def inc_timeouts(self) -> None:
        """A request timed out."""
        self._timeouts_total += 1

    def inc_connection_errors(self) -> None:
        """A request failed with a connection error."""
        self._connection_errors_total += 1

    def inc_serialization_errors(self) -> None:
        """A request failed with a serialization error."""
        self._serialization_errors_total += 1

    def record_flow_pause(self) -> None:
        """A connection was paused by its agent."""
        self._flow_control_pauses_total += 1

    def record_flow_resume(self) -> None:
        """A paused connection was resumed."""
        self._flow_control_resumes_total += 1

    def record_flow_rejection(self) -> None:
        """A request was refused (or failed open) because of flow control."""
        self._flow_control_rejections_total += 1

    def inc_affinity_evictions(self, n: int) -> None:
        """``n`` affinities were reclaimed by the TTL sweep."""
        if n > 0:
            self._affinity_evictions_total += n

    def inc_affinity_rejections(self) -> None:
        """An affinity store was refused at capacity."""
        self._affinity_rejections_total += 1

    # gauges
    def set_correlation_affinities(self, n: int) -> None:
        """Current number of affinity entries."""
        self._correlation_affinities = max(int(n), 0)

    def set_in_flight(self, n: int) -> None:
        """Current number of in-flight requests."""
        self._in_flight_requests = max(int(n), 0)

    def inc_in_flight(self) -> None:
        """One more request in flight."""
        self._in_flight_requests += 1

    def dec_in_flight(self) -> None:
        """One request fewer in flight (never below 0)."""
        if self._in_flight_requests > 0:
            self._in_flight_requests -= 1

    def set_buffer_utilization(self, percent: int) -> None:
        """Buffer utilisation in percent, clamped to 0..100."""
        self._buffer_utilization_percent = min(max(int(percent), 0), 100)

    def set_healthy_connections(self, n: int) -> None:
        """Current number of healthy connections."""
        self._healthy_connections = max(int(n), 0)

    def set_paused_connections(self, n: int) -> None:
        """Current number of flow-control paused connections."""
        self._paused_connections = max(int(n), 0)

    # histograms
    def record_serialization_time(self, seconds: float) -> None:
        """Observe one serialization duration (seconds)."""
        self._serialization_time.record(seconds)

    def record_request_duration(self, seconds: float) -> None:
        """Observe one request duration (seconds)."""
        self._request_duration.record(seconds)

    # read access
    @property
    def requests_total(self) -> int:
        """Requests sent."""
        return self._requests_total

    @property
    def responses_total(self) -> int:
        """Responses received."""
        return self._responses_total

    @property
    def timeouts_total(self) -> int:
        """Request timeouts."""
        return self._timeouts_total

    @property
    def connection_errors_total(self) -> int:
        """Connection errors."""
        return self._connection_errors_total

    @property
    def serialization_errors_total(self) -> int:
        """Serialization errors (not exported to Prometheus, as upstream)."""
        return self._serialization_errors_total

    @property
    def flow_control_pauses_total(self) -> int:
        """Flow-control pause events."""
        return self._flow_control_pauses_total

    @property
    def flow_control_resumes_total(self) -> int:
        """Flow-control resume events (not exported, as upstream)."""
        return self._flow_control_resumes_total

    @property
    def flow_control_rejections_total(self) -> int:
        """Requests refused because of flow control."""
        return self._flow_control_rejections_total

    @property
    def affinity_evictions_total(self) -> int:
        """Affinities reclaimed by the TTL sweep."""
        return self._affinity_evictions_total

    @property
    def affinity_rejections_total(self) -> int:
        """Affinity stores refused at capacity."""
        return self._affinity_rejections_total

    @property
    def in_flight_requests(self) -> int:
        """Current in-flight requests."""
        return self._in_flight_requests

    @property
    def correlation_affinities(self) -> int:
        """Current affinity entries."""
        return self._correlation_affinities

    @property
    def buffer_utilization_percent(self) -> int:
        """Buffer utilisation percent (0..100)."""
        return self._buffer_utilization_percent

    @property
    def healthy_connections(self) -> int:
        """Healthy connections."""
        return self._healthy_connections

    @property
    def paused_connections(self) -> int:
        """Paused connections."""
        return self._paused_connections

    @property
    def serialization_time(self) -> Histogram:
        """Serialization-time histogram."""
        return self._serialization_time

    @property
    def request_duration(self) -> Histogram:
        """Request-duration histogram."""
        return self._request_duration

    def snapshot(self) -> ProtocolMetricsSnapshot:
        """Plain copy of every field."""
        return ProtocolMetricsSnapshot(
            requests_total=self._requests_total,
            responses_total=self._responses_total,
            timeouts_total=self._timeouts_total,
            connection_errors_total=self._connection_errors_total,
            serialization_errors_total=self._serialization_errors_total,
            flow_control_pauses_total=self._flow_control_pauses_total,
            flow_control_resumes_total=self._flow_control_resumes_total,
            flow_control_rejections_total=self._flow_control_rejections_total,
            affinity_evictions_total=self._affinity_evictions_total,
            affinity_rejections_total=self._affinity_rejections_total,
            in_flight_requests=self._in_flight_requests,
            correlation_affinities=self._correlation_affinities,
            buffer_utilization_percent=self._buffer_utilization_percent,
            healthy_connections=self._healthy_connections,
            paused_connections=self._paused_connections,
            serialization_time=self._serialization_time.snapshot(),
            request_duration=self._request_duration.snapshot(),
        )

    def to_prometheus(self, prefix: str = "agent_protocol") -> str:
        """Upstream's Prometheus text exposition of these metrics."""
        return _render_prometheus(self.snapshot(), prefix)

    def __repr__(self) -> str:
        return (
            f"<ProtocolMetrics requests={self._requests_total} "
            f"responses={self._responses_total} in_flight={self._in_flight_requests}>"
        )
