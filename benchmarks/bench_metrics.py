"""Micro benchmarks of ProtocolMetrics counters, histogram records and exports.

Run: ``pytest benchmarks/bench_metrics.py --benchmark-group-by=func`` (both cores side by
side via the ``core_impl`` fixture).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any


def loaded_metrics(core: types.ModuleType) -> Any:
    m = core.ProtocolMetrics()
    for i in range(1000):
        m.inc_requests()
        m.inc_responses()
        m.record_request_duration(i * 1e-5)
        m.record_serialization_time(i * 1e-7)
    return m


def test_inc_requests(benchmark: Any, core_impl: types.ModuleType) -> None:
    benchmark(core_impl.ProtocolMetrics().inc_requests)


def test_in_flight_inc_dec(benchmark: Any, core_impl: types.ModuleType) -> None:
    m = core_impl.ProtocolMetrics()
    inc, dec = m.inc_in_flight, m.dec_in_flight

    def both() -> None:
        inc()
        dec()

    benchmark(both)


def test_record_request_duration(benchmark: Any, core_impl: types.ModuleType) -> None:
    benchmark(core_impl.ProtocolMetrics().record_request_duration, 0.000734)


def test_histogram_record(benchmark: Any, core_impl: types.ModuleType) -> None:
    benchmark(core_impl.Histogram().record, 0.0123)


def test_snapshot(benchmark: Any, core_impl: types.ModuleType) -> None:
    benchmark(loaded_metrics(core_impl).snapshot)


def test_to_prometheus(benchmark: Any, core_impl: types.ModuleType) -> None:
    m = loaded_metrics(core_impl)
    text = benchmark(m.to_prometheus)
    assert "agent_protocol_requests_total 1000\n" in text


def main() -> int:
    """Print best-of-7 ns per call for both cores, measured side by side in this one run."""
    import sys
    import timeit

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from conftest import CORES

    cases: dict[str, tuple[str, Callable[[Any], dict[str, Any]]]] = {
        "inc_requests": ("f()", lambda m: {"f": m.inc_requests}),
        "inc_in_flight + dec_in_flight": (
            "i(); d()",
            lambda m: {"i": m.inc_in_flight, "d": m.dec_in_flight},
        ),
        "record_request_duration": ("f(0.000734)", lambda m: {"f": m.record_request_duration}),
        "histogram.record": ("f(0.0123)", lambda m: {"f": m.request_duration.record}),
    }
    results: dict[str, dict[str, float]] = {}
    for name, core in CORES.items():
        m = core.ProtocolMetrics()
        for case, (stmt, make_globals) in cases.items():
            best = min(timeit.repeat(stmt, number=200_000, repeat=7, globals=make_globals(m)))
            results.setdefault(case, {})[name] = best / 200_000 * 1e9
    names = list(CORES)
    print(f"{'ns per call':32s}" + "".join(f"{n:>12s}" for n in names))
    for case, row in results.items():
        print(f"{case:32s}" + "".join(f"{row[n]:12.1f}" for n in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
