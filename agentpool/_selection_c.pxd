# C types for _selection_c.py (a link to _selection_py.py), compiled in Cython's pure-Python
# mode: the same source runs interpreted as agentpool._selection_py.

cimport cython
from libc.stdint cimport int64_t, uint64_t

cdef uint64_t _U64
cdef uint64_t _XORSHIFT_MUL
cdef uint64_t _UNHEALTHY_AFTER
cdef int ROUND_ROBIN
cdef int LEAST_CONNECTIONS
cdef int HEALTH_BASED
cdef int RANDOM


@cython.final
cdef class ConnState:
    cdef object _conn
    cdef public bint healthy
    cdef public bint paused
    cdef public bint closed
    cdef int64_t _in_flight
    cdef uint64_t _request_count
    cdef uint64_t _error_count
    cdef uint64_t _consecutive_errors
    cdef double _created_at
    cdef double _last_used

    cdef inline double _rate(self) noexcept
    cpdef begin(self, double now)
    cpdef finish(self, bint ok)


@cython.final
cdef class ConnectionSet:
    cdef str _agent_id
    cdef public object last_error
    cdef list _states
    cdef uint64_t _rr
    cdef uint64_t _rng

    cdef str _with_last_error(self, str message)
    @cython.locals(x=uint64_t)
    cdef inline uint64_t _next_random(self) noexcept
    @cython.locals(states=list, n=Py_ssize_t, i=Py_ssize_t, k=Py_ssize_t, nh=Py_ssize_t,
                   s=ConnState, best=ConnState, rate=double, best_rate=double)
    cpdef ConnState select(self, int strategy)
    @cython.locals(s=ConnState, c=Py_ssize_t)
    cpdef Py_ssize_t healthy_count(self) except -1
    @cython.locals(s=ConnState, c=Py_ssize_t)
    cpdef Py_ssize_t paused_count(self) except -1
    @cython.locals(s=ConnState, c=int64_t)
    cpdef int64_t total_in_flight(self) except? -1
    @cython.locals(s=ConnState, c=uint64_t)
    cpdef uint64_t total_requests(self) except? 0xFFFFFFFFFFFFFFFF
    @cython.locals(s=ConnState, c=uint64_t)
    cpdef uint64_t total_errors(self) except? 0xFFFFFFFFFFFFFFFF


@cython.final
@cython.internal
@cython.freelist(256)
cdef class _Affinity:
    cdef ConnState state
    cdef double created_at
    cdef double last_access


@cython.final
cdef class AffinityMap:
    cdef dict _map
    cdef Py_ssize_t _max_entries
    cdef uint64_t _rejections
    cdef bint _at_capacity

    @cython.locals(entry=_Affinity)
    cpdef object get(self, object correlation_id, double now)
    @cython.locals(entry=_Affinity)
    cpdef object peek(self, object correlation_id)
    @cython.locals(expired=list, e=_Affinity)
    cpdef Py_ssize_t sweep(self, double now, double ttl) except -1
    @cython.locals(dead=list, e=_Affinity)
    cpdef Py_ssize_t drop_state(self, ConnState state) except -1

    @cython.locals(entry=_Affinity)
    cdef bint _store(self, object correlation_id, ConnState state, double now) except -1


@cython.locals(n=Py_ssize_t, m=AffinityMap)
cpdef Py_ssize_t forget_affinity(dict entries, object correlation_id) except -1


@cython.final
@cython.internal
@cython.freelist(64)
cdef class _Session:
    cdef ConnState state
    cdef object agent_id
    cdef double created_at
    cdef double last_accessed


@cython.final
cdef class SessionMap:
    cdef dict _map

    @cython.locals(entry=_Session)
    cpdef create(self, object session_id, ConnState state, object agent_id, double now)
    @cython.locals(entry=_Session, t=double)
    cpdef object lookup(self, object session_id, double now, object timeout)
    @cython.locals(entry=_Session, t=double)
    cpdef bint has(self, object session_id, double now, object timeout) except -1
    @cython.locals(entry=_Session)
    cpdef object peek(self, object session_id)
    @cython.locals(entry=_Session)
    cpdef object agent(self, object session_id)
    @cython.locals(expired=list, e=_Session, t=double)
    cpdef Py_ssize_t sweep(self, double now, object timeout) except -1
    @cython.locals(dead=list, e=_Session)
    cpdef Py_ssize_t drop_state(self, ConnState state) except -1
