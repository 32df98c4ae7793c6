"""Always-JSON messages: handshake, registration, cancel and ping."""

from __future__ import annotations

from typing import Any, Final

import orjson

from ..enums import CancelReason, EventType
from ..errors import InvalidMessage
from ..messages import (
    AgentCapabilities,
    AgentFeatures,
    AgentLimits,
    CancelRequest,
    HandshakeRequest,
    HandshakeResponse,
    Ping,
    RegistrationRequest,
    RegistrationResponse,
)
from .schema import (
    _DEF,
    _OPT,
    _REQ,
    _SORT,
    _any,
    _bool,
    _dumps,
    _guard,
    _i32,
    _json,
    _list,
    _opt,
    _serialization,
    _str,
    _Struct,
    _u32,
    _u64,
    _unknown_variant,
)

# --------------------------------------------------------------------------------------------
# Always-JSON messages: handshake, registration, cancel, ping

_ENCODINGS: Final = ("json", "msgpack")


def _encoding(v: Any, path: str) -> str:
    s = _str(v, path)
    if s not in _ENCODINGS:
        _unknown_variant(s, "`json` or `msgpack`", path)
    return s


def _event_codes(v: Any, path: str) -> list[EventType]:
    out: list[EventType] = []
    for code in _list(_i32)(v, path):
        if code == 0:
            code = EventType.CONFIGURE
        try:
            ev = EventType(code)
        except ValueError:
            continue
        if ev not in out:
            out.append(ev)
    return out


_FEATURES = _Struct(
    "UdsFeatures",
    "capabilities.features",
    [
        ("streaming_body", _bool, _REQ),
        ("websocket", _bool, _REQ),
        ("guardrails", _bool, _REQ),
        ("config_push", _bool, _REQ),
        ("metrics_export", _bool, _REQ),
        ("concurrent_requests", _u32, _REQ),
        ("cancellation", _bool, _REQ),
        ("flow_control", _bool, _REQ),
        ("health_reporting", _bool, _REQ),
    ],
    AgentFeatures,
)
_LIMITS = _Struct(
    "UdsLimits",
    "capabilities.limits",
    [
        ("max_body_size", _u64, _REQ),
        ("max_concurrency", _u32, _REQ),
        ("preferred_chunk_size", _u64, _REQ),
    ],
    AgentLimits,
)
_CAPABILITIES = _Struct(
    "UdsCapabilities",
    "capabilities",
    [
        ("agent_id", _str, _REQ),
        ("name", _str, _REQ),
        ("version", _str, _REQ),
        ("supported_events", _event_codes, _REQ),
        ("features", _FEATURES.conv, _REQ),
        ("limits", _LIMITS.conv, _REQ),
    ],
    AgentCapabilities,
)
_HANDSHAKE_REQUEST = _Struct(
    "UdsHandshakeRequest",
    "",
    [
        ("supported_versions", _list(_u32), _REQ),
        ("proxy_id", _str, _REQ),
        ("proxy_version", _str, _REQ),
        ("config", _any, _OPT),
        ("supported_encodings", _list(_encoding), _DEF, list),
    ],
    HandshakeRequest,
)
_HANDSHAKE_RESPONSE = _Struct(
    "UdsHandshakeResponse",
    "",
    [
        ("protocol_version", _u32, _REQ),
        ("capabilities", _CAPABILITIES.conv, _REQ),
        ("success", _bool, _REQ),
        ("error", _opt(_str), _OPT),
        ("encoding", _encoding, _DEF, lambda: "json"),
    ],
    HandshakeResponse,
)
_REGISTRATION_REQUEST = _Struct(
    "RegistrationRequest",
    "",
    [
        ("protocol_version", _u32, _REQ),
        ("agent_id", _str, _REQ),
        ("capabilities", _CAPABILITIES.conv, _REQ),
        ("auth_token", _opt(_str), _OPT),
        ("metadata", _any, _OPT),
    ],
    RegistrationRequest,
)
_REGISTRATION_RESPONSE = _Struct(
    "RegistrationResponse",
    "",
    [
        ("success", _bool, _REQ),
        ("error", _opt(_str), _OPT),
        ("proxy_id", _str, _REQ),
        ("proxy_version", _str, _REQ),
        ("connection_id", _str, _REQ),
    ],
    RegistrationResponse,
)


def _decode_json_struct(spec: _Struct, payload: bytes) -> Any:
    obj = _json(payload)
    return _guard(lambda: spec.decode(obj, "$"))


def _json_any(v: Any) -> Any:
    """Arbitrary JSON value as upstream writes a ``serde_json::Value``: object keys sorted."""
    return orjson.Fragment(_dumps(v, option=_SORT))


