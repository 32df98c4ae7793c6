"""Property tests: encode -> decode is the identity in both encodings; garbage only ever
raises AgentProtocolError subclasses."""

from __future__ import annotations

import json
import math
from typing import Any

import msgpack
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentpool import codec as C
from agentpool.codec import response as CR
from agentpool.enums import CancelReason, EventType, FlowAction, HealthState
from agentpool.errors import AgentProtocolError
from agentpool.messages import (
    AgentCapabilities,
    AgentFeatures,
    AgentLimits,
    AgentResponse,
    Allow,
    AuditMetadata,
    Block,
    BodyMutation,
    Challenge,
    ConfigError,
    ConfigUpdateRequest,
    ConfigUpdateResponse,
    ConfigureEvent,
    CounterMetric,
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
    WebSocketFrameEvent,
)

SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
CODECS = [C.JSON_CODEC, C.MSGPACK_CODEC]

text = st.text(max_size=12)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
opt_text = st.none() | text
f64 = st.floats(allow_nan=False, allow_infinity=False)
f32 = st.floats(width=32, allow_nan=False, allow_infinity=False).map(C.f32_shortest)
str_map = st.dictionaries(text, text, max_size=3)
headers = st.dictionaries(text, st.lists(text, max_size=3), max_size=4)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | f64 | text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(text, children, max_size=3),
    max_leaves=8,
)

metadata = st.builds(
    RequestMetadata,
    correlation_id=text,
    request_id=text,
    client_ip=text,
    client_port=u16,
    server_name=opt_text,
    protocol=text,
    tls_version=opt_text,
    tls_cipher=opt_text,
    route_id=opt_text,
    upstream_id=opt_text,
    timestamp=text,
    traceparent=opt_text,
)
events = st.one_of(
    st.builds(RequestHeadersEvent, metadata=metadata, method=text, uri=text, headers=headers),
    st.builds(
        RequestBodyChunkEvent,
        correlation_id=text,
        data=st.binary(max_size=40),
        is_last=st.booleans(),
        total_size=st.none() | u64,
        chunk_index=u32,
        bytes_received=u64,
    ),
    st.builds(ResponseHeadersEvent, correlation_id=text, status=u16, headers=headers),
    st.builds(
        ResponseBodyChunkEvent,
        correlation_id=text,
        data=st.binary(max_size=40),
        is_last=st.booleans(),
        total_size=st.none() | u64,
        chunk_index=u32,
        bytes_sent=u64,
    ),
    st.builds(
        RequestCompleteEvent,
        correlation_id=text,
        status=u16,
        duration_ms=u64,
        request_body_size=u64,
        response_body_size=u64,
        upstream_attempts=u32,
        error=opt_text,
    ),
    st.builds(
        WebSocketFrameEvent,
        correlation_id=text,
        opcode=st.sampled_from(["text", "binary", "close", "ping", "pong", "continuation"]),
        data=st.binary(max_size=40),
        client_to_server=st.booleans(),
        frame_index=u64,
        fin=st.booleans(),
        route_id=opt_text,
        client_ip=text,
    ),
    st.builds(
        GuardrailInspectEvent,
        correlation_id=text,
        inspection_type=st.sampled_from(["prompt_injection", "pii_detection"]),
        content=text,
        model=opt_text,
        categories=st.lists(text, max_size=3),
        route_id=opt_text,
        metadata=str_map,
    ),
    st.builds(ConfigureEvent, config=json_value, config_version=opt_text, correlation_id=text),
)

header_op = st.one_of(
    st.builds(HeaderOp.set, text, text),
    st.builds(HeaderOp.add, text, text),
    st.builds(HeaderOp.remove, text),
)
decisions = st.one_of(
    st.just(Allow()),
    st.builds(Block, status=u16, body=opt_text, headers=st.none() | str_map),
    st.builds(Redirect, url=text, status=u16),
    st.builds(Challenge, challenge_type=text, params=str_map),
)
mutation = st.none() | st.builds(BodyMutation, data=opt_text, chunk_index=u32)
custom = st.dictionaries(text.filter(lambda k: k != "correlation_id"), json_value, max_size=3)
responses = st.builds(
    AgentResponse,
    version=u32,
    decision=decisions,
    request_headers=st.lists(header_op, max_size=3),
    response_headers=st.lists(header_op, max_size=3),
    routing_metadata=str_map,
    audit=st.builds(
        AuditMetadata,
        tags=st.lists(text, max_size=3),
        rule_ids=st.lists(text, max_size=3),
        confidence=st.none() | f32,
        reason_codes=st.lists(text, max_size=2),
        custom=custom,
    ),
    needs_more=st.booleans(),
    request_body_mutation=mutation,
    response_body_mutation=mutation,
    websocket_decision=st.one_of(
        st.none(),
        st.sampled_from(["allow", "drop"]),
        st.builds(WebSocketClose, code=u16, reason=text),
    ),
)

