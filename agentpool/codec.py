"""Payload codecs for the v2 agent protocol: JSON (orjson) and MessagePack.

Framing is separate (``core.encode_frame`` / ``core.FrameDecoder``); this module only turns
message objects into payload bytes and back.

Output follows upstream byte for byte where upstream is deterministic (docs/protocol.md):
events are JSON with keys sorted at every level and the correlation id injected at the top;
responses, handshakes and control messages keep struct order. MessagePack output uses named
maps (never positional arrays, never a duplicate key) with raw ``bin`` bodies; MessagePack
input may be named maps or upstream's positional arrays (schema driven, skipped fields
honoured). Every decoding failure raises :class:`~agentpool.errors.InvalidMessage` naming the
field; encoding failures raise :class:`~agentpool.errors.Serialization`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final, NoReturn

import msgpack
import orjson

from ._impl import core
from .enums import CancelReason, EventType, FlowAction, HealthState, MessageType
from .errors import AgentProtocolError, InvalidMessage, Serialization
from .messages import RESPONSE_WIRE_FIELDS as _RESPONSE_WIRE_FIELDS
from .messages import (
    AgentCapabilities,
    AgentFeatures,
    AgentLimits,
    AgentResponse,
    Allow,
    AuditMetadata,
    Block,
    BodyMutation,
    CancelRequest,
    Challenge,
    ConfigError,
    ConfigUpdateRequest,
    ConfigUpdateResponse,
    ConfigUpdateType,
    ConfigureEvent,
    ControlMessage,
    CounterMetric,
    Decision,
    Event,
    FlowControlSignal,
    GaugeMetric,
    GuardrailInspectEvent,
    HandshakeRequest,
    HandshakeResponse,
    HeaderOp,
    HealthStatus,
    HistogramBucket,
    HistogramMetric,
    ListUpdate,
    LoadMetrics,
    MetricsReport,
    Ping,
    Redirect,
    RegistrationRequest,
    RegistrationResponse,
    RequestBodyChunkEvent,
    RequestCompleteEvent,
    RequestHeadersEvent,
    RequestMetadata,
    RequestReload,
    ResourceMetrics,
    ResponseBodyChunkEvent,
    ResponseHeadersEvent,
    RestartRequired,
    RuleDefinition,
    RuleUpdate,
    WebSocketClose,
    WebSocketDecision,
    WebSocketFrameEvent,
)

__all__ = [
    "JSON_CODEC",
    "MSGPACK_CODEC",
    "Codec",
    "decode_cancel",
    "decode_handshake_request",
    "decode_handshake_response",
    "decode_ping",
    "decode_registration_request",
    "decode_registration_response",
    "encode_cancel",
    "encode_handshake_request",
    "encode_handshake_response",
    "encode_ping",
    "encode_registration_request",
    "encode_registration_response",
    "f32_shortest",
    "get_codec",
]

_loads = orjson.loads
_dumps = orjson.dumps
_SORT: Final = orjson.OPT_SORT_KEYS
_JSONDecodeError = orjson.JSONDecodeError
_b2a = binascii.b2a_base64

if sys.version_info >= (3, 11):

    def _b64decode(text: str) -> bytes:
        return binascii.a2b_base64(text, strict_mode=True)

else:  # pragma: no cover - Python 3.10

    def _b64decode(text: str) -> bytes:
        return base64.b64decode(text, validate=True)


_packb = msgpack.packb
_unpackb = msgpack.unpackb

_U16: Final = 0xFFFF
_U32: Final = 0xFFFF_FFFF
_U64: Final = 0xFFFF_FFFF_FFFF_FFFF
_I32_MIN: Final = -(2**31)
_I32_MAX: Final = 2**31 - 1

_MISSING: Any = object()


# --------------------------------------------------------------------------------------------
# Error helpers


def _describe(v: object) -> str:
    """Describe a decoded value the way serde's ``Unexpected`` does."""
    if v is None:
        return "null"
    if v.__class__ is bool:
        return f"boolean `{'true' if v else 'false'}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v!r}`"
    if isinstance(v, str):
        s = v if len(v) <= 40 else v[:40] + "..."
        return f"string {json.dumps(s)}"
    if isinstance(v, (bytes, bytearray)):
        return "byte array"
    if isinstance(v, (list, tuple)):
        return "sequence"
    if isinstance(v, dict):
        return "map"
    return type(v).__name__


def _bad_type(v: object, expected: str, path: str) -> NoReturn:
    raise InvalidMessage(
        f"invalid type: {_describe(v)}, expected {expected} at `{path}`", field=path
    )


def _missing(path: str) -> NoReturn:
    parent, _, name = path.rpartition(".")
    where = f" at `{parent}`" if parent else ""
    raise InvalidMessage(f"missing field `{name}`{where}", field=path)


def _serialization(exc: BaseException) -> Serialization:
    return Serialization(str(exc) or type(exc).__name__)


# --------------------------------------------------------------------------------------------
# Scalar converters: ``conv(value, path) -> value``; raise InvalidMessage on a wrong type.

Conv = Callable[[Any, str], Any]


def _str(v: Any, path: str) -> str:
    if v.__class__ is str:
        return v  # type: ignore[no-any-return]
    if isinstance(v, str):
        return str(v)
    if isinstance(v, (bytes, bytearray)):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            _bad_type(v, "a string", path)
    _bad_type(v, "a string", path)


def _opt(conv: Conv) -> Conv:
    def opt(v: Any, path: str) -> Any:
        return None if v is None else conv(v, path)

    return opt


def _uint(bits: int, name: str) -> Conv:
    hi = (1 << bits) - 1

    def conv(v: Any, path: str) -> int:
        if v.__class__ is int or (isinstance(v, int) and v.__class__ is not bool):
            if 0 <= v <= hi:
                return int(v)
            raise InvalidMessage(
                f"invalid value: integer `{v}`, expected {name} at `{path}`", field=path
            )
        _bad_type(v, name, path)

    return conv


_u16 = _uint(16, "u16")
_u32 = _uint(32, "u32")
_u64 = _uint(64, "u64")


def _i32(v: Any, path: str) -> int:
    if isinstance(v, int) and v.__class__ is not bool:
        if _I32_MIN <= v <= _I32_MAX:
            return int(v)
        raise InvalidMessage(f"invalid value: integer `{v}`, expected i32 at `{path}`", field=path)
    _bad_type(v, "i32", path)


def _bool(v: Any, path: str) -> bool:
    if v.__class__ is bool:
        return v  # type: ignore[no-any-return]
    _bad_type(v, "a boolean", path)


def _f64(v: Any, path: str) -> float:
    if v.__class__ is float:
        return v  # type: ignore[no-any-return]
    if isinstance(v, (int, float)) and v.__class__ is not bool:
        return float(v)
    _bad_type(v, "f64", path)


_F32 = struct.Struct("<f")


def f32_shortest(x: float) -> float:
    """Round ``x`` to f32 and return the shortest decimal that maps back to it (as Rust prints)."""
    if math.isnan(x) or math.isinf(x):
        return x
    try:
        packed = _F32.pack(x)
    except OverflowError:
        return math.copysign(math.inf, x)
    target = _F32.unpack(packed)[0]
    for digits in range(1, 10):
        cand = float(f"{target:.{digits}g}")
        try:
            if _F32.pack(cand) == packed:
                return cand
        except OverflowError:
            continue
    return float(target)


