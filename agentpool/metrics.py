"""Agent-reported metrics and the prometheus-client collector (docs/observability.md).

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

from ._impl import core
from ._metric_names import PROTOCOL_HISTOGRAMS, PROTOCOL_SCALARS

if TYPE_CHECKING:
    from .messages import MetricsReport

__all__ = [
    "DROP_REASONS",
    "AgentPoolCollector",
    "CounterSeries",
    "GaugeSeries",
    "HistogramSeries",
    "MetricsCollector",
    "MetricsCollectorConfig",
    "MetricsSnapshot",
    "ProtocolMetrics",
    "escape_label_value",
    "format_le",
    "format_value",
    "rust_f64_display",
]

log = logging.getLogger(__name__)

ProtocolMetrics = core.ProtocolMetrics
"""The proxy-side protocol counters (``pool.protocol_metrics``), from the active core."""

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
    """Collector limits (docs/observability.md, "Limits"); ``max_age`` in seconds.

    ``max_age``, ``max_series`` and ``include_agent_id_label`` are upstream's. The others
    bound what one agent can make the collector keep: ``max_series_per_agent`` new series
    per agent id, ``max_agents`` agent ids, ``max_labels`` labels per series. A metric or
    label name longer than ``max_name_length`` refuses the series; label values and help
    texts are cut to ``max_label_value_length`` / ``max_help_length`` characters; an agent
    id taken from a report (``record()`` without ``agent_id``) longer than
    ``max_agent_id_length`` refuses the report.
    """

    max_age: float = 300.0
    max_series: int = 10_000
    include_agent_id_label: bool = True
    max_series_per_agent: int = 1_000
    max_agents: int = 1_000
    max_labels: int = 32
    max_name_length: int = 256
    max_label_value_length: int = 1_024
    max_help_length: int = 1_024
    max_agent_id_length: int = 256


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


#: Why a series or report was refused (keys of :meth:`MetricsCollector.drops`).
DROP_REASONS = (
    "max_series",
    "max_series_per_agent",
    "too_large",
    "max_agents",
    "agent_id_too_long",
)
_REPORT_REASONS = frozenset({"max_agents", "agent_id_too_long"})


class MetricsCollector:
    """Latest-value store for agent-reported series, bounded by :class:`MetricsCollectorConfig`.

    Values are replaced on every report, never accumulated. A series is keyed by agent id,
    name and labels; the pool records each report under the id the connection was added
    with, never the id inside the report. New series beyond ``max_series`` (all agents) or
    ``max_series_per_agent``, series with an oversized name or too many labels, and reports
    from a new agent id beyond ``max_agents`` are dropped and counted (:meth:`drops`), with
    one warning per reason (the ``max_series`` warning re-arms once expiry made room).
    Existing series keep updating. Thread-safe, so a scrape from another thread is fine.
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
        self._per_agent: dict[str, int] = {}
        self._drops = dict.fromkeys(DROP_REASONS, 0)
        self._warned: set[str] = set()

    def _drop(self, reason: str, agent_id: str, what: str) -> None:
        self._drops[reason] += 1
        if reason in self._warned:
            return
        self._warned.add(reason)
        cfg = self.config
        limit = {
            "max_series": f"max_series={cfg.max_series}",
            "max_series_per_agent": f"max_series_per_agent={cfg.max_series_per_agent}",
            "too_large": (f"max_name_length={cfg.max_name_length}, max_labels={cfg.max_labels}"),
            "max_agents": f"max_agents={cfg.max_agents}",
            "agent_id_too_long": f"max_agent_id_length={cfg.max_agent_id_length}",
        }[reason]
        log.warning(
            "agent metrics limit reached (%s); dropping (first dropped: %s from agent %r)",
            limit,
            what[:200],
            agent_id[:200],
        )

    def _labels(self, agent_id: str, labels: dict[str, str] | None) -> Labels | None:
        cfg = self.config
        merged: dict[str, str] = {}
        if labels:
            if len(labels) > cfg.max_labels:
                return None
            cut = cfg.max_label_value_length
            for k, v in labels.items():
                key = str(k)
                if len(key) > cfg.max_name_length:
                    return None
                value = str(v)
                merged[key] = value if len(value) <= cut else value[:cut]
        if cfg.include_agent_id_label:
            merged["agent_id"] = agent_id
        return tuple(sorted(merged.items()))

    def _key(self, agent_id: str, metric: Any) -> tuple[_SeriesKey, str | None] | None:
        """The series key and help text of one reported metric; None (counted) if refused."""
        name = str(metric.name)
        labels = (
            None
            if len(name) > self.config.max_name_length
            else self._labels(agent_id, metric.labels)
        )
        if labels is None:
            self._drop("too_large", agent_id, f"{len(name)}-character metric {name[:64]!r}")
            return None
        help_text = metric.help
        if help_text is not None:
            help_text = str(help_text)[: self.config.max_help_length]
        return (agent_id, name, labels), help_text

    def _admit(self, store: dict[_SeriesKey, Any], key: _SeriesKey) -> bool:
        if key in store:
            return True
        agent_id = key[0]
        total = len(self._counters) + len(self._gauges) + len(self._histograms)
        if total >= self.config.max_series:
            self._drop("max_series", agent_id, repr(key[1][:64]))
            return False
        if self._per_agent.get(agent_id, 0) >= self.config.max_series_per_agent:
            self._drop("max_series_per_agent", agent_id, repr(key[1][:64]))
            return False
        self._per_agent[agent_id] = self._per_agent.get(agent_id, 0) + 1
        return True

    def _room_for_agent(self) -> bool:
        """Make room for a new agent id: forget the least recently reporting id that has no
        series left (``_last_report`` is kept in reporting order)."""
        if len(self._last_report) < self.config.max_agents:
            return True
        if len(self._per_agent) >= len(self._last_report):
            return False
        idle = next((aid for aid in self._last_report if aid not in self._per_agent), None)
        if idle is None:
            return False
        del self._last_report[idle]
        return len(self._last_report) < self.config.max_agents

    def record(self, report: MetricsReport, agent_id: str | None = None) -> bool:
        """Store every counter, gauge and histogram of one agent report.

        ``agent_id`` is the id the series are kept and labelled under; the pool passes the id
        the reporting connection was added with, so a report cannot speak for another agent.
        Without it the report's own ``agent_id`` is used (bounded by ``max_agent_id_length``).
        Returns False if the whole report was refused (see :meth:`drops`).
        """
        if agent_id is None:
            agent_id = str(report.agent_id)
            if len(agent_id) > self.config.max_agent_id_length:
                with self._lock:
                    self._drop("agent_id_too_long", agent_id, f"a {len(agent_id)}-character id")
                return False
        with self._lock:
            now = self._clock()
            if self._last_report.pop(agent_id, None) is None and not self._room_for_agent():
                self._drop("max_agents", agent_id, "a report")
                return False
            self._last_report[agent_id] = now
            for c in report.counters:
                k = self._key(agent_id, c)
                if k is not None and self._admit(self._counters, k[0]):
                    key, help_text = k
                    self._counters[key] = CounterSeries(
                        agent_id, key[1], help_text, key[2], int(c.value), now
                    )
            for g in report.gauges:
                k = self._key(agent_id, g)
                if k is not None and self._admit(self._gauges, k[0]):
                    key, help_text = k
                    self._gauges[key] = GaugeSeries(
                        agent_id, key[1], help_text, key[2], float(g.value), now
                    )
            for h in report.histograms:
                k = self._key(agent_id, h)
                if k is not None and self._admit(self._histograms, k[0]):
                    key, help_text = k
                    buckets = tuple((float(b.le), int(b.count)) for b in h.buckets)
                    self._histograms[key] = HistogramSeries(
                        agent_id,
                        key[1],
                        help_text,
                        key[2],
                        float(h.sum),
                        int(h.count),
                        buckets,
                        now,
                    )
            return True

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
                    left = self._per_agent[k[0]] - 1
                    if left:
                        self._per_agent[k[0]] = left
                    else:
                        del self._per_agent[k[0]]
                removed += len(stale)
            total = len(self._counters) + len(self._gauges) + len(self._histograms)
            if total < self.config.max_series:
                self._warned.discard("max_series")
            return removed

    def series_count(self) -> int:
        """Total series of all three kinds."""
        return len(self._counters) + len(self._gauges) + len(self._histograms)

    def dropped_series(self) -> int:
        """Series refused: over ``max_series`` or ``max_series_per_agent``, or too large."""
        return sum(n for r, n in self._drops.items() if r not in _REPORT_REASONS)

    def dropped_reports(self) -> int:
        """Whole reports refused: a new agent id over ``max_agents``, or an id too long."""
        return sum(n for r, n in self._drops.items() if r in _REPORT_REASONS)

    def drops(self) -> dict[str, int]:
        """Refusals by reason (every key of :data:`DROP_REASONS`, zero included)."""
        with self._lock:
            return dict(self._drops)

    def agent_series_count(self, agent_id: str) -> int:
        """Series currently kept for ``agent_id``."""
        return self._per_agent.get(agent_id, 0)

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
        """All series in upstream's Prometheus text format (docs/observability.md).

        Series that cannot be exposed (a metric or label name Prometheus rejects, a reserved
        ``__`` label, a histogram carrying its own ``le``, or a name under ``reserved_prefix``)
        are left out, and so is a family whose names clash with one written before it (the
        same name reported as counter and gauge, a gauge ``x_count`` beside a histogram
        ``x``): counters come first, then gauges, then histograms, each sorted by name, and
        the first family to claim a name keeps it. One misbehaving agent therefore cannot
        make the text unparsable.
        """
        out: list[str] = []
        for kind, name, series in _families(self.snapshot(), reserved_prefix):
            _header(out, name, series[0].help, kind)
            if kind == "counter":
                for c in series:
                    out.append(f"{name}{_render_labels(c.labels)} {format_value(float(c.value))}\n")
            elif kind == "gauge":
                for g in series:
                    out.append(f"{name}{_render_labels(g.labels)} {format_value(g.value)}\n")
            else:
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
        return f"MetricsCollector(series={self.series_count()}, dropped={self.dropped_series()})"


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


