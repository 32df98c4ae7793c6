# cython: annotation_typing=False
"""Connection state, selection, correlation affinity and sticky sessions: one source, two builds.

Per-connection cached state (:class:`ConnState`), the per-agent ordered connection list with
the four load-balancing strategies (:class:`ConnectionSet`), the correlation affinity map
(:class:`AffinityMap`) and sticky sessions (:class:`SessionMap`), as docs/pool.md describes.
Times are monotonic seconds passed in by the caller, so every rule is testable without sleeping.

This file is plain Python and is also compiled by Cython (pure-Python mode) as
``agentpool._selection_c``: ``_selection_c.py`` links here and ``_selection_c.pxd`` adds the C
types. Write it so that both builds give the same results: integers that wrap in C are
masked to 64 bits here.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .errors import ConnectionFailed

if TYPE_CHECKING:
    from .connection import AgentConnection

try:
    import cython

    COMPILED: bool = cython.compiled
except ImportError:  # Cython is a build dependency only
    COMPILED = False

__all__ = ["AffinityMap", "ConnState", "ConnectionSet", "SessionMap", "forget_affinity"]

_U64 = 0xFFFFFFFFFFFFFFFF
_XORSHIFT_MUL = 0x2545F4914F6CDD1D
_UNHEALTHY_AFTER = 3

ROUND_ROBIN = 0
LEAST_CONNECTIONS = 1
HEALTH_BASED = 2
RANDOM = 3


class ConnState:
    """Cached per-connection state read by selection and updated around each request.

    ``healthy`` starts True and drops to False after 3 consecutive errors (only maintenance
    sets it back); ``in_flight`` counts requests between ``begin()`` and ``finish()``.
    """

    __slots__ = (
        "_conn",
        "_consecutive_errors",
        "_created_at",
        "_error_count",
        "_in_flight",
        "_last_used",
        "_request_count",
        "closed",
        "healthy",
        "paused",
    )

    def __init__(self, conn: AgentConnection, now: float | None = None) -> None:
        if now is None:
            now = time.monotonic()
        self._conn = conn
        self.healthy = True
        self.paused = False
        self.closed = False
        self._in_flight = 0
        self._request_count = 0
        self._error_count = 0
        self._consecutive_errors = 0
        self._created_at = float(now)
        self._last_used = float(now)

    @property
    def conn(self) -> AgentConnection:
        """The connection object this state describes."""
        return self._conn

    @property
    def in_flight(self) -> int:
        """Requests begun and not yet finished."""
        return self._in_flight

    @property
    def request_count(self) -> int:
        """Completed requests (success or error)."""
        return self._request_count

    @property
    def error_count(self) -> int:
        """Failed requests over the connection's lifetime."""
        return self._error_count

    @property
    def consecutive_errors(self) -> int:
        """Failures since the last success."""
        return self._consecutive_errors

    @property
    def created_at(self) -> float:
        """Monotonic creation time (seconds)."""
        return self._created_at

    @property
    def last_used(self) -> float:
        """Monotonic time of the last ``begin()``."""
        return self._last_used

    @property
    def error_rate(self) -> float:
        """``error_count / request_count`` (0.0 before the first completed request)."""
        return self._rate()

    @property
    def selectable(self) -> bool:
        """True when selection may pick this connection (healthy and not closed)."""
        return bool(self.healthy and not self.closed)

    def _rate(self) -> float:
        if self._request_count == 0:
            return 0.0
        return self._error_count / self._request_count

    def begin(self, now: float) -> None:
        """Account a request start: one more in flight, touched at ``now``."""
        self._in_flight += 1
        self._last_used = now

    def release(self) -> None:
        """End a request that never reached the agent: one fewer in flight, nothing counted."""
        if self._in_flight > 0:
            self._in_flight -= 1

    def finish(self, ok: bool) -> None:
        """Account a request end; 3 consecutive failures mark the connection unhealthy."""
        if self._in_flight > 0:
            self._in_flight -= 1
        self._request_count += 1
        if ok:
            self._consecutive_errors = 0
        else:
            self._error_count += 1
            self._consecutive_errors += 1
            if self._consecutive_errors >= _UNHEALTHY_AFTER:
                self.healthy = False

    def __repr__(self) -> str:
        return (
            f"<ConnState conn={self._conn!r} healthy={bool(self.healthy)} "
            f"paused={bool(self.paused)} closed={bool(self.closed)} "
            f"in_flight={self._in_flight} requests={self._request_count} "
            f"errors={self._error_count}>"
        )