def _f32(v: Any, path: str) -> float:
    return f32_shortest(_f64(v, path))


def _any(v: Any, path: str) -> Any:
    return v


def _list(conv: Conv, what: str = "a sequence") -> Conv:
    def lst(v: Any, path: str) -> list[Any]:
        if v.__class__ is not list:
            if isinstance(v, (list, tuple)):
                v = list(v)
            else:
                _bad_type(v, what, path)
        if conv is _str:
            for x in v:
                if x.__class__ is not str:
                    return [_str(x, path) for x in v]
            return v  # type: ignore[no-any-return]
        return [conv(x, path) for x in v]

    return lst


def _map(conv: Conv) -> Conv:
    def mp(v: Any, path: str) -> dict[str, Any]:
        if v.__class__ is not dict:
            _bad_type(v, "a map", path)
        out: dict[str, Any] | None = None
        if conv is _str or conv is _any:
            for k, x in v.items():
                if k.__class__ is not str or (conv is _str and x.__class__ is not str):
                    out = {}
                    break
            if out is None:
                return v  # type: ignore[no-any-return]
        out = {}
        for k, x in v.items():
            out[_str(k, path)] = conv(x, f"{path}.{k}" if k.__class__ is str else path)
        return out

    return mp


_list_str = _list(_str)
_map_str = _map(_str)
_map_any = _map(_any)
_map_headers = _map(_list(_str))


def _data(v: Any, path: str) -> bytes:
    """Body data: raw ``bin`` (MessagePack) or base64 text; undecodable text falls back to UTF-8."""
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    if isinstance(v, str):
        try:
            return _b64decode(v)
        except (binascii.Error, ValueError):
            return v.encode("utf-8", "surrogatepass")
    _bad_type(v, "a string", path)


def _b64(data: bytes) -> str:
    return _b2a(data, newline=False).decode("ascii")


# --------------------------------------------------------------------------------------------
# Struct schemas (maps by name, sequences by position)

_REQ: Final = 0  # required
_DEF: Final = 1  # default when missing
_OPT: Final = 2  # Option: missing -> None
_SKP: Final = 3  # Option with skip_serializing_if: also omitted from positional arrays


class _F:
    __slots__ = ("conv", "factory", "key", "kind", "path")

    def __init__(
        self, key: str, conv: Conv, kind: int, factory: Callable[[], Any] | None, path: str
    ) -> None:
        self.key = key
        self.conv = conv
        self.kind = kind
        self.factory = factory
        self.path = path

    def default(self) -> Any:
        return None if self.factory is None else self.factory()


class _Struct:
    """A serde-like struct schema: field specs in declaration order plus a builder."""

    __slots__ = ("build", "fields", "name", "path")

    def __init__(
        self,
        name: str,
        path: str,
        fields: Sequence[tuple[Any, ...]],
        build: Callable[..., Any],
    ) -> None:
        self.name = name
        self.path = path
        prefix = f"{path}." if path else ""
        specs = []
        for spec in fields:
            key, conv, kind = spec[0], spec[1], spec[2]
            factory = spec[3] if len(spec) > 3 else None
            specs.append(_F(key, conv, kind, factory, prefix + key))
        self.fields: tuple[_F, ...] = tuple(specs)
        self.build = build

    def values(self, obj: Any, path: str | None = None) -> list[Any]:
        cls = obj.__class__
        if cls is dict:
            out = []
            get = obj.get
            for f in self.fields:
                v = get(f.key, _MISSING)
                if v is _MISSING:
                    if f.kind == _REQ:
                        _missing(f.path)
                    out.append(f.default())
                else:
                    out.append(f.conv(v, f.path))
            return out
        if cls is list or cls is tuple:
            return self._positional(obj)
        _bad_type(obj, f"struct {self.name}", path if path is not None else self.path or "$")

    def _positional(self, arr: Sequence[Any]) -> list[Any]:
        """Decode a positional array (upstream's default MessagePack struct form).

        A short array means skipped fields were left out: skip fields are taken as omitted
        first (in declaration order), falling back to reading them when that does not decode;
        trailing non-required fields take their defaults.
        """
        n, m = len(self.fields), len(arr)
        if m > n:
            raise InvalidMessage(
                f"invalid length {m}, expected struct {self.name} with {n} elements",
                field=self.path or None,
            )
        out: list[Any] = []
        self._fill(arr, 0, 0, n - m, out)
        return out

    def _fill(self, arr: Sequence[Any], fi: int, ai: int, missing: int, out: list[Any]) -> None:
        fields = self.fields
        m = len(arr)
        for idx in range(fi, len(fields)):
            f = fields[idx]
            if ai >= m:
                if f.kind == _REQ:
                    raise InvalidMessage(
                        f"invalid length {m}, expected struct {self.name} with "
                        f"{len(fields)} elements",
                        field=f.path,
                    )
                out.append(f.default())
                continue
            if f.kind == _SKP and missing:
                mark = len(out)
                try:
                    out.append(None)
                    self._fill(arr, idx + 1, ai, missing - 1, out)
                    return
                except InvalidMessage:
                    del out[mark:]
            out.append(f.conv(arr[ai], f.path))
            ai += 1

    def decode(self, obj: Any, path: str | None = None) -> Any:
        return self.build(*self.values(obj, path))

    def conv(self, v: Any, path: str) -> Any:
        return self.decode(v, path)


def _variant(v: Any, path: str, names: str) -> tuple[str, Any]:
    """Split an externally tagged enum value into (tag, content); unit variants give None."""
    if isinstance(v, str):
        return v, _MISSING
    if isinstance(v, (bytes, bytearray)):
        return _str(v, path), _MISSING
    if v.__class__ is dict:
        if len(v) != 1:
            raise InvalidMessage(
                f"invalid type: map with {len(v)} entries, expected enum {names} at `{path}`",
                field=path,
            )
        ((tag, content),) = v.items()
        return _str(tag, path), content
    _bad_type(v, f"enum {names}", path)


def _unknown_variant(tag: str, expected: str, path: str) -> NoReturn:
    raise InvalidMessage(f"unknown variant `{tag}`, expected {expected} at `{path}`", field=path)


# --------------------------------------------------------------------------------------------
# AgentResponse schemas


_BLOCK = _Struct(
    "Block",
    "decision.block",
    [("status", _u16, _REQ), ("body", _opt(_str), _OPT), ("headers", _opt(_map_str), _OPT)],
    Block,
)
_REDIRECT = _Struct(
    "Redirect", "decision.redirect", [("url", _str, _REQ), ("status", _u16, _REQ)], Redirect
)
_CHALLENGE = _Struct(
    "Challenge",
    "decision.challenge",
    [("challenge_type", _str, _REQ), ("params", _map_str, _REQ)],
    Challenge,
)
_ALLOW = Allow()
_DECISIONS = "one of `allow`, `block`, `redirect`, `challenge`"


