# Declarations of the selection part of the core (included by _core.pxd).

cimport cython
from libc.stdint cimport int64_t, uint64_t


@cython.final
cdef class ConnState:
    cdef readonly object conn
    cdef public bint healthy
    cdef public bint paused
    cdef public bint closed
    cdef readonly int64_t in_flight
    cdef readonly uint64_t request_count
    cdef readonly uint64_t error_count
    cdef readonly uint64_t consecutive_errors
    cdef readonly double created_at
    cdef readonly double last_used


@cython.final
cdef class ConnectionSet:
    cdef readonly str agent_id
    cdef public object last_error
    cdef list _states
    cdef uint64_t _rr
    cdef uint64_t _rng

    cpdef ConnState select(self, int strategy)
    cdef inline uint64_t _next_random(self) noexcept


@cython.final
cdef class _AffinityEntry:
    cdef ConnState state
    cdef double created_at
    cdef double last_access


@cython.final
cdef class AffinityMap:
    cdef dict _map
    cdef readonly Py_ssize_t max_entries
    cdef readonly uint64_t rejections
    cdef readonly bint at_capacity

    cdef bint _store(self, object correlation_id, ConnState state, double now) except -1


@cython.final
cdef class _SessionEntry:
    cdef ConnState state
    cdef object agent_id
    cdef double created_at
    cdef double last_accessed


@cython.final
cdef class SessionMap:
    cdef dict _map
