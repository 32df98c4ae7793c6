"""Events: encoding and validation (proxy side), decoding (agent side)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, NoReturn

from .._impl import core
from ..enums import MessageType
from ..errors import InvalidMessage, Serialization
from ..messages import (
    ConfigureEvent,
    Event,
    GuardrailInspectEvent,
    RequestBodyChunkEvent,
    RequestCompleteEvent,
    RequestHeadersEvent,
    RequestMetadata,
    ResponseBodyChunkEvent,
    ResponseHeadersEvent,
    WebSocketFrameEvent,
)
from .schema import (
    _DEF,
    _KEEP,
    _OPT,
    _REQ,
    _SKP,
    _SORT,
    _U16,
    _U32,
    _U64,
    Conv,
    _any,
    _bool,
    _data,
    _dumps,
    _e,
    _enc_data,
    _list_str,
    _map_headers,
    _map_str,
    _opt,
    _str,
    _Struct,
    _u16,
    _u32,
    _u64,
    _unknown_variant,
    _unpackb,
)

_HEADERS_ENCODER = core.HeadersEventEncoder(RequestHeadersEvent, RequestMetadata, _dumps, _SORT)
_headers_json = _HEADERS_ENCODER.encode
_headers_typed = _HEADERS_ENCODER.check


# --------------------------------------------------------------------------------------------
# Events: encoding (proxy side)


def _event_obj(event: Event, cid: str, binary: bool) -> dict[str, Any]:
    """The event as a map with the injected ``correlation_id`` first (JSON sorts it later),
    written by the encoders generated from the schemas (RequestHeaders' metadata carries the
    injected id too)."""
    cls = event.__class__
    if cls is RequestHeadersEvent:
        e: Any = event
        return _HEADERS_MAP(e, binary, cid, _METADATA_MAP(e.metadata, binary, cid))  # type: ignore[no-any-return]
    encode = _EVENT_ENCODERS.get(cls)
    if encode is not None:
        return encode(event, binary, cid)  # type: ignore[no-any-return]
    for known in _EVENT_CLASSES:
        if isinstance(event, known):
            return _event_obj(_rebase(event, known), cid, binary)
    raise Serialization(f"not an event: {type(event).__name__}")


def _rebase(event: Any, cls: type) -> Any:
    """Copy an instance of an event subclass into its base class (subclasses encode like it)."""
    from dataclasses import fields

    return cls(**{f.name: getattr(event, f.name) for f in fields(cls)})


# --------------------------------------------------------------------------------------------
# Events: validation before encoding (proxy side). A wrong type must fail here, naming the
# field, and never reach an agent (which may answer Allow to what it cannot decode).


def _bad_field(where: str, expected: str, value: Any) -> NoReturn:
    got = f"{type(value).__name__} {_short(value)}"
    raise Serialization(f"`{where}`: expected {expected}, got {got}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _v_str(v: Any, where: str) -> None:
    if not isinstance(v, str):
        _bad_field(where, "a string", v)


def _v_opt_str(v: Any, where: str) -> None:
    if v is not None and not isinstance(v, str):
        _bad_field(where, "a string or None", v)


def _v_bool(v: Any, where: str) -> None:
    if v.__class__ is not bool:
        _bad_field(where, "a bool", v)


def _v_uint(v: Any, where: str, top: int) -> None:
    if not isinstance(v, int) or v.__class__ is bool or not 0 <= v <= top:
        _bad_field(where, f"an integer in 0..{top}", v)


def _v_bytes(v: Any, where: str) -> None:
    if not isinstance(v, (bytes, bytearray, memoryview)):
        _bad_field(where, "bytes", v)


def _v_headers(v: Any, where: str) -> None:
    if not isinstance(v, dict):
        _bad_field(where, "a map of header name to a list of strings", v)
    for name, values in v.items():
        if not isinstance(name, str):
            _bad_field(f"{where} (a name)", "a string", name)
        if not isinstance(values, list):
            _bad_field(f"{where}[{name!r}]", "a list of strings", values)
        for item in values:
            if not isinstance(item, str):
                _bad_field(f"{where}[{name!r}] (a value)", "a string", item)


def _v_str_list(v: Any, where: str) -> None:
    if not isinstance(v, list):
        _bad_field(where, "a list of strings", v)
    for item in v:
        _v_str(item, f"{where} (an item)")


def _v_str_map(v: Any, where: str) -> None:
    if not isinstance(v, dict):
        _bad_field(where, "a map of strings", v)
    for key, item in v.items():
        _v_str(key, f"{where} (a key)")
        _v_str(item, f"{where}[{key!r}]")


def _chunk_typed(e: Any, correlation_id: Any) -> bool:
    """The body-chunk fields have exactly their declared types (the common, fast case)."""
    count = e.bytes_received if e.__class__ is RequestBodyChunkEvent else e.bytes_sent
    index, total = e.chunk_index, e.total_size
    return bool(
        e.data.__class__ is bytes
        and e.is_last.__class__ is bool
        and count.__class__ is int
        and index.__class__ is int
        and correlation_id.__class__ is str
        and 0 <= count <= _U64
        and 0 <= index <= _U32
        and (total is None or (total.__class__ is int and 0 <= total <= _U64))
    )


def validate_event(event: Any, correlation_id: Any = "") -> None:
    """Raise Serialization, naming the field, unless ``event`` has the types its wire form needs.

    Called by the encoders on every path that does not check types while writing.
    """
    cls = event.__class__
    if cls is RequestHeadersEvent:
        if _headers_typed(event, correlation_id):
            return
    elif cls is RequestBodyChunkEvent or cls is ResponseBodyChunkEvent:
        if _chunk_typed(event, correlation_id):
            return
    _v_str(correlation_id, "correlation_id")
    try:
        _validate_event(event)
    except AttributeError as exc:
        raise Serialization(f"{type(event).__name__}: {exc}") from None


def _validate_event(e: Any) -> None:
    checks = _EVENT_CHECKS.get(e.__class__)
    if checks is None:
        for known in _EVENT_CLASSES:
            if isinstance(e, known):
                checks = _EVENT_CHECKS[known]
                break
        else:
            raise Serialization(f"not an event: {type(e).__name__}")
    for attr, check, where in checks:
        check(getattr(e, attr), where)


# --------------------------------------------------------------------------------------------
# Events: decoding (agent side)


def _metadata_conv(v: Any, path: str) -> RequestMetadata:
    return _METADATA.decode(v, path)  # type: ignore[no-any-return]


_METADATA = _Struct(
    "RequestMetadata",
    "metadata",
    [
        ("correlation_id", _str, _REQ),
        ("request_id", _str, _REQ),
        ("client_ip", _str, _REQ),
        ("client_port", _u16, _REQ),
        ("server_name", _opt(_str), _OPT),
        ("protocol", _str, _REQ),
        ("tls_version", _opt(_str), _OPT),
        ("tls_cipher", _opt(_str), _OPT),
        ("route_id", _opt(_str), _OPT),
        ("upstream_id", _opt(_str), _OPT),
        ("timestamp", _str, _REQ),
        ("traceparent", _opt(_str), _SKP),
    ],
    RequestMetadata,
)

_INSPECTION_TYPES: Final = ("prompt_injection", "pii_detection")


def _inspection_type(v: Any, path: str) -> str:
    s = _str(v, path)
    if s not in _INSPECTION_TYPES:
        _unknown_variant(s, "`prompt_injection` or `pii_detection`", path)
    return s


_EVENT_SCHEMAS: dict[int, _Struct] = {
    MessageType.REQUEST_HEADERS: _Struct(
        "RequestHeadersEvent",
        "",
        [
            ("metadata", _metadata_conv, _REQ, _e(_METADATA.enc)),
            ("method", _str, _REQ),
            ("uri", _str, _REQ),
            ("headers", _map_headers, _REQ),
        ],
        RequestHeadersEvent,
    ),
    MessageType.REQUEST_BODY_CHUNK: _Struct(
        "RequestBodyChunkEvent",
        "",
        [
            ("correlation_id", _str, _REQ),
            ("data", _data, _REQ, _e(_enc_data)),
            ("is_last", _bool, _REQ),
            ("total_size", _opt(_u64), _SKP, _e(omit=_KEEP)),
            ("chunk_index", _u32, _DEF, int),
            ("bytes_received", _u64, _DEF, int),
        ],
        RequestBodyChunkEvent,
    ),
    MessageType.RESPONSE_HEADERS: _Struct(
        "ResponseHeadersEvent",
        "",
        [("correlation_id", _str, _REQ), ("status", _u16, _REQ), ("headers", _map_headers, _REQ)],
        ResponseHeadersEvent,
    ),
    MessageType.RESPONSE_BODY_CHUNK: _Struct(
        "ResponseBodyChunkEvent",
        "",
        [
            ("correlation_id", _str, _REQ),
            ("data", _data, _REQ, _e(_enc_data)),
            ("is_last", _bool, _REQ),
            ("total_size", _opt(_u64), _SKP, _e(omit=_KEEP)),
            ("chunk_index", _u32, _DEF, int),
            ("bytes_sent", _u64, _DEF, int),
        ],
        ResponseBodyChunkEvent,
    ),
    MessageType.REQUEST_COMPLETE: _Struct(
        "RequestCompleteEvent",
        "",
        [
            ("correlation_id", _str, _REQ),
            ("status", _u16, _REQ),
            ("duration_ms", _u64, _REQ),
            ("request_body_size", _u64, _REQ),
            ("response_body_size", _u64, _REQ),
            ("upstream_attempts", _u32, _REQ),
            ("error", _opt(_str), _OPT),
        ],
        RequestCompleteEvent,
    ),
    MessageType.WEBSOCKET_FRAME: _Struct(
        "WebSocketFrameEvent",
        "",
        [
            ("correlation_id", _str, _REQ),
            ("opcode", _str, _REQ),
            ("data", _data, _REQ, _e(_enc_data)),
            ("client_to_server", _bool, _REQ),
            ("frame_index", _u64, _REQ),
            ("fin", _bool, _REQ),
            ("route_id", _opt(_str), _OPT),
            ("client_ip", _str, _REQ),
        ],
        WebSocketFrameEvent,
    ),
    MessageType.GUARDRAIL_INSPECT: _Struct(
        "GuardrailInspectEvent",
        "",
        [
            ("correlation_id", _str, _REQ),
            ("inspection_type", _inspection_type, _REQ),
            ("content", _str, _REQ),
            ("model", _opt(_str), _SKP),
            ("categories", _list_str, _DEF, list),
            ("route_id", _opt(_str), _SKP),
            ("metadata", _map_str, _DEF, dict),
        ],
        GuardrailInspectEvent,
    ),
    MessageType.CONFIGURE: _Struct(
        "ConfigureEvent",
        "",
        [
            ("config", _any, _DEF, lambda: None),
            ("config_version", _opt(_str), _OPT),
            ("correlation_id", _str, _DEF, str),
        ],
        ConfigureEvent,
    ),
}

_EVENT_BY_CLASS: dict[Any, _Struct] = {s.build: s for s in _EVENT_SCHEMAS.values()}
_EVENT_CLASSES: tuple[type, ...] = tuple(_EVENT_BY_CLASS)
# Every event's map starts with the injected correlation id, which replaces its own field.
_EVENT_ENCODERS: Final = {c: s.encoder(("correlation_id",)) for c, s in _EVENT_BY_CLASS.items()}
_HEADERS_MAP: Final = _EVENT_BY_CLASS[RequestHeadersEvent].encoder(("correlation_id", "metadata"))
_METADATA_MAP: Final = _METADATA.encoder(("correlation_id",))


def _opt_str_ok(v: Any) -> bool:
    return v is None or v.__class__ is str


def _request_headers_fast(obj: dict[str, Any]) -> RequestHeadersEvent | None:
    """RequestHeaders with named metadata and well-typed values; None for anything else."""
    md = obj.get("metadata")
    method = obj.get("method")
    uri = obj.get("uri")
    headers = obj.get("headers")
    if (
        md.__class__ is not dict
        or method.__class__ is not str
        or uri.__class__ is not str
        or headers.__class__ is not dict
    ):
        return None
    g = md.get
    cid = g("correlation_id")
    rid = g("request_id")
    ip = g("client_ip")
    port = g("client_port")
    proto = g("protocol")
    ts = g("timestamp")
    sn = g("server_name")
    tv = g("tls_version")
    tc = g("tls_cipher")
    route = g("route_id")
    up = g("upstream_id")
    tp = g("traceparent")
    if not (
        cid.__class__ is str
        and rid.__class__ is str
        and ip.__class__ is str
        and port.__class__ is int
        and 0 <= port <= _U16
        and proto.__class__ is str
        and ts.__class__ is str
        and _opt_str_ok(sn)
        and _opt_str_ok(tv)
        and _opt_str_ok(tc)
        and _opt_str_ok(route)
        and _opt_str_ok(up)
        and _opt_str_ok(tp)
    ):
        return None
    for k, values in headers.items():
        if k.__class__ is not str or values.__class__ is not list:
            return None
        for x in values:
            if x.__class__ is not str:
                return None
    return RequestHeadersEvent(
        RequestMetadata(cid, rid, ip, port, sn, proto, tv, tc, route, up, ts, tp),
        method,
        uri,
        headers,
    )


def _first_cid_hook(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """MessagePack map builder: later keys win except ``correlation_id`` (docs/protocol.md)."""
    d = dict(pairs)
    if len(d) != len(pairs) and "correlation_id" in d:
        for k, v in pairs:
            if k == "correlation_id":
                d[k] = v
                break
    return d


def _unpack_events(payload: bytes) -> Any:
    try:
        return _unpackb(payload, raw=False, object_pairs_hook=_first_cid_hook)
    except Exception as exc:  # msgpack raises a zoo of ValueError/TypeError/... subclasses
        raise InvalidMessage(f"invalid MessagePack payload: {exc}") from None


# --------------------------------------------------------------------------------------------
# Events: the validation table, derived from the schemas (the type check of each decoder)

Check = Callable[[Any, str], None]


def _v_opt(check: Check) -> Check:
    def opt(v: Any, where: str) -> None:
        if v is not None:
            check(v, where)

    return opt


def _v_uint_to(top: int) -> Check:
    def uint(v: Any, where: str) -> None:
        _v_uint(v, where, top)

    return uint


_SCALAR_CHECKS: Final[dict[Any, Check | None]] = {
    _str: _v_str,
    _inspection_type: _v_str,  # the variant itself is the agent's to judge
    _bool: _v_bool,
    _data: _v_bytes,
    _u16: _v_uint_to(_U16),
    _u32: _v_uint_to(_U32),
    _u64: _v_uint_to(_U64),
    _map_headers: _v_headers,
    _list_str: _v_str_list,
    _map_str: _v_str_map,
    _any: None,
}


def _check_of(conv: Conv) -> Check | None:
    inner = getattr(conv, "inner", None)  # an Option
    if inner is not None:
        return _v_opt_str if inner is _str else _v_opt(_check_of(inner))  # type: ignore[arg-type]
    if conv is _metadata_conv:
        return _v_metadata
    if conv not in _SCALAR_CHECKS:  # pragma: no cover - declaration error
        raise TypeError(f"no encode-side check for converter {conv!r}")
    return _SCALAR_CHECKS[conv]


def _checks(schema: _Struct, where: str, skip: str = "") -> tuple[tuple[str, Check, str], ...]:
    out: list[tuple[str, Check, str]] = []
    for f in schema.fields:
        check = _check_of(f.conv)
        if f.key != skip and check is not None:
            out.append((f.attr, check, f"{where}.{f.attr}"))
    return tuple(out)


def _v_metadata(m: Any, where: str) -> None:
    if not isinstance(m, RequestMetadata):
        _bad_field(where, "a RequestMetadata", m)
    for attr, check, field_where in _METADATA_CHECKS:
        check(getattr(m, attr), field_where)


_METADATA_CHECKS: Final = _checks(_METADATA, "RequestHeadersEvent.metadata")
# An event's own correlation_id is not checked: the injected one replaces it on the wire.
_EVENT_CHECKS: Final = {
    cls: _checks(schema, schema.name, skip="correlation_id")
    for cls, schema in _EVENT_BY_CLASS.items()
}