def _decision(v: Any, path: str = "decision") -> Decision:
    tag, content = _variant(v, path, "Decision")
    if tag == "allow":
        if content is _MISSING or content is None:
            return _ALLOW
        _bad_type(content, "unit variant", f"{path}.allow")
    spec = {"block": _BLOCK, "redirect": _REDIRECT, "challenge": _CHALLENGE}.get(tag)
    if spec is None:
        _unknown_variant(tag, _DECISIONS, path)
    if content is _MISSING:
        _bad_type(tag, f"struct variant Decision::{spec.name}", path)
    return spec.decode(content)  # type: ignore[no-any-return]


_OP_SPECS: dict[str, _Struct] = {}


def _op_spec(path: str, tag: str) -> _Struct:
    key = f"{path}.{tag}"
    spec = _OP_SPECS.get(key)
    if spec is None:
        if tag == "remove":
            spec = _Struct("HeaderOp", key, [("name", _str, _REQ)], lambda n: (n, None))
        else:
            spec = _Struct(
                "HeaderOp", key, [("name", _str, _REQ), ("value", _str, _REQ)], lambda n, v: (n, v)
            )
        if len(_OP_SPECS) < 64:
            _OP_SPECS[key] = spec
    return spec


def _header_op(v: Any, path: str) -> HeaderOp:
    tag, content = _variant(v, path, "HeaderOp")
    if tag == "set" or tag == "add" or tag == "remove":
        if content is _MISSING:
            _bad_type(tag, "struct variant", path)
        name, value = _op_spec(path, tag).decode(content)
        return HeaderOp("set" if tag == "set" else "add" if tag == "add" else "remove", name, value)
    _unknown_variant(tag, "one of `set`, `add`, `remove`", path)


_header_ops = _list(_header_op)

_AUDIT = _Struct(
    "AuditMetadata",
    "audit",
    [
        ("tags", _list_str, _DEF, list),
        ("rule_ids", _list_str, _DEF, list),
        ("confidence", _opt(_f32), _OPT),
        ("reason_codes", _list_str, _DEF, list),
        ("custom", _map_any, _DEF, dict),
    ],
    AuditMetadata,
)


def _mutation_struct(path: str) -> _Struct:
    return _Struct(
        "BodyMutation",
        path,
        [("data", _opt(_str), _OPT), ("chunk_index", _u32, _DEF, int)],
        BodyMutation,
    )


_REQ_MUT = _mutation_struct("request_body_mutation")
_RESP_MUT = _mutation_struct("response_body_mutation")
_WS_CLOSE = _Struct(
    "WebSocketClose",
    "websocket_decision.close",
    [("code", _u16, _REQ), ("reason", _str, _REQ)],
    WebSocketClose,
)


def _ws_decision(v: Any, path: str = "websocket_decision") -> WebSocketDecision:
    tag, content = _variant(v, path, "WebSocketDecision")
    if tag == "allow" or tag == "drop":
        if content is _MISSING or content is None:
            return tag  # type: ignore[return-value]
        _bad_type(content, "unit variant", f"{path}.{tag}")
    if tag == "close":
        if content is _MISSING:
            _bad_type(tag, "struct variant", path)
        return _WS_CLOSE.decode(content)  # type: ignore[no-any-return]
    _unknown_variant(tag, "one of `allow`, `drop`, `close`", path)


_new = object.__new__


def _mk_audit(
    tags: list[str],
    rule_ids: list[str],
    confidence: float | None,
    reason_codes: list[str],
    custom: dict[str, Any],
) -> AuditMetadata:
    """``AuditMetadata(...)`` without the dataclass ``__init__`` call (decode hot path)."""
    a = _new(AuditMetadata)
    a.tags = tags
    a.rule_ids = rule_ids
    a.confidence = confidence
    a.reason_codes = reason_codes
    a.custom = custom
    return a


def _mk_response(*values: Any) -> AgentResponse:
    """A decoded reply from its wire fields in order (the schema path); nothing left to build."""
    kv = dict(zip(_CANONICAL_KEYS, values, strict=True))
    return _make_response(  # type: ignore[no-any-return]
        kv.pop("version"), kv.pop("decision"), kv.pop("needs_more"), (_lazy_as_is, kv)
    )


def _lazy_as_is(lazy: tuple[Any, dict[str, Any]]) -> dict[str, Any]:
    return lazy[1]


def _build_lazy(lazy: tuple[Any, ...]) -> dict[str, Any]:
    """The lazy fields of a reply validated by ``_response_from_map``, built on first read.

    Header ops still in their canonical wire shape (validated: a list whose items are dicts)
    become :class:`HeaderOp`; an audit still a tuple of its validated parts becomes
    :class:`AuditMetadata`; everything else was built while validating.
    """
    _, rqh, rsh, rm, audit, rqm, rsm, wsd = lazy
    if rqh and rqh[0].__class__ is dict:
        rqh = _header_ops_build(rqh)
    if rsh and rsh[0].__class__ is dict:
        rsh = _header_ops_build(rsh)
    if audit.__class__ is tuple:
        audit = _mk_audit(*audit)
    return {
        "request_headers": rqh,
        "response_headers": rsh,
        "routing_metadata": rm,
        "audit": audit,
        "request_body_mutation": rqm,
        "response_body_mutation": rsm,
        "websocket_decision": wsd,
    }


_RESPONSE_FIELD_SPECS: Final[dict[str, tuple[Any, ...]]] = {
    "version": (_u32, _REQ),
    "decision": (_decision, _REQ),
    "request_headers": (_header_ops, _DEF, list),
    "response_headers": (_header_ops, _DEF, list),
    "routing_metadata": (_map_str, _DEF, dict),
    "audit": (_AUDIT.conv, _DEF, AuditMetadata),
    "needs_more": (_bool, _DEF, bool),
    "request_body_mutation": (_opt(_REQ_MUT.conv), _OPT),
    "response_body_mutation": (_opt(_RESP_MUT.conv), _OPT),
    "websocket_decision": (_opt(_ws_decision), _OPT),
}
# The wire order is AgentResponse's field order (messages.py); this only adds converters.
_CANONICAL_KEYS: Final = _RESPONSE_WIRE_FIELDS
_RESPONSE = _Struct(
    "AgentResponse",
    "",
    [(key, *_RESPONSE_FIELD_SPECS[key]) for key in _CANONICAL_KEYS],
    _mk_response,
)
_RESPONSE_KEYS: Final = frozenset(f.key for f in _RESPONSE.fields)
_AUDIT_KEYS: Final = frozenset(f.key for f in _AUDIT.fields)


def _nkeys(o: Any) -> int:
    """Number of object keys in a decoded JSON tree (duplicate detection, see decode_response)."""
    cls = o.__class__
    if cls is dict:
        n = len(o)
        for v in o.values():
            c = v.__class__
            if c is dict or c is list:
                n += _nkeys(v)
        return n
    if cls is list:
        n = 0
        for v in o:
            c = v.__class__
            if c is dict or c is list:
                n += _nkeys(v)
        return n
    return 0


def _header_ops_count(ops: list[Any]) -> int:
    """Key count of header ops in their canonical JSON shape; -1 for anything else."""
    nk = 0
    for item in ops:
        if item.__class__ is not dict or len(item) != 1:
            return -1
        ((tag, inner),) = item.items()
        if inner.__class__ is not dict or inner.get("name").__class__ is not str:
            return -1
        if tag == "remove":
            if len(inner) != 1:
                return -1
            nk += 2
        elif tag == "set" or tag == "add":
            if len(inner) != 2 or inner.get("value").__class__ is not str:
                return -1
            nk += 3
        else:
            return -1
    return nk


