"""Always-JSON messages: handshake, registration, cancel and ping."""

from __future__ import annotations

from typing import Any, Final

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
    _EMPTY,
    _OPT,
    _REQ,
    _any,
    _bool,
    _dumps,
    _e,
    _enc_int,
    _enc_json_any,
    _enc_list,
    _enc_str,
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
        ("supported_events", _event_codes, _REQ, _e(_enc_list(_enc_int))),
        ("features", _FEATURES.conv, _REQ, _e(_FEATURES.enc)),
        ("limits", _LIMITS.conv, _REQ, _e(_LIMITS.enc)),
    ],
    AgentCapabilities,
)
_HANDSHAKE_REQUEST = _Struct(
    "UdsHandshakeRequest",
    "",
    [
        ("supported_versions", _list(_u32), _REQ, _e(_enc_list(_enc_int))),
        ("proxy_id", _str, _REQ),
        ("proxy_version", _str, _REQ),
        ("config", _any, _OPT, _e(_enc_json_any)),
        ("supported_encodings", _list(_encoding), _DEF, list, _e(_enc_list(_enc_str), omit=_EMPTY)),
    ],
    HandshakeRequest,
)
_HANDSHAKE_RESPONSE = _Struct(
    "UdsHandshakeResponse",
    "",
    [
        ("protocol_version", _u32, _REQ),
        ("capabilities", _CAPABILITIES.conv, _REQ, _e(_CAPABILITIES.enc)),
        ("success", _bool, _REQ),
        ("error", _opt(_str), _OPT),
        ("encoding", _encoding, _DEF, lambda: "json", _e(_enc_str)),
    ],
    HandshakeResponse,
)
_REGISTRATION_REQUEST = _Struct(
    "RegistrationRequest",
    "",
    [
        ("protocol_version", _u32, _REQ),
        ("agent_id", _str, _REQ),
        ("capabilities", _CAPABILITIES.conv, _REQ, _e(_CAPABILITIES.enc)),
        ("auth_token", _opt(_str), _OPT),
        ("metadata", _any, _OPT, _e(_enc_json_any)),
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


def _encode(spec: _Struct, msg: Any) -> bytes:
    """``msg`` as JSON in its schema's field order."""
    try:
        return _dumps(spec.encode(msg))
    except (TypeError, ValueError, OverflowError) as exc:
        raise _serialization(exc) from None


def encode_handshake_request(req: HandshakeRequest) -> bytes:
    """Frame 0x01 payload (struct order; ``supported_encodings`` omitted when empty)."""
    return _encode(_HANDSHAKE_REQUEST, req)


def decode_handshake_request(payload: bytes) -> HandshakeRequest:
    """Parse a handshake request as a Rust agent does (unknown encodings are an error)."""
    return _decode_json_struct(_HANDSHAKE_REQUEST, payload)  # type: ignore[no-any-return]


def encode_handshake_response(resp: HandshakeResponse) -> bytes:
    """Frame 0x02 payload in struct order (``error`` always present)."""
    return _encode(_HANDSHAKE_RESPONSE, resp)


def decode_handshake_response(payload: bytes) -> HandshakeResponse:
    """Parse a handshake response; configure is accepted as 0 or 8, unknown codes dropped."""
    return _decode_json_struct(_HANDSHAKE_RESPONSE, payload)  # type: ignore[no-any-return]


def encode_registration_request(req: RegistrationRequest) -> bytes:
    """Reverse connection: the agent's registration (frame 0x01, struct order)."""
    return _encode(_REGISTRATION_REQUEST, req)


def decode_registration_request(payload: bytes) -> RegistrationRequest:
    """Parse a registration request (validation of version/id/token is the listener's job)."""
    return _decode_json_struct(_REGISTRATION_REQUEST, payload)  # type: ignore[no-any-return]


def encode_registration_response(resp: RegistrationResponse) -> bytes:
    """Reverse connection: the listener's answer (frame 0x02, struct order)."""
    return _encode(_REGISTRATION_RESPONSE, resp)


def decode_registration_response(payload: bytes) -> RegistrationResponse:
    return _decode_json_struct(_REGISTRATION_RESPONSE, payload)  # type: ignore[no-any-return]


def encode_cancel(correlation_id: str, reason: CancelReason | int, timestamp_ms: int) -> bytes:
    """Cancel (0x40) payload, always JSON, keys sorted, 0-based reason."""
    return _encode(_CANCEL, CancelRequest(correlation_id, reason, timestamp_ms))  # type: ignore[arg-type]


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
        ("reason", _cancel_reason, _REQ, _e(_enc_int)),
        ("timestamp_ms", _u64, _DEF, int, _e(_enc_int)),
    ],
    CancelRequest,
)
_PING = _Struct(
    "Ping",
    "",
    [("sequence", _u64, _REQ, _e(_enc_int)), ("timestamp_ms", _u64, _DEF, int, _e(_enc_int))],
    Ping,
)


def decode_cancel(payload: bytes) -> CancelRequest:
    return _decode_json_struct(_CANCEL, payload)  # type: ignore[no-any-return]


def encode_ping(sequence: int, timestamp_ms: int) -> bytes:
    """Ping (0x41) payload, always JSON; the agent echoes it verbatim as Pong."""
    return _encode(_PING, Ping(sequence, timestamp_ms))


def decode_ping(payload: bytes) -> Ping:
    return _decode_json_struct(_PING, payload)  # type: ignore[no-any-return]
