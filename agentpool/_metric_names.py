"""The proxy's protocol metrics, one table for both Prometheus exporters (docs/observability.md).

``ProtocolMetrics.to_prometheus()`` (the text renderer of ``_metrics_snapshot``, used by
``AgentPool.export_prometheus()``) and :class:`agentpool.metrics.AgentPoolCollector` (the
prometheus_client collector) expose the same series under ``<prefix>_<name>``, with the
names, kinds and help texts below, in this order.
"""

from __future__ import annotations

__all__ = ["PROTOCOL_HISTOGRAMS", "PROTOCOL_SCALARS"]

#: (snapshot field and metric suffix, kind, help text)
PROTOCOL_SCALARS: tuple[tuple[str, str, str], ...] = (
    ("requests_total", "counter", "Total requests sent to agents"),
    ("responses_total", "counter", "Total responses received from agents"),
    ("timeouts_total", "counter", "Total request timeouts"),
    ("connection_errors_total", "counter", "Total connection errors"),
    ("flow_control_pauses_total", "counter", "Flow control pause events"),
    ("flow_control_rejections_total", "counter", "Requests rejected due to flow control"),
    ("affinity_evictions_total", "counter", "Correlation affinities reclaimed by TTL sweep"),
    ("affinity_rejections_total", "counter", "Affinities dropped because the map was at capacity"),
    ("in_flight_requests", "gauge", "Current in-flight requests"),
    ("correlation_affinities", "gauge", "Current correlation affinity entries"),
    ("buffer_utilization_percent", "gauge", "Buffer utilization percentage"),
    ("healthy_connections", "gauge", "Number of healthy agent connections"),
    ("paused_connections", "gauge", "Number of flow-control paused connections"),
)

#: (snapshot field, metric suffix, help text); values in µs, exported in seconds.
PROTOCOL_HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("serialization_time", "serialization_seconds", "Serialization time in seconds"),
    ("request_duration", "request_duration_seconds", "Request duration in seconds"),
)