def _header_ops_build(ops: list[dict[str, dict[str, str]]]) -> list[HeaderOp]:
    """HeaderOp objects from canonical ops already checked by ``_header_ops_count``."""
    out = []
    for item in ops:
        ((tag, inner),) = item.items()
        if tag == "remove":
            out.append(HeaderOp("remove", inner["name"], None))
        else:
            out.append(HeaderOp("set" if tag == "set" else "add", inner["name"], inner["value"]))
    return out


def _response_cid(custom: dict[str, Any]) -> str:
    cid = custom.get("correlation_id", "")
    if cid.__class__ is str:
        return cid  # type: ignore[no-any-return]
    if isinstance(cid, str):
        return str(cid)
    if isinstance(cid, bytes):
        try:
            return cid.decode("utf-8")
        except UnicodeDecodeError:
            return ""
    return ""


_CANONICAL_AUDIT_KEYS: Final = tuple(f.key for f in _AUDIT.fields)


def _response_from_map(d: dict[str, Any]) -> tuple[str, AgentResponse, int]:
    """Decode an AgentResponse map; also return its object-key count for the JSON duplicate check.

    A map with exactly upstream's keys in struct order (what every Rust agent and our own
    encoder write) is read without defaults; other maps key by key with defaults. The common
    value shapes (decision ``"allow"`` or a plain block, empty lists, canonical header ops, a
    flat ``audit``) are checked inline; anything else goes through the schema converters,
    which also produce the error messages. The whole reply is validated here; canonical header
    ops and the audit become objects only when the reply's lazy fields are first read. The
    core's ``ResponseFactory.from_map`` takes the canonical shapes first (in C when compiled).
    """
    fast = _response_from_map_fast(d)
    if fast is not None:
        return fast  # type: ignore[no-any-return]
    nk = len(d)
    if nk == 10 and tuple(d) == _CANONICAL_KEYS:
        version = d["version"]
        dec = d["decision"]
        rqh = d["request_headers"]
        rsh = d["response_headers"]
        rm = d["routing_metadata"]
        audit_v = d["audit"]
        needs_more = d["needs_more"]
        rqm = d["request_body_mutation"]
        rsm = d["response_body_mutation"]
        wsd = d["websocket_decision"]
    else:
        get = d.get
        version = get("version", _MISSING)
        if version is _MISSING:
            _missing("version")
        dec = get("decision", _MISSING)
        if dec is _MISSING:
            _missing("decision")
        present = 2
        rqh = get("request_headers", _MISSING)
        if rqh is _MISSING:
            rqh = []
        else:
            present += 1
        rsh = get("response_headers", _MISSING)
        if rsh is _MISSING:
            rsh = []
        else:
            present += 1
        rm = get("routing_metadata", _MISSING)
        if rm is _MISSING:
            rm = {}
        else:
            present += 1
        audit_v = get("audit", _MISSING)
        if audit_v is not _MISSING:
            present += 1
        needs_more = get("needs_more", _MISSING)
        if needs_more is _MISSING:
            needs_more = False
        else:
            present += 1
        rqm = get("request_body_mutation", _MISSING)
        if rqm is _MISSING:
            rqm = None
        else:
            present += 1
        rsm = get("response_body_mutation", _MISSING)
        if rsm is _MISSING:
            rsm = None
        else:
            present += 1
        wsd = get("websocket_decision", _MISSING)
        if wsd is _MISSING:
            wsd = None
        else:
            present += 1
        if present != nk:
            for k, v in d.items():
                if k not in _RESPONSE_KEYS:
                    nk += _nkeys(v)

    if version.__class__ is not int or version < 0 or version > _U32:
        version = _u32(version, "version")

    if dec.__class__ is str and dec == "allow":
        decision: Decision = _ALLOW
    elif (
        dec.__class__ is dict
        and len(dec) == 1
        and (inner := dec.get("block")).__class__ is dict
        and len(inner) == 3
        and (status := inner.get("status", _MISSING)).__class__ is int
        and 0 <= status <= _U16
        and ((body := inner.get("body", _MISSING)) is None or body.__class__ is str)
        and ((hdrs := inner.get("headers", _MISSING)) is None or hdrs.__class__ is dict)
    ):
        if hdrs:
            hdrs = _map_str(hdrs, "decision.block.headers")
            nk += len(hdrs)
        decision = Block(status, body, hdrs)
        nk += 4
    else:
        decision = _decision(dec)
        nk += _nkeys(dec)

    if rqh.__class__ is not list or rqh:
        n_op_keys = _header_ops_count(rqh) if rqh.__class__ is list else -1
        if n_op_keys >= 0:
            nk += n_op_keys
        else:
            nk += _nkeys(rqh)
            rqh = _header_ops(rqh, "request_headers")

    if rsh.__class__ is not list or rsh:
        n_op_keys = _header_ops_count(rsh) if rsh.__class__ is list else -1
        if n_op_keys >= 0:
            nk += n_op_keys
        else:
            nk += _nkeys(rsh)
            rsh = _header_ops(rsh, "response_headers")

    if rm.__class__ is not dict or rm:
        rm = _map_str(rm, "routing_metadata")
        nk += len(rm)

    cid = ""
    audit: Any
    if audit_v is _MISSING:
        audit = ([], [], None, [], {})
    elif audit_v.__class__ is dict:
        n_audit = len(audit_v)
        nk += n_audit
        if n_audit == 5 and tuple(audit_v) == _CANONICAL_AUDIT_KEYS:
            tags, rule_ids, conf, reasons, custom = audit_v.values()
        else:
            aget = audit_v.get
            tags = aget("tags", _MISSING)
            rule_ids = aget("rule_ids", _MISSING)
            conf = aget("confidence")
            reasons = aget("reason_codes", _MISSING)
            custom = aget("custom", _MISSING)
            for k, v in audit_v.items():
                if k not in _AUDIT_KEYS:
                    nk += _nkeys(v)
            if tags is _MISSING:
                tags = []
            if rule_ids is _MISSING:
                rule_ids = []
            if reasons is _MISSING:
                reasons = []
            if custom is _MISSING:
                custom = {}
        if tags.__class__ is not list or tags:
            tags = _list_str(tags, "audit.tags")
        if rule_ids.__class__ is not list or rule_ids:
            rule_ids = _list_str(rule_ids, "audit.rule_ids")
        if conf is not None:
            conf = _f32(conf, "audit.confidence")
        if reasons.__class__ is not list or reasons:
            reasons = _list_str(reasons, "audit.reason_codes")
        if custom.__class__ is not dict:
            _bad_type(custom, "a map", "audit.custom")
        if custom:
            nk += _nkeys(custom)
            cid = _response_cid(custom)
        audit = (tags, rule_ids, conf, reasons, custom)
    else:
        audit = _AUDIT.decode(audit_v, "audit")
        nk += _nkeys(audit_v)
        cid = _response_cid(audit.custom)

    if needs_more.__class__ is not bool:
        _bad_type(needs_more, "a boolean", "needs_more")

    if rqm is not None:
        nk += _nkeys(rqm)
        rqm = _REQ_MUT.decode(rqm)
    if rsm is not None:
        nk += _nkeys(rsm)
        rsm = _RESP_MUT.decode(rsm)
    if wsd is not None:
        nk += _nkeys(wsd)
        wsd = _ws_decision(wsd)

    resp = _make_response(
        version, decision, needs_more, (_build_lazy, rqh, rsh, rm, audit, rqm, rsm, wsd)
    )
    return cid, resp, nk


