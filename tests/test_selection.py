"""ConnState, ConnectionSet, AffinityMap, SessionMap on the active core (POOL.md §4, §6, §7)."""

from __future__ import annotations

import collections
import time

import pytest

from agentpool import ConnectionFailed, LoadBalanceStrategy
from agentpool._impl import core

ALL_STRATEGIES = list(LoadBalanceStrategy)


def make_set(n: int, agent_id: str = "a1") -> tuple[core.ConnectionSet, list[core.ConnState]]:
    cs = core.ConnectionSet(agent_id)
    states = [core.ConnState(f"c{i}", now=0.0) for i in range(n)]
    for s in states:
        cs.add(s)
    return cs, states


# --- ConnState ------------------------------------------------------------------------------


def test_connstate_initial_values() -> None:
    s = core.ConnState("conn", now=12.5)
    assert s.conn == "conn"
    assert s.healthy is True
    assert s.paused is False
    assert s.closed is False
    assert (s.in_flight, s.request_count, s.error_count, s.consecutive_errors) == (0, 0, 0, 0)
    assert s.created_at == 12.5
    assert s.last_used == 12.5
    assert s.error_rate == 0.0
    assert s.selectable is True


def test_connstate_default_time_is_monotonic() -> None:
    before = time.monotonic()
    s = core.ConnState(object())
    assert before <= s.created_at <= time.monotonic()


def test_connstate_begin_finish_counts() -> None:
    s = core.ConnState(None, now=0.0)
    s.begin(1.0)
    s.begin(2.0)
    assert s.in_flight == 2
    assert s.last_used == 2.0
    s.finish(True)
    s.finish(False)
    assert s.in_flight == 0
    assert s.request_count == 2
    assert s.error_count == 1
    assert s.consecutive_errors == 1
    assert s.error_rate == 0.5


def test_finish_never_underflows_in_flight() -> None:
    s = core.ConnState(None, now=0.0)
    s.finish(True)
    s.finish(False)
    assert s.in_flight == 0
    assert s.request_count == 2
    s.begin(1.0)
    assert s.in_flight == 1


def test_three_consecutive_errors_mark_unhealthy() -> None:
    s = core.ConnState(None, now=0.0)
    s.finish(False)
    s.finish(False)
    assert s.healthy
    s.finish(True)
    assert s.consecutive_errors == 0
    s.finish(False)
    s.finish(False)
    assert s.healthy
    s.finish(False)
    assert s.consecutive_errors == 3
    assert not s.healthy
    assert not s.selectable
    # a later success resets the streak but does not restore health (maintenance does)
    s.finish(True)
    assert s.consecutive_errors == 0
    assert not s.healthy
    assert s.error_count == 5
    assert s.request_count == 7


def test_connstate_flags_are_writable_counters_are_not() -> None:
    s = core.ConnState(None, now=0.0)
    s.healthy = False
    s.paused = True
    s.closed = True
    assert (s.healthy, s.paused, s.closed) == (False, True, True)
    for name in (
        "conn",
        "in_flight",
        "request_count",
        "error_count",
        "consecutive_errors",
        "created_at",
        "last_used",
    ):
        with pytest.raises(AttributeError):
            setattr(s, name, 1)


# --- ConnectionSet membership -------------------------------------------------------------------


def test_connection_set_membership() -> None:
    cs, (a, b, c) = make_set(3)
    assert cs.agent_id == "a1"
    assert len(cs) == 3
    assert list(cs) == [a, b, c]
    assert cs.states == [a, b, c]
    cs.states.clear()  # a copy
    assert len(cs) == 3
    cs.add(a)  # already present: no-op
    assert len(cs) == 3
    assert b in cs
    assert cs.remove(b) is True
    assert cs.remove(b) is False
    assert b not in cs
    assert cs.states == [a, c]
    d = core.ConnState("d", now=0.0)
    assert cs.replace(a, d) is True
    assert cs.states == [d, c]
    e = core.ConnState("e", now=0.0)
    assert cs.replace(a, e) is False  # a is gone: e appended
    assert cs.states == [d, c, e]
    cs.clear()
    assert len(cs) == 0


def test_connection_set_aggregates() -> None:
    cs, (a, b, c) = make_set(3)
    a.begin(1.0)
    a.begin(1.0)
    b.begin(1.0)
    b.finish(False)
    c.finish(True)
    c.finish(False)
    c.healthy = False
    b.paused = True
    assert cs.total_in_flight() == 2
    assert cs.total_requests() == 3
    assert cs.total_errors() == 2
    assert cs.healthy_count() == 2
    assert cs.paused_count() == 1
    a.closed = True
    assert cs.healthy_count() == 1