def _families(
    snap: MetricsSnapshot, reserved_prefix: str | None, taken: set[str] | None = None
) -> list[tuple[str, str, list[Any]]]:
    """``(kind, name, series)`` per exposable family, clashing names dropped (first wins).

    ``taken`` holds names already exposed before these families; it is updated in place.
    """
    taken = set() if taken is None else taken
    kinds: tuple[tuple[str, Sequence[Any]], ...] = (
        ("counter", _exportable(snap.counters, False, reserved_prefix)),
        ("gauge", _exportable(snap.gauges, False, reserved_prefix)),
        ("histogram", _exportable(snap.histograms, True, reserved_prefix)),
    )
    out: list[tuple[str, str, list[Any]]] = []
    for kind, series_list in kinds:
        for name, series in _group_by_name(series_list):
            claimed = _claimed_names(kind, name)
            if claimed & taken:
                log.debug("not exporting agent %s %r: its name is already exported", kind, name)
                continue
            taken |= claimed
            out.append((kind, name, series))
    return out


def _claimed_names(kind: str, name: str) -> set[str]:
    """Every family or sample name a family of this kind may occupy in any exposition format
    (a parser folds ``x_total`` into the family ``x``, and may read ``_created`` samples)."""
    if kind == "counter":
        base = name.removesuffix("_total")
        return {name, base, f"{base}_total", f"{base}_created"}
    if kind == "histogram":
        return {name, f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
    return {name}


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

# The protocol series and their help texts are the core text renderer's (one table).
_PROTOCOL_COUNTERS = tuple((n, h) for n, kind, h in PROTOCOL_SCALARS if kind == "counter")
_PROTOCOL_GAUGES = tuple((n, h) for n, kind, h in PROTOCOL_SCALARS if kind == "gauge")
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
    ``pool.protocol_metrics.snapshot()`` (the ``<prefix>_*`` series of docs/observability.md, same
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
        fams += [HistogramMetricFamily(f"{p}_{n}", h) for _, n, h in PROTOCOL_HISTOGRAMS]
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
            taken |= _claimed_names("counter", f"{p}_{n}")
            yield CounterMetricFamily(f"{p}_{n}", h, value=float(getattr(snap, n)))
        for n, h in _PROTOCOL_GAUGES:
            taken |= _claimed_names("gauge", f"{p}_{n}")
            yield GaugeMetricFamily(f"{p}_{n}", h, value=float(getattr(snap, n)))
        for attr, n, h in PROTOCOL_HISTOGRAMS:
            hist = getattr(snap, attr)
            taken |= _claimed_names("histogram", f"{p}_{n}")
            yield HistogramMetricFamily(
                f"{p}_{n}", h, buckets=_cumulative_buckets(hist), sum_value=hist.sum / 1e6
            )

        stats = list(self.pool.agent_stats_sync())
        for attr, n, h in _AGENT_GAUGES:
            fam = GaugeMetricFamily(f"{p}_{n}", h, labels=["agent_id"])
            for st in stats:
                fam.add_metric([st.agent_id], float(getattr(st, attr)))
            taken |= _claimed_names("gauge", fam.name)
            yield fam

        yield from self._agent_families(self.pool.metrics_collector.snapshot(), taken)

    def _agent_families(self, snap: MetricsSnapshot, taken: set[str]) -> Iterator[Any]:
        from prometheus_client.core import Metric

        for kind, name, series in _families(snap, None, taken):
            typ = kind
            if kind == "counter" and not name.endswith("_total"):
                typ = "unknown"
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
            yield fam


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