class ConnectionSet:
    """The ordered connections of one agent and the strategy pick over them (docs/pool.md)."""

    __slots__ = ("_agent_id", "_rng", "_rr", "_states", "last_error")

    def __init__(self, agent_id: str) -> None:
        self._agent_id = agent_id
        # appended to "No connections" errors: what the last connect attempt said, and when
        self.last_error: str | None = None
        self._states: list[ConnState] = []
        self._rr = 0
        self._rng = random.getrandbits(64) | 1

    @property
    def agent_id(self) -> str:
        """The agent these connections belong to."""
        return self._agent_id

    @property
    def states(self) -> list[ConnState]:
        """A copy of the connection list, in selection order."""
        return list(self._states)

    @property
    def round_robin_index(self) -> int:
        """The next round-robin counter value (wraps at 2**64)."""
        return self._rr

    def add(self, state: ConnState) -> None:
        """Append ``state`` (no-op if already present)."""
        for s in self._states:
            if s is state:
                return
        self._states.append(state)

    def remove(self, state: ConnState) -> bool:
        """Remove ``state``; False if it was not in the set."""
        for i in range(len(self._states)):
            if self._states[i] is state:
                del self._states[i]
                return True
        return False

    def replace(self, old: ConnState, new: ConnState) -> bool:
        """Put ``new`` in ``old``'s slot; if ``old`` is absent append ``new`` and return False."""
        for i in range(len(self._states)):
            if self._states[i] is old:
                self._states[i] = new
                return True
        self.add(new)
        return False

    def clear(self) -> None:
        """Drop every connection."""
        self._states.clear()

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[ConnState]:
        return iter(list(self._states))

    def __contains__(self, state: object) -> bool:
        for s in self._states:
            if s is state:
                return True
        return False

    def _with_last_error(self, message: str) -> str:
        return message if self.last_error is None else f"{message} ({self.last_error})"

    def _seed(self, seed: int) -> None:
        """Restart the random strategy's sequence from ``seed`` (the builds are compared so)."""
        self._rng = (seed & _U64) | 1

    def _next_random(self) -> int:
        """xorshift64* (the same 64-bit sequence in both builds)."""
        x = self._rng
        x ^= x >> 12
        x ^= (x << 25) & _U64
        x ^= x >> 27
        self._rng = x
        return (x * _XORSHIFT_MUL) & _U64

    def select(self, strategy: int) -> ConnState:
        """Pick a connection by ``strategy`` (a ``LoadBalanceStrategy``) over the healthy ones.

        Raises ``ConnectionFailed`` when the agent has no connections or none is healthy
        (healthy = ``healthy and not closed``; paused connections stay selectable).
        """
        states = self._states
        n = len(states)
        best: ConnState | None = None
        best_rate = 0.0
        if n == 0:
            raise ConnectionFailed(
                self._with_last_error(f"No connections available for agent {self._agent_id}")
            )
        if strategy == LEAST_CONNECTIONS:
            for i in range(n):
                s = states[i]
                if s.healthy and not s.closed and (best is None or s._in_flight < best._in_flight):
                    best = s
        elif strategy == HEALTH_BASED:
            for i in range(n):
                s = states[i]
                if s.healthy and not s.closed:
                    rate = s._rate()
                    if best is None or rate < best_rate:
                        best = s
                        best_rate = rate
        elif strategy == ROUND_ROBIN or strategy == RANDOM:
            nh = 0
            for i in range(n):
                s = states[i]
                if s.healthy and not s.closed:
                    nh += 1
            if nh == 0:
                raise ConnectionFailed(
                    self._with_last_error(f"No healthy connections for agent {self._agent_id}")
                )
            if strategy == ROUND_ROBIN:
                k = self._rr % nh
                self._rr = (self._rr + 1) & _U64
            else:
                k = self._next_random() % nh
            if nh == n:
                return states[k]
            for i in range(n):
                s = states[i]
                if s.healthy and not s.closed:
                    if k == 0:
                        return s
                    k -= 1
        else:
            raise ValueError(f"unknown load balance strategy: {strategy!r}")
        if best is None:
            raise ConnectionFailed(
                self._with_last_error(f"No healthy connections for agent {self._agent_id}")
            )
        return best

    def healthy_count(self) -> int:
        """Connections selection may pick (healthy and not closed)."""
        c = 0
        for s in self._states:
            if s.healthy and not s.closed:
                c += 1
        return c

    def paused_count(self) -> int:
        """Connections currently paused by agent flow control."""
        c = 0
        for s in self._states:
            if s.paused:
                c += 1
        return c

    def total_in_flight(self) -> int:
        """Sum of ``in_flight`` over the connections."""
        c = 0
        for s in self._states:
            c += s._in_flight
        return c

    def total_requests(self) -> int:
        """Sum of ``request_count`` over the connections."""
        c = 0
        for s in self._states:
            c += s._request_count
        return c

    def total_errors(self) -> int:
        """Sum of ``error_count`` over the connections."""
        c = 0
        for s in self._states:
            c += s._error_count
        return c

    def __repr__(self) -> str:
        return f"<ConnectionSet agent_id={self._agent_id!r} connections={len(self._states)}>"


