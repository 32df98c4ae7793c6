"""Endpoint sets: the replicas behind one agent id (docs/pool.md, "Endpoint sets").

An agent id owns one record per endpoint (:class:`EndpointRecord`): its connections, its
reported health, its reconnect backoff and its circuit breaker. The pool's selection core
still sees one connection list per agent; an endpoint that should not get new requests (its
breaker is not closed while another endpoint's is, or it reported itself unhealthy) has its
connections marked unhealthy, which selection already skips (:func:`refresh_selection`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ._impl import core
from .circuit import CircuitBreaker, CircuitBreakerConfig, CircuitState
from .endpoint import parse_endpoint
from .errors import InvalidEndpoint

__all__ = ["EndpointRecord", "EndpointStats", "EndpointsBreaker", "normalize_endpoints"]

_UNHEALTHY_AFTER = 3


@dataclass(slots=True)
class EndpointStats:
    """One endpoint of an agent: connections, traffic, health, recovery state."""

    agent_id: str
    endpoint: str
    state: str  # "active" or "draining"
    active_connections: int
    healthy_connections: int
    total_in_flight: int
    total_requests: int
    total_errors: int
    error_rate: float
    is_healthy: bool
    breaker_state: str | None
    reconnect_attempts: int
    last_error: str | None


def normalize_endpoints(endpoints: str | Iterable[str]) -> list[str]:
    """The endpoints in order without duplicates, each checked (``InvalidEndpoint``)."""
    items = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    out: list[str] = []
    for ep in items:
        if not isinstance(ep, str):
            raise InvalidEndpoint(repr(ep), "an endpoint is a string")
        ep = ep.strip()
        parse_endpoint(ep)
        if ep not in out:
            out.append(ep)
    return out


class _EndpointBreaker(CircuitBreaker):
    """A circuit breaker that tells its endpoint set when its state changes."""

    __slots__ = ("_on_change",)

    def __init__(self, config: CircuitBreakerConfig, on_change: Callable[[], None]) -> None:
        self._on_change: Callable[[], None] | None = None
        super().__init__(config)
        self._on_change = on_change

    def _transition(self, state: CircuitState) -> None:
        old = self._state
        super()._transition(state)
        if old is not state and self._on_change is not None:
            self._on_change()


class EndpointRecord:
    """One endpoint of an agent id: its connections and per-endpoint recovery state."""

    __slots__ = (
        "breaker",
        "breaker_clean",
        "closing",
        "endpoint",
        "health_at",
        "last_error",
        "next_reconnect_at",
        "reconnect_attempts",
        "reconnecting",
        "reported_ok",
        "retired_errors",
        "retired_requests",
        "selectable",
        "states",
        "was_healthy",
    )

    def __init__(self, endpoint: str, breaker: CircuitBreaker | None) -> None:
        self.endpoint = endpoint
        self.breaker = breaker
        # True while the breaker is closed with no failures: the hot path then skips it.
        self.breaker_clean = True
        self.states: list[core.ConnState] = []
        self.reported_ok = True
        self.health_at = 0.0
        self.selectable = True
        self.reconnect_attempts = 0
        self.next_reconnect_at = 0.0
        self.reconnecting = False
        self.closing = False
        self.retired_requests = 0
        self.retired_errors = 0
        self.last_error: str | None = None
        self.was_healthy = True

    def live_count(self) -> int:
        return sum(1 for st in self.states if not st.closed)

    def healthy_count(self) -> int:
        return sum(1 for st in self.states if st.healthy and not st.closed)

    def usable_count(self) -> int:
        """Connections that would be healthy if the endpoint were selectable."""
        return sum(1 for st in self.states if _usable(st))

    def is_healthy(self) -> bool:
        return not self.closing and self.reported_ok and self.healthy_count() > 0

    def admits(self) -> bool:
        """The breaker lets requests through (absent or closed)."""
        b = self.breaker
        return b is None or b.state is CircuitState.CLOSED

    def stats(self, agent_id: str) -> EndpointStats:
        states = list(self.states)
        requests = self.retired_requests + sum(st.request_count for st in states)
        errors = self.retired_errors + sum(st.error_count for st in states)
        return EndpointStats(
            agent_id=agent_id,
            endpoint=self.endpoint,
            state="draining" if self.closing else "active",
            active_connections=sum(1 for st in states if not st.closed),
            healthy_connections=0 if self.closing else self.healthy_count(),
            total_in_flight=sum(st.in_flight for st in states),
            total_requests=requests,
            total_errors=errors,
            error_rate=errors / requests if requests else 0.0,
            is_healthy=self.is_healthy(),
            breaker_state=None if self.breaker is None else self.breaker.state.value,
            reconnect_attempts=self.reconnect_attempts,
            last_error=self.last_error,
        )

    def __repr__(self) -> str:
        return (
            f"<EndpointRecord {self.endpoint} connections={len(self.states)} "
            f"selectable={self.selectable} closing={self.closing}>"
        )


def _usable(st: core.ConnState) -> bool:
    return bool(not st.closed and st.conn.is_connected and st.consecutive_errors < _UNHEALTHY_AFTER)


def refresh_selection(endpoints: Sequence[EndpointRecord]) -> None:
    """Mark each endpoint's connections selectable or not.

    An endpoint that reported itself unhealthy is never selectable. One whose breaker is not
    closed is selectable only when no other endpoint is both closed and usable, so the
    breaker then answers (``CircuitBreakerOpen``) as it does for a single endpoint.
    """
    attractive = any(ep.reported_ok and ep.admits() and ep.usable_count() > 0 for ep in endpoints)
    for ep in endpoints:
        sel = ep.reported_ok and (ep.admits() or not attractive)
        if sel == ep.selectable:
            continue
        ep.selectable = sel
        for st in ep.states:
            st.healthy = sel and _usable(st)


class EndpointsBreaker:
    """The gate a send passes before selection: open only when every endpoint's breaker is.

    With one endpoint it is exactly that endpoint's breaker. With several, a closed one
    lets the request through (selection then avoids the others); otherwise the first that
    lets a call through (half-open probe) does. Outcomes are recorded on the breaker of the
    endpoint the request actually went to.
    """

    __slots__ = ("_endpoints",)

    def __init__(self, endpoints: Callable[[], Sequence[EndpointRecord]]) -> None:
        self._endpoints = endpoints

    def _breakers(self) -> list[CircuitBreaker]:
        return [ep.breaker for ep in self._endpoints() if ep.breaker is not None]

    @property
    def state(self) -> CircuitState:
        """CLOSED if any endpoint's breaker is, else HALF_OPEN if any is, else OPEN."""
        states = {b.state for b in self._breakers()}
        for s in (CircuitState.CLOSED, CircuitState.HALF_OPEN):
            if s in states or not states:
                return s
        return CircuitState.OPEN

    def is_closed(self) -> bool:
        breakers = self._breakers()
        if not breakers or any(b.state is CircuitState.CLOSED for b in breakers):
            return True
        return any(b.is_closed() for b in breakers)

    allow_request = is_closed

    def release(self) -> None:
        for b in self._breakers():
            if b.state is CircuitState.HALF_OPEN:
                b.release()
                return
