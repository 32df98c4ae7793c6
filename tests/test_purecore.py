"""The compiled and the interpreted build of each pure-Python-mode core module agree.

``agentpool._selection_c`` and ``agentpool._metrics_c`` are compiled (Cython pure-Python mode)
from ``_selection_py.py`` and ``_metrics_py.py``, the very files the pure-Python core runs.
Each test drives both builds with one seeded random sequence of operations and compares every
result, error class and message. On a pure-Python install there is only one build: skipped.
"""

from __future__ import annotations

import importlib
import math
import random
import types
from collections.abc import Callable
from typing import Any

import pytest

from agentpool import _impl, _metrics_py, _selection_py

SEEDS = range(12)


def _builds(plain: types.ModuleType, compiled_name: str) -> list[types.ModuleType]:
    if not _impl.HAS_EXTENSIONS:
        pytest.skip("pure-Python install: no compiled build to compare with")
    compiled = importlib.import_module(f"agentpool.{compiled_name}")
    assert compiled.COMPILED, f"agentpool.{compiled_name} is not the compiled build"
    assert not plain.COMPILED
    return [compiled, plain]


@pytest.fixture
def selection() -> list[types.ModuleType]:
    """[compiled, interpreted] builds of _selection_py.py."""
    return _builds(_selection_py, "_selection_c")


@pytest.fixture
def metrics() -> list[types.ModuleType]:
    """[compiled, interpreted] builds of _metrics_py.py."""
    return _builds(_metrics_py, "_metrics_c")


def _outcome(call: Callable[[], Any]) -> Any:
    """A call's result, or its exception as (class name, message)."""
    try:
        return call()
    except Exception as exc:
        return ("raised", type(exc).__name__, str(exc))


def _run(
    builds: list[types.ModuleType], script: Callable[[types.ModuleType, random.Random], list[Any]]
) -> None:
    for seed in SEEDS:
        compiled, interpreted = (script(m, random.Random(seed)) for m in builds)
        assert compiled == interpreted, f"seed {seed}"


def _selection_script(m: types.ModuleType, rng: random.Random) -> list[Any]:
    states = [m.ConnState(f"c{i}", now=float(i)) for i in range(rng.randint(0, 6))]
    cs = m.ConnectionSet("agent")
    cs._seed(rng.getrandbits(64))
    for s in states:
        cs.add(s)
    if rng.random() < 0.3:
        cs.last_error = "refused at 12:00"
    out: list[Any] = []
    for _ in range(400):
        op = rng.random()
        if states and op < 0.25:
            s = rng.choice(states)
            s.begin(rng.random())
        elif states and op < 0.45:
            rng.choice(states).finish(rng.random() < 0.7)
        elif states and op < 0.5:
            rng.choice(states).release()
        elif states and op < 0.6:
            s = rng.choice(states)
            setattr(s, rng.choice(["healthy", "closed", "paused"]), rng.random() < 0.5)
        else:
            strategy = rng.choice([0, 1, 2, 3, 3, 7])
            picked = _outcome(lambda st=strategy: cs.select(st))
            out.append(states.index(picked) if isinstance(picked, m.ConnState) else picked)
    out.append([repr(s) for s in states])
    out.append(
        [(s.in_flight, s.request_count, s.error_count, s.consecutive_errors) for s in states]
    )
    out.append([(s.error_rate, s.selectable, s.last_used, s.created_at) for s in states])
    out.append(
        (
            cs.healthy_count(),
            cs.paused_count(),
            cs.total_in_flight(),
            cs.total_requests(),
            cs.total_errors(),
            cs.round_robin_index,
            len(cs),
            repr(cs),
        )
    )
    return out


def test_selection_builds_agree(selection: list[types.ModuleType]) -> None:
    _run(selection, _selection_script)


def test_membership_builds_agree(selection: list[types.ModuleType]) -> None:
    def script(m: types.ModuleType, rng: random.Random) -> list[Any]:
        pool = [m.ConnState(f"c{i}", now=0.0) for i in range(6)]
        cs = m.ConnectionSet("agent")
        out: list[Any] = []
        for _ in range(200):
            a, b = rng.choice(pool), rng.choice(pool)
            op = rng.choice(["add", "remove", "replace", "contains", "clear"])
            if op == "add":
                out.append(cs.add(a))
            elif op == "remove":
                out.append(cs.remove(a))
            elif op == "replace":
                out.append(cs.replace(a, b))
            elif op == "contains":
                out.append(a in cs)
            elif rng.random() < 0.1:
                cs.clear()
            out.append([pool.index(s) for s in cs])
        return out

    _run(selection, script)


