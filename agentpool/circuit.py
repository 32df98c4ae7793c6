"""Per-agent circuit breaker (docs/pool.md, "Circuit breaker").

Upstream keeps one breaker per agent *around* the pool; agentpool's pool keeps one per agent
and consults it before selecting a connection. Closed lets everything through; enough
consecutive failures open it; after ``timeout`` seconds it half-opens and lets a few probes
through; enough successes close it again, any failure re-opens it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["CircuitBreaker", "CircuitBreakerConfig", "CircuitState"]


class CircuitState(enum.Enum):
    """Breaker state, named as upstream (Closed / Open / HalfOpen)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class CircuitBreakerConfig:
    """Thresholds with the Rust proxy's defaults; ``timeout`` is in seconds."""

    failure_threshold: int = 5
    success_threshold: int = 2
    timeout: float = 30.0
    half_open_max_requests: int = 1

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if self.success_threshold < 1:
            raise ValueError("success_threshold must be >= 1")
        if self.timeout < 0:
            raise ValueError("timeout must be >= 0")
        if self.half_open_max_requests < 0:
            raise ValueError("half_open_max_requests must be >= 0")


class CircuitBreaker:
    """Consecutive-failure circuit breaker with upstream's gate semantics.

    ``is_closed()`` (alias ``allow_request()``) is the gate and may change state: an open
    breaker whose timeout has elapsed becomes half-open and that call passes without being
    counted as a probe; a half-open breaker then passes ``half_open_max_requests`` more calls.
    Every state change resets the failure, success and probe counters.
    """

    __slots__ = (
        "_clock",
        "_failures",
        "_half_open_requests",
        "_last_change",
        "_state",
        "_successes",
        "config",
    )

    def __init__(
        self,
        config: CircuitBreakerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config if config is not None else CircuitBreakerConfig()
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._successes = 0
        self._half_open_requests = 0
        self._last_change = clock()

    @property
    def state(self) -> CircuitState:
        """Current state; reading it never transitions."""
        return self._state

    @property
    def failure_count(self) -> int:
        """Consecutive failures recorded in the current state."""
        return self._failures

    @property
    def success_count(self) -> int:
        """Consecutive successes recorded in the current state."""
        return self._successes

    def retry_after(self) -> float:
        """Seconds until an open breaker half-opens (0.0 unless open)."""
        if self._state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self.config.timeout - (self._clock() - self._last_change))

    def is_closed(self) -> bool:
        """Whether a request may go through now (see the class docstring)."""
        state = self._state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.OPEN:
            if self._clock() - self._last_change >= self.config.timeout:
                self._transition(CircuitState.HALF_OPEN)
                return True
            return False
        if self._half_open_requests < self.config.half_open_max_requests:
            self._half_open_requests += 1
            return True
        return False

    allow_request = is_closed

    def record_success(self) -> None:
        """Count a success; enough of them in half-open close the breaker."""
        self._failures = 0
        self._successes += 1
        if (
            self._state is CircuitState.HALF_OPEN
            and self._successes >= self.config.success_threshold
        ):
            self._transition(CircuitState.CLOSED)

    def record_failure(self) -> None:
        """Count a failure (timeouts included); opens a closed breaker at the threshold
        and re-opens a half-open one at once."""
        self._successes = 0
        self._failures += 1
        if self._state is CircuitState.CLOSED:
            if self._failures >= self.config.failure_threshold:
                self._transition(CircuitState.OPEN)
        elif self._state is CircuitState.HALF_OPEN:
            self._transition(CircuitState.OPEN)

    def release(self) -> None:
        """A call let through never reached the agent: give a half-open probe slot back."""
        if self._state is CircuitState.HALF_OPEN and self._half_open_requests > 0:
            self._half_open_requests -= 1

    def reset(self) -> None:
        """Force the breaker closed with fresh counters."""
        self._transition(CircuitState.CLOSED)

    def _transition(self, state: CircuitState) -> None:
        self._state = state
        self._failures = 0
        self._successes = 0
        self._half_open_requests = 0
        self._last_change = self._clock()

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(state={self._state.name}, failures={self._failures}, "
            f"successes={self._successes})"
        )
