"""Pure-Python twin of ``_selection.pxi``: connection state, selection, affinity, sessions.

Per-connection cached state (:class:`ConnState`), the per-agent ordered connection list with
the four load-balancing strategies (:class:`ConnectionSet`), the correlation affinity map
(:class:`AffinityMap`) and sticky sessions (:class:`SessionMap`), as docs/pool.md describes.
Times are monotonic seconds passed in by the caller, so every rule is testable without sleeping.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import Any

from .errors import ConnectionFailed

__all__ = ["AffinityMap", "ConnState", "ConnectionSet", "SessionMap", "forget_affinity"]

_U64 = 0xFFFFFFFFFFFFFFFF
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

    def __init__(self, conn: object, now: float | None = None) -> None:
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
    def conn(self) -> object:
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
        if self._request_count == 0:
            return 0.0
        return self._error_count / self._request_count

    @property
    def selectable(self) -> bool:
        """True when selection may pick this connection (healthy and not closed)."""
        return self.healthy and not self.closed

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
            f"<ConnState conn={self._conn!r} healthy={self.healthy} paused={self.paused} "
            f"closed={self.closed} in_flight={self._in_flight} requests={self._request_count} "
            f"errors={self._error_count}>"
        )


class ConnectionSet:
    """The ordered connections of one agent and the strategy pick over them (docs/pool.md)."""

    __slots__ = ("_agent_id", "_rand", "_rr", "_states", "last_error")

    def __init__(self, agent_id: str) -> None:
        self._agent_id = agent_id
        # appended to "No connections" errors: what the last connect attempt said, and when
        self.last_error: str | None = None
        self._states: list[ConnState] = []
        self._rr = 0
        self._rand = random.Random().random

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
        for i, s in enumerate(self._states):
            if s is state:
                del self._states[i]
                return True
        return False

    def replace(self, old: ConnState, new: ConnState) -> bool:
        """Put ``new`` in ``old``'s slot; if ``old`` is absent append ``new`` and return False."""
        for i, s in enumerate(self._states):
            if s is old:
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
        return any(s is state for s in self._states)

    def _with_last_error(self, message: str) -> str:
        return message if self.last_error is None else f"{message} ({self.last_error})"

    def select(self, strategy: int) -> ConnState:
        """Pick a connection by ``strategy`` (a ``LoadBalanceStrategy``) over the healthy ones.

        Raises ``ConnectionFailed`` when the agent has no connections or none is healthy
        (healthy = ``healthy and not closed``; paused connections stay selectable).
        """
        states = self._states
        if not states:
            raise ConnectionFailed(
                self._with_last_error(f"No connections available for agent {self._agent_id}")
            )
        healthy = [s for s in states if s.healthy and not s.closed]
        if not healthy:
            raise ConnectionFailed(
                self._with_last_error(f"No healthy connections for agent {self._agent_id}")
            )
        if strategy == ROUND_ROBIN:
            i = self._rr
            self._rr = (i + 1) & _U64
            return healthy[i % len(healthy)]
        if strategy == LEAST_CONNECTIONS:
            best = healthy[0]
            for s in healthy:
                if s._in_flight < best._in_flight:
                    best = s
            return best
        if strategy == HEALTH_BASED:
            best = healthy[0]
            best_rate = best.error_rate
            for s in healthy:
                rate = s._error_count / s._request_count if s._request_count else 0.0
                if rate < best_rate:
                    best = s
                    best_rate = rate
            return best
        if strategy == RANDOM:
            return healthy[int(self._rand() * len(healthy))]
        raise ValueError(f"unknown load balance strategy: {strategy!r}")

    def healthy_count(self) -> int:
        """Connections selection may pick (healthy and not closed)."""
        return sum(1 for s in self._states if s.healthy and not s.closed)

    def paused_count(self) -> int:
        """Connections currently paused by agent flow control."""
        return sum(1 for s in self._states if s.paused)

    def total_in_flight(self) -> int:
        """Sum of ``in_flight`` over the connections."""
        return sum(s._in_flight for s in self._states)

    def total_requests(self) -> int:
        """Sum of ``request_count`` over the connections."""
        return sum(s._request_count for s in self._states)

    def total_errors(self) -> int:
        """Sum of ``error_count`` over the connections."""
        return sum(s._error_count for s in self._states)

    def __repr__(self) -> str:
        return f"<ConnectionSet agent_id={self._agent_id!r} connections={len(self._states)}>"


