# Connection selection over cached per-connection state, correlation affinity and sticky
# sessions (docs/pool.md: Selection, Correlation affinity and sticky sessions). Twin: _selection_py.py.

cimport cython
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from libc.stdint cimport int64_t, uint64_t

import random as _sel_random
import time as _sel_time

from agentpool.errors import ConnectionFailed as _sel_ConnectionFailed

cdef enum:
    _SEL_ROUND_ROBIN = 0
    _SEL_LEAST_CONNECTIONS = 1
    _SEL_HEALTH_BASED = 2
    _SEL_RANDOM = 3
    _SEL_UNHEALTHY_AFTER = 3


cdef inline bint _sel_selectable(ConnState s) noexcept:
    return s.healthy and not s.closed


cdef inline double _sel_error_rate(ConnState s) noexcept:
    if s.request_count == 0:
        return 0.0
    return <double>s.error_count / <double>s.request_count


@cython.final
cdef class ConnState:
    """Cached per-connection state read by selection and updated around each request.

    ``healthy`` starts True and drops to False after 3 consecutive errors (only maintenance
    sets it back); ``in_flight`` counts requests between ``begin()`` and ``finish()``.
    """

    def __cinit__(self, object conn, now=None):
        self.conn = conn
        self.healthy = True
        self.paused = False
        self.closed = False
        self.in_flight = 0
        self.request_count = 0
        self.error_count = 0
        self.consecutive_errors = 0
        if now is None:
            now = _sel_time.monotonic()
        self.created_at = now
        self.last_used = now

    @property
    def error_rate(self):
        """``error_count / request_count`` (0.0 before the first completed request)."""
        return _sel_error_rate(self)

    @property
    def selectable(self):
        """True when selection may pick this connection (healthy and not closed)."""
        return _sel_selectable(self)

    def begin(self, double now):
        """Account a request start: one more in flight, touched at ``now``."""
        self.in_flight += 1
        self.last_used = now

    def release(self):
        """End a request that never reached the agent: one fewer in flight, nothing counted."""
        if self.in_flight > 0:
            self.in_flight -= 1

    def finish(self, bint ok):
        """Account a request end; 3 consecutive failures mark the connection unhealthy."""
        if self.in_flight > 0:
            self.in_flight -= 1
        self.request_count += 1
        if ok:
            self.consecutive_errors = 0
        else:
            self.error_count += 1
            self.consecutive_errors += 1
            if self.consecutive_errors >= _SEL_UNHEALTHY_AFTER:
                self.healthy = False

    def __repr__(self):
        return (
            f"<ConnState conn={self.conn!r} healthy={bool(self.healthy)} "
            f"paused={bool(self.paused)} closed={bool(self.closed)} in_flight={self.in_flight} "
            f"requests={self.request_count} errors={self.error_count}>"
        )


cdef str _sel_with_last_error(str message, ConnectionSet cs):
    if cs.last_error is None:
        return message
    return f"{message} ({cs.last_error})"


