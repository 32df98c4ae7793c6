"""Pool metrics for proxies with many worker processes (prometheus_client multiprocess mode).

prometheus_client's multiprocess mode aggregates only its own metric objects, so the custom
:class:`~agentpool.metrics.AgentPoolCollector` is invisible there. :class:`MultiprocessExporter`
copies a pool's counters, gauges and histograms into prometheus_client-native metrics by
delta, from a periodic task (never on the request path); with ``PROMETHEUS_MULTIPROC_DIR``
set, one scrape through ``prometheus_client.multiprocess.MultiProcessCollector`` then shows
the sum over all workers. See docs/deployment.md.

Histograms: the native histogram gets the pool's own bucket bounds (µs converted to seconds)
and each tick adds the per-slot count deltas and the sum delta to it directly, one increment
per changed slot, so the copy is exact and costs nothing per request. (The public
``Histogram.observe`` would need one call per observation.) This uses the per-bucket values
of prometheus_client's ``Histogram`` (``_buckets``, ``_sum``), checked when the exporter is
built; a prometheus_client without them raises :class:`RuntimeError` there, not later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any, Literal

from . import tls as _tls
from .metrics import PoolLike

__all__ = ["MultiprocessExporter"]

log = logging.getLogger("agentpool.multiproc")

_Mode = Literal["livesum", "livemax", "livemin"]

# (snapshot field, help); exported as <prefix>_<field without _total>, rendered with _total
_COUNTERS: tuple[tuple[str, str], ...] = (
    ("requests_total", "Total requests sent to agents"),
    ("responses_total", "Total responses received from agents"),
    ("timeouts_total", "Total request timeouts"),
    ("connection_errors_total", "Total connection errors"),
    ("serialization_errors_total", "Total serialization errors"),
    ("flow_control_pauses_total", "Total flow control pause signals received"),
    ("flow_control_resumes_total", "Total flow control resume signals received"),
    ("flow_control_rejections_total", "Requests rejected due to flow control"),
    ("affinity_evictions_total", "Correlation affinities evicted because the map was full"),
    ("affinity_rejections_total", "Affinities dropped because the map was at capacity"),
)
# (snapshot field, help); summed over live workers
_GAUGES: tuple[tuple[str, str, _Mode], ...] = (
    ("in_flight_requests", "Current in-flight requests", "livesum"),
    ("correlation_affinities", "Current correlation affinity entries", "livesum"),
    ("buffer_utilization_percent", "Buffer utilization percentage (highest worker)", "livemax"),
    ("healthy_connections", "Number of healthy agent connections", "livesum"),
    ("paused_connections", "Number of flow-control paused connections", "livesum"),
)
_HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("serialization_time", "serialization_seconds", "Serialization time in seconds"),
    ("request_duration", "request_duration_seconds", "Request duration in seconds"),
)
# (AgentPoolStats field, suffix, help, mode)
_AGENT_GAUGES: tuple[tuple[str, str, str, _Mode], ...] = (
    ("active_connections", "agent_connections", "Connections in the pool for the agent", "livesum"),
    (
        "healthy_connections",
        "agent_healthy_connections",
        "Healthy connections for the agent",
        "livesum",
    ),
    ("total_in_flight", "agent_in_flight_requests", "In-flight requests to the agent", "livesum"),
    ("is_healthy", "agent_healthy", "1 if every live worker sees the agent healthy", "livemin"),
)


class MultiprocessExporter:
    """Copy one pool's metrics into prometheus_client metrics, every ``interval`` seconds.

    Create it in each worker after the pool, then ``start()`` it (or call :meth:`update`
    yourself). Metric names match :class:`~agentpool.metrics.AgentPoolCollector`: counters
    add up over all workers (dead ones included, as counters should), gauges are summed over
    live workers (``livesum``; ``is_healthy`` is the minimum, buffer utilization the
    maximum), histograms add up. Call ``prometheus_client.multiprocess.mark_process_dead(pid)``
    when a worker exits, as prometheus_client's multiprocess mode requires.

    ``registry`` is where the metrics are registered; None (the default) registers them
    nowhere, which is what multiprocess mode wants (the scrape reads the mmap files).
    Agent-reported metrics (MetricsReport) are not copied.
    """

    def __init__(
        self,
        pool: PoolLike,
        *,
        prefix: str = "agent_protocol",
        interval: float = 5.0,
        registry: Any = None,
        agent_stats: bool = True,
        tls_failures: bool = True,
    ) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        if not interval > 0:
            raise ValueError("interval must be positive")
        self.pool = pool
        self.prefix = prefix
        self.interval = float(interval)
        self._task: asyncio.Task[None] | None = None
        self._last: dict[str, float] = {}
        self._last_hist: dict[str, tuple[list[int], int]] = {}
        self._agent_stats = agent_stats
        self._tls = tls_failures
        p = prefix
        self._counters = {
            field: Counter(f"{p}_{field[: -len('_total')]}", help_text, registry=registry)
            for field, help_text in _COUNTERS
        }
        self._gauges = {
            field: Gauge(f"{p}_{field}", help_text, registry=registry, multiprocess_mode=mode)
            for field, help_text, mode in _GAUGES
        }
        snap = pool.protocol_metrics.snapshot()
        self._histograms: dict[str, Any] = {}
        for field, suffix, help_text in _HISTOGRAMS:
            bounds = getattr(snap, field).buckets
            hist = Histogram(
                f"{p}_{suffix}",
                help_text,
                registry=registry,
                buckets=[b / 1e6 for b in bounds] + [float("inf")],
            )
            _check_histogram(hist, len(bounds) + 1)
            self._histograms[field] = hist
        self._agent_gauges = (
            {
                attr: Gauge(
                    f"{p}_{suffix}",
                    help_text,
                    ["agent_id"],
                    registry=registry,
                    multiprocess_mode=mode,
                )
                for attr, suffix, help_text, mode in _AGENT_GAUGES
            }
            if agent_stats
            else {}
        )
        self._seen_agents: set[str] = set()
        self._tls_counter = (
            Counter(
                f"{p}_tls_handshake_failures",
                "TLS handshakes that failed, by reason",
                ["reason"],
                registry=registry,
            )
            if tls_failures
            else None
        )

    def _delta(self, key: str, value: float) -> float:
        last = self._last.get(key, 0.0)
        self._last[key] = value
        # a counter that went down was reset (a new pool): count it from zero
        return value - last if value >= last else value

    def update(self) -> None:
        """Copy what changed since the last call (cheap: a snapshot and a few increments)."""
        snap = self.pool.protocol_metrics.snapshot()
        for field, counter in self._counters.items():
            d = self._delta(field, float(getattr(snap, field)))
            if d:
                counter.inc(d)
        for field, gauge in self._gauges.items():
            gauge.set(float(getattr(snap, field)))
        for field, hist in self._histograms.items():
            self._copy_histogram(field, hist, getattr(snap, field))
        if self._agent_stats:
            self._copy_agents(self.pool.agent_stats_sync())
        if self._tls_counter is not None:
            for reason, count in _tls.handshake_failures().items():
                d = self._delta(f"tls:{reason}", float(count))
                if d:
                    self._tls_counter.labels(reason).inc(d)

    def _copy_histogram(self, field: str, hist: Any, h: Any) -> None:
        counts = list(h.counts)
        last_counts, last_sum = self._last_hist.get(field, ([0] * len(counts), 0))
        if any(c < lc for c, lc in zip(counts, last_counts)) or h.sum < last_sum:
            last_counts, last_sum = [0] * len(counts), 0
        self._last_hist[field] = (counts, int(h.sum))
        buckets = hist._buckets
        for i, (c, lc) in enumerate(zip(counts, last_counts)):
            if c != lc:
                buckets[i].inc(float(c - lc))
        if h.sum != last_sum:
            hist._sum.inc((h.sum - last_sum) / 1e6)

    def _copy_agents(self, stats: Sequence[Any]) -> None:
        current = {st.agent_id for st in stats}
        for st in stats:
            for attr, gauge in self._agent_gauges.items():
                gauge.labels(st.agent_id).set(float(getattr(st, attr)))
        # a removed agent reads 0 (multiprocess files cannot forget a label set)
        for gone in self._seen_agents - current:
            for gauge in self._agent_gauges.values():
                gauge.labels(gone).set(0.0)
        self._seen_agents = current

    def start(self) -> asyncio.Task[None]:
        """Run :meth:`update` every ``interval`` seconds on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self._task

    async def _run(self) -> None:
        while True:
            try:
                self.update()
            except Exception:
                log.exception("multiprocess metrics update failed")
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        """Stop the periodic task and copy once more, so a worker's last counts are kept."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.update()

    async def __aenter__(self) -> MultiprocessExporter:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _check_histogram(hist: Any, slots: int) -> None:
    buckets = getattr(hist, "_buckets", None)
    if not isinstance(buckets, list) or len(buckets) != slots or not hasattr(hist, "_sum"):
        raise RuntimeError(
            "this prometheus_client's Histogram has no per-bucket values (_buckets/_sum); "
            "MultiprocessExporter cannot copy histograms into it"
        )