class _Affinity:
    __slots__ = ("created_at", "last_access", "state")

    def __init__(self, state: ConnState, now: float) -> None:
        self.state = state
        self.created_at = now
        self.last_access = now


def _remove_where(entries: dict[str, Any], doomed: Callable[[Any], bool]) -> int:
    """Delete the entries ``doomed`` picks; return how many."""
    keys = [k for k, e in entries.items() if doomed(e)]
    for k in keys:
        del entries[k]
    return len(keys)


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
        self._max_entries = int(max_entries)
        self._map: dict[str, _Affinity] = {}
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
        return self._at_capacity

    def store(self, correlation_id: str, state: ConnState, now: float) -> bool:
        """Bind ``correlation_id`` to ``state``; False if refused at capacity."""
        entry = self._map.get(correlation_id)
        if entry is not None:
            entry.state = state
            entry.created_at = now
            entry.last_access = now
            self._at_capacity = False
            return True
        if len(self._map) >= self._max_entries:
            self._rejections += 1
            self._at_capacity = True
            return False
        self._at_capacity = False
        self._map[correlation_id] = _Affinity(state, now)
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
        return None if entry is None else entry.state

    def remove(self, correlation_id: str) -> bool:
        """Drop the binding; False if there was none."""
        return self._map.pop(correlation_id, None) is not None

    def sweep(self, now: float, ttl: float) -> int:
        """Remove entries idle strictly longer than ``ttl``; return how many."""
        return _remove_where(self._map, lambda e: now - e.last_access > ttl)

    def drop_state(self, state: ConnState) -> int:
        """Remove every entry bound to ``state``; return how many."""
        return _remove_where(self._map, lambda e: e.state is state)

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
        if e.affinity.remove(correlation_id):
            n += 1
    return n


class _Session:
    __slots__ = ("agent_id", "created_at", "last_accessed", "state")

    def __init__(self, state: ConnState, agent_id: str, now: float) -> None:
        self.state = state
        self.agent_id = agent_id
        self.created_at = now
        self.last_accessed = now


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
        self._map[session_id] = _Session(state, agent_id, now)

    def lookup(self, session_id: str, now: float, timeout: float | None) -> ConnState | None:
        """The session's connection, refreshed; an expired session is removed (None)."""
        entry = self._map.get(session_id)
        if entry is None:
            return None
        if timeout is not None and now - entry.last_accessed > timeout:
            del self._map[session_id]
            return None
        entry.last_accessed = now
        return entry.state

    def has(self, session_id: str, now: float, timeout: float | None) -> bool:
        """True if the session exists and is not expired; changes nothing."""
        entry = self._map.get(session_id)
        if entry is None:
            return False
        return timeout is None or not now - entry.last_accessed > timeout

    def peek(self, session_id: str) -> ConnState | None:
        """The session's connection, ignoring expiry and refreshing nothing."""
        entry = self._map.get(session_id)
        return None if entry is None else entry.state

    def agent(self, session_id: str) -> str | None:
        """The agent id bound to the session (expiry not checked, nothing refreshed)."""
        entry = self._map.get(session_id)
        return None if entry is None else entry.agent_id

    def remove(self, session_id: str) -> bool:
        """Drop the session; False if there was none."""
        return self._map.pop(session_id, None) is not None

    def sweep(self, now: float, timeout: float | None) -> int:
        """Remove every expired session (none when ``timeout`` is None); return how many."""
        if timeout is None:
            return 0
        return _remove_where(self._map, lambda e: now - e.last_accessed > timeout)

    def drop_state(self, state: ConnState) -> int:
        """Remove every session bound to ``state``; return how many."""
        return _remove_where(self._map, lambda e: e.state is state)

    def clear(self) -> None:
        """Remove every session."""
        self._map.clear()

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._map

    def __repr__(self) -> str:
        return f"<SessionMap sessions={len(self._map)}>"