def _capabilities_obj(c: AgentCapabilities) -> dict[str, Any]:
    f, lim = c.features, c.limits
    return {
        "agent_id": c.agent_id,
        "name": c.name,
        "version": c.version,
        "supported_events": [int(e) for e in c.supported_events],
        "features": {
            "streaming_body": f.streaming_body,
            "websocket": f.websocket,
            "guardrails": f.guardrails,
            "config_push": f.config_push,
            "metrics_export": f.metrics_export,
            "concurrent_requests": f.concurrent_requests,
            "cancellation": f.cancellation,
            "flow_control": f.flow_control,
            "health_reporting": f.health_reporting,
        },
        "limits": {
            "max_body_size": lim.max_body_size,
            "max_concurrency": lim.max_concurrency,
            "preferred_chunk_size": lim.preferred_chunk_size,
        },
    }


def _dump_json(obj: Any) -> bytes:
    try:
        return _dumps(obj)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _serialization(exc) from None


def encode_handshake_request(req: HandshakeRequest) -> bytes:
    """Frame 0x01 payload (struct order; ``supported_encodings`` omitted when empty)."""
    try:
        d: dict[str, Any] = {
            "supported_versions": [int(v) for v in req.supported_versions],
            "proxy_id": req.proxy_id,
            "proxy_version": req.proxy_version,
            "config": _json_any(req.config),
        }
        if req.supported_encodings:
            d["supported_encodings"] = [
                str(getattr(e, "value", e)) for e in req.supported_encodings
            ]
    except (TypeError, ValueError, OverflowError) as exc:
        raise _serialization(exc) from None
    return _dump_json(d)


def decode_handshake_request(payload: bytes) -> HandshakeRequest:
    """Parse a handshake request as a Rust agent does (unknown encodings are an error)."""
    return _decode_json_struct(_HANDSHAKE_REQUEST, payload)  # type: ignore[no-any-return]


def encode_handshake_response(resp: HandshakeResponse) -> bytes:
    """Frame 0x02 payload in struct order (``error`` always present)."""
    return _dump_json(
        {
            "protocol_version": resp.protocol_version,
            "capabilities": _capabilities_obj(resp.capabilities),
            "success": resp.success,
            "error": resp.error,
            "encoding": str(getattr(resp.encoding, "value", resp.encoding)),
        }
    )


def decode_handshake_response(payload: bytes) -> HandshakeResponse:
    """Parse a handshake response; configure is accepted as 0 or 8, unknown codes dropped."""
    return _decode_json_struct(_HANDSHAKE_RESPONSE, payload)  # type: ignore[no-any-return]


def encode_registration_request(req: RegistrationRequest) -> bytes:
    """Reverse connection: the agent's registration (frame 0x01, struct order)."""
    try:
        meta = _json_any(req.metadata)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _serialization(exc) from None
    return _dump_json(
        {
            "protocol_version": req.protocol_version,
            "agent_id": req.agent_id,
            "capabilities": _capabilities_obj(req.capabilities),
            "auth_token": req.auth_token,
            "metadata": meta,
        }
    )


def decode_registration_request(payload: bytes) -> RegistrationRequest:
    """Parse a registration request (validation of version/id/token is the listener's job)."""
    return _decode_json_struct(_REGISTRATION_REQUEST, payload)  # type: ignore[no-any-return]


def encode_registration_response(resp: RegistrationResponse) -> bytes:
    """Reverse connection: the listener's answer (frame 0x02, struct order)."""
    return _dump_json(
        {
            "success": resp.success,
            "error": resp.error,
            "proxy_id": resp.proxy_id,
            "proxy_version": resp.proxy_version,
            "connection_id": resp.connection_id,
        }
    )


def decode_registration_response(payload: bytes) -> RegistrationResponse:
    return _decode_json_struct(_REGISTRATION_RESPONSE, payload)  # type: ignore[no-any-return]


def encode_cancel(correlation_id: str, reason: CancelReason | int, timestamp_ms: int) -> bytes:
    """Cancel (0x40) payload, always JSON, keys sorted, 0-based reason."""
    return _dump_json(
        {"correlation_id": correlation_id, "reason": int(reason), "timestamp_ms": int(timestamp_ms)}
    )


def _cancel_reason(v: Any, path: str) -> CancelReason:
    n = _i32(v, path)
    try:
        return CancelReason(n)
    except ValueError:
        raise InvalidMessage(
            f"invalid value: integer `{n}`, expected a cancel reason 0-5 at `{path}`", field=path
        ) from None


_CANCEL = _Struct(
    "CancelRequest",
    "",
    [
        ("correlation_id", _str, _REQ),
        ("reason", _cancel_reason, _REQ),
        ("timestamp_ms", _u64, _DEF, int),
    ],
    CancelRequest,
)
_PING = _Struct("Ping", "", [("sequence", _u64, _REQ), ("timestamp_ms", _u64, _DEF, int)], Ping)


def decode_cancel(payload: bytes) -> CancelRequest:
    return _decode_json_struct(_CANCEL, payload)  # type: ignore[no-any-return]


def encode_ping(sequence: int, timestamp_ms: int) -> bytes:
    """Ping (0x41) payload, always JSON; the agent echoes it verbatim as Pong."""
    return _dump_json({"sequence": int(sequence), "timestamp_ms": int(timestamp_ms)})


def decode_ping(payload: bytes) -> Ping:
    return _decode_json_struct(_PING, payload)  # type: ignore[no-any-return]