def _maps_script(m: types.ModuleType, rng: random.Random) -> list[Any]:
    states = [m.ConnState(f"c{i}", now=0.0) for i in range(3)]
    amap = m.AffinityMap(rng.randint(0, 8))
    smap = m.SessionMap()
    keys = [f"k{i}" for i in range(12)]

    def idx(s: Any) -> Any:
        return None if s is None else states.index(s)

    out: list[Any] = []
    now = 0.0
    for _ in range(500):
        now += rng.choice([0.0, 0.5, 1.0, 3.0])
        k, s = rng.choice(keys), rng.choice(states)
        timeout = rng.choice([None, 1.0, 2.5, 10.0])
        op = rng.randrange(14)
        if op == 0:
            out.append(amap.store(k, s, now))
        elif op == 1:
            out.append(idx(amap.get(k, now)))
        elif op == 2:
            out.append(idx(amap.peek(k)))
        elif op == 3:
            out.append(amap.remove(k))
        elif op == 4:
            out.append(amap.sweep(now, rng.choice([0.5, 2.0, 5.0])))
        elif op == 5:
            out.append(amap.drop_state(s))
        elif op == 6:
            smap.create(k, s, f"agent-{idx(s)}", now)
        elif op == 7:
            out.append(idx(smap.lookup(k, now, timeout)))
        elif op == 8:
            out.append(smap.has(k, now, timeout))
        elif op == 9:
            out.append((idx(smap.peek(k)), smap.agent(k)))
        elif op == 10:
            out.append(smap.remove(k))
        elif op == 11:
            out.append(smap.sweep(now, timeout))
        elif op == 12:
            out.append(smap.drop_state(s))
        else:
            agents = {"a": types.SimpleNamespace(affinity=amap)}
            out.append(m.forget_affinity(agents, k))
        out.append((len(amap), k in amap, len(smap), k in smap, amap.at_capacity))
    out.append((amap.rejections, amap.max_entries, repr(amap), repr(smap)))
    return out


def test_affinity_and_session_builds_agree(selection: list[types.ModuleType]) -> None:
    _run(selection, _maps_script)


EDGE_SECONDS = [
    0.0,
    -1.0,
    -0.0,
    0.5e-9,
    1.5e-9,
    2.5e-9,
    999.5e-9,
    1000.5e-9,
    10e-6,
    10.0000005e-6,
    50e-6,
    0.0123,
    1.0,
    9e9,
    1e300,
    math.inf,
    -math.inf,
    # exactly half a ns below a µs boundary after the * 1e9
    *[(k * 1000 - 0.5) / 1e9 for k in (1, 2, 10, 50, 100, 500)],
]


def _histogram_script(m: types.ModuleType, rng: random.Random) -> list[Any]:
    bounds = sorted(rng.sample(range(0, 2_000_000), rng.randint(1, 15)))
    hists = [m.Histogram(), m.Histogram(bounds)]
    out: list[Any] = []
    for h in hists:
        for x in EDGE_SECONDS:
            h.record(x)
        for _ in range(2000):
            h.record(rng.random() * rng.choice([1e-9, 1e-6, 1e-3, 1.0, 100.0]))
            h.record_micros(rng.randint(-5, 3_000_000))
        h.record_micros(bounds[-1])
        out.append((h.snapshot(), h.count, h.sum_micros, h.bounds_us, repr(h)))
        h.reset()
        out.append(h.snapshot())
    return out


def test_histogram_builds_agree(metrics: list[types.ModuleType]) -> None:
    _run(metrics, _histogram_script)


def test_histogram_bad_bounds_agree(metrics: list[types.ModuleType]) -> None:
    for bad in ([], [5, 5], [3, 2], [-1, 4], ["x"]):
        results = [_outcome(lambda m=m, b=bad: m.Histogram(b).bounds_us) for m in metrics]
        assert results[0] == results[1], bad


def _protocol_metrics_script(m: types.ModuleType, rng: random.Random) -> list[Any]:
    pm = m.ProtocolMetrics()
    counters = [
        "inc_requests",
        "inc_responses",
        "inc_timeouts",
        "inc_connection_errors",
        "inc_serialization_errors",
        "record_flow_pause",
        "record_flow_resume",
        "record_flow_rejection",
        "inc_affinity_rejections",
        "inc_in_flight",
        "dec_in_flight",
    ]
    gauges = [
        "set_correlation_affinities",
        "set_in_flight",
        "set_buffer_utilization",
        "set_healthy_connections",
        "set_paused_connections",
        "inc_affinity_evictions",
    ]
    out: list[Any] = []
    for _ in range(600):
        op = rng.random()
        if op < 0.6:
            getattr(pm, rng.choice(counters))()
        elif op < 0.8:
            getattr(pm, rng.choice(gauges))(rng.randint(-50, 250))
        elif op < 0.9:
            pm.record_request_duration(rng.random() * rng.choice([1e-6, 1e-3, 1.0]))
        else:
            pm.record_serialization_time(rng.random() * 1e-4)
    out.append(pm.snapshot())
    out.append(pm.to_prometheus())
    out.append(pm.to_prometheus("custom"))
    out.append(repr(pm))
    return out


def test_protocol_metrics_builds_agree(metrics: list[types.ModuleType]) -> None:
    _run(metrics, _protocol_metrics_script)


def test_snapshot_classes_are_shared(metrics: list[types.ModuleType]) -> None:
    compiled, interpreted = (m.ProtocolMetrics().snapshot() for m in metrics)
    assert type(compiled) is type(interpreted)
    assert type(compiled.request_duration) is type(interpreted.request_duration)
    assert compiled == interpreted
