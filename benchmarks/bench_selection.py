"""Micro benchmarks of connection selection, correlation affinity and sticky sessions.

Run: ``pytest benchmarks/bench_selection.py --benchmark-group-by=func`` (pytest-benchmark),
or ``python benchmarks/bench_selection.py`` for a side-by-side summary of both cores
(ns per select, affinity scaling 10 vs 100,000 entries, tracemalloc memory of 100,000 sticky
sessions + 100,000 affinities).
"""

from __future__ import annotations

import gc
import itertools
import sys
import timeit
import tracemalloc
import types
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from agentpool.enums import LoadBalanceStrategy

STRATEGIES = list(LoadBalanceStrategy)


def build_set(core: types.ModuleType, n: int = 4, agent_id: str = "agent") -> Any:
    cs = core.ConnectionSet(agent_id)
    for i in range(n):
        cs.add(core.ConnState(f"conn-{i}", now=0.0))
    return cs


def affinity_cycle(core: types.ModuleType, size: int) -> Callable[[], None]:
    """One store + get + remove on a map already holding ``size`` entries (size stays put)."""
    amap = core.AffinityMap(size + 10)
    state = core.ConnState("c", now=0.0)
    for i in range(size):
        amap.store(f"pre-{i:08d}-{uuid.uuid4()}", state, 0.0)
    keys = itertools.cycle([str(uuid.uuid4()) for _ in range(1024)])
    store, get, remove = amap.store, amap.get, amap.remove

    def cycle() -> None:
        k = next(keys)
        store(k, state, 1.0)
        get(k, 2.0)
        remove(k)

    return cycle


def session_cycle(core: types.ModuleType, size: int) -> Callable[[], None]:
    """One create + lookup + remove on a session map already holding ``size`` sessions."""
    sessions = core.SessionMap()
    state = core.ConnState("c", now=0.0)
    for i in range(size):
        sessions.create(f"pre-{i:08d}-{uuid.uuid4()}", state, "agent", 0.0)
    keys = itertools.cycle([str(uuid.uuid4()) for _ in range(1024)])
    create, lookup, remove = sessions.create, sessions.lookup, sessions.remove

    def cycle() -> None:
        k = next(keys)
        create(k, state, "agent", 1.0)
        lookup(k, 2.0, 300.0)
        remove(k)

    return cycle


def memory_figure(core: types.ModuleType, n: int = 100_000) -> tuple[float, float]:
    """MB for ``n`` sticky sessions + ``n`` affinities: (with the id strings, maps only).

    The maps are measured with tracemalloc (every allocation made while filling them);
    the uuid4 id strings, made before tracing, are added as ``sys.getsizeof`` each.
    """
    states = [core.ConnState(f"conn-{i}", now=0.0) for i in range(4)]
    session_ids = [str(uuid.uuid4()) for _ in range(n)]
    correlation_ids = [str(uuid.uuid4()) for _ in range(n)]
    ids_bytes = sum(map(sys.getsizeof, session_ids)) + sum(map(sys.getsizeof, correlation_ids))
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        sessions = core.SessionMap()
        affinity = core.AffinityMap(n)
        for i in range(n):
            now = 1000.0 + i * 1e-6
            sessions.create(session_ids[i], states[i & 3], "agent-1", now)
            affinity.store(correlation_ids[i], states[i & 3], now)
        gc.collect()
        maps = tracemalloc.get_traced_memory()[0] - base
        assert len(sessions) == n
        assert len(affinity) == n
    finally:
        tracemalloc.stop()
    mb = 1024 * 1024
    return (maps + ids_bytes) / mb, maps / mb


# --- pytest-benchmark --------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES, ids=[s.name.lower() for s in STRATEGIES])
def test_select_4_connections(benchmark: Any, core_impl: types.ModuleType, strategy: int) -> None:
    cs = build_set(core_impl)
    benchmark(cs.select, int(strategy))