# --- selection errors --------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_select_empty_set_error(strategy: LoadBalanceStrategy) -> None:
    cs = core.ConnectionSet("waf-1")
    with pytest.raises(ConnectionFailed) as info:
        cs.select(strategy)
    assert str(info.value) == "Connection failed: No connections available for agent waf-1"


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_select_no_healthy_error(strategy: LoadBalanceStrategy) -> None:
    cs, states = make_set(3, "waf-1")
    states[0].healthy = False
    states[1].closed = True
    states[2].healthy = False
    with pytest.raises(ConnectionFailed) as info:
        cs.select(strategy)
    assert str(info.value) == "Connection failed: No healthy connections for agent waf-1"


def test_select_unknown_strategy() -> None:
    cs, _ = make_set(2)
    with pytest.raises(ValueError):
        cs.select(7)


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_paused_connection_is_still_selectable(strategy: LoadBalanceStrategy) -> None:
    cs, (a,) = make_set(1)
    a.paused = True
    assert cs.select(strategy) is a


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_select_only_healthy(strategy: LoadBalanceStrategy) -> None:
    cs, states = make_set(4)
    states[0].healthy = False
    states[2].closed = True
    picks = {cs.select(strategy) for _ in range(200)}
    assert picks <= {states[1], states[3]}
    assert picks


# --- strategies ---------------------------------------------------------------------------------


def test_round_robin_order_and_distribution() -> None:
    cs, states = make_set(4)
    assert [cs.select(LoadBalanceStrategy.ROUND_ROBIN) for _ in range(8)] == states * 2
    counts = collections.Counter(cs.select(0) for _ in range(4000))
    assert [counts[s] for s in states] == [1000, 1000, 1000, 1000]
    assert cs.round_robin_index == 4008


def test_round_robin_rotates_over_current_healthy_list() -> None:
    cs, (a, b, c, d) = make_set(4)
    assert cs.select(0) is a  # index 0
    b.healthy = False  # healthy = [a, c, d]
    assert cs.select(0) is c  # index 1 -> healthy[1]
    assert cs.select(0) is d  # index 2 -> healthy[2]
    assert cs.select(0) is a  # index 3 -> healthy[0]
    b.healthy = True  # healthy = [a, b, c, d]
    assert cs.select(0) is a  # index 4 -> healthy[0]
    assert cs.select(0) is b


def test_round_robin_counter_not_advanced_by_errors() -> None:
    cs, (a, b) = make_set(2)
    a.healthy = b.healthy = False
    for _ in range(3):
        with pytest.raises(ConnectionFailed):
            cs.select(0)
    assert cs.round_robin_index == 0
    a.healthy = b.healthy = True
    assert cs.select(0) is a


def test_least_connections_picks_min_in_flight_first_on_tie() -> None:
    cs, (a, b, c, d) = make_set(4)
    assert cs.select(LoadBalanceStrategy.LEAST_CONNECTIONS) is a  # all 0: first
    a.begin(0.0)
    assert cs.select(1) is b
    b.begin(0.0)
    c.begin(0.0)
    assert cs.select(1) is d
    d.begin(0.0)
    d.begin(0.0)
    assert cs.select(1) is a  # a, b, c tie at 1: first in list order
    a.healthy = False
    a.finish(True)  # a has 0 in flight but is unhealthy
    assert cs.select(1) is b


def test_least_connections_spreads_concurrent_load() -> None:
    cs, states = make_set(4)
    for _ in range(40):
        cs.select(1).begin(0.0)
    assert [s.in_flight for s in states] == [10, 10, 10, 10]


def test_health_based_picks_lowest_error_rate_first_on_tie() -> None:
    cs, (a, b, c) = make_set(3)
    assert cs.select(LoadBalanceStrategy.HEALTH_BASED) is a  # all 0.0
    a.finish(False)  # 1/1
    a.finish(True)  # 1/2
    b.finish(True)  # 0/1
    assert cs.select(2) is b  # b 0.0 before c 0.0 (tie, list order)
    b.finish(False)
    b.finish(False)  # 2/3
    c.finish(False)
    c.finish(True)
    c.finish(True)
    c.finish(True)  # 1/4
    assert cs.select(2) is c
    c.healthy = False
    assert cs.select(2) is a  # 0.5 < 0.667


def test_health_based_is_deterministic() -> None:
    cs, (a, b) = make_set(2)
    a.finish(False)
    assert {cs.select(2) for _ in range(100)} == {b}


