"""Message classes: upstream names and defaults, builders, class-level constants."""

from __future__ import annotations

import dataclasses
import re
import time

import pytest

from agentpool import messages as M
from agentpool.enums import EventType, FlowAction, HealthState, MessageType


def test_every_exported_name_exists() -> None:
    for name in M.__all__:
        assert hasattr(M, name), name


@pytest.mark.parametrize(
    ("cls", "msg_type", "event_type"),
    [
        (M.RequestHeadersEvent, MessageType.REQUEST_HEADERS, EventType.REQUEST_HEADERS),
        (M.RequestBodyChunkEvent, MessageType.REQUEST_BODY_CHUNK, EventType.REQUEST_BODY_CHUNK),
        (M.ResponseHeadersEvent, MessageType.RESPONSE_HEADERS, EventType.RESPONSE_HEADERS),
        (M.ResponseBodyChunkEvent, MessageType.RESPONSE_BODY_CHUNK, EventType.RESPONSE_BODY_CHUNK),
        (M.RequestCompleteEvent, MessageType.REQUEST_COMPLETE, EventType.REQUEST_COMPLETE),
        (M.WebSocketFrameEvent, MessageType.WEBSOCKET_FRAME, EventType.WEBSOCKET_FRAME),
        (M.GuardrailInspectEvent, MessageType.GUARDRAIL_INSPECT, EventType.GUARDRAIL_INSPECT),
        (M.ConfigureEvent, MessageType.CONFIGURE, EventType.CONFIGURE),
    ],
)
def test_event_class_constants(cls: type, msg_type: MessageType, event_type: EventType) -> None:
    assert cls.MESSAGE_TYPE is msg_type  # type: ignore[attr-defined]
    assert cls.EVENT_TYPE is event_type  # type: ignore[attr-defined]
    names = {f.name for f in dataclasses.fields(cls)}
    assert "MESSAGE_TYPE" not in names and "EVENT_TYPE" not in names


def test_dataclasses_use_slots() -> None:
    for name in M.__all__:
        obj = getattr(M, name)
        if dataclasses.is_dataclass(obj) and isinstance(obj, type):
            assert "__slots__" in obj.__dict__, name


def test_handshake_defaults() -> None:
    req = M.HandshakeRequest()
    assert req.supported_versions == [2]
    assert req.proxy_id == "zentinel-proxy"
    assert req.config is None and req.supported_encodings == ["json"]
    assert req.max_version() == 2
    assert M.HandshakeRequest(supported_versions=[]).max_version() == 1
    # mutable defaults are not shared
    req.supported_versions.append(1)
    assert M.HandshakeRequest().supported_versions == [2]


def test_capabilities_defaults() -> None:
    caps = M.AgentCapabilities("waf-1", "WAF", "1.0.0")
    assert caps.supported_events == [EventType.REQUEST_HEADERS]
    assert caps.features == M.AgentFeatures()
    assert not any(
        getattr(caps.features, f.name)
        for f in dataclasses.fields(M.AgentFeatures)
        if f.name != "concurrent_requests"
    )
    assert caps.features.concurrent_requests == 0
    assert caps.limits == M.AgentLimits(10485760, 100, 65536)
    assert caps.protocol_version == 2
    assert caps.supports_event(EventType.REQUEST_HEADERS)
    assert caps.supports_event(1)
    assert not caps.supports_event(EventType.CONFIGURE)


def test_handshake_failure() -> None:
    r = M.HandshakeResponse.failure("nope")
    assert (r.protocol_version, r.success, r.error, r.encoding) == (0, False, "nope", "json")
    assert r.capabilities.agent_id == ""


def test_request_metadata_defaults_and_correlation_id() -> None:
    md = M.RequestMetadata("c1", "r1", "10.0.0.5", 40000)
    assert md.protocol == "HTTP/1.1"
    assert md.server_name is None and md.traceparent is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}\+00:00", md.timestamp)
    ev = M.RequestHeadersEvent(md, "GET", "/x", {"host": ["example.com"]})
    assert ev.correlation_id == "c1"
    md.correlation_id = "c2"
    assert ev.correlation_id == "c2"


def test_rfc3339_now_is_utc_now() -> None:
    stamp = M.rfc3339_now()
    parsed = time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")
    assert abs(time.mktime(parsed) - time.mktime(time.gmtime())) < 5
    assert abs(M.now_ms() - time.time() * 1000) < 5000


def test_event_defaults() -> None:
    body = M.RequestBodyChunkEvent("c", b"x", True)
    assert (body.total_size, body.chunk_index, body.bytes_received) == (None, 0, 0)
    resp_body = M.ResponseBodyChunkEvent("c", b"x", False)
    assert resp_body.bytes_sent == 0
    ws = M.WebSocketFrameEvent("c", "text", b"hi", True, 0, True)
    assert ws.route_id is None and ws.client_ip == ""
    g = M.GuardrailInspectEvent("c", "pii_detection", "text")
    assert g.model is None and g.categories == [] and g.metadata == {}
    cfg = M.ConfigureEvent()
    assert (cfg.config, cfg.config_version, cfg.correlation_id) == (None, None, "")
    done = M.RequestCompleteEvent("c", 200, 1, 2, 3, 1)
    assert done.error is None


def test_header_op_builders() -> None:
    assert M.HeaderOp.set("x-a", "1") == M.HeaderOp("set", "x-a", "1")
    assert M.HeaderOp.add("x-a", "2") == M.HeaderOp("add", "x-a", "2")
    assert M.HeaderOp.remove("server") == M.HeaderOp("remove", "server", None)


