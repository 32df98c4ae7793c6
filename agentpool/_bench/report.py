"""Reporting: the markdown table, the target verdicts, the environment and the JSON results."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from typing import Any

from .._impl import HAS_EXTENSIONS
from .._version import __version__
from .agent import grpc_module
from .scenarios import Scenario


def _fmt_range(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def _paired(a: Scenario | None, b: Scenario | None) -> list[float]:
    if a is None or b is None or not a.rates or not b.rates:
        return []
    return [x / y for x, y in zip(a.rates, b.rates) if y > 0]


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def find(
    scenarios: list[Scenario], kind: str, encoding: str, in_flight: int, conns: int
) -> Scenario | None:
    for s in scenarios:
        if (s.kind, s.encoding, s.in_flight, s.connections) == (kind, encoding, in_flight, conns):
            return s
    return None


def _baselines(scenarios: list[Scenario], s: Scenario) -> tuple[Scenario | None, Scenario | None]:
    raw = find(scenarios, "raw", "json", s.in_flight, s.connections)
    grpc = find(scenarios, "grpc", "json", s.in_flight, s.connections)
    return raw, grpc or find(scenarios, "grpc", "json", s.in_flight, 1)


# The targets (issue 6 and 12): (label, measured (kind, in flight, connections), baseline,
# threshold of the paired ratio); every scenario is JSON, W stands for --in-flight.
W = -1
_TARGETS: tuple[tuple[str, tuple[str, int, int], tuple[str, int, int], float], ...] = (
    ("pool json 1x1 / raw 1x1", ("pool", 1, 1), ("raw", 1, 1), 0.9),
    ("pool json {w}x4 / raw {w}x1", ("pool", W, 4), ("raw", W, 1), 1.0),
    ("pool json {w}x4 / raw {w}x4", ("pool", W, 4), ("raw", W, 4), 1.0),
    ("pool json {w}x4 / grpc {w} on 1 stream", ("pool", W, 4), ("grpc", W, 1), 30.0),
    ("pool json {w}x4 / grpc {w} over 4 streams", ("pool", W, 4), ("grpc", W, 4), 30.0),
    ("pool json {w}x4 / raw+codec {w}x4", ("pool", W, 4), ("rawcodec", W, 4), 1.5),
    ("batch json {w}x4 / raw {w}x4 (per event)", ("batch", W, 4), ("raw", W, 4), 1.3),
    ("fanout json {w}x4 / raw {w}x4 (per event)", ("fanout", W, 4), ("raw", W, 4), 1.3),
    ("pool json 1x1 / grpc 1", ("pool", 1, 1), ("grpc", 1, 1), 2.5),
)


def targets(scenarios: list[Scenario], wide: int) -> list[dict[str, Any]]:
    """The targets, each a paired ratio with its threshold and verdict."""

    def pick(spec: tuple[str, int, int]) -> Scenario | None:
        kind, in_flight, conns = spec
        return find(scenarios, kind, "json", wide if in_flight == W else in_flight, conns)

    out: list[dict[str, Any]] = []
    for label, measured, baseline, threshold in _TARGETS:
        summary = _summary(_paired(pick(measured), pick(baseline)))
        out.append(
            {
                "target": label.format(w=wide),
                "threshold": threshold,
                "ratio": summary,
                "met": None if summary is None else summary["median"] >= threshold,
            }
        )
    return out


def render_table(scenarios: list[Scenario], wide: int) -> str:
    """Markdown table of the run plus the target verdicts."""
    lines = [
        "| scenario | in flight | conns | enc | frame B | round trips/s median (min-max) "
        "| µs/rt | CPU µs/rt client + server | vs raw | vs grpc |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in scenarios:
        if not s.rates:
            lines.append(
                f"| {s.kind} | {s.in_flight} | {s.connections} | {s.encoding} | - "
                f"| failed: {s.error} | | | | |"
            )
            continue
        raw, grpc = _baselines(scenarios, s)
        med = statistics.median(s.rates)
        vs_raw = _summary(_paired(s, raw)) if s.kind != "raw" else None
        vs_grpc = _summary(_paired(s, grpc)) if s.kind != "grpc" else None
        lines.append(
            f"| {s.kind} | {s.in_flight} | {s.connections} | {s.encoding} | {s.frame_size or '-'} "
            f"| {_fmt_range(s.rates, '{:,.0f}')} | {1e6 / med:.1f} "
            f"| {statistics.median(s.cpu_us):.1f} + {statistics.median(s.server_cpu_us):.1f} "
            f"| {_ratio_text(vs_raw)} | {_ratio_text(vs_grpc)} |"
        )
    lines += [
        "",
        "| target | threshold | measured (median, min-max of paired ratios) | verdict |",
        "|---|---:|---:|---|",
    ]
    for t in targets(scenarios, wide):
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(
            f"| {t['target']} | ≥ {t['threshold']:g}x | {_ratio_text(t['ratio'])} | {verdict} |"
        )
    return "\n".join(lines)


def _ratio_text(summary: dict[str, float] | None) -> str:
    if summary is None:
        return "-"
    return f"{summary['median']:.2f}x ({summary['min']:.2f}-{summary['max']:.2f})"


def environment(args: argparse.Namespace, agent_impl: str) -> dict[str, Any]:
    try:
        import uvloop

        uvloop_version = str(getattr(uvloop, "__version__", "?"))
    except ImportError:  # pragma: no cover
        uvloop_version = None
    grpc_version = None
    with contextlib.suppress(Exception):
        grpc_version = grpc_module().__version__
    return {
        "agentpool": __version__,
        "compiled_core": HAS_EXTENSIONS,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "uvloop": uvloop_version,
        "grpcio": grpc_version,
        "agent": agent_impl,
        "repetitions": args.reps,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "in_flight": args.in_flight,
        "clear_affinity": not args.keep_affinity,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def results(
    args: argparse.Namespace, env: dict[str, Any], elapsed: float, scenarios: list[Scenario]
) -> dict[str, Any]:
    """Everything of a run as one JSON-ready dict (``--json``)."""

    def rel(s: Scenario, base: Scenario | None) -> dict[str, float] | None:
        return _summary(_paired(s, base))

    return {
        "environment": env,
        "elapsed_s": elapsed,
        "scenarios": [
            {
                "name": s.name,
                "kind": s.kind,
                "encoding": s.encoding,
                "in_flight": s.in_flight,
                "connections": s.connections,
                "frame_size": s.frame_size,
                "rates": s.rates,
                "rate": _summary(s.rates),
                "us_per_rt": (1e6 / statistics.median(s.rates)) if s.rates else None,
                "client_cpu_us_per_rt": s.cpu_us,
                "client_cpu_us_per_rt_median": (statistics.median(s.cpu_us) if s.cpu_us else None),
                "server_cpu_us_per_rt": s.server_cpu_us,
                "server_cpu_us_per_rt_median": (
                    statistics.median(s.server_cpu_us) if s.server_cpu_us else None
                ),
                "vs_raw": rel(s, _baselines(scenarios, s)[0]) if s.kind != "raw" else None,
                "vs_grpc": rel(s, _baselines(scenarios, s)[1]) if s.kind != "grpc" else None,
                "error": s.error,
            }
            for s in scenarios
        ],
        "targets": targets(scenarios, args.in_flight),
    }
