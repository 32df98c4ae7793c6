# Proxy-side protocol counters, gauges and µs histograms (docs/observability.md). Twin: _metrics_py.py.
# The snapshot classes and the Prometheus renderer are shared with the twin, so both cores
# produce identical snapshots and text.

cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.math cimport nearbyint
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memset

from agentpool._metrics_py import (
    DEFAULT_BUCKETS_US,
    HistogramSnapshot,
    ProtocolMetricsSnapshot,
    _check_bounds as _met_check_bounds,
    _render_prometheus as _met_render_prometheus,
)

cdef double _MET_MAX_NS_F = 9e18
cdef uint64_t _MET_MAX_US = 9000000000000000ULL


cdef inline uint64_t _met_seconds_to_micros(double seconds) noexcept:
    cdef double x = seconds * 1e9
    if x >= _MET_MAX_NS_F:
        return _MET_MAX_US
    if x > 0.0:
        return <uint64_t>(<int64_t>nearbyint(x) // 1000)
    return 0


@cython.final
cdef class Histogram:
    """Fixed-bucket µs histogram (non-cumulative slots plus an overflow slot).

    ``record(seconds)`` stores ``floor(µs)`` of the duration (rounded to the ns first) in the
    first slot whose bound is >= it.
    """

    def __cinit__(self, bounds_us=DEFAULT_BUCKETS_US):
        cdef tuple bounds = _met_check_bounds(bounds_us)
        cdef Py_ssize_t i, n = len(bounds)
        self._nbounds = n
        self._bounds = <uint64_t *>PyMem_Malloc((n + 1) * sizeof(uint64_t))
        self._counts = <uint64_t *>PyMem_Malloc((n + 1) * sizeof(uint64_t))
        if self._bounds == NULL or self._counts == NULL:
            raise MemoryError()
        for i in range(n):
            self._bounds[i] = <uint64_t>bounds[i]
        memset(self._counts, 0, (n + 1) * sizeof(uint64_t))
        self.count = 0
        self.sum_micros = 0

    def __dealloc__(self):
        PyMem_Free(self._bounds)
        PyMem_Free(self._counts)

    cdef void _record_micros(self, uint64_t micros) noexcept:
        cdef Py_ssize_t lo = 0, hi = self._nbounds, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._bounds[mid] < micros:
                lo = mid + 1
            else:
                hi = mid
        self._counts[lo] += 1
        self.sum_micros += micros
        self.count += 1

    cdef void _record(self, double seconds) noexcept:
        self._record_micros(_met_seconds_to_micros(seconds))

    @property
    def bounds_us(self):
        """Finite upper bounds in µs."""
        cdef Py_ssize_t i
        return tuple([self._bounds[i] for i in range(self._nbounds)])

    def record(self, double seconds):
        """Observe a duration given in seconds."""
        self._record(seconds)

    def record_micros(self, int64_t micros):
        """Observe a duration given in whole µs (negative counts as 0)."""
        self._record_micros(<uint64_t>micros if micros > 0 else 0)

    def reset(self):
        """Forget every observation."""
        memset(self._counts, 0, (self._nbounds + 1) * sizeof(uint64_t))
        self.count = 0
        self.sum_micros = 0

    def snapshot(self):
        """A copy of the current state."""
        cdef Py_ssize_t i
        return HistogramSnapshot(
            [self._bounds[i] for i in range(self._nbounds)],
            [self._counts[i] for i in range(self._nbounds + 1)],
            self.sum_micros,
            self.count,
        )

    def __repr__(self):
        return f"<Histogram count={self.count} sum_us={self.sum_micros}>"


cdef inline uint64_t _met_nonneg(int64_t n) noexcept:
    return <uint64_t>n if n > 0 else 0


@cython.final
cdef class ProtocolMetrics:
    """Proxy-side protocol counters, gauges and histograms (docs/observability.md), pool-global."""

    def __cinit__(self):
        self.serialization_time = Histogram()
        self.request_duration = Histogram()

    def inc_requests(self):
        """A request was sent to an agent."""
        self.requests_total += 1

    def inc_responses(self):
        """A response was received from an agent."""
        self.responses_total += 1

    def inc_timeouts(self):
        """A request timed out."""
        self.timeouts_total += 1

    def inc_connection_errors(self):
        """A request failed with a connection error."""
        self.connection_errors_total += 1

    def inc_serialization_errors(self):
        """A request failed with a serialization error."""
        self.serialization_errors_total += 1

    def record_flow_pause(self):
        """A connection was paused by its agent."""
        self.flow_control_pauses_total += 1

    def record_flow_resume(self):
        """A paused connection was resumed."""
        self.flow_control_resumes_total += 1

    def record_flow_rejection(self):
        """A request was refused (or failed open) because of flow control."""
        self.flow_control_rejections_total += 1

    def inc_affinity_evictions(self, int64_t n):
        """``n`` affinities were reclaimed by the TTL sweep."""
        self.affinity_evictions_total += _met_nonneg(n)

    def inc_affinity_rejections(self):
        """An affinity store was refused at capacity."""
        self.affinity_rejections_total += 1

    def set_correlation_affinities(self, int64_t n):
        """Current number of affinity entries."""
        self.correlation_affinities = _met_nonneg(n)

    def set_in_flight(self, int64_t n):
        """Current number of in-flight requests."""
        self.in_flight_requests = _met_nonneg(n)

    def inc_in_flight(self):
        """One more request in flight."""
        self.in_flight_requests += 1

    def dec_in_flight(self):
        """One request fewer in flight (never below 0)."""
        if self.in_flight_requests > 0:
            self.in_flight_requests -= 1

    def set_buffer_utilization(self, int64_t percent):
        """Buffer utilisation in percent, clamped to 0..100."""
        self.buffer_utilization_percent = 100 if percent > 100 else _met_nonneg(percent)

    def set_healthy_connections(self, int64_t n):
        """Current number of healthy connections."""
        self.healthy_connections = _met_nonneg(n)

    def set_paused_connections(self, int64_t n):
        """Current number of flow-control paused connections."""
        self.paused_connections = _met_nonneg(n)

    def record_serialization_time(self, double seconds):
        """Observe one serialization duration (seconds)."""
        self.serialization_time._record(seconds)

    def record_request_duration(self, double seconds):
        """Observe one request duration (seconds)."""
        self.request_duration._record(seconds)

    def snapshot(self):
        """Plain copy of every field."""
        return ProtocolMetricsSnapshot(
            requests_total=self.requests_total,
            responses_total=self.responses_total,
            timeouts_total=self.timeouts_total,
            connection_errors_total=self.connection_errors_total,
            serialization_errors_total=self.serialization_errors_total,
            flow_control_pauses_total=self.flow_control_pauses_total,
            flow_control_resumes_total=self.flow_control_resumes_total,
            flow_control_rejections_total=self.flow_control_rejections_total,
            affinity_evictions_total=self.affinity_evictions_total,
            affinity_rejections_total=self.affinity_rejections_total,
            in_flight_requests=self.in_flight_requests,
            correlation_affinities=self.correlation_affinities,
            buffer_utilization_percent=self.buffer_utilization_percent,
            healthy_connections=self.healthy_connections,
            paused_connections=self.paused_connections,
            serialization_time=self.serialization_time.snapshot(),
            request_duration=self.request_duration.snapshot(),
        )

    def to_prometheus(self, str prefix="agent_protocol"):
        """Upstream's Prometheus text exposition of these metrics."""
        return _met_render_prometheus(self.snapshot(), prefix)

    def __repr__(self):
        return (
            f"<ProtocolMetrics requests={self.requests_total} "
            f"responses={self.responses_total} in_flight={self.in_flight_requests}>"
        )