class _Affinity:
    __slots__ = ("created_at", "last_access", "state")

    state: ConnState
    created_at: float
    last_access: float


class AffinityMap:
    """Correlation id -> connection, bounded (docs/pool.md "Correlation affinity").

    A new id is refused when the map is full (``rejections`` counts it; ``at_capacity`` is
    set until the next accepted store, so the caller can warn once per episode); re-storing
    an existing id always succeeds. ``get`` refreshes the idle timer that ``sweep`` checks.
    """

    __slots__ = ("_at_capacity", "_map", "_max_entries", "_rejections")

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        self._map: dict[str, _Affinity] = {}
        self._max_entries = max_entries
        self._rejections = 0
        self._at_capacity = False

    @property
    def max_entries(self) -> int:
        """Capacity of the map."""
        return self._max_entries

    @property
    def rejections(self) -> int:
        """New ids refused because the map was full."""
        return self._rejections

    @property
    def at_capacity(self) -> bool:
        """True from a refused store until the next accepted one."""
        return bool(self._at_capacity)

    def store(self, correlation_id: str, state: ConnState, now: float) -> bool:
        """Bind ``correlation_id`` to ``state``; False if refused at capacity."""
        return bool(self._store(correlation_id, state, now))

    def _store(self, correlation_id: str, state: ConnState, now: float) -> bool:
        entry = self._map.get(correlation_id)
        if entry is None:
            if len(self._map) >= self._max_entries:
                self._rejections += 1
                self._at_capacity = True
                return False
            entry = _Affinity.__new__(_Affinity)
            self._map[correlation_id] = entry
        entry.state = state
        entry.created_at = now
        entry.last_access = now
        self._at_capacity = False
        return True

    def get(self, correlation_id: str, now: float) -> ConnState | None:
        """The bound connection (refreshing its idle timer), or None."""
        entry = self._map.get(correlation_id)
        if entry is None:
            return None
        entry.last_access = now
        return entry.state

    def peek(self, correlation_id: str) -> ConnState | None:
        """The bound connection without refreshing anything, or None."""
        entry = self._map.get(correlation_id)
        if entry is None:
            return None
        return entry.state

    def remove(self, correlation_id: str) -> bool:
        """Drop the binding; False if there was none."""
        return self._map.pop(correlation_id, None) is not None

    def sweep(self, now: float, ttl: float) -> int:
        """Remove entries idle strictly longer than ``ttl``; return how many."""
        expired = []
        for k, e in self._map.items():
            if now - e.last_access > ttl:
                expired.append(k)
        for k in expired:
            del self._map[k]
        return len(expired)

    def drop_state(self, state: ConnState) -> int:
        """Remove every entry bound to ``state``; return how many."""
        dead = []
        for k, e in self._map.items():
            if e.state is state:
                dead.append(k)
        for k in dead:
            del self._map[k]
        return len(dead)

    def clear(self) -> None:
        """Remove every entry."""
        self._map.clear()

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, correlation_id: object) -> bool:
        return correlation_id in self._map

    def __repr__(self) -> str:
        return f"<AffinityMap entries={len(self._map)} max_entries={self._max_entries}>"


