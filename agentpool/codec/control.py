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
    _EMPTY,
    _MISSING,
    _NONE,
    _OPT,
    _REQ,
    _SKP,
    Conv,
    Enc,
    _any,
    _bad_type,
    _bool,
    _e,
    _enc_float,
    _enc_int,
    _enc_list,
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


def _health_state_or_none(v: Any, path: str) -> tuple[HealthState, dict[str, Any]] | None:
    return None if v is None else _health_state(v, path)


def _with_state_fields(hs: HealthStatus, extra: dict[str, Any]) -> HealthStatus:
    """Fill the detail fields from a tagged state (``{"status": "degraded", ...}``)."""
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


def _mk_health(
    agent_id: str,
    state: tuple[HealthState, dict[str, Any]] | None,
    timestamp_ms: int,
    message: str | None,
    load: LoadMetrics | None,
    resources: ResourceMetrics | None,
    valid_until_ms: int | None,
    disabled_features: list[str],
    timeout_multiplier: float | None,
    drain_eta_ms: int | None,
    unhealthy_reason: str | None,
    recoverable: bool | None,
) -> HealthStatus:
    health_state, extra = (HealthState.UNSPECIFIED, {}) if state is None else state
    hs = HealthStatus(
        agent_id,
        health_state,
        message,
        timestamp_ms,
        load,
        resources,
        valid_until_ms,
        disabled_features,
        timeout_multiplier,
        drain_eta_ms,
        unhealthy_reason,
        recoverable,
    )
    return _with_state_fields(hs, extra)


# The map form, as this codec writes it: the state as its number, optional fields left out;
# a tagged state (``{"status": ...}``) and a missing one (UNSPECIFIED) are read too.
_HEALTH = _Struct(
    "HealthStatus",
    "",
    [
        ("agent_id", _str, _DEF, str),
        ("state", _health_state_or_none, _OPT, _e(_enc_int)),
        ("timestamp_ms", _u64, _DEF, int),
        ("message", _opt(_str), _OPT, _e(omit=_NONE)),
        ("load", _opt(_LOAD.conv), _OPT, _e(_LOAD.enc, omit=_NONE)),
        ("resources", _opt(_RESOURCES.conv), _OPT, _e(_RESOURCES.enc, omit=_NONE)),
        ("valid_until_ms", _opt(_u64), _OPT, _e(omit=_NONE)),
        ("disabled_features", _list_str, _DEF, list, _e(omit=_EMPTY)),
        ("timeout_multiplier", _opt(_f32), _OPT, _e(omit=_NONE)),
        ("drain_eta_ms", _opt(_u64), _OPT, _e(omit=_NONE)),
        ("unhealthy_reason", _opt(_str), _OPT, _e(omit=_NONE)),
        ("recoverable", _opt(_bool), _OPT, _e(omit=_NONE)),
    ],
    _mk_health,
)
# Upstream's positional array (its struct order; read only).
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


def _decode_health(obj: Any) -> HealthStatus:
    if obj.__class__ is list:
        agent_id, state_v, message, load, resources, valid_until, ts = _HEALTH_POSITIONAL.values(
            obj
        )
        state, extra = _health_state(state_v, "state")
        hs = HealthStatus(agent_id, state, message, ts, load, resources, valid_until)
        return _with_state_fields(hs, extra)
    if obj.__class__ is dict:
        return _HEALTH.decode(obj)  # type: ignore[no-any-return]
    _bad_type(obj, "struct HealthStatus", "$")


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


def _enc_le(v: Any, binary: bool) -> Any:
    return "+Inf" if v == math.inf else float(v)


_BUCKET = _Struct(
    "HistogramBucket",
    "histograms.buckets",
    [("le", _le, _REQ, _e(_enc_le)), ("count", _u64, _REQ)],
    HistogramBucket,
)


def _metric_struct(
    name: str, path: str, value_conv: Conv, value_enc: Enc | None, build: Callable[..., Any]
) -> _Struct:
    return _Struct(
        name,
        path,
        [
            ("name", _str, _REQ),
            ("help", _opt(_str), _SKP),
            ("labels", _map_str, _DEF, dict),
            ("value", value_conv, _REQ, _e(value_enc)),
        ],
        build,
    )


