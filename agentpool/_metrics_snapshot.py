"""Snapshots of the protocol metrics and their Prometheus text, shared by both builds.

The compiled (``agentpool._metrics_c``) and the interpreted (``agentpool._metrics_py``)
build of the metrics core return these very classes, so their snapshots compare equal and
render identical text. Plain Python, never compiled.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from ._metric_names import PROTOCOL_HISTOGRAMS, PROTOCOL_SCALARS

__all__ = [
    "DEFAULT_BUCKETS_US",
    "HistogramSnapshot",
    "ProtocolMetricsSnapshot",
    "check_bounds",
    "render_prometheus",
]

DEFAULT_BUCKETS_US: tuple[int, ...] = (
    10,
    50,
    100,
    500,
    1_000,
    5_000,
    10_000,
    50_000,
    100_000,
    500_000,
    1_000_000,
)


def check_bounds(bounds_us: Iterable[int]) -> tuple[int, ...]:
    out = tuple(int(b) for b in bounds_us)
    prev = -1
    for b in out:
        if b < 0 or b <= prev:
            raise ValueError("histogram bounds must be non-negative and strictly increasing")
        prev = b
    return out


@dataclass(slots=True)
class HistogramSnapshot:
    """Point-in-time histogram: ``counts[i]`` observations in slot ``i`` (non-cumulative).

    ``buckets`` are the finite upper bounds in µs; ``counts`` has one more slot (overflow);
    ``sum`` is in µs.
    """

    buckets: list[int]
    counts: list[int]
    sum: int
    count: int

    def mean_micros(self) -> float:
        """Mean observation in µs (0.0 if empty)."""
        if self.count == 0:
            return 0.0
        return self.sum / self.count

    def percentile_micros(self, p: float) -> int:
        """Upper bound (µs) of the slot holding the ``p``-th percentile (0 if empty).

        The overflow slot reports the last finite bound.
        """
        if self.count == 0:
            return 0
        target = math.ceil(self.count * p / 100.0)
        cumulative = 0
        for i, c in enumerate(self.counts):
            cumulative += c
            if cumulative >= target:
                if i < len(self.buckets):
                    return self.buckets[i]
                break
        return self.buckets[-1] if self.buckets else 0


@dataclass(slots=True)
class ProtocolMetricsSnapshot:
    """Plain values of every :class:`ProtocolMetrics` field at one instant."""

    requests_total: int = 0
    responses_total: int = 0
    timeouts_total: int = 0
    connection_errors_total: int = 0
    serialization_errors_total: int = 0
    flow_control_pauses_total: int = 0
    flow_control_resumes_total: int = 0
    flow_control_rejections_total: int = 0
    affinity_evictions_total: int = 0
    affinity_rejections_total: int = 0
    in_flight_requests: int = 0
    correlation_affinities: int = 0
    buffer_utilization_percent: int = 0
    healthy_connections: int = 0
    paused_connections: int = 0
    serialization_time: HistogramSnapshot = field(
        default_factory=lambda: HistogramSnapshot(
            list(DEFAULT_BUCKETS_US), [0] * (len(DEFAULT_BUCKETS_US) + 1), 0, 0
        )
    )
    request_duration: HistogramSnapshot = field(
        default_factory=lambda: HistogramSnapshot(
            list(DEFAULT_BUCKETS_US), [0] * (len(DEFAULT_BUCKETS_US) + 1), 0, 0
        )
    )


def _render_histogram(out: list[str], name: str, help_text: str, h: HistogramSnapshot) -> None:
    out.append(f"# HELP {name} {help_text}\n# TYPE {name} histogram\n")
    cumulative = 0
    for bound, c in zip(h.buckets, h.counts):
        cumulative += c
        out.append(f'{name}_bucket{{le="{bound / 1e6:.6f}"}} {cumulative}\n')
    out.append(f'{name}_bucket{{le="+Inf"}} {h.count}\n')
    out.append(f"{name}_sum {h.sum / 1e6:.6f}\n{name}_count {h.count}\n\n")


def render_prometheus(snap: ProtocolMetricsSnapshot, prefix: str) -> str:
    """Upstream's exact Prometheus text for a snapshot (shared by both cores)."""
    out: list[str] = []
    for attr, kind, help_text in PROTOCOL_SCALARS:
        name = f"{prefix}_{attr}"
        out.append(
            f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n{name} {getattr(snap, attr)}\n\n"
        )
    for attr, suffix, help_text in PROTOCOL_HISTOGRAMS:
        _render_histogram(out, f"{prefix}_{suffix}", help_text, getattr(snap, attr))
    return "".join(out)