class _DupDict(dict[str, Any]):
    """A dict that remembers the first key seen twice while parsing."""

    __slots__ = ("dup",)

    dup: str | None


def _dup_hook(pairs: list[tuple[str, Any]]) -> _DupDict:
    d = _DupDict(pairs)
    d.dup = None
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                d.dup = k
                break
            seen.add(k)
    return d


def _check_dup(obj: Any, path: str) -> None:
    if isinstance(obj, _DupDict) and obj.dup is not None:
        field = f"{path}.{obj.dup}" if path else obj.dup
        where = f" at `{path}`" if path else ""
        raise InvalidMessage(f"duplicate field `{obj.dup}`{where}", field=field)


def _check_variant_dups(v: Any, path: str) -> None:
    if isinstance(v, dict):
        _check_dup(v, path)
        for tag, content in v.items():
            _check_dup(content, f"{path}.{tag}")


def _as_bytes(payload: Any) -> bytes:
    if isinstance(payload, str):
        return payload.encode("utf-8", "surrogatepass")
    return bytes(payload)


def _ws_before_colon(raw: bytes) -> bool:
    return b" :" in raw or b"\n:" in raw or b"\t:" in raw or b"\r:" in raw


def _check_response_duplicates(payload: bytes) -> None:
    """Reject duplicate struct fields the way serde does (maps like ``custom`` may repeat keys).

    Only called when the cheap test in ``decode_response`` cannot rule duplicates out: every
    key is followed by a colon (``":`` when no whitespace precedes it), so a colon count equal
    to the number of distinct keys decoded proves there were no repeats.
    """
    try:
        tree = json.loads(payload, object_pairs_hook=_dup_hook)
    except (ValueError, RecursionError):
        return
    if not isinstance(tree, dict):
        return
    _check_dup(tree, "")
    _check_variant_dups(tree.get("decision"), "decision")
    for key in ("request_headers", "response_headers"):
        ops = tree.get(key)
        if isinstance(ops, list):
            for op in ops:
                _check_variant_dups(op, key)
    _check_dup(tree.get("audit"), "audit")
    _check_dup(tree.get("request_body_mutation"), "request_body_mutation")
    _check_dup(tree.get("response_body_mutation"), "response_body_mutation")
    _check_variant_dups(tree.get("websocket_decision"), "websocket_decision")


# --------------------------------------------------------------------------------------------
# AgentResponse encoding (struct order, as upstream's agent server writes it)


def _decision_obj(d: Decision) -> Any:
    cls = d.__class__
    if cls is Allow:
        return "allow"
    if cls is Block:
        return {"block": {"status": d.status, "body": d.body, "headers": d.headers}}  # type: ignore[union-attr]
    if cls is Redirect:
        return {"redirect": {"url": d.url, "status": d.status}}  # type: ignore[union-attr]
    if cls is Challenge:
        return {"challenge": {"challenge_type": d.challenge_type, "params": d.params}}  # type: ignore[union-attr]
    if isinstance(d, Allow):
        return "allow"
    raise Serialization(f"unknown decision type {type(d).__name__}")


def _op_obj(op: HeaderOp) -> dict[str, Any]:
    if op.op == "remove":
        return {"remove": {"name": op.name}}
    if op.op == "set" or op.op == "add":
        return {op.op: {"name": op.name, "value": op.value}}
    raise Serialization(f"unknown header op `{op.op}`")


def _mutation_obj(m: BodyMutation | None) -> Any:
    if m is None:
        return None
    return {"data": m.data, "chunk_index": m.chunk_index}


def _ws_obj(w: WebSocketDecision | None) -> Any:
    if w is None or w == "allow" or w == "drop":
        return w
    if isinstance(w, WebSocketClose):
        return {"close": {"code": w.code, "reason": w.reason}}
    raise Serialization(f"unknown websocket decision {w!r}")


def _audit_obj(a: AuditMetadata, correlation_id: str) -> dict[str, Any]:
    custom = a.custom
    if not custom:
        custom = {"correlation_id": correlation_id}
    else:
        custom = {"correlation_id": correlation_id, **custom}
        custom["correlation_id"] = correlation_id
    conf = a.confidence
    return {
        "tags": a.tags,
        "rule_ids": a.rule_ids,
        "confidence": None if conf is None else f32_shortest(conf),
        "reason_codes": a.reason_codes,
        "custom": custom,
    }


# How each wire field of an AgentResponse is written: (value -> wire object, or None to write
# the value itself, and whether it needs the correlation id); the order is the field order.
_FIELD_OBJ: Final[dict[str, Callable[..., Any] | None]] = {
    "version": None,
    "decision": _decision_obj,
    "request_headers": lambda ops: [_op_obj(o) for o in ops],
    "response_headers": lambda ops: [_op_obj(o) for o in ops],
    "routing_metadata": None,
    "audit": _audit_obj,
    "needs_more": None,
    "request_body_mutation": _mutation_obj,
    "response_body_mutation": _mutation_obj,
    "websocket_decision": _ws_obj,
}
_RESPONSE_OBJ: Final = tuple((key, _FIELD_OBJ[key]) for key in _CANONICAL_KEYS)


def _response_obj(r: AgentResponse, correlation_id: str) -> dict[str, Any]:
    out = {}
    for key, conv in _RESPONSE_OBJ:
        v = getattr(r, key)
        if conv is None:
            out[key] = v
        elif conv is _audit_obj:
            out[key] = _audit_obj(v, correlation_id)
        else:
            out[key] = conv(v)
    return out


def _split_template(sample: bytes, cid: bytes) -> tuple[bytes, bytes]:
    head, sep, tail = sample.partition(cid)
    assert sep and cid not in tail
    return head, tail


# The exact bytes every Rust agent (and our own agents) send for a plain Allow, split around
# the correlation id. A payload matching one of these is decoded without parsing.
_TEMPLATE_CID = "\x00cid\x00"
_JSON_ALLOW_HEAD, _JSON_ALLOW_TAIL = _split_template(
    orjson.dumps(_response_obj(AgentResponse(), _TEMPLATE_CID)), b"\\u0000cid\\u0000"
)
# MessagePack: our named map, and upstream 0.6.20's positional array (the same values in field
# order, the audit as an array too); the cid's str header (a fixstr for ids under 32 bytes) is
# the byte right before it.
_ALLOW_OBJ: Final = _response_obj(AgentResponse(), _TEMPLATE_CID)
_MSGPACK_ALLOW_TEMPLATES: Final = tuple(
    _split_template(msgpack.packb(obj, use_bin_type=True), b"\xa5\x00cid\x00")
    for obj in (
        _ALLOW_OBJ,
        [list(v.values()) if k == "audit" else v for k, v in _ALLOW_OBJ.items()],
    )
)


