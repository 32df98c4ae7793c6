"""Decisions and AgentResponse: schemas, the fast decoder, the encoder, byte templates.

AgentResponse is the message of every round trip, so besides its schema (which decodes the
shapes the fast paths decline and produces the error messages) it has hand-written paths:
the map decoder, the encoder and the canonical-Allow byte templates the core matches.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final

import msgpack
import orjson

from .._impl import core
from ..errors import InvalidMessage, Serialization
from ..messages import RESPONSE_WIRE_FIELDS as _RESPONSE_WIRE_FIELDS
from ..messages import (
    AgentResponse,
    Allow,
    AuditMetadata,
    Block,
    BodyMutation,
    Challenge,
    Decision,
    HeaderOp,
    Redirect,
    WebSocketClose,
    WebSocketDecision,
)
from .schema import (
    _DEF,
    _MISSING,
    _OPT,
    _REQ,
    _U16,
    _U32,
    _bad_type,
    _bool,
    _f32,
    _list,
    _list_str,
    _map_any,
    _map_str,
    _missing,
    _opt,
    _str,
    _Struct,
    _u16,
    _u32,
    _unknown_variant,
    _variant,
    f32_shortest,
)

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
