"""Conversion between agentpool's messages and the gRPC protobuf messages (no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("google.protobuf")

from agentpool import AgentProtocolError, InvalidMessage, MessageTooLarge, WrongConnectionType
from agentpool.enums import CancelReason, FlowAction, HealthState, MessageType
from agentpool.grpc import _convert
from agentpool.grpc import agent_v2_pb2 as pb
from agentpool.messages import (
    AgentResponse,
    AuditMetadata,
    Block,
    BodyMutation,
    Challenge,
    CounterMetric,
    FlowControlSignal,
    GaugeMetric,
    HeaderOp,
    HealthStatus,
    HistogramBucket,
    HistogramMetric,
    ListUpdate,
    MetricsReport,
    Redirect,
    RequestBodyChunkEvent,
    RequestHeadersEvent,
    RequestMetadata,
    RuleUpdate,
)


def roundtrip(resp: AgentResponse, cid: str = "c") -> tuple[str, AgentResponse]:
    raw = _convert.response_to_proto(resp, cid).SerializeToString()
    assert raw[0] == 0x12  # the field tag the proxy side routes on
    return _convert.decode_response(raw)


@pytest.mark.parametrize(
    "decision",
    [
        Block(403, "no", {"x-a": "1", "x-b": "2"}),
        Block(429),
        Redirect("https://e.test/", 307),
        Challenge("captcha", {"site": "k"}),
    ],
)
def test_decisions_roundtrip(decision: object) -> None:
    cid, back = roundtrip(AgentResponse(decision=decision))  # type: ignore[arg-type]
    assert cid == "c" and back.decision == decision


def test_allow_header_ops_audit_roundtrip() -> None:
    resp = AgentResponse(
        request_headers=[HeaderOp.set("a", "1"), HeaderOp.add("b", "2"), HeaderOp.remove("c")],
        response_headers=[HeaderOp.add("d", "")],
        audit=AuditMetadata(
            tags=["t"],
            rule_ids=["r1", "r2"],
            confidence=0.5,
            reason_codes=["x"],
            custom={"s": "text", "n": 3, "l": [1, "a"], "o": {"k": None}},
        ),
        needs_more=True,
        routing_metadata={"dropped": "on gRPC"},
    )
    cid, back = roundtrip(resp, "cid-1")
    assert cid == "cid-1" and back.is_allow and back.needs_more
    assert back.request_headers == resp.request_headers
    assert back.response_headers == resp.response_headers
    a = back.audit
    assert (a.tags, a.rule_ids, a.confidence, a.reason_codes) == (["t"], ["r1", "r2"], 0.5, ["x"])
    # custom values are strings on gRPC: non-strings arrive as their JSON text
    assert a.custom == {"s": "text", "n": "3", "l": '[1,"a"]', "o": '{"k":null}'}
    assert back.routing_metadata == {}


def test_what_grpc_cannot_carry_is_refused_on_the_agent_side() -> None:
    with pytest.raises(WrongConnectionType, match="request_body_mutation"):
        _convert.response_to_proto(
            AgentResponse(request_body_mutation=BodyMutation.replace(0, "x")), "c"
        )
    with pytest.raises(WrongConnectionType, match="response_body_mutation"):
        _convert.response_to_proto(
            AgentResponse(response_body_mutation=BodyMutation.drop_chunk(1)), "c"
        )
    with pytest.raises(WrongConnectionType, match="WebSocket"):
        _convert.response_to_proto(AgentResponse.websocket_close(1008, "policy"), "c")
    # pass-through mutations and an allowed frame change nothing: they are fine
    ok = AgentResponse(request_body_mutation=BodyMutation.pass_through())
    ok.websocket_decision = "allow"
    assert roundtrip(ok)[1].is_allow


def test_replies_without_a_decision_or_with_an_empty_header_op_are_invalid() -> None:
    msg = pb.AgentToProxy()
    msg.response.correlation_id = "c"
    with pytest.raises(InvalidMessage, match="no decision"):
        _convert.decode_response(msg.SerializeToString())
    msg.response.allow.SetInParent()
    msg.response.request_headers.add()
    with pytest.raises(InvalidMessage, match="set/add/remove"):
        _convert.decode_response(msg.SerializeToString())
    with pytest.raises(InvalidMessage, match="undecodable"):
        _convert.decode_response(b"\x12\x05ab")
    health = pb.AgentToProxy()
    health.health.state = 1
    with pytest.raises(InvalidMessage, match="expected an AgentResponse"):
        _convert.decode_response(health.SerializeToString())


def test_request_headers_flattened_and_grouped_again() -> None:
    meta = RequestMetadata(
        correlation_id="ignored",
        request_id="r",
        client_ip="::1",
        client_port=65535,
        server_name="s",
        tls_version="TLSv1.3",
        tls_cipher="dropped on gRPC",
        route_id="rt",
        traceparent="00-a-b-01",
    )
    headers = {"x-m": ["1", "2", "3"], "host": ["h"], "empty": []}
    raw = _convert.encode_event(
        RequestHeadersEvent(metadata=meta, method="POST", uri="/u?q", headers=headers), "cid"
    )
    msg = pb.ProxyToAgent.FromString(raw)
    rh = msg.request_headers
    assert [(h.name, h.value) for h in rh.headers] == [
        ("x-m", "1"),
        ("x-m", "2"),
        ("x-m", "3"),
        ("host", "h"),
    ]
    assert rh.http_version == "HTTP/1.1" and rh.metadata.correlation_id == "cid"
    assert rh.metadata.timestamp_ms > 1_600_000_000_000
    assert not rh.metadata.HasField("upstream_id")
    kind, event = _convert.event_from_proto(msg)  # type: ignore[misc]
    assert kind == MessageType.REQUEST_HEADERS
    assert event.headers == {"x-m": ["1", "2", "3"], "host": ["h"]}
    m = event.metadata
    assert (m.client_ip, m.client_port, m.server_name, m.tls_version) == (
        "::1",
        65535,
        "s",
        "TLSv1.3",
    )
    assert m.tls_cipher is None and m.upstream_id is None and m.traceparent == "00-a-b-01"
    assert m.timestamp.endswith("+00:00") and m.timestamp[:2] == "20"


def test_body_bytes_are_raw_and_sizes_bounded() -> None:
    data = bytes(range(256)) * 4
    raw = _convert.encode_event(
        RequestBodyChunkEvent(
            correlation_id="x", data=data, is_last=False, total_size=9000, chunk_index=2,
            bytes_received=1024,
        ),
        "b",
    )  # fmt: skip
    chunk = pb.ProxyToAgent.FromString(raw).request_body_chunk
    assert chunk.data == data and chunk.correlation_id == "b" and chunk.total_size == 9000
    assert chunk.bytes_transferred == 1024 and chunk.proxy_buffer_available == 0
    big = RequestBodyChunkEvent(correlation_id="x", data=b"\0" * (4 << 20), is_last=True)
    with pytest.raises(MessageTooLarge) as info:
        _convert.encode_event(big, "b")
    assert info.value.max == 4 << 20 and info.value.size > 4 << 20


def test_cancel_reasons_are_one_based_on_grpc() -> None:
    for reason in CancelReason:
        msg = pb.ProxyToAgent.FromString(_convert.encode_cancel("c", reason))
        assert msg.cancel.reason == int(reason) + 1 and msg.cancel.correlation_id == "c"


def test_control_messages_roundtrip() -> None:
    def back(msg: object) -> object:
        env = pb.AgentToProxy.FromString(msg.SerializeToString())  # type: ignore[attr-defined]
        item = _convert.control_from_proto(env)
        assert item is not None
        return item[1]

    status = back(
        _convert.health_to_proto(HealthStatus("a", HealthState.DRAINING, "bye", timestamp_ms=5))
    )
    assert isinstance(status, HealthStatus)
    assert (status.agent_id, status.state, status.message, status.timestamp_ms) == (
        "a",
        HealthState.DRAINING,
        "bye",
        5,
    )
    sig = back(_convert.flow_to_proto(FlowControlSignal(FlowAction.PAUSE, "c", 7, 100)))
    assert sig == FlowControlSignal(FlowAction.PAUSE, "c", 7, 100)
    report = MetricsReport(
        agent_id="a",
        timestamp_ms=1,
        interval_ms=2,
        counters=[CounterMetric("c_total", 3, "help", {"l": "v"})],
        gauges=[GaugeMetric("g", 1.5)],
        histograms=[HistogramMetric("h", 2.5, 2, [HistogramBucket(0.1, 1)], None, {})],
    )
    assert back(_convert.metrics_to_proto(report)) == report


def test_config_update_requests_from_the_agent() -> None:
    env = pb.AgentToProxy()
    cu = env.config_update
    cu.request_id = "r1"
    rule = cu.rule_update.rules.add(id="x", priority=2, definition_json='{"a": 1}', enabled=True)
    rule.tags.append("t")
    cu.rule_update.rule_set = "set"
    kind, req = _convert.control_from_proto(env)  # type: ignore[misc]
    assert kind == MessageType.CONFIG_UPDATE_REQUEST and req.request_id == "r1"
    assert isinstance(req.update_type, RuleUpdate)
    assert req.update_type.rules[0].definition == {"a": 1}
    env.config_update.list_update.list_id = "ips"
    env.config_update.list_update.add.append("1.2.3.4")
    assert _convert.control_from_proto(env)[1].update_type == ListUpdate("ips", ["1.2.3.4"])  # type: ignore[index]
    env.config_update.rule_update.rules.add(id="bad", definition_json="{not json")
    with pytest.raises(InvalidMessage, match="definition_json"):
        _convert.control_from_proto(env)
    bad_flow = pb.AgentToProxy()
    bad_flow.flow_control.action = 9
    with pytest.raises(InvalidMessage, match="flow action"):
        _convert.control_from_proto(bad_flow)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_from_an_agent_give_a_reply_or_a_typed_error(raw: bytes) -> None:
    """What the proxy side does with an agent's message never fails untyped."""
    try:
        env = _convert.parse_envelope(raw)
    except AgentProtocolError:
        return
    try:
        if env.WhichOneof("message") == "response":
            cid, resp = _convert.decode_response(raw)
            assert isinstance(cid, str) and isinstance(resp, AgentResponse)
        else:
            _convert.control_from_proto(env)
    except AgentProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    method=st.text(max_size=10),
    uri=st.text(max_size=40),
    headers=st.dictionaries(
        st.text(min_size=1, max_size=12), st.lists(st.text(max_size=20), min_size=1, max_size=3)
    ),
    port=st.integers(0, 65535),
)
def test_request_headers_roundtrip(
    method: str, uri: str, headers: dict[str, list[str]], port: int
) -> None:
    meta = RequestMetadata(correlation_id="c", request_id="r", client_ip="ip", client_port=port)
    event = RequestHeadersEvent(metadata=meta, method=method, uri=uri, headers=headers)
    msg = pb.ProxyToAgent.FromString(_convert.encode_event(event, "c"))
    kind, back = _convert.event_from_proto(msg)  # type: ignore[misc]
    assert kind == MessageType.REQUEST_HEADERS
    assert (back.method, back.uri, back.headers) == (method, uri, headers)
    assert back.metadata.client_port == port and back.metadata.correlation_id == "c"
