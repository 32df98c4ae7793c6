# Declarations of the ProtocolMetrics part of the core (included by _core.pxd).

cimport cython
from libc.stdint cimport int64_t, uint64_t


@cython.final
cdef class Histogram:
    cdef uint64_t *_bounds
    cdef uint64_t *_counts
    cdef Py_ssize_t _nbounds
    cdef readonly uint64_t count
    cdef readonly uint64_t sum_micros

    cdef void _record_micros(self, uint64_t micros) noexcept
    cdef void _record(self, double seconds) noexcept


@cython.final
cdef class ProtocolMetrics:
    cdef readonly uint64_t requests_total
    cdef readonly uint64_t responses_total
    cdef readonly uint64_t timeouts_total
    cdef readonly uint64_t connection_errors_total
    cdef readonly uint64_t serialization_errors_total
    cdef readonly uint64_t flow_control_pauses_total
    cdef readonly uint64_t flow_control_resumes_total
    cdef readonly uint64_t flow_control_rejections_total
    cdef readonly uint64_t affinity_evictions_total
    cdef readonly uint64_t affinity_rejections_total
    cdef readonly uint64_t in_flight_requests
    cdef readonly uint64_t correlation_affinities
    cdef readonly uint64_t buffer_utilization_percent
    cdef readonly uint64_t healthy_connections
    cdef readonly uint64_t paused_connections
    cdef readonly Histogram serialization_time
    cdef readonly Histogram request_duration
