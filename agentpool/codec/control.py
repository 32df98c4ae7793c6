"""Control messages (0x30-0x33): health, metrics, config update, flow control."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, Final

from ..enums import FlowAction, HealthState
from ..errors import InvalidMessage, Serialization
from ..messages import (
    ConfigError,
    ConfigUpdateRequest,
    ConfigUpdateResponse,
    ConfigUpdateType,
    CounterMetric,
    FlowControlSignal,
    GaugeMetric,
    HealthStatus,
    HistogramBucket,
    HistogramMetric,
    ListUpdate,
    LoadMetrics,
    MetricsReport,
    RequestReload,
    ResourceMetrics,
    RestartRequired,
    RuleDefinition,
    RuleUpdate,
)
from .schema import (
    _DEF,
    _MISSING,
    _OPT,
    _REQ,
    _SKP,
    Conv,
    _any,
    _bad_type,
    _bool,
    _f32,
    _f64,
    _i32,
    _list,
    _list_str,
    _map_str,
    _missing,
    _opt,
    _str,
    _Struct,
    _u32,
    _u64,
    _unknown_variant,
)

# --------------------------------------------------------------------------------------------
# Control messages (0x30-0x33)

_HEALTH_NAMES: Final = {
    "healthy": HealthState.HEALTHY,
    "degraded": HealthState.DEGRADED,
    "draining": HealthState.DRAINING,
    "unhealthy": HealthState.UNHEALTHY,
}

_LOAD = _Struct(
    "LoadMetrics",
    "load",
    [
        ("in_flight", _u32, _REQ),
        ("queue_depth", _u32, _REQ),
        ("avg_latency_ms", _f32, _REQ),
        ("p50_latency_ms", _f32, _REQ),
        ("p95_latency_ms", _f32, _REQ),
        ("p99_latency_ms", _f32, _REQ),
        ("requests_processed", _u64, _REQ),
        ("requests_rejected", _u64, _REQ),
        ("requests_timed_out", _u64, _REQ),
    ],
    LoadMetrics,
)
_RESOURCES = _Struct(
    "ResourceMetrics",
    "resources",
    [
        ("cpu_percent", _opt(_f32), _OPT),
        ("memory_bytes", _opt(_u64), _OPT),
        ("memory_limit", _opt(_u64), _OPT),
        ("active_threads", _opt(_u32), _OPT),
        ("open_fds", _opt(_u32), _OPT),
        ("fd_limit", _opt(_u32), _OPT),
        ("connections", _opt(_u32), _OPT),
    ],
    ResourceMetrics,
)

_STATE_FIELDS: Final = {
    "healthy": (),
    "degraded": (("disabled_features", _list_str, list), ("timeout_multiplier", _f32, None)),
    "draining": (("eta_ms", _opt(_u64), None),),
    "unhealthy": (("reason", _str, None), ("recoverable", _bool, None)),
}


def _tagged(v: Any, tag_key: str, path: str, what: str) -> tuple[str, Any]:
    """Split an internally tagged enum (map with ``tag_key`` or ``[tag, fields...]``)."""
    if v.__class__ is dict:
        tag = v.get(tag_key, _MISSING)
        if tag is _MISSING:
            _missing(f"{path}.{tag_key}")
        return _str(tag, f"{path}.{tag_key}"), v
    if v.__class__ is list and v:
        return _str(v[0], f"{path}.{tag_key}"), v[1:]
    _bad_type(v, f"internally tagged enum {what}", path)


def _health_state(v: Any, path: str) -> tuple[HealthState, dict[str, Any]]:
    if isinstance(v, int) and v.__class__ is not bool:
        try:
            return HealthState(v), {}
        except ValueError:
            raise InvalidMessage(
                f"invalid value: integer `{v}`, expected a health state 0-4 at `{path}`",
                field=path,
            ) from None
    tag, body = _tagged(v, "status", path, "HealthState")
    state = _HEALTH_NAMES.get(tag)
    if state is None:
        _unknown_variant(tag, "one of `healthy`, `degraded`, `draining`, `unhealthy`", path)
    specs = _STATE_FIELDS[tag]
    extra: dict[str, Any] = {}
    for i, (key, conv, _dflt) in enumerate(specs):
        fpath = f"{path}.{key}"
        if body.__class__ is dict:
            x = body.get(key, _MISSING)
        else:
            x = body[i] if i < len(body) else _MISSING
        if x is _MISSING:
            if key == "eta_ms":
                x = None
            else:
                _missing(fpath)
        extra[key] = conv(x, fpath)
    return state, extra


_HEALTH_EXTRA = _Struct(
    "HealthStatus",
    "",
    [
        ("disabled_features", _list_str, _DEF, list),
        ("timeout_multiplier", _opt(_f32), _OPT),
        ("drain_eta_ms", _opt(_u64), _OPT),
        ("unhealthy_reason", _opt(_str), _OPT),
        ("recoverable", _opt(_bool), _OPT),
    ],
    lambda *a: a,
)


def _decode_health(obj: Any) -> HealthStatus:
    if obj.__class__ is list:
        values = _HEALTH_POSITIONAL.values(obj)
        agent_id, state_v, message, load, resources, valid_until, ts = values
        extra: dict[str, Any] = {}
        state, extra = _health_state(state_v, "state")
        hs = HealthStatus(agent_id, state, message, ts, load, resources, valid_until)
    elif obj.__class__ is dict:
        get = obj.get
        state_v = get("state", _MISSING)
        if state_v is _MISSING or state_v is None:
            state, extra = HealthState.UNSPECIFIED, {}
        else:
            state, extra = _health_state(state_v, "state")
        agent_id = _str(get("agent_id", ""), "agent_id")
        message = _opt(_str)(get("message"), "message")
        ts = _u64(get("timestamp_ms", 0), "timestamp_ms")
        load = _opt(_LOAD.conv)(get("load"), "load")
        resources = _opt(_RESOURCES.conv)(get("resources"), "resources")
        valid_until = _opt(_u64)(get("valid_until_ms"), "valid_until_ms")
        hs = HealthStatus(agent_id, state, message, ts, load, resources, valid_until)
        feats, mult, eta, reason, recov = _HEALTH_EXTRA.values(obj)
        hs.disabled_features = feats
        hs.timeout_multiplier = mult
        hs.drain_eta_ms = eta
        hs.unhealthy_reason = reason
        hs.recoverable = recov
    else:
        _bad_type(obj, "struct HealthStatus", "$")
    if extra:
        if "disabled_features" in extra:
            hs.disabled_features = extra["disabled_features"]
            hs.timeout_multiplier = extra["timeout_multiplier"]
        if "eta_ms" in extra:
            hs.drain_eta_ms = extra["eta_ms"]
        if "reason" in extra:
            hs.unhealthy_reason = extra["reason"]
            hs.recoverable = extra["recoverable"]
    return hs


_HEALTH_POSITIONAL = _Struct(
    "HealthStatus",
    "",
    [
        ("agent_id", _str, _REQ),
        ("state", _any, _REQ),
        ("message", _opt(_str), _OPT),
        ("load", _opt(_LOAD.conv), _OPT),
        ("resources", _opt(_RESOURCES.conv), _OPT),
        ("valid_until_ms", _opt(_u64), _OPT),
        ("timestamp_ms", _u64, _REQ),
    ],
    lambda *a: a,
)


def _health_obj(h: HealthStatus) -> dict[str, Any]:
    d: dict[str, Any] = {
        "agent_id": h.agent_id,
        "state": int(h.state),
        "timestamp_ms": h.timestamp_ms,
    }
    if h.message is not None:
        d["message"] = h.message
    if h.load is not None:
        lo = h.load
        d["load"] = {
            "in_flight": lo.in_flight,
            "queue_depth": lo.queue_depth,
            "avg_latency_ms": lo.avg_latency_ms,
            "p50_latency_ms": lo.p50_latency_ms,
            "p95_latency_ms": lo.p95_latency_ms,
            "p99_latency_ms": lo.p99_latency_ms,
            "requests_processed": lo.requests_processed,
            "requests_rejected": lo.requests_rejected,
            "requests_timed_out": lo.requests_timed_out,
        }
    if h.resources is not None:
        r = h.resources
        d["resources"] = {
            "cpu_percent": r.cpu_percent,
            "memory_bytes": r.memory_bytes,
            "memory_limit": r.memory_limit,
            "active_threads": r.active_threads,
            "open_fds": r.open_fds,
            "fd_limit": r.fd_limit,
            "connections": r.connections,
        }
    if h.valid_until_ms is not None:
        d["valid_until_ms"] = h.valid_until_ms
    if h.disabled_features:
        d["disabled_features"] = h.disabled_features
    if h.timeout_multiplier is not None:
        d["timeout_multiplier"] = h.timeout_multiplier
    if h.drain_eta_ms is not None:
        d["drain_eta_ms"] = h.drain_eta_ms
    if h.unhealthy_reason is not None:
        d["unhealthy_reason"] = h.unhealthy_reason
    if h.recoverable is not None:
        d["recoverable"] = h.recoverable
    return d


def _le(v: Any, path: str) -> float:
    if isinstance(v, str):
        if v in ("+Inf", "Inf", "inf", "+inf"):
            return math.inf
        try:
            return float(v)
        except ValueError:
            raise InvalidMessage(
                f'invalid value: string {json.dumps(v)}, expected a number or "+Inf" at `{path}`',
                field=path,
            ) from None
    return _f64(v, path)


_BUCKET = _Struct(
    "HistogramBucket",
    "histograms.buckets",
    [("le", _le, _REQ), ("count", _u64, _REQ)],
    HistogramBucket,
)


def _metric_struct(name: str, path: str, value_conv: Conv, build: Callable[..., Any]) -> _Struct:
    return _Struct(
        name,
        path,
        [
            ("name", _str, _REQ),
            ("help", _opt(_str), _SKP),
            ("labels", _map_str, _DEF, dict),
            ("value", value_conv, _REQ),
        ],
        build,
    )


_COUNTER = _metric_struct(
    "CounterMetric", "counters", _u64, lambda n, h, lb, v: CounterMetric(n, v, h, lb)
)
_GAUGE = _metric_struct("GaugeMetric", "gauges", _f64, lambda n, h, lb, v: GaugeMetric(n, v, h, lb))
_HISTOGRAM = _Struct(
    "HistogramMetric",
    "histograms",
    [
        ("name", _str, _REQ),
        ("help", _opt(_str), _SKP),
        ("labels", _map_str, _DEF, dict),
        ("sum", _f64, _REQ),
        ("count", _u64, _REQ),
        ("buckets", _list(_BUCKET.conv), _REQ),
    ],
    lambda n, h, lb, s, c, b: HistogramMetric(n, s, c, b, h, lb),
)
_METRICS = _Struct(
    "MetricsReport",
    "",
    [
        ("agent_id", _str, _REQ),
        ("timestamp_ms", _u64, _REQ),
        ("interval_ms", _u64, _REQ),
        ("counters", _list(_COUNTER.conv), _DEF, list),
        ("gauges", _list(_GAUGE.conv), _DEF, list),
        ("histograms", _list(_HISTOGRAM.conv), _DEF, list),
    ],
    MetricsReport,
)


def _metric_head(m: CounterMetric | GaugeMetric | HistogramMetric) -> dict[str, Any]:
    d: dict[str, Any] = {"name": m.name}
    if m.help is not None:
        d["help"] = m.help
    d["labels"] = m.labels
    return d


def _metrics_obj(r: MetricsReport) -> dict[str, Any]:
    counters = []
    for c in r.counters:
        d = _metric_head(c)
        d["value"] = c.value
        counters.append(d)
    gauges = []
    for g in r.gauges:
        d = _metric_head(g)
        d["value"] = float(g.value)
        gauges.append(d)
    hists = []
    for h in r.histograms:
        d = _metric_head(h)
        d["sum"] = float(h.sum)
        d["count"] = h.count
        d["buckets"] = [
            {"le": "+Inf" if b.le == math.inf else float(b.le), "count": b.count} for b in h.buckets
        ]
        hists.append(d)
    return {
        "agent_id": r.agent_id,
        "timestamp_ms": r.timestamp_ms,
        "interval_ms": r.interval_ms,
        "counters": counters,
        "gauges": gauges,
        "histograms": hists,
    }


_RULE = _Struct(
    "RuleDefinition",
    "update_type.rules",
    [
        ("id", _str, _REQ),
        ("priority", _i32, _REQ),
        ("definition", _any, _REQ),
        ("enabled", _bool, _REQ),
        ("description", _opt(_str), _OPT),
        ("tags", _list_str, _DEF, list),
    ],
    RuleDefinition,
)

_UPDATE_TYPES: Final[dict[str, _Struct]] = {
    "request_reload": _Struct("RequestReload", "update_type", [], RequestReload),
    "rule_update": _Struct(
        "RuleUpdate",
        "update_type",
        [
            ("rule_set", _str, _REQ),
            ("rules", _list(_RULE.conv), _REQ),
            ("remove_rules", _list_str, _REQ),
        ],
        RuleUpdate,
    ),
    "list_update": _Struct(
        "ListUpdate",
        "update_type",
        [("list_id", _str, _REQ), ("add", _list_str, _REQ), ("remove", _list_str, _REQ)],
        ListUpdate,
    ),
    "restart_required": _Struct(
        "RestartRequired",
        "update_type",
        [("reason", _str, _REQ), ("grace_period_ms", _u64, _REQ)],
        RestartRequired,
    ),
    "config_error": _Struct(
        "ConfigError",
        "update_type",
        [("error", _str, _REQ), ("field", _opt(_str), _OPT)],
        ConfigError,
    ),
}


def _update_type(v: Any, path: str) -> ConfigUpdateType:
    tag, body = _tagged(v, "type", path, "ConfigUpdateType")
    spec = _UPDATE_TYPES.get(tag)
    if spec is None:
        _unknown_variant(
            tag,
            "one of `request_reload`, `rule_update`, `list_update`, `restart_required`, "
            "`config_error`",
            path,
        )
    return spec.decode(body)  # type: ignore[no-any-return]


_CONFIG_UPDATE = _Struct(
    "ConfigUpdateRequest",
    "",
    [("update_type", _update_type, _REQ), ("request_id", _str, _REQ), ("timestamp_ms", _u64, _REQ)],
    ConfigUpdateRequest,
)
_CONFIG_UPDATE_RESPONSE = _Struct(
    "ConfigUpdateResponse",
    "",
    [
        ("request_id", _str, _REQ),
        ("accepted", _bool, _REQ),
        ("error", _opt(_str), _OPT),
        ("timestamp_ms", _u64, _DEF, int),
    ],
    ConfigUpdateResponse,
)


def _update_type_obj(u: ConfigUpdateType) -> dict[str, Any]:
    if isinstance(u, RequestReload):
        return {"type": "request_reload"}
    if isinstance(u, RuleUpdate):
        return {
            "type": "rule_update",
            "rule_set": u.rule_set,
            "rules": [
                {
                    "id": r.id,
                    "priority": r.priority,
                    "definition": r.definition,
                    "enabled": r.enabled,
                    "description": r.description,
                    "tags": r.tags,
                }
                for r in u.rules
            ],
            "remove_rules": u.remove_rules,
        }
    if isinstance(u, ListUpdate):
        return {"type": "list_update", "list_id": u.list_id, "add": u.add, "remove": u.remove}
    if isinstance(u, RestartRequired):
        return {
            "type": "restart_required",
            "reason": u.reason,
            "grace_period_ms": u.grace_period_ms,
        }
    if isinstance(u, ConfigError):
        return {"type": "config_error", "error": u.error, "field": u.field}
    raise Serialization(f"unknown config update type {type(u).__name__}")


_FLOW_NAMES: Final = {
    "pause": FlowAction.PAUSE,
    "resume": FlowAction.RESUME,
    "update_capacity": FlowAction.UPDATE_CAPACITY,
}


def _flow_action(v: Any, path: str) -> tuple[FlowAction, int | None]:
    if v is None:
        return FlowAction.RESUME, None
    if isinstance(v, int) and v.__class__ is not bool:
        if v == 1:
            return FlowAction.PAUSE, None
        if v == 3:
            return FlowAction.UPDATE_CAPACITY, None
        return FlowAction.RESUME, None
    tag, body = _tagged(v, "type", path, "FlowAction")
    action = _FLOW_NAMES.get(tag)
    if action is None:
        _unknown_variant(tag, "one of `pause`, `resume`, `update_capacity`", path)
    avail = None
    if action is FlowAction.UPDATE_CAPACITY:
        x = (
            body.get("buffer_available", _MISSING)
            if body.__class__ is dict
            else (body[0] if body else _MISSING)
        )
        if x is _MISSING:
            _missing(f"{path}.buffer_available")
        avail = _u64(x, f"{path}.buffer_available")
    return action, avail


def _decode_flow(obj: Any) -> FlowControlSignal:
    if obj.__class__ is list:
        if len(obj) != 3:
            raise InvalidMessage(
                f"invalid length {len(obj)}, expected struct FlowControlSignal with 3 elements"
            )
        cid = _opt(_str)(obj[0], "correlation_id")
        action, avail = _flow_action(obj[1], "action")
        return FlowControlSignal(action, cid, _u64(obj[2], "timestamp_ms"), avail)
    if obj.__class__ is not dict:
        _bad_type(obj, "struct FlowControlSignal", "$")
    get = obj.get
    action, avail = _flow_action(get("action"), "action")
    cid = _opt(_str)(get("correlation_id"), "correlation_id")
    ts = _u64(get("timestamp_ms", 0), "timestamp_ms")
    top_avail = get("buffer_available")
    if avail is None and top_avail is not None:
        avail = _u64(top_avail, "buffer_available")
    return FlowControlSignal(action, cid, ts, avail)


def _flow_obj(f: FlowControlSignal) -> dict[str, Any]:
    d: dict[str, Any] = {"action": int(f.action)}
    if f.buffer_available is not None:
        d["buffer_available"] = f.buffer_available
    if f.correlation_id is not None:
        d["correlation_id"] = f.correlation_id
    if f.timestamp_ms:
        d["timestamp_ms"] = f.timestamp_ms
    return d


def _config_update_response_obj(r: ConfigUpdateResponse) -> dict[str, Any]:
    return {
        "request_id": r.request_id,
        "accepted": r.accepted,
        "error": r.error,
        "timestamp_ms": r.timestamp_ms,
    }


def _is_config_update_response(obj: Any) -> bool:
    if obj.__class__ is dict:
        return "accepted" in obj and "update_type" not in obj
    if obj.__class__ is list:
        return len(obj) >= 2 and isinstance(obj[0], str) and obj[1].__class__ is bool
    return False