def test_select_with_unhealthy(benchmark: Any, core_impl: types.ModuleType) -> None:
    cs = build_set(core_impl)
    cs.states[1].healthy = False
    benchmark(cs.select, 0)


@pytest.mark.parametrize("agents", [1, 10_000])
def test_select_by_agent_count(benchmark: Any, core_impl: types.ModuleType, agents: int) -> None:
    """Pool-style lookup (dict of agent id -> ConnectionSet) then select."""
    sets = {f"agent-{i}": build_set(core_impl, 4, f"agent-{i}") for i in range(agents)}
    aid = f"agent-{agents // 2}"

    def pick() -> Any:
        return sets[aid].select(0)

    benchmark(pick)


@pytest.mark.parametrize("size", [10, 100_000])
def test_affinity_store_get_remove(benchmark: Any, core_impl: types.ModuleType, size: int) -> None:
    benchmark(affinity_cycle(core_impl, size))


@pytest.mark.parametrize("size", [10, 100_000])
def test_session_create_lookup_remove(
    benchmark: Any, core_impl: types.ModuleType, size: int
) -> None:
    benchmark(session_cycle(core_impl, size))


def test_connstate_begin_finish(benchmark: Any, core_impl: types.ModuleType) -> None:
    st = core_impl.ConnState("c", now=0.0)

    def round_trip() -> None:
        st.begin(1.0)
        st.finish(True)

    benchmark(round_trip)


def test_memory_100k_sessions_100k_affinities(benchmark: Any, core_impl: types.ModuleType) -> None:
    """Records the tracemalloc figure in extra_info (MB); the benchmark time is the build."""
    total, maps_only = benchmark.pedantic(memory_figure, args=(core_impl,), rounds=1, iterations=1)
    benchmark.extra_info["mb_with_ids"] = round(total, 2)
    benchmark.extra_info["mb_maps_only"] = round(maps_only, 2)


# --- side-by-side summary -----------------------------------------------------------------------


def _ns(stmt: str | Callable[[], object], number: int, **names: object) -> float:
    """Best-of-3 ns per execution of ``stmt`` (a string is timed without a call wrapper)."""
    return min(timeit.repeat(stmt, number=number, repeat=3, globals=names)) / number * 1e9


def main() -> int:
    """Print ns per call and memory for both cores, measured in this one run."""
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from conftest import CORES

    results: dict[str, dict[str, float]] = {}
    for name, core in CORES.items():
        r = results.setdefault(name, {})
        cs = build_set(core)
        cases: dict[str, tuple[str | Callable[[], object], dict[str, object]]] = {
            f"select {st.name.lower()} (ns)": ("sel(s)", {"sel": cs.select, "s": int(st)})
            for st in STRATEGIES
        }
        cases["(timing loop + no-op call, ns)"] = ("f()", {"f": int})
        for kind, make in (("affinity", affinity_cycle), ("session", session_cycle)):
            for size in (10, 100_000):
                cases[f"{kind} cycle @{size} (ns)"] = (make(core, size), {})
        best = dict.fromkeys(cases, float("inf"))
        for _ in range(9):  # interleaved rounds, best of all: every case sees the same noise
            for key, (stmt, names) in cases.items():
                best[key] = min(best[key], _ns(stmt, 20_000, **names))
        r.update(best)
        r["affinity 100k/10 ratio"] = (
            r["affinity cycle @100000 (ns)"] / r["affinity cycle @10 (ns)"]
        )
        r["session 100k/10 ratio"] = r["session cycle @100000 (ns)"] / r["session cycle @10 (ns)"]
        total, maps_only = memory_figure(core)
        r["memory 100k+100k, with ids (MB)"] = total
        r["memory 100k+100k, maps only (MB)"] = maps_only
    cols = list(results)
    print(f"{'metric':40s}" + "".join(f"{n:>14s}" for n in cols))
    for key in results[cols[0]]:
        print(f"{key:40s}" + "".join(f"{results[n][key]:14.2f}" for n in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