health = st.builds(
    HealthStatus,
    agent_id=text,
    state=st.sampled_from(list(HealthState)),
    message=opt_text,
    timestamp_ms=u64,
    load=st.none()
    | st.builds(
        LoadMetrics,
        in_flight=u32,
        queue_depth=u32,
        avg_latency_ms=f32,
        p50_latency_ms=f32,
        p95_latency_ms=f32,
        p99_latency_ms=f32,
        requests_processed=u64,
        requests_rejected=u64,
        requests_timed_out=u64,
    ),
    resources=st.none()
    | st.builds(
        ResourceMetrics,
        cpu_percent=st.none() | f32,
        memory_bytes=st.none() | u64,
        memory_limit=st.none() | u64,
        active_threads=st.none() | u32,
        open_fds=st.none() | u32,
        fd_limit=st.none() | u32,
        connections=st.none() | u32,
    ),
    valid_until_ms=st.none() | u64,
    disabled_features=st.lists(text, max_size=2),
    timeout_multiplier=st.none() | f32,
    drain_eta_ms=st.none() | u64,
    unhealthy_reason=opt_text,
    recoverable=st.none() | st.booleans(),
)
metrics = st.builds(
    MetricsReport,
    agent_id=text,
    timestamp_ms=u64,
    interval_ms=u64,
    counters=st.lists(
        st.builds(CounterMetric, name=text, value=u64, help=opt_text, labels=str_map), max_size=2
    ),
    gauges=st.lists(
        st.builds(GaugeMetric, name=text, value=f64, help=opt_text, labels=str_map), max_size=2
    ),
    histograms=st.lists(
        st.builds(
            HistogramMetric,
            name=text,
            sum=f64,
            count=u64,
            buckets=st.lists(
                st.builds(HistogramBucket, le=f64 | st.just(math.inf), count=u64), max_size=3
            ),
            help=opt_text,
            labels=str_map,
        ),
        max_size=2,
    ),
)
update_types = st.one_of(
    st.just(RequestReload()),
    st.builds(
        RuleUpdate,
        rule_set=text,
        rules=st.lists(
            st.builds(
                RuleDefinition,
                id=text,
                priority=st.integers(-(2**31), 2**31 - 1),
                definition=json_value,
                enabled=st.booleans(),
                description=opt_text,
                tags=st.lists(text, max_size=2),
            ),
            max_size=2,
        ),
        remove_rules=st.lists(text, max_size=2),
    ),
    st.builds(ListUpdate, list_id=text, add=st.lists(text, max_size=2), remove=st.lists(text)),
    st.builds(RestartRequired, reason=text, grace_period_ms=u64),
    st.builds(ConfigError, error=text, field=opt_text),
)
controls = st.one_of(
    health,
    metrics,
    st.builds(ConfigUpdateRequest, update_type=update_types, request_id=text, timestamp_ms=u64),
    st.builds(
        ConfigUpdateResponse,
        request_id=text,
        accepted=st.booleans(),
        error=opt_text,
        timestamp_ms=u64,
    ),
    st.builds(
        FlowControlSignal,
        action=st.sampled_from(list(FlowAction)),
        correlation_id=opt_text,
        timestamp_ms=u64,
        buffer_available=st.none() | u64,
    ),
)
capabilities = st.builds(
    AgentCapabilities,
    agent_id=text,
    name=text,
    version=text,
    supported_events=st.lists(st.sampled_from(list(EventType)), unique=True, max_size=8),
    features=st.builds(
        AgentFeatures,
        st.booleans(),
        st.booleans(),
        st.booleans(),
        st.booleans(),
        st.booleans(),
        u32,
        st.booleans(),
        st.booleans(),
        st.booleans(),
    ),
    limits=st.builds(AgentLimits, u64, u32, u64),
)