def test_random_distribution() -> None:
    cs, states = make_set(4)
    counts = collections.Counter(cs.select(LoadBalanceStrategy.RANDOM) for _ in range(8000))
    assert set(counts) == set(states)
    for s in states:
        assert 1600 <= counts[s] <= 2400, counts  # expected 2000, sd ~39
    states[3].healthy = False
    counts = collections.Counter(cs.select(3) for _ in range(3000))
    assert set(counts) == set(states[:3])


# --- AffinityMap --------------------------------------------------------------------------------


def test_affinity_capacity_rejects_new_ids() -> None:
    m = core.AffinityMap(max_entries=3)
    s = core.ConnState(None, now=0.0)
    results = [m.store(f"req-{i}", s, 1.0) for i in range(10)]
    assert results == [True] * 3 + [False] * 7
    assert len(m) == 3
    assert m.rejections == 7
    assert m.at_capacity is True
    assert m.peek("req-3") is None


def test_affinity_restore_at_capacity_is_not_a_rejection() -> None:
    m = core.AffinityMap(1)
    s1 = core.ConnState("s1", now=0.0)
    s2 = core.ConnState("s2", now=0.0)
    assert m.store("req-1", s1, 1.0)
    assert m.store("req-1", s2, 2.0)
    assert len(m) == 1
    assert m.rejections == 0
    assert m.at_capacity is False
    assert m.get("req-1", 3.0) is s2


def test_affinity_at_capacity_episode_flag() -> None:
    m = core.AffinityMap(1)
    s = core.ConnState(None, now=0.0)
    assert m.max_entries == 1
    assert m.at_capacity is False
    m.store("a", s, 0.0)
    assert not m.store("b", s, 0.0)
    assert m.at_capacity is True
    assert not m.store("c", s, 0.0)
    assert m.at_capacity is True
    assert m.rejections == 2
    assert m.remove("a")
    assert m.store("b", s, 0.0)
    assert m.at_capacity is False


def test_affinity_zero_capacity_rejects_everything() -> None:
    m = core.AffinityMap(0)
    assert not m.store("a", core.ConnState(None, now=0.0), 0.0)
    assert len(m) == 0
    assert m.rejections == 1
    with pytest.raises(ValueError):
        core.AffinityMap(-1)


def test_affinity_default_capacity() -> None:
    assert core.AffinityMap().max_entries == 100_000


def test_affinity_get_peek_remove() -> None:
    m = core.AffinityMap()
    s = core.ConnState(None, now=0.0)
    assert m.get("x", 0.0) is None
    assert m.peek("x") is None
    assert m.store("x", s, 0.0)
    assert "x" in m
    assert m.get("x", 1.0) is s
    assert m.peek("x") is s
    assert m.remove("x") is True
    assert m.remove("x") is False
    assert len(m) == 0
    assert "x" not in m


def test_affinity_lookup_ignores_health() -> None:
    m = core.AffinityMap()
    s = core.ConnState(None, now=0.0)
    m.store("x", s, 0.0)
    s.healthy = False
    s.closed = True
    assert m.get("x", 1.0) is s


def test_affinity_ttl_zero_sweeps_everything() -> None:
    m = core.AffinityMap()
    s = core.ConnState(None, now=0.0)
    m.store("a", s, 1.0)
    m.store("b", s, 1.0)
    assert m.sweep(1.0, 0.0) == 0  # strict: no time has passed
    assert m.sweep(1.000001, 0.0) == 2
    assert len(m) == 0


def test_affinity_sweep_is_strict_and_get_refreshes() -> None:
    m = core.AffinityMap()
    s = core.ConnState(None, now=0.0)
    m.store("a", s, 0.0)
    m.store("b", s, 0.0)
    m.store("c", s, 0.0)
    assert m.get("b", 8.0) is s  # refresh
    assert m.peek("c") is s  # no refresh
    assert m.sweep(10.0, 10.0) == 0  # idle exactly ttl: kept
    assert m.sweep(10.5, 10.0) == 2  # a and c
    assert m.peek("b") is s
    assert m.sweep(18.5, 10.0) == 1
    assert len(m) == 0


def test_affinity_restore_resets_idle_timer() -> None:
    m = core.AffinityMap()
    s = core.ConnState(None, now=0.0)
    m.store("a", s, 0.0)
    m.store("a", s, 9.0)
    assert m.sweep(15.0, 10.0) == 0
    assert len(m) == 1