def forget_affinity(entries: dict[Any, Any], correlation_id: str) -> int:
    """Drop ``correlation_id`` from the ``affinity`` map of every value of ``entries`` (the
    pool's agents) in one call; how many bindings were dropped."""
    n = 0
    for e in entries.values():
        m: AffinityMap = e.affinity
        if m._map and m._map.pop(correlation_id, None) is not None:
            n += 1
    return n


class _Session:
    __slots__ = ("agent_id", "created_at", "last_accessed", "state")

    state: ConnState
    agent_id: str
    created_at: float
    last_accessed: float


class SessionMap:
    """Sticky sessions: session id -> (connection, agent id, created, last accessed) (§7).

    A session is expired when ``now - last_accessed > timeout`` (strict); ``timeout=None``
    never expires. ``lookup`` refreshes or removes; ``has`` only answers (upstream's refreshes).
    """

    __slots__ = ("_map",)

    def __init__(self) -> None:
        self._map: dict[str, _Session] = {}

    def create(self, session_id: str, state: ConnState, agent_id: str, now: float) -> None:
        """Bind ``session_id`` (overwriting an existing one), touched at ``now``."""
        entry = _Session.__new__(_Session)
        entry.state = state
        entry.agent_id = agent_id
        entry.created_at = now
        entry.last_accessed = now
        self._map[session_id] = entry

    def lookup(self, session_id: str, now: float, timeout: float | None) -> ConnState | None:
        """The session's connection, refreshed; an expired session is removed (None)."""
        entry = self._map.get(session_id)
        if entry is None:
            return None
        if timeout is not None:
            t: float = timeout
            if now - entry.last_accessed > t:
                del self._map[session_id]
                return None
        entry.last_accessed = now
        return entry.state

    def has(self, session_id: str, now: float, timeout: float | None) -> bool:
        """True if the session exists and is not expired; changes nothing."""
        entry = self._map.get(session_id)
        if entry is None:
            return False
        if timeout is None:
            return True
        t: float = timeout
        return not now - entry.last_accessed > t

    def peek(self, session_id: str) -> ConnState | None:
        """The session's connection, ignoring expiry and refreshing nothing."""
        entry = self._map.get(session_id)
        if entry is None:
            return None
        return entry.state

    def agent(self, session_id: str) -> str | None:
        """The agent id bound to the session (expiry not checked, nothing refreshed)."""
        entry = self._map.get(session_id)
        if entry is None:
            return None
        return entry.agent_id

    def remove(self, session_id: str) -> bool:
        """Drop the session; False if there was none."""
        return self._map.pop(session_id, None) is not None

    def sweep(self, now: float, timeout: float | None) -> int:
        """Remove every expired session (none when ``timeout`` is None); return how many."""
        if timeout is None:
            return 0
        t: float = timeout
        expired = []
        for k, e in self._map.items():
            if now - e.last_accessed > t:
                expired.append(k)
        for k in expired:
            del self._map[k]
        return len(expired)

    def drop_state(self, state: ConnState) -> int:
        """Remove every session bound to ``state``; return how many."""
        dead = []
        for k, e in self._map.items():
            if e.state is state:
                dead.append(k)
        for k in dead:
            del self._map[k]
        return len(dead)

    def clear(self) -> None:
        """Remove every session."""
        self._map.clear()

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._map

    def __repr__(self) -> str:
        return f"<SessionMap sessions={len(self._map)}>"