@SETTINGS
@given(event=events, data=st.data())
def test_event_round_trip(event: Any, data: st.DataObject) -> None:
    cid = event.correlation_id
    for codec in CODECS:
        payload = codec.encode_event(event, cid)
        assert codec.decode_event(event.MESSAGE_TYPE, payload) == event
        assert codec.event_correlation_id(payload) == cid


@SETTINGS
@given(response=responses, cid=text)
def test_response_round_trip(response: AgentResponse, cid: str) -> None:
    expected = AgentResponse(
        response.version,
        response.decision,
        response.request_headers,
        response.response_headers,
        response.routing_metadata,
        AuditMetadata(
            response.audit.tags,
            response.audit.rule_ids,
            response.audit.confidence,
            response.audit.reason_codes,
            {"correlation_id": cid, **response.audit.custom},
        ),
        response.needs_more,
        response.request_body_mutation,
        response.response_body_mutation,
        response.websocket_decision,
    )
    for codec in CODECS:
        assert codec.decode_response(codec.encode_response(response, cid)) == (cid, expected)


@SETTINGS
@given(msg=controls)
def test_control_round_trip(msg: Any) -> None:
    msg_type = {
        HealthStatus: 0x30,
        MetricsReport: 0x31,
        ConfigUpdateRequest: 0x32,
        ConfigUpdateResponse: 0x32,
        FlowControlSignal: 0x33,
    }[type(msg)]
    for codec in CODECS:
        assert codec.decode_control(msg_type, codec.encode_control(msg)) == msg


@SETTINGS
@given(
    req=st.builds(
        HandshakeRequest,
        supported_versions=st.lists(u32, max_size=3),
        proxy_id=text,
        proxy_version=text,
        config=json_value,
        supported_encodings=st.lists(st.sampled_from(["json", "msgpack"]), max_size=2),
    ),
    resp=st.builds(
        HandshakeResponse,
        protocol_version=u32,
        capabilities=capabilities,
        success=st.booleans(),
        error=opt_text,
        encoding=st.sampled_from(["json", "msgpack"]),
    ),
    reg=st.builds(
        RegistrationRequest,
        protocol_version=u32,
        agent_id=text,
        capabilities=capabilities,
        auth_token=opt_text,
        metadata=json_value,
    ),
    reg_resp=st.builds(
        RegistrationResponse,
        success=st.booleans(),
        error=opt_text,
        proxy_id=text,
        proxy_version=text,
        connection_id=text,
    ),
    cid=text,
    reason=st.sampled_from(list(CancelReason)),
    seq=u64,
    ts=u64,
)
def test_always_json_round_trip(
    req: HandshakeRequest,
    resp: HandshakeResponse,
    reg: RegistrationRequest,
    reg_resp: RegistrationResponse,
    cid: str,
    reason: CancelReason,
    seq: int,
    ts: int,
) -> None:
    assert C.decode_handshake_request(C.encode_handshake_request(req)) == req
    assert C.decode_handshake_response(C.encode_handshake_response(resp)) == resp
    assert C.decode_registration_request(C.encode_registration_request(reg)) == reg
    assert C.decode_registration_response(C.encode_registration_response(reg_resp)) == reg_resp
    cancel = C.decode_cancel(C.encode_cancel(cid, reason, ts))
    assert (cancel.correlation_id, cancel.reason, cancel.timestamp_ms) == (cid, reason, ts)
    ping = C.decode_ping(C.encode_ping(seq, ts))
    assert (ping.sequence, ping.timestamp_ms) == (seq, ts)


def _all_decoders() -> list[Any]:
    out: list[Any] = [
        C.decode_handshake_request,
        C.decode_handshake_response,
        C.decode_registration_request,
        C.decode_registration_response,
        C.decode_cancel,
        C.decode_ping,
    ]
    for codec in CODECS:
        out.append(codec.decode_response)
        out.append(codec.event_correlation_id)
        out.append(codec.decode_config_update_response)
        for t in range(0x10, 0x18):
            out.append(lambda p, c=codec, t=t: c.decode_event(t, p))
        for t in range(0x30, 0x34):
            out.append(lambda p, c=codec, t=t: c.decode_control(t, p))
    return out