_COUNTER = _metric_struct(
    "CounterMetric", "counters", _u64, None, lambda n, h, lb, v: CounterMetric(n, v, h, lb)
)
_GAUGE = _metric_struct(
    "GaugeMetric", "gauges", _f64, _enc_float, lambda n, h, lb, v: GaugeMetric(n, v, h, lb)
)
_HISTOGRAM = _Struct(
    "HistogramMetric",
    "histograms",
    [
        ("name", _str, _REQ),
        ("help", _opt(_str), _SKP),
        ("labels", _map_str, _DEF, dict),
        ("sum", _f64, _REQ, _e(_enc_float)),
        ("count", _u64, _REQ),
        ("buckets", _list(_BUCKET.conv), _REQ, _e(_enc_list(_BUCKET.enc))),
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
        ("counters", _list(_COUNTER.conv), _DEF, list, _e(_enc_list(_COUNTER.enc))),
        ("gauges", _list(_GAUGE.conv), _DEF, list, _e(_enc_list(_GAUGE.enc))),
        ("histograms", _list(_HISTOGRAM.conv), _DEF, list, _e(_enc_list(_HISTOGRAM.enc))),
    ],
    MetricsReport,
)


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

# Internally tagged (``{"type": tag, ...fields}``), in upstream's variant order.
_UPDATE_TYPES: Final[dict[str, _Struct]] = {
    "request_reload": _Struct("RequestReload", "update_type", [], RequestReload),
    "rule_update": _Struct(
        "RuleUpdate",
        "update_type",
        [
            ("rule_set", _str, _REQ),
            ("rules", _list(_RULE.conv), _REQ, _e(_enc_list(_RULE.enc))),
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


def _enc_update_type(u: ConfigUpdateType, binary: bool) -> dict[str, Any]:
    for tag, spec in _UPDATE_TYPES.items():
        cls: Any = spec.build
        if isinstance(u, cls):
            return spec.encode(u, binary, {"type": tag})  # type: ignore[no-any-return]
    raise Serialization(f"unknown config update type {type(u).__name__}")


_CONFIG_UPDATE = _Struct(
    "ConfigUpdateRequest",
    "",
    [
        ("update_type", _update_type, _REQ, _e(_enc_update_type)),
        ("request_id", _str, _REQ),
        ("timestamp_ms", _u64, _REQ),
    ],
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


def _mk_flow(
    action: tuple[FlowAction, int | None],
    buffer_available: Any,
    correlation_id: str | None,
    timestamp_ms: int,
) -> FlowControlSignal:
    flow_action, avail = action
    if avail is None and buffer_available is not None:
        avail = _u64(buffer_available, "buffer_available")
    return FlowControlSignal(flow_action, correlation_id, timestamp_ms, avail)


# The map form, as this codec writes it (the action as its number); a tagged action
# (``{"type": "update_capacity", "buffer_available": n}``) is read too and its own
# ``buffer_available`` wins over the top-level one, which is only checked when used.
_FLOW = _Struct(
    "FlowControlSignal",
    "",
    [
        ("action", _flow_action, _DEF, lambda: (FlowAction.RESUME, None), _e(_enc_int)),
        ("buffer_available", _any, _OPT, _e(omit=_NONE)),
        ("correlation_id", _opt(_str), _OPT, _e(omit=_NONE)),
        ("timestamp_ms", _u64, _DEF, int, _e(omit=_EMPTY)),
    ],
    _mk_flow,
)


def _decode_flow(obj: Any) -> FlowControlSignal:
    if obj.__class__ is list:
        # Upstream's positional array: [correlation_id, action, timestamp_ms].
        if len(obj) != 3:
            raise InvalidMessage(
                f"invalid length {len(obj)}, expected struct FlowControlSignal with 3 elements"
            )
        cid = _opt(_str)(obj[0], "correlation_id")
        action, avail = _flow_action(obj[1], "action")
        return FlowControlSignal(action, cid, _u64(obj[2], "timestamp_ms"), avail)
    if obj.__class__ is not dict:
        _bad_type(obj, "struct FlowControlSignal", "$")
    return _FLOW.decode(obj)  # type: ignore[no-any-return]


_CONTROL_SCHEMAS: Final = (
    (HealthStatus, _HEALTH),
    (FlowControlSignal, _FLOW),
    (MetricsReport, _METRICS),
    (ConfigUpdateRequest, _CONFIG_UPDATE),
    (ConfigUpdateResponse, _CONFIG_UPDATE_RESPONSE),
)


def _control_obj(msg: Any, binary: bool) -> dict[str, Any]:
    for cls, schema in _CONTROL_SCHEMAS:
        if isinstance(msg, cls):
            return schema.encode(msg, binary)  # type: ignore[no-any-return]
    raise Serialization(f"not a control message: {type(msg).__name__}")


def _is_config_update_response(obj: Any) -> bool:
    if obj.__class__ is dict:
        return "accepted" in obj and "update_type" not in obj
    if obj.__class__ is list:
        return len(obj) >= 2 and isinstance(obj[0], str) and obj[1].__class__ is bool
    return False
