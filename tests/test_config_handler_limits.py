"""ConfigUpdateHandler: agent-initiated reload requests are remembered within a cap and an age."""

from __future__ import annotations

import logging
import tracemalloc

import pytest

from agentpool.control import (
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_PENDING_AGE,
    ConfigUpdateHandler,
)
from agentpool.messages import ConfigUpdateRequest, RequestReload, RuleUpdate


def reload(rid: str) -> ConfigUpdateRequest:
    return ConfigUpdateRequest(update_type=RequestReload(), request_id=rid, timestamp_ms=1)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_defaults() -> None:
    h = ConfigUpdateHandler()
    assert (h.max_pending, h.max_pending_age) == (DEFAULT_MAX_PENDING, DEFAULT_MAX_PENDING_AGE)
    assert (DEFAULT_MAX_PENDING, DEFAULT_MAX_PENDING_AGE) == (256, 300.0)


def test_cap_forgets_the_oldest_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    h = ConfigUpdateHandler(max_pending=3)
    with caplog.at_level(logging.WARNING, logger="agentpool.control"):
        for i in range(10):
            assert h.handle(reload(f"r{i}")).accepted
    assert [r.request_id for r in h.pending_requests()] == ["r7", "r8", "r9"]
    assert h.pending_count() == 3 and h.dropped_count() == 7
    assert len(caplog.records) == 1 and "max_pending=3" in caplog.text
    h.handle(reload("r8"))  # a repeated id moves to the end, it is not a second entry
    assert [r.request_id for r in h.pending_requests()] == ["r7", "r9", "r8"]


def test_age_bound_and_clear_old_pending() -> None:
    clock = Clock()
    h = ConfigUpdateHandler(clock=clock, max_pending_age=10.0)
    h.handle(reload("old"))
    clock.now += 6
    h.handle(reload("new"))
    assert h.pending_count() == 2
    clock.now += 4  # "old" is exactly max_pending_age old
    assert [r.request_id for r in h.pending_requests()] == ["new"]
    assert h.clear_old_pending(1.0) == 1 and h.pending_count() == 0
    assert h.dropped_count() == 0


def test_long_request_ids_are_rejected_and_not_remembered() -> None:
    h = ConfigUpdateHandler()
    resp = h.handle(reload("x" * 257))
    assert not resp.accepted and resp.error == "Request id too long"
    assert h.pending_count() == 0
    assert h.handle(reload("x" * 256)).accepted and h.pending_count() == 1
    # other kinds are never remembered
    h.handle(ConfigUpdateRequest(RuleUpdate("r", [], []), "y" * 5000, 1))
    assert h.pending_count() == 1


def test_invalid_bounds() -> None:
    with pytest.raises(ValueError):
        ConfigUpdateHandler(max_pending=-1)
    with pytest.raises(ValueError):
        ConfigUpdateHandler(max_pending_age=float("nan"))
    h = ConfigUpdateHandler(max_pending=0)
    assert h.handle(reload("r")).accepted and h.pending_count() == 0 and h.dropped_count() == 1


def test_200k_reload_requests_keep_memory_bounded() -> None:
    """Before: 200k reload requests were all kept (+70 MB)."""
    h = ConfigUpdateHandler()
    tracemalloc.start()
    try:
        for i in range(200_000):
            h.handle(reload(f"reload-{i:08d}"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert h.pending_count() == DEFAULT_MAX_PENDING
    assert h.dropped_count() == 200_000 - DEFAULT_MAX_PENDING
    assert peak < 2 * 1024 * 1024, peak
