# C types for _metrics_c.py (a link to _metrics_py.py), compiled in Cython's pure-Python
# mode: the same source runs interpreted as agentpool._metrics_py.

cimport cython
from libc.stdint cimport int64_t, uint64_t

cdef double _MAX_NS_F
cdef uint64_t _MAX_US


@cython.final
cdef class Histogram:
    cdef tuple _bounds_us
    cdef Py_ssize_t _nbounds
    cdef unsigned long long[::1] _bounds
    cdef unsigned long long[::1] _counts
    cdef uint64_t _count
    cdef uint64_t _sum_micros

    @cython.locals(lo=Py_ssize_t, hi=Py_ssize_t, mid=Py_ssize_t)
    cdef void _record_micros(self, uint64_t micros) noexcept
    @cython.locals(x=double, ns=int64_t, frac=double, micros=uint64_t)
    cdef void _record(self, double seconds) noexcept


@cython.final
cdef class ProtocolMetrics:
    cdef uint64_t _requests_total
    cdef uint64_t _responses_total
    cdef uint64_t _timeouts_total
    cdef uint64_t _connection_errors_total
    cdef uint64_t _serialization_errors_total
    cdef uint64_t _flow_control_pauses_total
    cdef uint64_t _flow_control_resumes_total
    cdef uint64_t _flow_control_rejections_total
    cdef uint64_t _affinity_evictions_total
    cdef uint64_t _affinity_rejections_total
    cdef uint64_t _in_flight_requests
    cdef uint64_t _correlation_affinities
    cdef uint64_t _buffer_utilization_percent
    cdef uint64_t _healthy_connections
    cdef uint64_t _paused_connections
    cdef Histogram _serialization_time
    cdef Histogram _request_duration
