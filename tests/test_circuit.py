"""CircuitBreaker semantics (POOL.md §8.4, DECISIONS 8) with a fake clock."""

from __future__ import annotations

import pytest
from _helpers import FakeClock

from agentpool.circuit import CircuitBreaker, CircuitBreakerConfig, CircuitState


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def open_breaker(cb: CircuitBreaker) -> None:
    for _ in range(cb.config.failure_threshold):
        cb.record_failure()
    assert cb.state is CircuitState.OPEN


def test_defaults_match_rust_proxy() -> None:
    cfg = CircuitBreakerConfig()
    assert cfg.failure_threshold == 5
    assert cfg.success_threshold == 2
    assert cfg.timeout == 30.0
    assert cfg.half_open_max_requests == 1
    cb = CircuitBreaker()
    assert cb.state is CircuitState.CLOSED
    assert cb.is_closed()
    assert cb.allow_request()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failure_threshold": 0},
        {"success_threshold": 0},
        {"timeout": -1.0},
        {"half_open_max_requests": -1},
    ],
)
def test_invalid_config_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CircuitBreakerConfig(**kwargs)  # type: ignore[arg-type]


def test_opens_after_threshold_consecutive_failures(clock: FakeClock) -> None:
    cb = CircuitBreaker(clock=clock)
    for _ in range(4):
        cb.record_failure()
        assert cb.state is CircuitState.CLOSED
        assert cb.is_closed()
    cb.record_failure()
    assert cb.state is CircuitState.OPEN
    assert not cb.is_closed()
    assert not cb.allow_request()


def test_success_resets_consecutive_failures(clock: FakeClock) -> None:
    cb = CircuitBreaker(clock=clock)
    for _ in range(4):
        cb.record_failure()
    cb.record_success()
    assert cb.failure_count == 0
    for _ in range(4):
        cb.record_failure()
    assert cb.state is CircuitState.CLOSED
    cb.record_failure()
    assert cb.state is CircuitState.OPEN


def test_open_stays_open_until_timeout(clock: FakeClock) -> None:
    cb = CircuitBreaker(clock=clock)
    open_breaker(cb)
    clock.advance(29.999)
    assert not cb.is_closed()
    assert cb.state is CircuitState.OPEN
    assert cb.retry_after() == pytest.approx(0.001)
    clock.advance(0.001)
    assert cb.retry_after() == 0.0
    assert cb.is_closed()  # transitioning call passes and is not counted as a probe
    assert cb.state is CircuitState.HALF_OPEN


def test_state_read_does_not_transition(clock: FakeClock) -> None:
    cb = CircuitBreaker(clock=clock)
    open_breaker(cb)
    clock.advance(100)
    assert cb.state is CircuitState.OPEN
    assert cb.retry_after() == 0.0


def test_half_open_default_lets_two_probes_through(clock: FakeClock) -> None:
    cb = CircuitBreaker(clock=clock)
    open_breaker(cb)
    clock.advance(30)
    assert cb.is_closed()  # transition
    assert cb.is_closed()  # the one counted probe
    assert not cb.is_closed()
    assert not cb.is_closed()
    assert cb.state is CircuitState.HALF_OPEN


def test_half_open_max_requests_configurable(clock: FakeClock) -> None:
    cb = CircuitBreaker(CircuitBreakerConfig(half_open_max_requests=3), clock=clock)
    open_breaker(cb)
    clock.advance(30)
    assert [cb.is_closed() for _ in range(6)] == [True, True, True, True, False, False]


def test_half_open_closes_after_success_threshold(clock: FakeClock) -> None:
    cb = CircuitBreaker(clock=clock)
    open_breaker(cb)
    clock.advance(30)
    assert cb.is_closed()
    cb.record_success()
    assert cb.state is CircuitState.HALF_OPEN
    cb.record_success()
    assert cb.state is CircuitState.CLOSED
    assert cb.failure_count == 0 and cb.success_count == 0
    # closed again: needs the full failure threshold to re-open
    for _ in range(4):
        cb.record_failure()
    assert cb.state is CircuitState.CLOSED


def test_half_open_failure_reopens_and_restarts_timeout(clock: FakeClock) -> None:
    cb = CircuitBreaker(clock=clock)
    open_breaker(cb)
    clock.advance(30)
    assert cb.is_closed()
    cb.record_success()
    cb.record_failure()
    assert cb.state is CircuitState.OPEN
    clock.advance(29)
    assert not cb.is_closed()
    clock.advance(1)
    assert cb.is_closed()
    assert cb.state is CircuitState.HALF_OPEN


def test_successes_while_open_do_not_close(clock: FakeClock) -> None:
    cb = CircuitBreaker(clock=clock)
    open_breaker(cb)
    cb.record_success()
    cb.record_success()
    cb.record_success()
    assert cb.state is CircuitState.OPEN
    clock.advance(30)
    assert cb.is_closed()
    # counters were reset by the transition: two fresh successes are needed
    cb.record_success()
    assert cb.state is CircuitState.HALF_OPEN
    cb.record_success()
    assert cb.state is CircuitState.CLOSED


def test_custom_thresholds_and_zero_timeout(clock: FakeClock) -> None:
    cfg = CircuitBreakerConfig(failure_threshold=1, success_threshold=1, timeout=0.0)
    cb = CircuitBreaker(cfg, clock=clock)
    cb.record_failure()
    assert cb.state is CircuitState.OPEN
    assert cb.is_closed()  # timeout 0: half-opens at once
    assert cb.state is CircuitState.HALF_OPEN
    cb.record_success()
    assert cb.state is CircuitState.CLOSED


def test_reset(clock: FakeClock) -> None:
    cb = CircuitBreaker(clock=clock)
    open_breaker(cb)
    cb.reset()
    assert cb.state is CircuitState.CLOSED
    assert cb.is_closed()
    assert "CLOSED" in repr(cb)