DECODERS = _all_decoders()


def _only_typed_errors(payload: bytes) -> None:
    for decode in DECODERS:
        try:
            decode(payload)
        except AgentProtocolError:
            pass


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.binary(max_size=64))
def test_random_bytes_only_typed_errors(payload: bytes) -> None:
    _only_typed_errors(payload)


@SETTINGS
@given(value=json_value)
def test_random_documents_only_typed_errors(value: Any) -> None:
    _only_typed_errors(orjson.dumps(value))
    _only_typed_errors(msgpack.packb(value, use_bin_type=True))


@SETTINGS
@given(response=responses, event=events, data=st.data())
def test_mutated_payloads_only_typed_errors(
    response: AgentResponse, event: Any, data: st.DataObject
) -> None:
    """Valid payloads with a few bytes flipped, cut or duplicated."""
    for codec in CODECS:
        for payload in (codec.encode_response(response, "c"), codec.encode_event(event, "c")):
            if not payload:
                continue
            i = data.draw(st.integers(0, len(payload) - 1))
            b = data.draw(st.integers(0, 255))
            _only_typed_errors(payload[:i] + bytes([b]) + payload[i + 1 :])
            _only_typed_errors(payload[:i])
            _only_typed_errors(payload[:i] + payload[i // 2 :])


@SETTINGS
@given(doc=st.dictionaries(st.sampled_from([*sorted(CR._RESPONSE_KEYS), "x"]), json_value))
def test_response_shaped_documents(doc: dict[str, Any]) -> None:
    """Documents with the right keys but arbitrary values: decode or InvalidMessage."""
    doc.setdefault("version", 2)
    doc.setdefault("decision", "allow")
    _only_typed_errors(orjson.dumps(doc))
    _only_typed_errors(msgpack.packb(doc, use_bin_type=True))
    _only_typed_errors(msgpack.packb(list(doc.values()), use_bin_type=True))


@SETTINGS
@given(response=responses, cid=text)
def test_json_duplicate_detection_never_rejects_valid(response: AgentResponse, cid: str) -> None:
    """The cheap duplicate check never flags a valid payload (strings with key markers too)."""
    payload = C.JSON_CODEC.encode_response(response, cid + '":')
    got_cid, _ = C.JSON_CODEC.decode_response(payload)
    assert got_cid == cid + '":'
    # pretty-printed JSON from a non-Rust agent is accepted too
    pretty = json.dumps(orjson.loads(payload), indent=2).encode()
    assert C.JSON_CODEC.decode_response(pretty)[0] == got_cid


def _dump_pairs(pairs: list[tuple[str, Any]], sep: str) -> str:
    return "{" + ",".join(json.dumps(k) + sep + json.dumps(v) for k, v in pairs) + "}"


@SETTINGS
@given(
    response=responses,
    where=st.sampled_from(["top", "audit"]),
    pick=st.integers(0, 20),
    sep=st.sampled_from([":", ": ", " :", "\n:\t"]),
)
def test_json_duplicate_struct_fields_always_rejected(
    response: AgentResponse, where: str, pick: int, sep: str
) -> None:
    """A repeated struct field is rejected whatever else the payload holds (no false negatives)."""
    doc = orjson.loads(C.JSON_CODEC.encode_response(response, 'id":x'))
    if where == "top":
        pairs = list(doc.items())
        key, value = pairs[pick % len(pairs)]
        pairs.append((key, value))
        text = _dump_pairs(pairs, sep)
    else:
        audit = list(doc["audit"].items())
        key, value = audit[pick % len(audit)]
        audit.append((key, value))
        doc["audit"] = "\x00AUDIT\x00"
        text = _dump_pairs(list(doc.items()), sep).replace(
            json.dumps("\x00AUDIT\x00"), _dump_pairs(audit, sep)
        )
    try:
        C.JSON_CODEC.decode_response(text.encode())
    except AgentProtocolError as exc:
        assert "duplicate field" in str(exc), exc
    else:
        raise AssertionError(f"duplicate `{key}` accepted: {text}")