@cython.final
cdef class ConnectionSet:
    """The ordered connections of one agent and the strategy pick over them (docs/pool.md)."""

    def __cinit__(self, str agent_id):
        self.agent_id = agent_id
        self.last_error = None
        self._states = []
        self._rr = 0
        self._rng = <uint64_t>_sel_random.getrandbits(64) | 1

    @property
    def states(self):
        """A copy of the connection list, in selection order."""
        return list(self._states)

    @property
    def round_robin_index(self):
        """The next round-robin counter value (wraps at 2**64)."""
        return self._rr

    def add(self, ConnState state not None):
        """Append ``state`` (no-op if already present)."""
        for s in self._states:
            if s is state:
                return
        self._states.append(state)

    def remove(self, ConnState state not None):
        """Remove ``state``; False if it was not in the set."""
        cdef Py_ssize_t i
        for i in range(len(self._states)):
            if self._states[i] is state:
                del self._states[i]
                return True
        return False

    def replace(self, ConnState old not None, ConnState new not None):
        """Put ``new`` in ``old``'s slot; if ``old`` is absent append ``new`` and return False."""
        cdef Py_ssize_t i
        for i in range(len(self._states)):
            if self._states[i] is old:
                self._states[i] = new
                return True
        self.add(new)
        return False

    def clear(self):
        """Drop every connection."""
        self._states.clear()

    def __len__(self):
        return len(self._states)

    def __iter__(self):
        return iter(list(self._states))

    def __contains__(self, state):
        for s in self._states:
            if s is state:
                return True
        return False

    cdef inline uint64_t _next_random(self) noexcept:
        # xorshift64*
        cdef uint64_t x = self._rng
        x ^= x >> 12
        x ^= x << 25
        x ^= x >> 27
        self._rng = x
        return x * <uint64_t>0x2545F4914F6CDD1D

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cpdef ConnState select(self, int strategy):
        """Pick a connection by ``strategy`` (a ``LoadBalanceStrategy``) over the healthy ones.

        Raises ``ConnectionFailed`` when the agent has no connections or none is healthy
        (healthy = ``healthy and not closed``; paused connections stay selectable).
        """
        cdef list states = self._states
        cdef Py_ssize_t n = PyList_GET_SIZE(states)
        cdef Py_ssize_t i, k, nh = 0
        cdef ConnState s
        cdef ConnState best = None
        cdef double rate, best_rate = 0.0
        if n == 0:
            raise _sel_ConnectionFailed(
                _sel_with_last_error(f"No connections available for agent {self.agent_id}", self)
            )
        if strategy == _SEL_LEAST_CONNECTIONS:
            for i in range(n):
                s = <ConnState>PyList_GET_ITEM(states, i)
                if _sel_selectable(s) and (best is None or s.in_flight < best.in_flight):
                    best = s
        elif strategy == _SEL_HEALTH_BASED:
            for i in range(n):
                s = <ConnState>PyList_GET_ITEM(states, i)
                if _sel_selectable(s):
                    rate = _sel_error_rate(s)
                    if best is None or rate < best_rate:
                        best = s
                        best_rate = rate
        elif strategy == _SEL_ROUND_ROBIN or strategy == _SEL_RANDOM:
            for i in range(n):
                if _sel_selectable(<ConnState>PyList_GET_ITEM(states, i)):
                    nh += 1
            if nh == 0:
                raise _sel_ConnectionFailed(
                    _sel_with_last_error(f"No healthy connections for agent {self.agent_id}", self)
                )
            if strategy == _SEL_ROUND_ROBIN:
                k = <Py_ssize_t>(self._rr % <uint64_t>nh)
                self._rr += 1
            else:
                k = <Py_ssize_t>(self._next_random() % <uint64_t>nh)
            if nh == n:
                return <ConnState>PyList_GET_ITEM(states, k)
            for i in range(n):
                s = <ConnState>PyList_GET_ITEM(states, i)
                if _sel_selectable(s):
                    if k == 0:
                        return s
                    k -= 1
        else:
            raise ValueError(f"unknown load balance strategy: {strategy!r}")
        if best is None:
            raise _sel_ConnectionFailed(
                _sel_with_last_error(f"No healthy connections for agent {self.agent_id}", self)
            )
        return best

    def healthy_count(self):
        """Connections selection may pick (healthy and not closed)."""
        cdef Py_ssize_t c = 0
        cdef ConnState s
        for s in self._states:
            if _sel_selectable(s):
                c += 1
        return c

    def paused_count(self):
        """Connections currently paused by agent flow control."""
        cdef Py_ssize_t c = 0
        cdef ConnState s
        for s in self._states:
            if s.paused:
                c += 1
        return c

    def total_in_flight(self):
        """Sum of ``in_flight`` over the connections."""
        cdef int64_t c = 0
        cdef ConnState s
        for s in self._states:
            c += s.in_flight
        return c

    def total_requests(self):
        """Sum of ``request_count`` over the connections."""
        cdef uint64_t c = 0
        cdef ConnState s
        for s in self._states:
            c += s.request_count
        return c

    def total_errors(self):
        """Sum of ``error_count`` over the connections."""
        cdef uint64_t c = 0
        cdef ConnState s
        for s in self._states:
            c += s.error_count
        return c

    def __repr__(self):
        return f"<ConnectionSet agent_id={self.agent_id!r} connections={len(self._states)}>"


@cython.final
@cython.internal
@cython.freelist(256)
cdef class _AffinityEntry:
    pass


