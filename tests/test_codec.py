"""Codec unit tests: encodings, injected ids, error messages naming the field, fast paths."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import msgpack
import orjson
import pytest

from agentpool import codec as C
from agentpool.codec import events as CE
from agentpool.codec import response as CR
from agentpool.enums import CancelReason, Encoding, EventType, FlowAction, HealthState, MessageType
from agentpool.errors import AgentProtocolError, InvalidMessage, Serialization
from agentpool.messages import (
    AgentCapabilities,
    AgentResponse,
    AuditMetadata,
    Block,
    BodyMutation,
    ConfigUpdateRequest,
    ConfigUpdateResponse,
    ConfigureEvent,
    FlowControlSignal,
    GuardrailInspectEvent,
    HandshakeRequest,
    HandshakeResponse,
    HeaderOp,
    HealthStatus,
    ListUpdate,
    RegistrationRequest,
    RegistrationResponse,
    RequestBodyChunkEvent,
    RequestCompleteEvent,
    RequestHeadersEvent,
    RequestMetadata,
    ResponseBodyChunkEvent,
    ResponseHeadersEvent,
    WebSocketClose,
    WebSocketFrameEvent,
)

CODECS = [C.JSON_CODEC, C.MSGPACK_CODEC]


def _meta(cid: str = "meta-id", **kw: Any) -> RequestMetadata:
    return RequestMetadata(
        cid, "r1", "10.0.0.5", 40000, timestamp="2026-01-01T00:00:00+00:00", **kw
    )


def _events() -> list[Any]:
    return [
        RequestHeadersEvent(_meta(), "GET", "/x", {"host": ["example.com"], "b": ["1", "2"]}),
        RequestBodyChunkEvent("c", b"\x00\xff\xfebody", False, None, 1, 7),
        ResponseHeadersEvent("c", 200, {"content-type": ["text/html"]}),
        ResponseBodyChunkEvent("c", b"resp", True, 4, 0, 4),
        RequestCompleteEvent("c", 504, 30000, 1, 2, 3, "timeout"),
        WebSocketFrameEvent("c", "binary", b"\x01\x02", False, 9, True, None, "10.0.0.5"),
        GuardrailInspectEvent("c", "prompt_injection", "hi", model="m", metadata={"t": "x"}),
        ConfigureEvent({"b": 1, "a": [1, {"z": None, "y": 2}]}, "v1"),
    ]


# --------------------------------------------------------------------------------------------
# get_codec


def test_get_codec() -> None:
    assert C.get_codec("json") is C.JSON_CODEC
    assert C.get_codec("msgpack") is C.MSGPACK_CODEC
    assert C.get_codec(Encoding.MSGPACK) is C.MSGPACK_CODEC
    assert C.JSON_CODEC.name == "json" and C.MSGPACK_CODEC.name == "msgpack"
    with pytest.raises(InvalidMessage, match="unknown variant `cbor`"):
        C.get_codec("cbor")
    with pytest.raises(InvalidMessage):
        C.get_codec(None)  # type: ignore[arg-type]
    assert "json" in repr(C.JSON_CODEC)


# --------------------------------------------------------------------------------------------
# Events, proxy side


@pytest.mark.parametrize("event", _events(), ids=lambda e: type(e).__name__)
def test_json_event_sorted_and_injected(event: Any) -> None:
    payload = C.JSON_CODEC.encode_event(event, "inj-1")
    # sorted keys at every level, compact, exactly one correlation_id at the top
    doc = json.loads(payload)
    assert (
        payload
        == json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )
    assert doc["correlation_id"] == "inj-1"
    pairs = json.loads(payload, object_pairs_hook=lambda p: p)
    assert [k for k, _ in pairs].count("correlation_id") == 1
    if isinstance(event, RequestHeadersEvent):
        assert doc["metadata"]["correlation_id"] == "inj-1"
        assert event.metadata.correlation_id == "meta-id"  # the caller's object is untouched
        assert "traceparent" not in doc["metadata"]
    if isinstance(event, (RequestBodyChunkEvent, ResponseBodyChunkEvent, WebSocketFrameEvent)):
        assert base64.b64decode(doc["data"], validate=True) == event.data
    decoded = C.JSON_CODEC.decode_event(event.MESSAGE_TYPE, payload)
    assert decoded.correlation_id == "inj-1"


@pytest.mark.parametrize("event", _events(), ids=lambda e: type(e).__name__)
def test_msgpack_event_named_maps_raw_bin(event: Any) -> None:
    payload = C.MSGPACK_CODEC.encode_event(event, "inj-1")
    seen: list[list[Any]] = []

    def hook(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), keys  # never a duplicate key
        seen.append(keys)
        return dict(pairs)

    doc = msgpack.unpackb(payload, raw=False, object_pairs_hook=hook)
    assert isinstance(doc, dict)
    assert doc["correlation_id"] == "inj-1"
    if isinstance(event, RequestHeadersEvent):
        assert isinstance(doc["metadata"], dict)  # named, not positional
        assert doc["metadata"]["correlation_id"] == "inj-1"
        assert "traceparent" not in doc["metadata"]
    if "data" in doc:
        assert isinstance(doc["data"], bytes) and doc["data"] == event.data
    decoded = C.MSGPACK_CODEC.decode_event(event.MESSAGE_TYPE, payload)
    assert decoded.correlation_id == "inj-1"


def test_traceparent_only_when_present() -> None:
    ev = RequestHeadersEvent(_meta(traceparent="00-abc-def-01"), "GET", "/", {})
    assert json.loads(C.JSON_CODEC.encode_event(ev, "c"))["metadata"]["traceparent"] == (
        "00-abc-def-01"
    )
    doc = msgpack.unpackb(C.MSGPACK_CODEC.encode_event(ev, "c"))
    assert doc["metadata"]["traceparent"] == "00-abc-def-01"


def test_guardrail_skips_absent_model_and_route() -> None:
    ev = GuardrailInspectEvent("c", "pii_detection", "x")
    doc = json.loads(C.JSON_CODEC.encode_event(ev, "c"))
    assert "model" not in doc and "route_id" not in doc
    assert doc["categories"] == [] and doc["metadata"] == {}


def test_configure_config_sorted_deeply() -> None:
    payload = C.JSON_CODEC.encode_event(ConfigureEvent({"z": {"b": 1, "a": 2}, "a": 0}, "v"), "k")
    assert payload == (
        b'{"config":{"a":0,"z":{"a":2,"b":1}},"config_version":"v","correlation_id":"k"}'
    )


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_encode_event_errors_are_serialization(codec: C.Codec) -> None:
    with pytest.raises(Serialization):
        codec.encode_event(object(), "c")  # type: ignore[arg-type]
    if codec is C.JSON_CODEC:
        bad = RequestHeadersEvent(_meta(), "GET", "/", {1: ["x"]})  # type: ignore[dict-item]
        with pytest.raises(Serialization):
            codec.encode_event(bad, "c")
    with pytest.raises(Serialization):
        codec.encode_event(RequestBodyChunkEvent("c", "not bytes", True), "c")  # type: ignore[arg-type]


def test_event_subclass_encodes_like_base() -> None:
    class MyChunk(RequestBodyChunkEvent):
        pass

    ev = MyChunk("c", b"ab", True)
    base = RequestBodyChunkEvent("c", b"ab", True)
    assert C.JSON_CODEC.encode_event(ev, "x") == C.JSON_CODEC.encode_event(base, "x")


# --------------------------------------------------------------------------------------------
# Events, agent side


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_decode_event_round_trip(codec: C.Codec) -> None:
    for ev in _events():
        cid = ev.correlation_id
        out = codec.decode_event(ev.MESSAGE_TYPE, codec.encode_event(ev, cid))
        assert out == ev


@pytest.mark.parametrize(
    ("msg_type", "payload", "field", "text"),
    [
        (0x11, {"data": "", "is_last": True}, "correlation_id", "missing field `correlation_id`"),
        (0x11, {"correlation_id": "c", "is_last": True}, "data", "missing field `data`"),
        (0x11, {"correlation_id": "c", "data": "", "is_last": 1}, "is_last", "expected a boolean"),
        (0x12, {"correlation_id": "c", "status": 70000, "headers": {}}, "status", "expected u16"),
        (
            0x12,
            {"correlation_id": "c", "status": 200, "headers": {"a": "x"}},
            "headers.a",
            "string",
        ),
        (
            0x16,
            {"correlation_id": "c", "inspection_type": "x", "content": ""},
            "inspection_type",
            "unknown variant `x`",
        ),
        (
            0x10,
            {"correlation_id": "c", "method": "GET", "uri": "/", "headers": {}},
            "metadata",
            "missing field `metadata`",
        ),
        (
            0x10,
            {"metadata": {"correlation_id": "c"}, "method": "GET", "uri": "/", "headers": {}},
            "metadata.request_id",
            "missing field `request_id` at `metadata`",
        ),
    ],
)
def test_decode_event_errors_name_the_field(
    msg_type: int, payload: dict[str, Any], field: str, text: str
) -> None:
    with pytest.raises(InvalidMessage) as info:
        C.JSON_CODEC.decode_event(msg_type, orjson.dumps(payload))
    assert info.value.field == field
    assert text in str(info.value)


def test_decode_event_unknown_type() -> None:
    with pytest.raises(InvalidMessage, match="not an event message type: 0x20"):
        C.JSON_CODEC.decode_event(0x20, b"{}")


def test_body_data_base64_fallback_to_utf8() -> None:
    payload = orjson.dumps({"correlation_id": "c", "data": "not base64!", "is_last": True})
    ev = C.JSON_CODEC.decode_event(0x11, payload)
    assert isinstance(ev, RequestBodyChunkEvent) and ev.data == b"not base64!"


def test_configure_event_lenient_defaults() -> None:
    ev = C.JSON_CODEC.decode_event(0x17, b"{}")
    assert ev == ConfigureEvent(None, None, "")


def test_event_correlation_id_best_effort() -> None:
    js = C.JSON_CODEC
    assert js.event_correlation_id(b'{"correlation_id":"a","x":1}') == "a"
    assert js.event_correlation_id(b'{"metadata":{"correlation_id":"m"}}') == "m"
    assert js.event_correlation_id(b'{"correlation_id":5}') == ""
    assert js.event_correlation_id(b"\xff garbage") == ""
    assert js.event_correlation_id(b"[1,2]") == ""
    mp = C.MSGPACK_CODEC
    assert mp.event_correlation_id(msgpack.packb({"metadata": ["m", "r"]})) == "m"
    assert mp.event_correlation_id(msgpack.packb(["pos-id", b"x", True])) == "pos-id"
    assert mp.event_correlation_id(b"\xc1") == ""
    assert mp.event_correlation_id(b"") == ""


# --------------------------------------------------------------------------------------------
# AgentResponse


def test_encode_response_struct_order_and_injection() -> None:
    resp = AgentResponse(audit=AuditMetadata(custom={"score": 5, "correlation_id": "stale"}))
    payload = C.JSON_CODEC.encode_response(resp, "c9")
    doc = json.loads(payload)
    assert list(doc) == [
        "version",
        "decision",
        "request_headers",
        "response_headers",
        "routing_metadata",
        "audit",
        "needs_more",
        "request_body_mutation",
        "response_body_mutation",
        "websocket_decision",
    ]
    assert list(doc["audit"]) == ["tags", "rule_ids", "confidence", "reason_codes", "custom"]
    assert doc["audit"]["custom"] == {"correlation_id": "c9", "score": 5}
    assert "fail_open" not in doc
    assert resp.audit.custom["correlation_id"] == "stale"  # caller's object untouched


def test_encode_response_f32_confidence() -> None:
    payload = C.JSON_CODEC.encode_response(
        AgentResponse(audit=AuditMetadata(confidence=0.949999988079071)), "c"
    )
    assert b'"confidence":0.95,' in payload
    assert C.f32_shortest(0.1) == 0.1
    assert C.f32_shortest(1e40) == math.inf
    assert math.isnan(C.f32_shortest(math.nan))


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_response_round_trip_all_shapes(codec: C.Codec) -> None:
    responses = [
        AgentResponse(),
        AgentResponse.block(),
        AgentResponse(decision=Block(451, "legal", {"x-a": "1"})),
        AgentResponse.redirect("https://e/", 307),
        AgentResponse.challenge("captcha", {"site": "k"}),
        AgentResponse(
            request_headers=[HeaderOp.set("a", "1"), HeaderOp.remove("b")],
            response_headers=[HeaderOp.add("c", "2")],
            routing_metadata={"k": "v"},
            audit=AuditMetadata(["t"], ["r"], 0.5, ["RC"], {"n": [1, {"x": None}]}),
            needs_more=True,
            request_body_mutation=BodyMutation.replace(1, "x"),
            response_body_mutation=BodyMutation.drop_chunk(2),
            websocket_decision=WebSocketClose(1000, "bye"),
        ),
        AgentResponse.websocket_drop(),
    ]
    for resp in responses:
        cid, back = codec.decode_response(codec.encode_response(resp, "id-1"))
        assert cid == "id-1"
        resp.audit.custom = {"correlation_id": "id-1", **resp.audit.custom}
        assert back == resp


def _resp(**over: Any) -> bytes:
    doc: dict[str, Any] = {
        "version": 2,
        "decision": "allow",
        "audit": {"custom": {"correlation_id": "c1"}},
    }
    doc.update(over)
    return orjson.dumps(doc)


@pytest.mark.parametrize(
    ("payload", "field", "text"),
    [
        (b'{"decision":"allow"}', "version", "missing field `version`"),
        (b'{"version":2}', "decision", "missing field `decision`"),
        (_resp(version=-1), "version", "expected u32"),
        (_resp(version=True), "version", "invalid type: boolean `true`, expected u32"),
        (_resp(version="2"), "version", 'invalid type: string "2"'),
        (_resp(decision="Allow"), "decision", "unknown variant `Allow`"),
        (_resp(decision="block"), "decision", "struct variant"),
        (_resp(decision={"allow": None, "block": {}}), "decision", "map with 2 entries"),
        (_resp(decision={"block": {}}), "decision.block.status", "missing field `status`"),
        (
            _resp(decision={"block": {"status": 403.0}}),
            "decision.block.status",
            "floating point `403.0`",
        ),
        (
            _resp(decision={"block": {"status": 403, "headers": {"a": 1}}}),
            "decision.block.headers.a",
            "integer `1`",
        ),
        (_resp(decision={"redirect": {"url": "x"}}), "decision.redirect.status", "missing field"),
        (
            _resp(decision={"challenge": {"challenge_type": "c"}}),
            "decision.challenge.params",
            "missing field `params`",
        ),
        (_resp(decision={"allow": 1}), "decision.allow", "expected unit variant"),
        (_resp(decision=5), "decision", "expected enum Decision"),
        (_resp(request_headers=None), "request_headers", "invalid type: null"),
        (
            _resp(request_headers=[{"replace": {"name": "a"}}]),
            "request_headers",
            "unknown variant `replace`",
        ),
        (
            _resp(response_headers=[{"set": {"name": "a"}}]),
            "response_headers.set.value",
            "missing field `value`",
        ),
        (_resp(routing_metadata={"a": None}), "routing_metadata.a", "null"),
        (_resp(audit=None), "audit", "invalid type: null"),
        (_resp(audit={"tags": "x"}), "audit.tags", "expected a sequence"),
        (_resp(audit={"tags": [1]}), "audit.tags", "integer `1`"),
        (_resp(audit={"confidence": "high"}), "audit.confidence", "expected f64"),
        (_resp(audit={"custom": []}), "audit.custom", "expected a map"),
        (_resp(needs_more=None), "needs_more", "null"),
        (_resp(needs_more=0), "needs_more", "expected a boolean"),
        (
            _resp(request_body_mutation={"chunk_index": -1}),
            "request_body_mutation.chunk_index",
            "expected u32",
        ),
        (_resp(response_body_mutation={"data": 5}), "response_body_mutation.data", "string"),
        (_resp(websocket_decision="close"), "websocket_decision", "struct variant"),
        (_resp(websocket_decision="reject"), "websocket_decision", "unknown variant `reject`"),
        (
            _resp(websocket_decision={"close": {"code": 1000}}),
            "websocket_decision.close.reason",
            "missing field `reason`",
        ),
        (b"[1,2]", "$", "expected struct AgentResponse"),
        (b"2", "$", "expected struct AgentResponse"),
    ],
)
def test_decode_response_errors_name_the_field(payload: bytes, field: str, text: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        C.JSON_CODEC.decode_response(payload)
    assert info.value.field == field
    assert text in str(info.value)
    assert str(info.value).startswith("Invalid message format: ")


@pytest.mark.parametrize(
    "payload",
    [b"", b"{", b"nul", b"\xff\xfe", b'{"version":2,', b"{}" * 3],
)
def test_decode_response_malformed_json(payload: bytes) -> None:
    with pytest.raises(InvalidMessage):
        C.JSON_CODEC.decode_response(payload)


def test_decode_response_unknown_fields_ignored_and_non_str_cid() -> None:
    cid, resp = C.JSON_CODEC.decode_response(
        _resp(extra={"deep": [{"a": 1}]}, audit={"custom": {"correlation_id": 7}, "x": {"y": 1}})
    )
    assert cid == "" and resp.decision.__class__.__name__ == "Allow"
    cid, _ = C.JSON_CODEC.decode_response(_resp(audit={}))
    assert cid == ""
    cid, _ = C.JSON_CODEC.decode_response(b'{"version":1,"decision":"allow"}')
    assert cid == ""


# Duplicate keys: serde rejects duplicate struct fields; HashMap fields keep the last value.
@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b'{"version":2,"version":2,"decision":"allow"}', "version"),
        (b'{"version":2,"decision":"allow","decision":"allow"}', "decision"),
        (b'{"version":2,"decision":"allow","audit":{"tags":[],"tags":[]}}', "audit.tags"),
        (
            b'{"version":2,"decision":{"block":{"status":403,"status":404}}}',
            "decision.block.status",
        ),
        (b'{"version":2,"decision":{"block":{"status":1},"block":{"status":2}}}', "decision.block"),
        (
            b'{"version":2,"decision":"allow","request_headers":[{"set":{"name":"a","name":"b",'
            b'"value":"v"}}]}',
            "request_headers.set.name",
        ),
        (b'{"version":2,"decision":"allow","needs_more":false,"needs_more":true}', "needs_more"),
        (
            b'{"version":2,"decision":"allow","request_body_mutation":{"data":null,"data":null}}',
            "request_body_mutation.data",
        ),
        (
            b'{"version":2,"decision":"allow","websocket_decision":{"close":{"code":1,"code":2,'
            b'"reason":""}}}',
            "websocket_decision.close.code",
        ),
        # an escaped spelling of the same key is still the same key
        (b'{"version":2,"vers\\u0069on":2,"decision":"allow"}', "version"),
    ],
)
def test_duplicate_struct_fields_rejected(payload: bytes, field: str) -> None:
    with pytest.raises(InvalidMessage, match="duplicate field") as info:
        C.JSON_CODEC.decode_response(payload)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("payload", "expect_cid"),
    [
        (
            b'{"version":2,"decision":"allow","audit":{"custom":{"correlation_id":"a",'
            b'"correlation_id":"b"}}}',
            "b",
        ),
        (
            b'{"version":2,"decision":"allow","routing_metadata":{"k":"1","k":"2"},'
            b'"audit":{"custom":{"correlation_id":"c"}}}',
            "c",
        ),
        (
            b'{"version":2,"decision":"allow","unknown":{"a":1,"a":2},'
            b'"audit":{"custom":{"correlation_id":"c"}}}',
            "c",
        ),
        # key markers inside strings must not confuse the duplicate check
        (
            b'{"version":2,"decision":{"block":{"status":403,"body":"{\\"a\\":1}","headers":null}},'
            b'"audit":{"custom":{"correlation_id":"c","note":"x\\":y"}}}',
            "c",
        ),
    ],
)
def test_duplicate_map_keys_last_wins(payload: bytes, expect_cid: str) -> None:
    cid, resp = C.JSON_CODEC.decode_response(payload)
    assert cid == expect_cid
    if b"routing_metadata" in payload:
        assert resp.routing_metadata == {"k": "2"}


@pytest.mark.parametrize(
    "cid", ["7Rv2cW9kP11", "", "3f0b2c1e-8d4a-4b7e-9c2f-6a1d5e8b7c90", "a b", "é", 'q"uote', "\\"]
)
@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_allow_fast_path_matches_generic(codec: C.Codec, cid: str) -> None:
    payload = codec.encode_response(AgentResponse(), cid)
    got = codec.decode_response(payload)
    assert got == (cid, AgentResponse(audit=AuditMetadata(custom={"correlation_id": cid})))
    # the generic decoder agrees
    if codec is C.JSON_CODEC:
        d = orjson.loads(payload)
    else:
        d = msgpack.unpackb(payload, raw=False)
    c2, r2, _ = CR._response_from_map(d)
    assert (c2, r2) == got
    # responses are independent objects
    got[1].request_headers.append(HeaderOp.set("a", "b"))
    assert codec.decode_response(payload)[1].request_headers == []


def test_msgpack_positional_allow_fast_path() -> None:
    arr = [
        2,
        "allow",
        [],
        [],
        {},
        [[], [], None, [], {"correlation_id": "cc"}],
        False,
        None,
        None,
        None,
    ]
    payload = msgpack.packb(arr)
    assert C.MSGPACK_CODEC.decode_response(payload) == (
        "cc",
        AgentResponse(audit=AuditMetadata(custom={"correlation_id": "cc"})),
    )
    # a near miss (needs_more true) goes through the schema decoder
    arr[6] = True
    cid, resp = C.MSGPACK_CODEC.decode_response(msgpack.packb(arr))
    assert cid == "cc" and resp.needs_more


def test_msgpack_response_tolerance() -> None:
    # strings as bin, named/positional mix, last-wins duplicates
    doc = {
        "version": 2,
        "decision": {"block": [403, b"body", None]},
        "audit": [[], [], 0.5, [], {"correlation_id": b"bin-id"}],
    }
    cid, resp = C.MSGPACK_CODEC.decode_response(msgpack.packb(doc, use_bin_type=True))
    assert resp.decision == Block(403, "body")
    assert resp.audit.confidence == 0.5
    assert cid == "bin-id"
    with pytest.raises(InvalidMessage):
        C.MSGPACK_CODEC.decode_response(
            msgpack.packb({"version": 2, "decision": {"block": [b"\xff"]}})
        )
    with pytest.raises(InvalidMessage, match="invalid MessagePack payload"):
        C.MSGPACK_CODEC.decode_response(b"\xc1")
    with pytest.raises(InvalidMessage, match="expected struct AgentResponse"):
        C.MSGPACK_CODEC.decode_response(msgpack.packb("allow"))


# --------------------------------------------------------------------------------------------
# Control messages


def test_health_int_form_bytes() -> None:
    h = HealthStatus("a", HealthState.DEGRADED, timestamp_ms=1)
    assert C.JSON_CODEC.encode_control(h) == b'{"agent_id":"a","state":2,"timestamp_ms":1}'
    full = HealthStatus(
        "a", HealthState.UNHEALTHY, "m", 5, unhealthy_reason="db", recoverable=False
    )
    doc = json.loads(C.JSON_CODEC.encode_control(full))
    assert doc["state"] == 4 and doc["message"] == "m" and doc["unhealthy_reason"] == "db"
    assert list(doc) == sorted(doc)
    assert C.JSON_CODEC.decode_control(0x30, C.JSON_CODEC.encode_control(full)) == full


def test_health_state_errors() -> None:
    with pytest.raises(InvalidMessage, match="health state") as info:
        C.JSON_CODEC.decode_control(0x30, b'{"state":9}')
    assert info.value.field == "state"
    with pytest.raises(InvalidMessage, match="unknown variant `sleepy`"):
        C.JSON_CODEC.decode_control(0x30, b'{"state":{"status":"sleepy"}}')
    with pytest.raises(InvalidMessage, match="missing field `status`"):
        C.JSON_CODEC.decode_control(0x30, b'{"state":{}}')
    with pytest.raises(InvalidMessage, match="missing field `reason`"):
        C.JSON_CODEC.decode_control(0x30, b'{"state":{"status":"unhealthy"}}')


def test_flow_forms() -> None:
    dec = C.JSON_CODEC.decode_control
    assert dec(0x33, b'{"action":1}') == FlowControlSignal(FlowAction.PAUSE)
    assert dec(0x33, b'{"action":2}') == FlowControlSignal(FlowAction.RESUME)
    assert dec(0x33, b'{"action":7}') == FlowControlSignal(FlowAction.RESUME)
    assert dec(0x33, b"{}") == FlowControlSignal(FlowAction.RESUME)
    assert dec(0x33, b'{"action":{"type":"pause"},"correlation_id":"c"}') == FlowControlSignal(
        FlowAction.PAUSE, "c"
    )
    with pytest.raises(InvalidMessage, match="missing field `buffer_available`"):
        dec(0x33, b'{"action":{"type":"update_capacity"}}')
    with pytest.raises(InvalidMessage, match="unknown variant `stop`"):
        dec(0x33, b'{"action":{"type":"stop"}}')
    assert C.JSON_CODEC.encode_control(FlowControlSignal(FlowAction.PAUSE)) == b'{"action":1}'
    assert C.JSON_CODEC.encode_control(FlowControlSignal(FlowAction.RESUME, "c", 9)) == (
        b'{"action":2,"correlation_id":"c","timestamp_ms":9}'
    )


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_config_update_response_on_0x32(codec: C.Codec) -> None:
    resp = ConfigUpdateResponse("push-1", False, "nope", 12)
    payload = codec.encode_control(resp)
    assert codec.decode_control(MessageType.CONFIG_UPDATE_REQUEST, payload) == resp
    assert codec.decode_config_update_response(payload) == resp
    if codec is C.JSON_CODEC:
        assert (
            payload == b'{"request_id":"push-1","accepted":false,"error":"nope","timestamp_ms":12}'
        )
    req = ConfigUpdateRequest(ListUpdate("l", ["a"], []), "r", 3)
    assert codec.decode_control(0x32, codec.encode_control(req)) == req


def test_control_errors() -> None:
    with pytest.raises(InvalidMessage, match="not a control message type"):
        C.JSON_CODEC.decode_control(0x20, b"{}")
    with pytest.raises(Serialization):
        C.JSON_CODEC.encode_control(object())  # type: ignore[arg-type]
    with pytest.raises(InvalidMessage) as info:
        C.JSON_CODEC.decode_control(0x31, b'{"agent_id":"a","timestamp_ms":1}')
    assert info.value.field == "interval_ms"
    with pytest.raises(InvalidMessage) as info:
        C.JSON_CODEC.decode_control(
            0x32, b'{"update_type":{"type":"boom"},"request_id":"r","timestamp_ms":1}'
        )
    assert info.value.field == "update_type"
    with pytest.raises(InvalidMessage) as info:
        C.JSON_CODEC.decode_control(
            0x31,
            b'{"agent_id":"a","timestamp_ms":1,"interval_ms":1,"histograms":[{"name":"h",'
            b'"sum":1,"count":1,"buckets":[{"le":"lots","count":1}]}]}',
        )
    assert info.value.field == "histograms.buckets.le"


# --------------------------------------------------------------------------------------------
# Always-JSON messages


def test_handshake_request_round_trip_and_layout() -> None:
    req = HandshakeRequest(
        proxy_version="9.9",
        config={"b": 1, "a": {"d": 1, "c": 2}},
        supported_encodings=["msgpack", "json"],
    )
    payload = C.encode_handshake_request(req)
    assert payload == (
        b'{"supported_versions":[2],"proxy_id":"zentinel-proxy","proxy_version":"9.9",'
        b'"config":{"a":{"c":2,"d":1},"b":1},"supported_encodings":["msgpack","json"]}'
    )
    assert C.decode_handshake_request(payload) == req
    enc_enum = HandshakeRequest(supported_encodings=[Encoding.JSON])  # type: ignore[list-item]
    assert b'"supported_encodings":["json"]' in C.encode_handshake_request(enc_enum)
    with pytest.raises(InvalidMessage, match="unknown variant `cbor`") as info:
        C.decode_handshake_request(
            b'{"supported_versions":[2],"proxy_id":"p","proxy_version":"1",'
            b'"supported_encodings":["cbor"]}'
        )
    assert info.value.field == "supported_encodings"
    with pytest.raises(InvalidMessage, match="missing field `proxy_id`"):
        C.decode_handshake_request(b'{"supported_versions":[2]}')


def test_handshake_response_round_trip() -> None:
    caps = AgentCapabilities(
        "a", "A", "1", [EventType.CONFIGURE, EventType.GUARDRAIL_INSPECT], protocol_version=2
    )
    resp = HandshakeResponse(2, caps, True, None, "msgpack")
    payload = C.encode_handshake_response(resp)
    assert b'"supported_events":[8,7]' in payload
    assert C.decode_handshake_response(payload) == resp
    with pytest.raises(InvalidMessage):
        C.decode_handshake_response(b"not json")


def test_registration_round_trip() -> None:
    caps = AgentCapabilities("waf", "WAF", "2")
    req = RegistrationRequest(2, "waf", caps, "tok", {"z": 1, "a": [1]})
    payload = C.encode_registration_request(req)
    assert payload.startswith(b'{"protocol_version":2,"agent_id":"waf","capabilities":{')
    assert payload.endswith(b'"auth_token":"tok","metadata":{"a":[1],"z":1}}')
    assert C.decode_registration_request(payload) == req
    resp = RegistrationResponse(False, "Invalid message format: x", "zentinel-proxy", "0.1", "")
    payload = C.encode_registration_response(resp)
    assert payload == (
        b'{"success":false,"error":"Invalid message format: x","proxy_id":"zentinel-proxy",'
        b'"proxy_version":"0.1","connection_id":""}'
    )
    assert C.decode_registration_response(payload) == resp
    with pytest.raises(InvalidMessage) as info:
        C.decode_registration_request(b'{"protocol_version":2,"agent_id":"a"}')
    assert info.value.field == "capabilities"


def test_cancel_and_ping() -> None:
    assert C.encode_cancel("c1", CancelReason.TIMEOUT, 1767225600000) == (
        b'{"correlation_id":"c1","reason":1,"timestamp_ms":1767225600000}'
    )
    assert C.encode_ping(0, 1767225600000) == b'{"sequence":0,"timestamp_ms":1767225600000}'
    assert C.decode_cancel(C.encode_cancel("c", 5, 1)).reason is CancelReason.MANUAL
    with pytest.raises(InvalidMessage, match="cancel reason") as info:
        C.decode_cancel(b'{"correlation_id":"c","reason":6}')
    assert info.value.field == "reason"
    with pytest.raises(InvalidMessage, match="missing field `sequence`"):
        C.decode_ping(b"{}")
    with pytest.raises(InvalidMessage):
        C.decode_ping(b"")
    with pytest.raises(Serialization):
        C.encode_handshake_request(HandshakeRequest(config=object()))


def test_only_protocol_errors_escape_on_odd_inputs() -> None:
    odd: list[Any] = [
        b"{}",
        b"[]",
        b"null",
        b'"x"',
        b"1e400",
        b"[" * 5000 + b"]" * 5000,
        msgpack.packb({"a": [1] * 3}),
        msgpack.packb([[[]]]),
        b"\x92\x01",
    ]
    for payload in odd:
        for fn in (
            C.JSON_CODEC.decode_response,
            C.MSGPACK_CODEC.decode_response,
            lambda p: C.JSON_CODEC.decode_event(0x10, p),
            lambda p: C.MSGPACK_CODEC.decode_event(0x11, p),
            lambda p: C.MSGPACK_CODEC.decode_control(0x30, p),
            lambda p: C.JSON_CODEC.decode_control(0x31, p),
            C.decode_handshake_response,
        ):
            try:
                fn(payload)
            except AgentProtocolError:
                pass


@pytest.mark.parametrize(
    "payload",
    [
        b'{"version" :2,"version":2,"decision":"allow"}',
        b'{"version"\n:2,"version":2,"decision":"allow"}',
        b'{"version":2,"version" : 2,"decision":"allow","audit":{"custom":{"x":"a:b"}}}',
        b'{ "version": 2, "decision": "allow", "version": 2 }',
    ],
)
def test_duplicate_detection_with_whitespace(payload: bytes) -> None:
    with pytest.raises(InvalidMessage, match="duplicate field `version`"):
        C.JSON_CODEC.decode_response(payload)


def test_non_bytes_payloads() -> None:
    payload = C.JSON_CODEC.encode_response(AgentResponse.block(), "c")
    for variant in (bytearray(payload), memoryview(payload), payload.decode()):
        assert C.JSON_CODEC.decode_response(variant)[0] == "c"  # type: ignore[arg-type]
    mp = C.MSGPACK_CODEC.encode_response(AgentResponse(), "c")
    assert C.MSGPACK_CODEC.decode_response(bytearray(mp))[0] == "c"  # type: ignore[arg-type]
    with pytest.raises(InvalidMessage):
        C.JSON_CODEC.decode_response(12)  # type: ignore[arg-type]


@pytest.mark.parametrize("cid", ["plain", 'q"uote', "back\\slash", "é", ""])
@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_event_correlation_id_matches_decode(codec: C.Codec, cid: str) -> None:
    for ev in _events():
        payload = codec.encode_event(ev, cid)
        assert codec.event_correlation_id(payload) == cid
        assert codec.decode_event(ev.MESSAGE_TYPE, payload).correlation_id == cid


def test_request_headers_fast_and_schema_paths_agree() -> None:
    ev = RequestHeadersEvent(_meta(traceparent="tp"), "GET", "/", {"a": ["1"], "b": []})
    doc = orjson.loads(C.JSON_CODEC.encode_event(ev, "meta-id"))
    fast = CE._request_headers_fast(doc)
    slow = CE._EVENT_SCHEMAS[0x10].decode(doc, "$")
    assert fast == slow == ev
    doc["metadata"]["client_port"] = 70000
    assert CE._request_headers_fast(doc) is None
    with pytest.raises(InvalidMessage) as info:
        C.JSON_CODEC.decode_event(0x10, orjson.dumps(doc))
    assert info.value.field == "metadata.client_port"