def test_affinity_drop_state() -> None:
    m = core.AffinityMap()
    s1 = core.ConnState("1", now=0.0)
    s2 = core.ConnState("2", now=0.0)
    for i in range(10):
        m.store(f"r{i}", s1 if i % 2 else s2, 0.0)
    assert m.drop_state(s1) == 5
    assert len(m) == 5
    assert all(m.peek(f"r{i}") is s2 for i in range(0, 10, 2))
    assert m.drop_state(s1) == 0
    m.clear()
    assert len(m) == 0


# --- SessionMap ---------------------------------------------------------------------------------


def test_session_create_lookup_agent() -> None:
    sm = core.SessionMap()
    s = core.ConnState(None, now=0.0)
    assert sm.lookup("ws-1", 0.0, 300.0) is None
    assert sm.agent("ws-1") is None
    sm.create("ws-1", s, "agent-a", 0.0)
    assert len(sm) == 1
    assert "ws-1" in sm
    assert sm.lookup("ws-1", 1.0, 300.0) is s
    assert sm.agent("ws-1") == "agent-a"
    assert sm.peek("ws-1") is s


def test_session_create_overwrites() -> None:
    sm = core.SessionMap()
    s1 = core.ConnState("1", now=0.0)
    s2 = core.ConnState("2", now=0.0)
    sm.create("ws", s1, "a", 0.0)
    sm.create("ws", s2, "b", 50.0)
    assert len(sm) == 1
    assert sm.agent("ws") == "b"
    assert sm.lookup("ws", 55.0, 10.0) is s2  # touched at 50 by the re-create


def test_session_expiry_is_strict_and_removes() -> None:
    sm = core.SessionMap()
    s = core.ConnState(None, now=0.0)
    sm.create("ws", s, "a", 0.0)
    assert sm.lookup("ws", 10.0, 10.0) is s  # exactly the timeout: still valid, refreshed
    assert sm.lookup("ws", 20.0, 10.0) is s
    assert sm.lookup("ws", 30.5, 10.0) is None
    assert len(sm) == 0
    assert sm.lookup("ws", 30.5, None) is None


def test_session_lookup_refreshes() -> None:
    sm = core.SessionMap()
    s = core.ConnState(None, now=0.0)
    sm.create("ws", s, "a", 0.0)
    for t in (8.0, 16.0, 24.0, 32.0):
        assert sm.lookup("ws", t, 10.0) is s
    assert len(sm) == 1


def test_session_without_timeout_never_expires() -> None:
    sm = core.SessionMap()
    s = core.ConnState(None, now=0.0)
    sm.create("ws", s, "a", 0.0)
    assert sm.has("ws", 1e9, None)
    assert sm.lookup("ws", 1e9, None) is s
    assert sm.sweep(1e12, None) == 0
    assert len(sm) == 1


def test_session_has_is_a_pure_query() -> None:
    sm = core.SessionMap()
    s = core.ConnState(None, now=0.0)
    assert sm.has("ws", 0.0, 10.0) is False
    sm.create("ws", s, "a", 0.0)
    assert sm.has("ws", 9.0, 10.0) is True  # does not refresh
    assert sm.has("ws", 11.0, 10.0) is False  # expired ...
    assert len(sm) == 1  # ... but not removed
    assert sm.agent("ws") == "a"  # agent() ignores expiry
    assert sm.lookup("ws", 10.5, 10.0) is None  # has(9.0) did not refresh
    assert len(sm) == 0


def test_session_remove_and_sweep() -> None:
    sm = core.SessionMap()
    s = core.ConnState(None, now=0.0)
    assert sm.remove("nope") is False
    sm.create("a", s, "x", 0.0)
    sm.create("b", s, "x", 5.0)
    sm.create("c", s, "x", 10.0)
    assert sm.remove("c") is True
    assert len(sm) == 1 + 1
    assert sm.sweep(15.0, 10.0) == 1  # a idle 15 > 10; b idle 10, not > 10
    assert sm.peek("b") is s
    assert sm.sweep(15.0, None) == 0
    assert sm.sweep(15.5, 10.0) == 1
    assert len(sm) == 0


def test_session_drop_state() -> None:
    sm = core.SessionMap()
    s1 = core.ConnState("1", now=0.0)
    s2 = core.ConnState("2", now=0.0)
    sm.create("a", s1, "x", 0.0)
    sm.create("b", s2, "x", 0.0)
    sm.create("c", s1, "y", 0.0)
    assert sm.drop_state(s1) == 2
    assert len(sm) == 1
    assert sm.peek("b") is s2
    sm.clear()
    assert len(sm) == 0