def _response_factory(core_module: Any) -> Any:
    """``core_module``'s ResponseFactory set up for these replies (one per core in parity
    tests and benchmarks; the codec and connections use the active core's, ``_RESPONSES``)."""
    factory = core_module.ResponseFactory(
        AgentResponse, _ALLOW, (_JSON_ALLOW_HEAD, _JSON_ALLOW_TAIL), _MSGPACK_ALLOW_TEMPLATES
    )
    factory.set_map_decoding(_CANONICAL_KEYS, _CANONICAL_AUDIT_KEYS, Block, _f32, _build_lazy)
    return factory


_RESPONSES: Final[core.ResponseFactory] = _response_factory(core)
_json_allow_fast = _RESPONSES.match_json
_make_response = _RESPONSES.make
_response_from_map_fast = _RESPONSES.from_map
_msgpack_allow_fast = _RESPONSES.match_msgpack
_HEADERS_ENCODER = core.HeadersEventEncoder(RequestHeadersEvent, RequestMetadata, _dumps, _SORT)
_headers_json = _HEADERS_ENCODER.encode
_headers_typed = _HEADERS_ENCODER.check


def fast_paths(encoding: str) -> tuple[Any, Any, str]:
    """The core's C paths for ``encoding``, for ``AgentProtocolCore.set_fast_paths``: the
    RequestHeaders writer and the canonical-Allow recogniser (what the codec tries first)."""
    return _HEADERS_ENCODER, _RESPONSES, encoding


# --------------------------------------------------------------------------------------------
# Events: encoding (proxy side)


def _metadata_obj(m: RequestMetadata, cid: str) -> dict[str, Any]:
    md = {
        "correlation_id": cid,
        "request_id": m.request_id,
        "client_ip": m.client_ip,
        "client_port": m.client_port,
        "server_name": m.server_name,
        "protocol": m.protocol,
        "tls_version": m.tls_version,
        "tls_cipher": m.tls_cipher,
        "route_id": m.route_id,
        "upstream_id": m.upstream_id,
        "timestamp": m.timestamp,
    }
    if m.traceparent is not None:
        md["traceparent"] = m.traceparent
    return md


def _event_obj(event: Event, cid: str, binary: bool) -> dict[str, Any]:
    """The event as a map with the injected ``correlation_id`` first (JSON sorts it later)."""
    cls = event.__class__
    if cls is RequestHeadersEvent:
        e: Any = event
        return {
            "correlation_id": cid,
            "metadata": _metadata_obj(e.metadata, cid),
            "method": e.method,
            "uri": e.uri,
            "headers": e.headers,
        }
    if cls is RequestBodyChunkEvent or cls is ResponseBodyChunkEvent:
        e = event
        data = bytes(e.data) if binary else _b64(e.data)
        d = {
            "correlation_id": cid,
            "data": data,
            "is_last": e.is_last,
            "total_size": e.total_size,
            "chunk_index": e.chunk_index,
        }
        if cls is RequestBodyChunkEvent:
            d["bytes_received"] = e.bytes_received
        else:
            d["bytes_sent"] = e.bytes_sent
        return d
    if cls is ResponseHeadersEvent:
        e = event
        return {"correlation_id": cid, "status": e.status, "headers": e.headers}
    if cls is RequestCompleteEvent:
        e = event
        return {
            "correlation_id": cid,
            "status": e.status,
            "duration_ms": e.duration_ms,
            "request_body_size": e.request_body_size,
            "response_body_size": e.response_body_size,
            "upstream_attempts": e.upstream_attempts,
            "error": e.error,
        }
    if cls is WebSocketFrameEvent:
        e = event
        return {
            "correlation_id": cid,
            "opcode": e.opcode,
            "data": bytes(e.data) if binary else _b64(e.data),
            "client_to_server": e.client_to_server,
            "frame_index": e.frame_index,
            "fin": e.fin,
            "route_id": e.route_id,
            "client_ip": e.client_ip,
        }
    if cls is GuardrailInspectEvent:
        e = event
        d = {"correlation_id": cid, "inspection_type": e.inspection_type, "content": e.content}
        if e.model is not None:
            d["model"] = e.model
        d["categories"] = e.categories
        if e.route_id is not None:
            d["route_id"] = e.route_id
        d["metadata"] = e.metadata
        return d
    if cls is ConfigureEvent:
        e = event
        return {"correlation_id": cid, "config": e.config, "config_version": e.config_version}
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


def _validate_metadata(m: Any) -> None:
    where = "RequestHeadersEvent.metadata"
    if not isinstance(m, RequestMetadata):
        _bad_field(where, "a RequestMetadata", m)
    for name in ("correlation_id", "request_id", "client_ip", "protocol", "timestamp"):
        _v_str(getattr(m, name), f"{where}.{name}")
    _v_uint(m.client_port, f"{where}.client_port", _U16)
    for name in ("server_name", "tls_version", "tls_cipher", "route_id", "upstream_id"):
        _v_opt_str(getattr(m, name), f"{where}.{name}")
    _v_opt_str(m.traceparent, f"{where}.traceparent")


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
    cls = e.__class__
    if cls is RequestHeadersEvent or isinstance(e, RequestHeadersEvent):
        _validate_metadata(e.metadata)
        _v_str(e.method, "RequestHeadersEvent.method")
        _v_str(e.uri, "RequestHeadersEvent.uri")
        _v_headers(e.headers, "RequestHeadersEvent.headers")
    elif isinstance(e, (RequestBodyChunkEvent, ResponseBodyChunkEvent)):
        name = type(e).__name__
        _v_bytes(e.data, f"{name}.data")
        _v_bool(e.is_last, f"{name}.is_last")
        if e.total_size is not None:
            _v_uint(e.total_size, f"{name}.total_size", _U64)
        _v_uint(e.chunk_index, f"{name}.chunk_index", _U32)
        if isinstance(e, RequestBodyChunkEvent):
            _v_uint(e.bytes_received, f"{name}.bytes_received", _U64)
        else:
            _v_uint(e.bytes_sent, f"{name}.bytes_sent", _U64)
    elif isinstance(e, ResponseHeadersEvent):
        _v_uint(e.status, "ResponseHeadersEvent.status", _U16)
        _v_headers(e.headers, "ResponseHeadersEvent.headers")
    elif isinstance(e, RequestCompleteEvent):
        _v_uint(e.status, "RequestCompleteEvent.status", _U16)
        _v_uint(e.duration_ms, "RequestCompleteEvent.duration_ms", _U64)
        _v_uint(e.request_body_size, "RequestCompleteEvent.request_body_size", _U64)
        _v_uint(e.response_body_size, "RequestCompleteEvent.response_body_size", _U64)
        _v_uint(e.upstream_attempts, "RequestCompleteEvent.upstream_attempts", _U32)
        _v_opt_str(e.error, "RequestCompleteEvent.error")
    elif isinstance(e, WebSocketFrameEvent):
        _v_str(e.opcode, "WebSocketFrameEvent.opcode")
        _v_bytes(e.data, "WebSocketFrameEvent.data")
        _v_bool(e.client_to_server, "WebSocketFrameEvent.client_to_server")
        _v_uint(e.frame_index, "WebSocketFrameEvent.frame_index", _U64)
        _v_bool(e.fin, "WebSocketFrameEvent.fin")
        _v_opt_str(e.route_id, "WebSocketFrameEvent.route_id")
        _v_str(e.client_ip, "WebSocketFrameEvent.client_ip")
    elif isinstance(e, GuardrailInspectEvent):
        _v_str(e.inspection_type, "GuardrailInspectEvent.inspection_type")
        _v_str(e.content, "GuardrailInspectEvent.content")
        _v_opt_str(e.model, "GuardrailInspectEvent.model")
        _v_str_list(e.categories, "GuardrailInspectEvent.categories")
        _v_opt_str(e.route_id, "GuardrailInspectEvent.route_id")
        _v_str_map(e.metadata, "GuardrailInspectEvent.metadata")
    elif isinstance(e, ConfigureEvent):
        _v_opt_str(e.config_version, "ConfigureEvent.config_version")
    else:
        raise Serialization(f"not an event: {type(e).__name__}")


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
            ("metadata", _metadata_conv, _REQ),
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
            ("data", _data, _REQ),
            ("is_last", _bool, _REQ),
            ("total_size", _opt(_u64), _SKP),
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
            ("data", _data, _REQ),
            ("is_last", _bool, _REQ),
            ("total_size", _opt(_u64), _SKP),
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
            ("data", _data, _REQ),
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