@cython.final
cdef class AffinityMap:
    """Correlation id -> connection, bounded (docs/pool.md "Correlation affinity").

    A new id is refused when the map is full (``rejections`` counts it; ``at_capacity`` is
    set until the next accepted store, so the caller can warn once per episode); re-storing
    an existing id always succeeds. ``get`` refreshes the idle timer that ``sweep`` checks.
    """

    def __cinit__(self, Py_ssize_t max_entries=100_000):
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self._map = {}
        self.max_entries = max_entries
        self.rejections = 0
        self.at_capacity = False

    def store(self, object correlation_id, ConnState state not None, double now):
        """Bind ``correlation_id`` to ``state``; False if refused at capacity."""
        return self._store(correlation_id, state, now)

    cdef bint _store(self, object correlation_id, ConnState state, double now) except -1:
        cdef _AffinityEntry entry
        cdef object found = self._map.get(correlation_id)
        if found is not None:
            entry = <_AffinityEntry>found
        elif len(self._map) >= self.max_entries:
            self.rejections += 1
            self.at_capacity = True
            return False
        else:
            entry = _AffinityEntry.__new__(_AffinityEntry)
            self._map[correlation_id] = entry
        entry.state = state
        entry.created_at = now
        entry.last_access = now
        self.at_capacity = False
        return True

    def get(self, object correlation_id, double now):
        """The bound connection (refreshing its idle timer), or None."""
        cdef object found = self._map.get(correlation_id)
        if found is None:
            return None
        (<_AffinityEntry>found).last_access = now
        return (<_AffinityEntry>found).state

    def peek(self, object correlation_id):
        """The bound connection without refreshing anything, or None."""
        cdef object found = self._map.get(correlation_id)
        if found is None:
            return None
        return (<_AffinityEntry>found).state

    def remove(self, object correlation_id):
        """Drop the binding; False if there was none."""
        return self._map.pop(correlation_id, None) is not None

    def sweep(self, double now, double ttl):
        """Remove entries idle strictly longer than ``ttl``; return how many."""
        cdef list expired = []
        cdef _AffinityEntry e
        for k, v in self._map.items():
            e = <_AffinityEntry>v
            if now - e.last_access > ttl:
                expired.append(k)
        for k in expired:
            del self._map[k]
        return len(expired)

    def drop_state(self, ConnState state not None):
        """Remove every entry bound to ``state``; return how many."""
        cdef list dead = []
        for k, v in self._map.items():
            if (<_AffinityEntry>v).state is state:
                dead.append(k)
        for k in dead:
            del self._map[k]
        return len(dead)

    def clear(self):
        """Remove every entry."""
        self._map.clear()

    def __len__(self):
        return len(self._map)

    def __contains__(self, correlation_id):
        return correlation_id in self._map

    def __repr__(self):
        return f"<AffinityMap entries={len(self._map)} max_entries={self.max_entries}>"


def forget_affinity(dict entries, object correlation_id):
    """Drop ``correlation_id`` from the ``affinity`` map of every value of ``entries`` (the
    pool's agents) in one call; how many bindings were dropped."""
    cdef Py_ssize_t n = 0
    cdef AffinityMap m
    for e in entries.values():
        m = <AffinityMap?>e.affinity
        if m._map and m._map.pop(correlation_id, None) is not None:
            n += 1
    return n


@cython.final
@cython.internal
@cython.freelist(64)
cdef class _SessionEntry:
    pass


@cython.final
cdef class SessionMap:
    """Sticky sessions: session id -> (connection, agent id, created, last accessed) (§7).

    A session is expired when ``now - last_accessed > timeout`` (strict); ``timeout=None``
    never expires. ``lookup`` refreshes or removes; ``has`` only answers (upstream's refreshes).
    """

    def __cinit__(self):
        self._map = {}

    def create(self, object session_id, ConnState state not None, object agent_id, double now):
        """Bind ``session_id`` (overwriting an existing one), touched at ``now``."""
        cdef _SessionEntry entry = _SessionEntry.__new__(_SessionEntry)
        entry.state = state
        entry.agent_id = agent_id
        entry.created_at = now
        entry.last_accessed = now
        self._map[session_id] = entry

    def lookup(self, object session_id, double now, object timeout):
        """The session's connection, refreshed; an expired session is removed (None)."""
        cdef object found = self._map.get(session_id)
        cdef _SessionEntry entry
        if found is None:
            return None
        entry = <_SessionEntry>found
        if timeout is not None and now - entry.last_accessed > <double>timeout:
            del self._map[session_id]
            return None
        entry.last_accessed = now
        return entry.state

    def has(self, object session_id, double now, object timeout):
        """True if the session exists and is not expired; changes nothing."""
        cdef object found = self._map.get(session_id)
        if found is None:
            return False
        return timeout is None or not (now - (<_SessionEntry>found).last_accessed > <double>timeout)

    def peek(self, object session_id):
        """The session's connection, ignoring expiry and refreshing nothing."""
        cdef object found = self._map.get(session_id)
        if found is None:
            return None
        return (<_SessionEntry>found).state

    def agent(self, object session_id):
        """The agent id bound to the session (expiry not checked, nothing refreshed)."""
        cdef object found = self._map.get(session_id)
        if found is None:
            return None
        return (<_SessionEntry>found).agent_id

    def remove(self, object session_id):
        """Drop the session; False if there was none."""
        return self._map.pop(session_id, None) is not None

    def sweep(self, double now, object timeout):
        """Remove every expired session (none when ``timeout`` is None); return how many."""
        if timeout is None:
            return 0
        cdef double t = timeout
        cdef list expired = []
        for k, v in self._map.items():
            if now - (<_SessionEntry>v).last_accessed > t:
                expired.append(k)
        for k in expired:
            del self._map[k]
        return len(expired)

    def drop_state(self, ConnState state not None):
        """Remove every session bound to ``state``; return how many."""
        cdef list dead = []
        for k, v in self._map.items():
            if (<_SessionEntry>v).state is state:
                dead.append(k)
        for k in dead:
            del self._map[k]
        return len(dead)

    def clear(self):
        """Remove every session."""
        self._map.clear()

    def __len__(self):
        return len(self._map)

    def __contains__(self, session_id):
        return session_id in self._map

    def __repr__(self):
        return f"<SessionMap sessions={len(self._map)}>"
