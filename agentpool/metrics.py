"""Agent-reported metrics (POOL.md §11) and the prometheus-client collector (DECISIONS 12).

:class:`MetricsCollector` keeps the latest value of every series agents report in
MetricsReport frames and renders them in upstream's Prometheus text format.
:class:`AgentPoolCollector` exposes a pool's protocol metrics, per-agent stats and the
agent-reported series to a ``prometheus_client`` registry; it is built fresh on every scrape
and never registers itself (the application calls ``registry.register(...)``).
``prometheus_client`` is imported only when the collector is used.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .messages import MetricsReport

__all__ = [
    "AgentPoolCollector",
    "CounterSeries",
    "GaugeSeries",
    "HistogramSeries",
    "MetricsCollector",
    "MetricsCollectorConfig",
    "MetricsSnapshot",
    "escape_label_value",
    "format_le",
    "format_value",
    "rust_f64_display",
]

log = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]

_I64_MIN = -(2**63)
_I64_MAX = 2**63


def rust_f64_display(value: float) -> str:
    """Render a float like Rust's ``{}`` for ``f64``: shortest round-trip digits, no exponent.

    ``1.0`` → ``"1"``, ``0.1`` → ``"0.1"``, ``1e-7`` → ``"0.0000001"``, ``1e21`` →
    ``"1000000000000000000000"``, ``-0.0`` → ``"-0"``, infinities ``"inf"``/``"-inf"``.
    """
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = repr(value)
    if "e" in text:
        text = format(Decimal(text), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def format_value(value: float) -> str:
    """Render a sample value as upstream's exporter does.

    Infinities and NaN use Prometheus spelling; finite values with no fractional part are
    printed as integers; everything else as Rust's shortest decimal. Integral values beyond
    the i64 range print their shortest decimal (upstream's cast would saturate).
    """
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer():
        if _I64_MIN <= value < _I64_MAX:
            return str(int(value))
        return rust_f64_display(value)
    return rust_f64_display(value)


def format_le(le: float) -> str:
    """Render a histogram bucket bound: ``+Inf`` for infinity, else Rust ``f64`` display."""
    if math.isinf(le):
        return "+Inf" if le > 0 else "-Inf"
    return rust_f64_display(le)


def escape_label_value(value: str) -> str:
    """Escape a label value for the text format (backslash, double quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _render_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels) + "}"


@dataclass(slots=True)
class MetricsCollectorConfig:
    """Collector limits; ``max_age`` in seconds (upstream defaults)."""

    max_age: float = 300.0
    max_series: int = 10_000
    include_agent_id_label: bool = True


@dataclass(frozen=True, slots=True)
class CounterSeries:
    """Latest reported value of one counter series; ``labels`` sorted by key."""

    agent_id: str
    name: str
    help: str | None
    labels: Labels
    value: int
    last_updated: float


@dataclass(frozen=True, slots=True)
class GaugeSeries:
    """Latest reported value of one gauge series; ``labels`` sorted by key."""

    agent_id: str
    name: str
    help: str | None
    labels: Labels
    value: float
    last_updated: float


@dataclass(frozen=True, slots=True)
class HistogramSeries:
    """Latest reported histogram; ``buckets`` are ``(le, count)`` as the agent sent them."""

    agent_id: str
    name: str
    help: str | None
    labels: Labels
    sum: float
    count: int
    buckets: tuple[tuple[float, int], ...]
    last_updated: float


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """Point-in-time copy of every series, in recording order."""

    counters: list[CounterSeries] = field(default_factory=list)
    gauges: list[GaugeSeries] = field(default_factory=list)
    histograms: list[HistogramSeries] = field(default_factory=list)

    def counter_count(self) -> int:
        """Number of counter series."""
        return len(self.counters)

    def gauge_count(self) -> int:
        """Number of gauge series."""
        return len(self.gauges)

    def histogram_count(self) -> int:
        """Number of histogram series."""
        return len(self.histograms)


_SeriesKey = tuple[str, str, Labels]


class MetricsCollector:
    """Latest-value store for agent-reported series, capped at ``max_series``.

    Values are replaced on every report, never accumulated. New series beyond the cap are
    dropped (counted in :meth:`dropped_series`, warned once per at-capacity episode);
    existing series keep updating. Thread-safe, so a scrape from another thread is fine.
    """

    def __init__(
        self,
        config: MetricsCollectorConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config if config is not None else MetricsCollectorConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._counters: dict[_SeriesKey, CounterSeries] = {}
        self._gauges: dict[_SeriesKey, GaugeSeries] = {}
        self._histograms: dict[_SeriesKey, HistogramSeries] = {}
        self._last_report: dict[str, float] = {}
        self._dropped = 0
        self._capacity_warned = False

    def _labels(self, agent_id: str, labels: dict[str, str] | None) -> Labels:
        merged = {str(k): str(v) for k, v in labels.items()} if labels else {}
        if self.config.include_agent_id_label:
            merged["agent_id"] = agent_id
        return tuple(sorted(merged.items()))

    def _admit(self, store: dict[_SeriesKey, Any], key: _SeriesKey) -> bool:
        if key in store:
            return True
        total = len(self._counters) + len(self._gauges) + len(self._histograms)
        if total < self.config.max_series:
            return True
        self._dropped += 1
        if not self._capacity_warned:
            self._capacity_warned = True
            log.warning(
                "metrics series limit reached (max_series=%d); dropping new series "
                "(first dropped: %s from agent %s)",
                self.config.max_series,
                key[1],
                key[0],
            )
        return False

    def record(self, report: MetricsReport) -> None:
        """Store every counter, gauge and histogram of one agent report."""
        agent_id = report.agent_id
        with self._lock:
            now = self._clock()
            self._last_report[agent_id] = now
            for c in report.counters:
                labels = self._labels(agent_id, c.labels)
                key = (agent_id, c.name, labels)
                if self._admit(self._counters, key):
                    self._counters[key] = CounterSeries(
                        agent_id, c.name, c.help, labels, int(c.value), now
                    )
            for g in report.gauges:
                labels = self._labels(agent_id, g.labels)
                key = (agent_id, g.name, labels)
                if self._admit(self._gauges, key):
                    self._gauges[key] = GaugeSeries(
                        agent_id, g.name, g.help, labels, float(g.value), now
                    )
            for h in report.histograms:
                labels = self._labels(agent_id, h.labels)
                key = (agent_id, h.name, labels)
                if self._admit(self._histograms, key):
                    buckets = tuple((float(b.le), int(b.count)) for b in h.buckets)
                    self._histograms[key] = HistogramSeries(
                        agent_id, h.name, h.help, labels, float(h.sum), int(h.count), buckets, now
                    )

    def expire_old_metrics(self) -> int:
        """Drop series not updated for ``max_age`` seconds; returns how many were dropped."""
        with self._lock:
            now = self._clock()
            max_age = self.config.max_age
            removed = 0
            for store in (self._counters, self._gauges, self._histograms):
                stale = [k for k, s in store.items() if now - s.last_updated >= max_age]
                for k in stale:
                    del store[k]
                removed += len(stale)
            total = len(self._counters) + len(self._gauges) + len(self._histograms)
            if total < self.config.max_series:
                self._capacity_warned = False
            return removed

    def series_count(self) -> int:
        """Total series of all three kinds."""
        return len(self._counters) + len(self._gauges) + len(self._histograms)

    def dropped_series(self) -> int:
        """New series refused because the collector was at ``max_series``."""
        return self._dropped

    def active_agents(self) -> list[str]:
        """Ids of every agent that ever sent a report."""
        with self._lock:
            return list(self._last_report)

    def last_report(self, agent_id: str) -> float | None:
        """Clock time of the agent's latest report, if any."""
        return self._last_report.get(agent_id)

    def snapshot(self) -> MetricsSnapshot:
        """Copy of every series (the structured form :class:`AgentPoolCollector` reads)."""
        with self._lock:
            return MetricsSnapshot(
                list(self._counters.values()),
                list(self._gauges.values()),
                list(self._histograms.values()),
            )

    def export_prometheus(self, reserved_prefix: str | None = None) -> str:
        """All series in upstream's Prometheus text format (POOL.md §11.3).

        Series that cannot be exposed (a metric or label name Prometheus rejects, a reserved
        ``__`` label, a histogram carrying its own ``le``, or a name under ``reserved_prefix``)
        are left out, so one misbehaving agent cannot make the whole text unparsable.
        """
        snap = self.snapshot()
        snap = MetricsSnapshot(
            _exportable(snap.counters, False, reserved_prefix),
            _exportable(snap.gauges, False, reserved_prefix),
            _exportable(snap.histograms, True, reserved_prefix),
        )
        out: list[str] = []
        for name, series in _group_by_name(snap.counters):
            _header(out, name, series[0].help, "counter")
            for c in series:
                out.append(f"{name}{_render_labels(c.labels)} {format_value(float(c.value))}\n")
        for name, series in _group_by_name(snap.gauges):
            _header(out, name, series[0].help, "gauge")
            for g in series:
                out.append(f"{name}{_render_labels(g.labels)} {format_value(g.value)}\n")
        for name, series in _group_by_name(snap.histograms):
            _header(out, name, series[0].help, "histogram")
            for h in series:
                base = dict(h.labels)
                for le, count in h.buckets:
                    labels = tuple(sorted({**base, "le": format_le(le)}.items()))
                    out.append(f"{name}_bucket{_render_labels(labels)} {count}\n")
                rendered = _render_labels(h.labels)
                out.append(f"{name}_sum{rendered} {format_value(h.sum)}\n")
                out.append(f"{name}_count{rendered} {h.count}\n")
        return "".join(out)

    def __repr__(self) -> str:
        return f"MetricsCollector(series={self.series_count()}, dropped={self._dropped})"


_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


def _exportable(series: Iterable[Any], histogram: bool, reserved_prefix: str | None) -> list[Any]:
    """The series whose metric and label names a Prometheus scrape accepts."""
    kept = []
    for s in series:
        if not _METRIC_NAME.match(s.name) or (
            reserved_prefix and s.name.startswith(reserved_prefix)
        ):
            log.debug("not exporting agent metric %r: invalid or reserved name", s.name)
            continue
        if any(
            not _LABEL_NAME.match(k) or k.startswith("__") or (histogram and k == "le")
            for k, _ in s.labels
        ):
            log.debug("not exporting agent metric %r: invalid label name", s.name)
            continue
        kept.append(s)
    return kept


def _group_by_name(series: Iterable[Any]) -> list[tuple[str, list[Any]]]:
    groups: dict[str, list[Any]] = {}
    for s in series:
        groups.setdefault(s.name, []).append(s)
    return sorted(groups.items(), key=lambda item: item[0])


def _header(out: list[str], name: str, help_text: str | None, kind: str) -> None:
    if help_text is not None:
        out.append(f"# HELP {name} {_escape_help(help_text)}\n")
    out.append(f"# TYPE {name} {kind}\n")


# --------------------------------------------------------------------------- collector

_PROTOCOL_COUNTERS: tuple[tuple[str, str], ...] = (
    ("requests_total", "Total requests sent to agents"),
    ("responses_total", "Total responses received from agents"),
    ("timeouts_total", "Total request timeouts"),
    ("connection_errors_total", "Total connection errors"),
    ("flow_control_pauses_total", "Flow control pause events"),
    ("flow_control_rejections_total", "Requests rejected due to flow control"),
    ("affinity_evictions_total", "Correlation affinities reclaimed by TTL sweep"),
    ("affinity_rejections_total", "Affinities dropped because the map was at capacity"),
)
_PROTOCOL_GAUGES: tuple[tuple[str, str], ...] = (
    ("in_flight_requests", "Current in-flight requests"),
    ("correlation_affinities", "Current correlation affinity entries"),
    ("buffer_utilization_percent", "Buffer utilization percentage"),
    ("healthy_connections", "Number of healthy agent connections"),
    ("paused_connections", "Number of flow-control paused connections"),
)
# (snapshot field, metric suffix, help)
_PROTOCOL_HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("serialization_time", "serialization_seconds", "Serialization time in seconds"),
    ("request_duration", "request_duration_seconds", "Request duration in seconds"),
)
# (AgentPoolStats field, metric suffix, help); all gauges: request/error totals are sums
# over live connections and drop when a connection is replaced, so they are not counters.
_AGENT_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("active_connections", "agent_connections", "Connections in the pool for the agent"),
    ("healthy_connections", "agent_healthy_connections", "Healthy connections for the agent"),
    ("total_in_flight", "agent_in_flight_requests", "In-flight requests to the agent"),
    ("total_requests", "agent_requests", "Requests completed by the agent's live connections"),
    ("total_errors", "agent_errors", "Errors on the agent's live connections"),
    ("error_rate", "agent_error_rate", "Errors divided by requests on live connections"),
    ("is_healthy", "agent_healthy", "1 if the agent is healthy, else 0"),
)


