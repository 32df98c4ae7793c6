# cython: annotation_typing=False
"""Proxy-side protocol counters, gauges and µs histograms: one source, two builds.

:class:`ProtocolMetrics` carries upstream's counters, gauges and two µs histograms
(docs/observability.md) with upstream's method names and Prometheus text; snapshots and the
text renderer live in ``_metrics_snapshot`` and are shared by both builds.

This file is plain Python and is also compiled by Cython (pure-Python mode) as
``agentpool._metrics_c``: ``_metrics_c.py`` links here and ``_metrics_c.pxd`` adds the C
types (the histogram slots become C arrays). Write it so that both builds give the same
results.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any

from ._metrics_snapshot import (
    DEFAULT_BUCKETS_US,
    HistogramSnapshot,
    ProtocolMetricsSnapshot,
    check_bounds,
    render_prometheus,
)

try:
    import cython

    COMPILED: bool = cython.compiled
except ImportError:  # Cython is a build dependency only
    COMPILED = False

__all__ = [
    "DEFAULT_BUCKETS_US",
    "Histogram",
    "HistogramSnapshot",
    "ProtocolMetrics",
    "ProtocolMetricsSnapshot",
]

# durations at or above 9e18 ns are clamped (the largest whole µs count kept)
_MAX_NS_F = 9e18
_MAX_US = 9_000_000_000_000_000


class Histogram:
    """Fixed-bucket µs histogram (non-cumulative slots plus an overflow slot).

    ``record(seconds)`` stores ``floor(µs)`` of the duration (rounded to the ns, half to
    even, first) in the first slot whose bound is >= it.
    """

    __slots__ = ("_bounds", "_bounds_us", "_count", "_counts", "_nbounds", "_sum_micros")

    def __init__(self, bounds_us: Sequence[int] = DEFAULT_BUCKETS_US) -> None:
        bounds = check_bounds(bounds_us)
        self._bounds_us = bounds
        self._nbounds = len(bounds)
        self._bounds: Any = array("Q", bounds)
        self._counts: Any = array("Q", bytes(8 * (len(bounds) + 1)))
        self._count = 0
        self._sum_micros = 0

    @property
    def bounds_us(self) -> tuple[int, ...]:
        """Finite upper bounds in µs."""
        return self._bounds_us

    @property
    def count(self) -> int:
        """Number of observations."""
        return self._count

    @property
    def sum_micros(self) -> int:
        """Sum of observations in µs."""
        return self._sum_micros

    def _record_micros(self, micros: int) -> None:
        lo = 0
        hi = self._nbounds
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._bounds[mid] < micros:
                lo = mid + 1
            else:
                hi = mid
        self._counts[lo] += 1
        self._sum_micros += micros
        self._count += 1

    def _record(self, seconds: float) -> None:
        x = seconds * 1e9
        if x >= _MAX_NS_F:
            micros = _MAX_US
        elif x > 0.0:
            ns = int(x)
            frac = x - ns
            if frac > 0.5 or (frac == 0.5 and ns & 1):
                ns += 1
            micros = ns // 1000
        else:
            micros = 0
        self._record_micros(micros)

    def record(self, seconds: float) -> None:
        """Observe a duration given in seconds."""
        self._record(seconds)

    def record_micros(self, micros: int) -> None:
        """Observe a duration given in whole µs (negative counts as 0)."""
        self._record_micros(micros if micros > 0 else 0)

    def reset(self) -> None:
        """Forget every observation."""
        for i in range(self._nbounds + 1):
            self._counts[i] = 0
        self._count = 0
        self._sum_micros = 0

    def snapshot(self) -> HistogramSnapshot:
        """A copy of the current state."""
        return HistogramSnapshot(
            list(self._bounds_us),
            [self._counts[i] for i in range(self._nbounds + 1)],
            self._sum_micros,
            self._count,
        )

    def __repr__(self) -> str:
        return f"<Histogram count={self._count} sum_us={self._sum_micros}>"


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
        self._serialization_time._record(seconds)

    def record_request_duration(self, seconds: float) -> None:
        """Observe one request duration (seconds)."""
        self._request_duration._record(seconds)

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
        return render_prometheus(self.snapshot(), prefix)

    def __repr__(self) -> str:
        return (
            f"<ProtocolMetrics requests={self._requests_total} "
            f"responses={self._responses_total} in_flight={self._in_flight_requests}>"
        )