def test_body_mutation_helpers() -> None:
    assert M.BodyMutation.pass_through(3) == M.BodyMutation(None, 3)
    assert M.BodyMutation.pass_through(3).is_pass_through()
    assert M.BodyMutation.drop_chunk(1) == M.BodyMutation("", 1)
    assert M.BodyMutation.drop_chunk(1).is_drop()
    rep = M.BodyMutation.replace(2, "new")
    assert rep == M.BodyMutation("new", 2)
    assert not rep.is_drop() and not rep.is_pass_through()


def test_agent_response_defaults_and_builders() -> None:
    r = M.AgentResponse()
    assert r.version == 2 and r.decision == M.Allow() and r.is_allow
    assert r.request_headers == [] and r.response_headers == [] and r.routing_metadata == {}
    assert r.audit == M.AuditMetadata()
    assert not r.needs_more and not r.fail_open
    assert r.request_body_mutation is None and r.response_body_mutation is None
    assert r.websocket_decision is None
    assert M.default_allow() == r == M.AgentResponse.allow()
    # no shared mutable state between instances
    r.request_headers.append(M.HeaderOp.set("a", "b"))
    r.audit.tags.append("t")
    assert M.AgentResponse().request_headers == [] and M.AgentResponse().audit.tags == []

    assert M.AgentResponse.block().decision == M.Block(403, None, None)
    assert M.AgentResponse.block(429, "slow down").decision == M.Block(429, "slow down")
    assert not M.AgentResponse.block().is_allow
    assert M.AgentResponse.redirect("https://x/").decision == M.Redirect("https://x/", 302)
    assert M.AgentResponse.redirect("https://x/", 301).decision == M.Redirect("https://x/", 301)
    assert M.AgentResponse.challenge("captcha", {"k": "v"}).decision == M.Challenge(
        "captcha", {"k": "v"}
    )
    assert M.AgentResponse.websocket_drop().websocket_decision == "drop"
    assert M.AgentResponse.websocket_allow().websocket_decision == "allow"
    assert M.AgentResponse.websocket_close(1008, "bye").websocket_decision == M.WebSocketClose(
        1008, "bye"
    )
    chained = (
        M.AgentResponse()
        .add_request_header(M.HeaderOp.set("x", "1"))
        .add_response_header(M.HeaderOp.remove("server"))
        .with_routing_metadata("pool", "canary")
        .set_needs_more()
        .with_request_body_mutation(M.BodyMutation.drop_chunk(0))
        .with_response_body_mutation(M.BodyMutation.pass_through(0))
        .with_audit(M.AuditMetadata(tags=["a"]))
    )
    assert chained.request_headers == [M.HeaderOp("set", "x", "1")]
    assert chained.response_headers == [M.HeaderOp("remove", "server")]
    assert chained.routing_metadata == {"pool": "canary"}
    assert chained.needs_more
    assert chained.audit.tags == ["a"]


def test_fail_open_marks_synthetic_allow() -> None:
    synthetic = M.AgentResponse(fail_open=True)
    assert synthetic.is_allow and synthetic.fail_open
    assert synthetic != M.AgentResponse()


def test_allow_is_immutable_singleton_like() -> None:
    assert M.Allow() == M.Allow()
    with pytest.raises((dataclasses.FrozenInstanceError, AttributeError, TypeError)):
        M.Allow().x = 1  # type: ignore[attr-defined]


def test_control_defaults() -> None:
    h = M.HealthStatus("a", HealthState.HEALTHY)
    assert h.message is None and h.timestamp_ms == 0 and h.load is None
    assert h.disabled_features == []
    f = M.FlowControlSignal(FlowAction.PAUSE)
    assert f.is_pause and f.correlation_id is None and f.timestamp_ms == 0
    assert not M.FlowControlSignal(FlowAction.RESUME).is_pause
    c = M.CounterMetric("n", 1)
    assert c.help is None and c.labels == {}
    hist = M.HistogramMetric("h", 1.0, 2)
    assert hist.buckets == [] and hist.help is None
    rule = M.RuleDefinition("1", 5, {"x": 1})
    assert rule.enabled and rule.description is None and rule.tags == []
    assert M.ConfigError("bad").field is None
    assert M.RequestReload.TYPE == "request_reload"
    assert {M.RuleUpdate.TYPE, M.ListUpdate.TYPE, M.RestartRequired.TYPE, M.ConfigError.TYPE} == {
        "rule_update",
        "list_update",
        "restart_required",
        "config_error",
    }


def test_config_update_response_builders() -> None:
    before = M.now_ms()
    ok = M.ConfigUpdateResponse.success("push-1")
    assert (ok.request_id, ok.accepted, ok.error) == ("push-1", True, None)
    assert ok.timestamp_ms >= before
    bad = M.ConfigUpdateResponse.failure("push-2", "rejected")
    assert (bad.request_id, bad.accepted, bad.error) == ("push-2", False, "rejected")


def test_registration_messages() -> None:
    caps = M.AgentCapabilities("a", "A", "1")
    req = M.RegistrationRequest(2, "a", caps)
    assert req.auth_token is None and req.metadata is None
    resp = M.RegistrationResponse(True, None, "zentinel-proxy", "0.1.0", "a-1")
    assert resp.connection_id == "a-1"