_EVENT_CLASSES: tuple[type, ...] = (
    RequestHeadersEvent,
    RequestBodyChunkEvent,
    ResponseHeadersEvent,
    ResponseBodyChunkEvent,
    RequestCompleteEvent,
    WebSocketFrameEvent,
    GuardrailInspectEvent,
    ConfigureEvent,
)


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


def _unpack(payload: bytes) -> Any:
    try:
        return _unpackb(payload, raw=False)
    except Exception as exc:
        raise InvalidMessage(f"invalid MessagePack payload: {exc}") from None


def _json(payload: bytes) -> Any:
    try:
        return _loads(payload)
    except _JSONDecodeError as exc:
        raise InvalidMessage(str(exc)) from None
    except TypeError as exc:
        raise InvalidMessage(f"payload is not bytes: {exc}") from None


def _guard(fn: Callable[[], Any]) -> Any:
    """Run a decoder; anything that is not already a protocol error becomes InvalidMessage."""
    try:
        return fn()
    except AgentProtocolError:
        raise
    except RecursionError:
        raise InvalidMessage("recursion limit exceeded") from None
    except Exception as exc:
        raise InvalidMessage(f"{type(exc).__name__}: {exc}") from None


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


# --------------------------------------------------------------------------------------------
# The codecs


class Codec:
    """One payload encoding (``name`` is ``"json"`` or ``"msgpack"``); use the module instances."""

    name: str = ""

    def encode_event(self, event: Event, correlation_id: str) -> bytes:
        """Proxy side: encode ``event`` with ``correlation_id`` injected at the top level."""
        raise NotImplementedError

    def decode_event(self, msg_type: int, payload: bytes) -> Event:
        """Agent side: decode an event frame's payload."""
        schema = _EVENT_SCHEMAS.get(msg_type)
        if schema is None:
            raise InvalidMessage(f"not an event message type: 0x{int(msg_type) & 0xFF:02x}")
        obj = self._load_event(payload)
        return _guard(lambda: self._finish_event(msg_type, schema, obj))  # type: ignore[no-any-return]

    def _load_event(self, payload: bytes) -> Any:
        raise NotImplementedError

    def _finish_event(self, msg_type: int, schema: _Struct, obj: Any) -> Event:
        if msg_type == MessageType.REQUEST_HEADERS and obj.__class__ is dict:
            fast = _request_headers_fast(obj)
            if fast is not None:
                return fast
        event: Event = schema.decode(obj, "$")
        return event

    def event_correlation_id(self, payload: bytes) -> str:
        """Best-effort correlation id of an event payload ("" if none); never raises."""
        try:
            obj = self._load_event(payload)
            cid = _MISSING
            if obj.__class__ is dict:
                cid = obj.get("correlation_id", _MISSING)
                if cid.__class__ is not str:
                    md = obj.get("metadata")
                    if md.__class__ is dict:
                        cid = md.get("correlation_id", _MISSING)
                    elif md.__class__ is list and md:
                        cid = md[0]
            elif obj.__class__ is list and obj:
                cid = obj[0]
            if isinstance(cid, (bytes, bytearray)):
                cid = bytes(cid).decode("utf-8")
            return str(cid) if isinstance(cid, str) else ""
        except Exception:
            return ""

    def encode_response(self, response: AgentResponse, correlation_id: str) -> bytes:
        """Agent side: encode ``response`` with ``audit.custom.correlation_id`` injected."""
        raise NotImplementedError

    def decode_response(self, payload: bytes) -> tuple[str, AgentResponse]:
        """Proxy side hot path: ``(correlation id from audit.custom, response)``."""
        raise NotImplementedError

    def encode_control(self, msg: ControlMessage) -> bytes:
        """Encode health, metrics, config update (request or response) or flow control."""
        try:
            return self._dump_control(self._control_obj(msg), isinstance(msg, HealthStatus))
        except AgentProtocolError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            raise _serialization(exc) from None

    @staticmethod
    def _control_obj(msg: ControlMessage) -> dict[str, Any]:
        if isinstance(msg, HealthStatus):
            return _health_obj(msg)
        if isinstance(msg, FlowControlSignal):
            return _flow_obj(msg)
        if isinstance(msg, MetricsReport):
            return _metrics_obj(msg)
        if isinstance(msg, ConfigUpdateRequest):
            return {
                "update_type": _update_type_obj(msg.update_type),
                "request_id": msg.request_id,
                "timestamp_ms": msg.timestamp_ms,
            }
        if isinstance(msg, ConfigUpdateResponse):
            return _config_update_response_obj(msg)
        raise Serialization(f"not a control message: {type(msg).__name__}")

    def _dump_control(self, obj: dict[str, Any], sort: bool) -> bytes:
        raise NotImplementedError

    def _load(self, payload: bytes) -> Any:
        raise NotImplementedError

    def decode_control(self, msg_type: int, payload: bytes) -> ControlMessage:
        """Decode a 0x30-0x33 payload; lenient about int vs tagged health/flow forms.

        A 0x32 payload is a ConfigUpdateRequest (agent to proxy) or, in the other direction,
        a ConfigUpdateResponse; the shape tells them apart.
        """
        obj = self._load(payload)

        def run() -> ControlMessage:
            if msg_type == MessageType.HEALTH_STATUS:
                return _decode_health(obj)
            if msg_type == MessageType.FLOW_CONTROL:
                return _decode_flow(obj)
            if msg_type == MessageType.METRICS_REPORT:
                return _METRICS.decode(obj, "$")  # type: ignore[no-any-return]
            if msg_type == MessageType.CONFIG_UPDATE_REQUEST:
                if _is_config_update_response(obj):
                    return _CONFIG_UPDATE_RESPONSE.decode(obj, "$")  # type: ignore[no-any-return]
                return _CONFIG_UPDATE.decode(obj, "$")  # type: ignore[no-any-return]
            raise InvalidMessage(f"not a control message type: 0x{int(msg_type) & 0xFF:02x}")

        return _guard(run)  # type: ignore[no-any-return]

    def decode_config_update_response(self, payload: bytes) -> ConfigUpdateResponse:
        """Decode the proxy's answer to an agent's ConfigUpdateRequest (agent side)."""
        obj = self._load(payload)
        return _guard(lambda: _CONFIG_UPDATE_RESPONSE.decode(obj, "$"))  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"<Codec {self.name}>"