class _HistogramLike(Protocol):
    buckets: Sequence[int]
    counts: Sequence[int]
    sum: int
    count: int


class PoolLike(Protocol):
    """What :class:`AgentPoolCollector` reads from a pool."""

    @property
    def protocol_metrics(self) -> Any: ...

    @property
    def metrics_collector(self) -> MetricsCollector: ...

    def agent_stats_sync(self) -> Sequence[Any]: ...


def _go_float(value: float) -> str:
    """prometheus_client's own float rendering (``1.0``, ``1e-05``, ``+Inf``)."""
    from prometheus_client.utils import floatToGoString

    render: Callable[[float], str] = floatToGoString
    return render(value)


def _cumulative_buckets(hist: _HistogramLike) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    running = 0
    counts = list(hist.counts)
    for bound, n in zip(hist.buckets, counts):
        running += n
        out.append((_go_float(bound / 1e6), float(running)))
    running += sum(counts[len(hist.buckets) :])
    out.append(("+Inf", float(running)))
    return out


class AgentPoolCollector:
    """prometheus_client custom collector for one pool.

    Register it yourself: ``registry.register(AgentPoolCollector(pool))``. Each scrape reads
    ``pool.protocol_metrics.snapshot()`` (the ``<prefix>_*`` series of POOL.md §10, same
    names and help texts; histograms in seconds with cumulative buckets),
    ``pool.agent_stats_sync()`` (``<prefix>_agent_*`` gauges labelled ``agent_id``) and
    the agent-reported series of ``pool.metrics_collector`` under their own names.

    Agent-reported counters whose name ends in ``_total`` are exposed as counters; others
    as untyped, so names stay identical to ``export_prometheus()``. Agent families whose
    name clashes with an earlier family, or that prometheus_client rejects, are skipped;
    with ``include_agent_id_label=False`` duplicate label sets keep the newest series.
    Under prometheus_client's multiprocess mode custom collectors are not aggregated;
    each worker's pool is only visible on its own process's scrape.
    """

    def __init__(self, pool: PoolLike, prefix: str = "agent_protocol") -> None:
        self.pool = pool
        self.prefix = prefix

    def describe(self) -> list[Any]:
        """Empty families for the fixed series; never touches pool state."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        p = self.prefix
        fams: list[Any] = [CounterMetricFamily(f"{p}_{n}", h) for n, h in _PROTOCOL_COUNTERS]
        fams += [GaugeMetricFamily(f"{p}_{n}", h) for n, h in _PROTOCOL_GAUGES]
        fams += [HistogramMetricFamily(f"{p}_{n}", h) for _, n, h in _PROTOCOL_HISTOGRAMS]
        fams += [GaugeMetricFamily(f"{p}_{n}", h, labels=["agent_id"]) for _, n, h in _AGENT_GAUGES]
        return fams

    def collect(self) -> Iterator[Any]:
        """Build every family fresh from the pool's current state."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        p = self.prefix
        snap = self.pool.protocol_metrics.snapshot()
        taken: set[str] = set()
        for n, h in _PROTOCOL_COUNTERS:
            taken |= _exposed_names("counter", f"{p}_{n}")
            yield CounterMetricFamily(f"{p}_{n}", h, value=float(getattr(snap, n)))
        for n, h in _PROTOCOL_GAUGES:
            taken |= _exposed_names("gauge", f"{p}_{n}")
            yield GaugeMetricFamily(f"{p}_{n}", h, value=float(getattr(snap, n)))
        for attr, n, h in _PROTOCOL_HISTOGRAMS:
            hist = getattr(snap, attr)
            taken |= _exposed_names("histogram", f"{p}_{n}")
            yield HistogramMetricFamily(
                f"{p}_{n}", h, buckets=_cumulative_buckets(hist), sum_value=hist.sum / 1e6
            )

        stats = list(self.pool.agent_stats_sync())
        for attr, n, h in _AGENT_GAUGES:
            fam = GaugeMetricFamily(f"{p}_{n}", h, labels=["agent_id"])
            for st in stats:
                fam.add_metric([st.agent_id], float(getattr(st, attr)))
            taken |= _exposed_names("gauge", fam.name)
            yield fam

        yield from self._agent_families(self.pool.metrics_collector.snapshot(), taken)

    def _agent_families(self, snap: MetricsSnapshot, taken: set[str]) -> Iterator[Any]:
        from prometheus_client.core import Metric

        kinds: tuple[tuple[str, Sequence[Any]], ...] = (
            ("counter", _exportable(snap.counters, False, None)),
            ("gauge", _exportable(snap.gauges, False, None)),
            ("histogram", _exportable(snap.histograms, True, None)),
        )
        for kind, series_list in kinds:
            for name, series in _group_by_name(series_list):
                typ = kind
                if kind == "counter" and not name.endswith("_total"):
                    typ = "unknown"
                exposed = _exposed_names(typ, name)
                if exposed & taken:
                    log.debug("skipping agent metric %r: name already exported", name)
                    continue
                help_text = next((s.help for s in series if s.help is not None), "")
                try:
                    fam = Metric(name, help_text, typ)
                    if typ == "counter":
                        fam.name = name[: -len("_total")]
                    for s in _newest_per_labels(series):
                        _add_agent_samples(fam, name, kind, s)
                except ValueError as exc:
                    log.debug("skipping agent metric %r: %s", name, exc)
                    continue
                taken |= exposed
                yield fam


def _exposed_names(typ: str, name: str) -> set[str]:
    """Family and sample names a family of this type occupies in the exposition."""
    if typ == "counter":
        return {name, name.removesuffix("_total")}
    if typ == "histogram":
        return {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return {name}


def _newest_per_labels(series: list[Any]) -> list[Any]:
    chosen: dict[Labels, Any] = {}
    for s in series:
        cur = chosen.get(s.labels)
        if cur is None or s.last_updated >= cur.last_updated:
            chosen[s.labels] = s
    return list(chosen.values())


def _add_agent_samples(fam: Any, name: str, kind: str, s: Any) -> None:
    labels = dict(s.labels)
    if kind == "counter":
        fam.add_sample(name, labels, float(s.value))
    elif kind == "gauge":
        fam.add_sample(name, labels, s.value)
    else:
        for le, count in s.buckets:
            fam.add_sample(f"{name}_bucket", {**labels, "le": _go_float(le)}, float(count))
        fam.add_sample(f"{name}_sum", labels, s.sum)
        fam.add_sample(f"{name}_count", labels, float(s.count))