class _JsonCodec(Codec):
    name = "json"

    def encode_event(self, event: Event, correlation_id: str) -> bytes:
        try:
            cls = event.__class__
            if cls is RequestHeadersEvent:
                # The proxy's hottest encode is written by the core, which checks every
                # field's type as it writes; anything it declines (a wrong type, unusual
                # values, unset slots) takes the validated generic path below.
                out = _headers_json(event, correlation_id)
                if out is not None:
                    return out
            elif cls is RequestBodyChunkEvent or cls is ResponseBodyChunkEvent:
                # Per-chunk hot path: one flat dict once the field types are checked inline.
                chunk: Any = event
                if cls is RequestBodyChunkEvent:
                    counter, count = "bytes_received", chunk.bytes_received
                else:
                    counter, count = "bytes_sent", chunk.bytes_sent
                index, total, data = chunk.chunk_index, chunk.total_size, chunk.data
                if (
                    data.__class__ is bytes
                    and chunk.is_last.__class__ is bool
                    and count.__class__ is int
                    and index.__class__ is int
                    and correlation_id.__class__ is str
                    and 0 <= count <= _U64
                    and 0 <= index <= _U32
                    and (total is None or (total.__class__ is int and 0 <= total <= _U64))
                ):
                    return _dumps(
                        {
                            counter: count,
                            "chunk_index": index,
                            "correlation_id": correlation_id,
                            "data": _b2a(data, newline=False).decode("ascii"),
                            "is_last": chunk.is_last,
                            "total_size": total,
                        },
                        option=_SORT,
                    )
            validate_event(event, correlation_id)
            return _dumps(_event_obj(event, correlation_id, False), option=_SORT)
        except AgentProtocolError:
            raise
        except (TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise _serialization(exc) from None

    def encode_event_binary_path(
        self, event: RequestBodyChunkEvent | ResponseBodyChunkEvent, correlation_id: str
    ) -> bytes:
        """Upstream's unused zero-copy body path (both counters, one of them null); for parity."""
        try:
            validate_event(event, correlation_id)
            d = _event_obj(event, correlation_id, False)
            d.setdefault("bytes_received", None)
            d.setdefault("bytes_sent", None)
            return _dumps(d, option=_SORT)
        except AgentProtocolError:
            raise
        except (TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise _serialization(exc) from None

    def _load_event(self, payload: bytes) -> Any:
        return _json(payload)

    def event_correlation_id(self, payload: bytes) -> str:
        if payload.__class__ is bytes and payload.startswith(b'{"correlation_id":"'):
            end = payload.find(b'"', 19)
            if end > 0:
                raw = payload[19:end]
                if b"\\" not in raw:
                    try:
                        return raw.decode("utf-8")
                    except UnicodeDecodeError:
                        pass
        return super().event_correlation_id(payload)

    def _load(self, payload: bytes) -> Any:
        return _json(payload)

    def encode_response(self, response: AgentResponse, correlation_id: str) -> bytes:
        try:
            return _dumps(_response_obj(response, correlation_id))
        except AgentProtocolError:
            raise
        except (TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise _serialization(exc) from None

    def decode_response(self, payload: bytes) -> tuple[str, AgentResponse]:
        # The canonical Allow reply: the id is taken out of the bytes, no parsing.
        fast = _json_allow_fast(payload)
        if fast is not None:
            return fast
        try:
            d = _loads(payload)
        except _JSONDecodeError as exc:
            raise InvalidMessage(str(exc)) from None
        except TypeError as exc:
            raise InvalidMessage(f"payload is not bytes: {exc}") from None
        if d.__class__ is not dict:
            _bad_type(d, "struct AgentResponse", "$")
        try:
            cid, resp, nk = _response_from_map(d)
        except AgentProtocolError:
            raise
        except RecursionError:
            raise InvalidMessage("recursion limit exceeded") from None
        except Exception as exc:
            raise InvalidMessage(f"{type(exc).__name__}: {exc}") from None
        raw = payload if payload.__class__ is bytes else _as_bytes(payload)
        if nk != raw.count(b":") and (nk != raw.count(b'":') or _ws_before_colon(raw)):
            _check_response_duplicates(raw)
        return cid, resp

    def _dump_control(self, obj: dict[str, Any], sort: bool) -> bytes:
        return _dumps(obj, option=_SORT) if sort else _dumps(obj)


class _MsgpackCodec(Codec):
    name = "msgpack"

    def encode_event(self, event: Event, correlation_id: str) -> bytes:
        try:
            validate_event(event, correlation_id)
            return _packb(_event_obj(event, correlation_id, True), use_bin_type=True)  # type: ignore[no-any-return]
        except AgentProtocolError:
            raise
        except (TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise _serialization(exc) from None

    def _load_event(self, payload: bytes) -> Any:
        return _unpack_events(payload)

    def _load(self, payload: bytes) -> Any:
        return _unpack(payload)

    def encode_response(self, response: AgentResponse, correlation_id: str) -> bytes:
        try:
            return _packb(_response_obj(response, correlation_id), use_bin_type=True)  # type: ignore[no-any-return]
        except AgentProtocolError:
            raise
        except (TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise _serialization(exc) from None

    def decode_response(self, payload: bytes) -> tuple[str, AgentResponse]:
        fast = _msgpack_allow_fast(payload)
        if fast is not None:
            return fast
        obj = _unpack(payload)
        try:
            if obj.__class__ is dict:
                cid, resp, _ = _response_from_map(obj)
                return cid, resp
            if obj.__class__ is list:
                resp = _RESPONSE.decode(obj, "$")
                return _response_cid(resp.audit.custom), resp
        except AgentProtocolError:
            raise
        except RecursionError:
            raise InvalidMessage("recursion limit exceeded") from None
        except Exception as exc:
            raise InvalidMessage(f"{type(exc).__name__}: {exc}") from None
        _bad_type(obj, "struct AgentResponse", "$")

    def _dump_control(self, obj: dict[str, Any], sort: bool) -> bytes:
        return _packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


JSON_CODEC: Final[Codec] = _JsonCodec()
MSGPACK_CODEC: Final[Codec] = _MsgpackCodec()
_CODECS: Final = {"json": JSON_CODEC, "msgpack": MSGPACK_CODEC}


def get_codec(name: str) -> Codec:
    """The codec for an encoding name (``"json"`` or ``"msgpack"``)."""
    key = getattr(name, "value", name)
    codec = _CODECS.get(key) if isinstance(key, str) else None
    if codec is None:
        raise InvalidMessage(f"unknown variant `{name}`, expected `json` or `msgpack`")
    return codec


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
