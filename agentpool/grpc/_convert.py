"""Conversion between agentpool's message classes and the gRPC protobuf messages.

The rules (docs/protocol.md, "gRPC transport"): multi-valued headers are flattened into one
``Header`` per value and grouped again on the way in; timestamps are ``timestamp_ms``
integers; body bytes travel raw; audit ``custom`` values are strings. gRPC carries no
routing metadata, body mutations or WebSocket decisions, so the events whose answer needs
them (WebSocket frames, guardrail inspections, Configure, whose gRPC form has no correlation
id) are refused with :class:`~agentpool.errors.WrongConnectionType` before anything is sent,
and an agent-side reply that would lose a body mutation or a WebSocket decision is refused
the same way (routing metadata, advisory only, is dropped).
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from google.protobuf.message import DecodeError

from ..enums import CancelReason, EventType, FlowAction, HealthState, MessageType
from ..errors import InvalidMessage, MessageTooLarge, Serialization, WrongConnectionType
from ..messages import (
    AgentCapabilities,
    AgentFeatures,
    AgentLimits,
    AgentResponse,
    Allow,
    AuditMetadata,
    Block,
    Challenge,
    ConfigError,
    ConfigUpdateRequest,
    CounterMetric,
    FlowControlSignal,
    GaugeMetric,
    HeaderOp,
    HealthStatus,
    HistogramBucket,
    HistogramMetric,
    ListUpdate,
    LoadMetrics,
    MetricsReport,
    Redirect,
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
)
from . import agent_v2_pb2 as pb

__all__ = [
    "MAX_MESSAGE_SIZE",
    "capabilities_from_proto",
    "capabilities_to_proto",
    "control_from_proto",
    "decode_response",
    "encode_cancel",
    "encode_event",
    "encode_ping",
    "event_from_proto",
    "response_from_proto",
    "response_to_proto",
]

#: grpcio's default receive limit, used on both sides and checked before a message is sent.
MAX_MESSAGE_SIZE = 4 * 1024 * 1024

_HTTP_VERSION = "HTTP/1.1"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _rfc3339(ms: int) -> str:
    secs, frac = divmod(ms, 1000)
    try:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    except (OverflowError, OSError, ValueError):
        raise InvalidMessage(f"timestamp_ms {ms} is out of range", field="timestamp_ms") from None
    return text + f".{frac:03d}000000+00:00"


_EVENT_TYPES = {
    "request_headers": MessageType.REQUEST_HEADERS,
    "request_body_chunk": MessageType.REQUEST_BODY_CHUNK,
    "response_headers": MessageType.RESPONSE_HEADERS,
    "response_body_chunk": MessageType.RESPONSE_BODY_CHUNK,
    "request_complete": MessageType.REQUEST_COMPLETE,
    "websocket_frame": MessageType.WEBSOCKET_FRAME,
    "guardrail": MessageType.GUARDRAIL_INSPECT,
}


def event_kind(msg: Any) -> tuple[MessageType, str] | None:
    """``(UDS message type, correlation id)`` of an event ``ProxyToAgent``; None otherwise."""
    which = msg.WhichOneof("message")
    kind = _EVENT_TYPES.get(which)
    if kind is None:
        return None
    inner = getattr(msg, which)
    if which == "request_headers":
        return kind, inner.metadata.correlation_id
    return kind, inner.correlation_id


# -- proxy side: events out ------------------------------------------------------------------


def _flat_headers(headers: dict[str, list[str]], out: Any) -> None:
    for name, values in headers.items():
        if isinstance(values, str):
            out.add(name=name, value=values)
        else:
            for value in values:
                out.add(name=name, value=value)


def _fill_body(chunk: Any, event: Any, transferred: int) -> None:
    chunk.correlation_id = event.correlation_id
    chunk.chunk_index = event.chunk_index
    chunk.data = bytes(event.data)
    chunk.is_last = event.is_last
    if event.total_size is not None:
        chunk.total_size = event.total_size
    chunk.bytes_transferred = transferred
    chunk.timestamp_ms = _now_ms()


def _to_proto_event(event: Any, correlation_id: str) -> Any:
    msg = pb.ProxyToAgent()
    cls = type(event)
    if cls is RequestHeadersEvent:
        m = event.metadata
        rh = msg.request_headers
        md = rh.metadata
        md.correlation_id = correlation_id
        md.request_id = m.request_id
        md.client_ip = m.client_ip
        md.client_port = m.client_port
        if m.server_name is not None:
            md.server_name = m.server_name
        md.protocol = m.protocol
        if m.tls_version is not None:
            md.tls_version = m.tls_version
        if m.route_id is not None:
            md.route_id = m.route_id
        if m.upstream_id is not None:
            md.upstream_id = m.upstream_id
        md.timestamp_ms = _now_ms()
        if m.traceparent is not None:
            md.traceparent = m.traceparent
        rh.method = event.method
        rh.uri = event.uri
        rh.http_version = _HTTP_VERSION
        _flat_headers(event.headers, rh.headers)
    elif cls is RequestBodyChunkEvent:
        _fill_body(msg.request_body_chunk, event, event.bytes_received)
        msg.request_body_chunk.correlation_id = correlation_id
    elif cls is ResponseBodyChunkEvent:
        _fill_body(msg.response_body_chunk, event, event.bytes_sent)
        msg.response_body_chunk.correlation_id = correlation_id
    elif cls is ResponseHeadersEvent:
        rs = msg.response_headers
        rs.correlation_id = correlation_id
        rs.status_code = event.status
        _flat_headers(event.headers, rs.headers)
    elif cls is RequestCompleteEvent:
        rc = msg.request_complete
        rc.correlation_id = correlation_id
        rc.status_code = event.status
        rc.duration_ms = event.duration_ms
        rc.bytes_received = event.request_body_size
        rc.bytes_sent = event.response_body_size
        if event.error is not None:
            rc.error = event.error
    else:
        name = getattr(cls, "__name__", repr(cls))
        raise WrongConnectionType(
            f"{name} cannot be sent over gRPC (the gRPC protocol has no reply for it: "
            "WebSocket decisions, guardrail inspections and Configure need the UDS framing)"
        )
    return msg


def encode_event(event: Any, correlation_id: str) -> bytes:
    """Serialize ``event`` as a ``ProxyToAgent`` message (the core's event encoder on gRPC)."""
    try:
        data: bytes = _to_proto_event(event, correlation_id).SerializeToString()
    except WrongConnectionType:
        raise
    except (TypeError, ValueError, AttributeError) as exc:
        raise Serialization(f"cannot encode {type(event).__name__} for gRPC: {exc}") from None
    if len(data) > MAX_MESSAGE_SIZE:
        raise MessageTooLarge(len(data), MAX_MESSAGE_SIZE)
    return data


def encode_cancel(correlation_id: str, reason: CancelReason | int) -> bytes:
    """A ``ProxyToAgent{cancel}``; gRPC numbers the reasons from 1 (UDS from 0)."""
    msg = pb.ProxyToAgent()
    msg.cancel.correlation_id = correlation_id
    msg.cancel.reason = int(reason) + 1
    msg.cancel.timestamp_ms = _now_ms()
    return msg.SerializeToString()  # type: ignore[no-any-return]


def encode_ping(sequence: int) -> bytes:
    msg = pb.ProxyToAgent()
    msg.ping.sequence = sequence
    msg.ping.timestamp_ms = _now_ms()
    return msg.SerializeToString()  # type: ignore[no-any-return]


def encode_handshake(proxy_id: str, proxy_version: str, config: Any) -> bytes:
    msg = pb.ProxyToAgent()
    hs = msg.handshake
    hs.supported_versions.append(2)
    hs.proxy_id = proxy_id
    hs.proxy_version = proxy_version
    hs.config_json = "{}" if config is None else orjson.dumps(config).decode()
    return msg.SerializeToString()  # type: ignore[no-any-return]


# -- proxy side: replies in --------------------------------------------------------------------


def parse_envelope(payload: bytes) -> Any:
    """Parse an ``AgentToProxy`` message; InvalidMessage when it is not one."""
    msg = pb.AgentToProxy()
    try:
        msg.ParseFromString(payload)
    except DecodeError as exc:
        raise InvalidMessage(f"undecodable AgentToProxy message: {exc}") from None
    return msg


def _header_op(op: Any, path: str) -> HeaderOp:
    which = op.WhichOneof("operation")
    if which == "set":
        return HeaderOp("set", op.set.name, op.set.value)
    if which == "add":
        return HeaderOp("add", op.add.name, op.add.value)
    if which == "remove":
        return HeaderOp("remove", op.remove, None)
    raise InvalidMessage("header operation with none of set/add/remove", field=path)


def response_from_proto(r: Any) -> AgentResponse:
    """An ``AgentResponse`` protobuf as agentpool's AgentResponse (no decision is an error)."""
    which = r.WhichOneof("decision")
    decision: Any
    if which == "allow":
        decision = Allow()
    elif which == "block":
        b = r.block
        decision = Block(
            status=b.status,
            body=b.body if b.HasField("body") else None,
            headers={h.name: h.value for h in b.headers} if b.headers else None,
        )
    elif which == "redirect":
        decision = Redirect(r.redirect.url, r.redirect.status)
    elif which == "challenge":
        decision = Challenge(r.challenge.challenge_type, dict(r.challenge.params))
    else:
        raise InvalidMessage(
            f"AgentResponse for {r.correlation_id!r} carries no decision", field="decision"
        )
    audit = AuditMetadata()
    if r.HasField("audit"):
        a = r.audit
        audit = AuditMetadata(
            tags=list(a.tags),
            rule_ids=list(a.rule_ids),
            confidence=a.confidence if a.HasField("confidence") else None,
            reason_codes=list(a.reason_codes),
            custom=dict(a.custom),
        )
    return AgentResponse(
        decision=decision,
        request_headers=[_header_op(op, "request_headers") for op in r.request_headers],
        response_headers=[_header_op(op, "response_headers") for op in r.response_headers],
        audit=audit,
        needs_more=r.needs_more,
    )


def decode_response(payload: bytes) -> tuple[str, AgentResponse]:
    """The core's reply decoder on gRPC: an ``AgentToProxy{response}`` as ``(cid, response)``."""
    msg = parse_envelope(payload)
    if msg.WhichOneof("message") != "response":
        raise InvalidMessage(f"expected an AgentResponse, got {msg.WhichOneof('message')}")
    r = msg.response
    return r.correlation_id, response_from_proto(r)


def capabilities_from_proto(c: Any) -> AgentCapabilities:
    events: list[EventType] = []
    for e in c.supported_events:
        try:
            events.append(EventType(e))
        except ValueError:
            continue
    f = c.features
    lim = c.limits
    return AgentCapabilities(
        agent_id=c.agent_id,
        name=c.name,
        version=c.version,
        supported_events=events,
        features=AgentFeatures(
            streaming_body=f.streaming_body,
            websocket=f.websocket,
            guardrails=f.guardrails,
            config_push=f.config_push,
            metrics_export=f.metrics_export,
            concurrent_requests=f.concurrent_requests,
            cancellation=f.cancellation,
            flow_control=f.flow_control,
            health_reporting=f.health_reporting,
        ),
        limits=AgentLimits(
            max_body_size=lim.max_body_size,
            max_concurrency=lim.max_concurrency,
            preferred_chunk_size=lim.preferred_chunk_size,
        )
        if c.HasField("limits")
        else AgentLimits(),
        protocol_version=c.protocol_version or 2,
    )


def _opt(m: Any, name: str) -> Any:
    return getattr(m, name) if m.HasField(name) else None


def _health_from_proto(h: Any) -> HealthStatus:
    try:
        state = HealthState(h.state)
    except ValueError:
        state = HealthState.UNSPECIFIED
    load = None
    if h.HasField("load"):
        lo = h.load
        load = LoadMetrics(
            in_flight=lo.in_flight,
            queue_depth=lo.queue_depth,
            avg_latency_ms=lo.avg_latency_ms,
            p50_latency_ms=lo.p50_latency_ms,
            p95_latency_ms=lo.p95_latency_ms,
            p99_latency_ms=lo.p99_latency_ms,
            requests_processed=lo.requests_processed,
            requests_rejected=lo.requests_rejected,
            requests_timed_out=lo.requests_timed_out,
        )
    resources = None
    if h.HasField("resources"):
        rs = h.resources
        resources = ResourceMetrics(
            **{
                k: _opt(rs, k)
                for k in (
                    "cpu_percent",
                    "memory_bytes",
                    "memory_limit",
                    "active_threads",
                    "open_fds",
                    "fd_limit",
                    "connections",
                )
            }
        )
    return HealthStatus(
        agent_id=h.agent_id,
        state=state,
        message=_opt(h, "message"),
        timestamp_ms=h.timestamp_ms,
        load=load,
        resources=resources,
        valid_until_ms=_opt(h, "valid_until_ms"),
        disabled_features=list(h.disabled_features),
        timeout_multiplier=h.timeout_multiplier or None,
        drain_eta_ms=_opt(h, "drain_eta_ms"),
        unhealthy_reason=_opt(h, "unhealthy_reason"),
        recoverable=h.recoverable,
    )


def _metrics_from_proto(m: Any) -> MetricsReport:
    return MetricsReport(
        agent_id=m.agent_id,
        timestamp_ms=m.timestamp_ms,
        interval_ms=m.interval_ms,
        counters=[
            CounterMetric(c.name, c.value, _opt(c, "help"), dict(c.labels)) for c in m.counters
        ],
        gauges=[GaugeMetric(g.name, g.value, _opt(g, "help"), dict(g.labels)) for g in m.gauges],
        histograms=[
            HistogramMetric(
                name=h.name,
                sum=h.sum,
                count=h.count,
                buckets=[HistogramBucket(b.le, b.count) for b in h.buckets],
                help=_opt(h, "help"),
                labels=dict(h.labels),
            )
            for h in m.histograms
        ],
    )


def _config_update_from_proto(c: Any) -> ConfigUpdateRequest:
    which = c.WhichOneof("update_type")
    update: Any
    if which == "request_reload":
        update = RequestReload()
    elif which == "rule_update":
        ru = c.rule_update
        rules = []
        for r in ru.rules:
            try:
                definition = orjson.loads(r.definition_json) if r.definition_json else None
            except orjson.JSONDecodeError:
                raise InvalidMessage(
                    f"rule {r.id!r}: definition_json is not JSON", field="definition_json"
                ) from None
            rules.append(
                RuleDefinition(
                    r.id, r.priority, definition, r.enabled, _opt(r, "description"), list(r.tags)
                )
            )
        update = RuleUpdate(ru.rule_set, rules, list(ru.remove_rules))
    elif which == "list_update":
        lu = c.list_update
        update = ListUpdate(lu.list_id, list(lu.add), list(lu.remove))
    elif which == "restart_required":
        update = RestartRequired(c.restart_required.reason, c.restart_required.grace_period_ms)
    elif which == "config_error":
        update = ConfigError(c.config_error.error, _opt(c.config_error, "field"))
    else:
        raise InvalidMessage("ConfigUpdateRequest without an update type", field="update_type")
    return ConfigUpdateRequest(
        update_type=update, request_id=c.request_id, timestamp_ms=c.timestamp_ms
    )


def control_from_proto(msg: Any) -> tuple[MessageType, Any] | None:
    """A control ``AgentToProxy`` message as ``(UDS message type, agentpool object)``.

    Pong gives ``(PONG, sequence)``; log messages and unknown kinds give None.
    """
    which = msg.WhichOneof("message")
    if which == "health":
        return MessageType.HEALTH_STATUS, _health_from_proto(msg.health)
    if which == "flow_control":
        fc = msg.flow_control
        try:
            action = FlowAction(fc.action)
        except ValueError:
            raise InvalidMessage(f"unknown flow action {fc.action}", field="action") from None
        return MessageType.FLOW_CONTROL, FlowControlSignal(
            action=action,
            correlation_id=_opt(fc, "correlation_id"),
            timestamp_ms=fc.timestamp_ms,
            buffer_available=_opt(fc, "buffer_available"),
        )
    if which == "metrics":
        return MessageType.METRICS_REPORT, _metrics_from_proto(msg.metrics)
    if which == "config_update":
        return MessageType.CONFIG_UPDATE_REQUEST, _config_update_from_proto(msg.config_update)
    if which == "pong":
        return MessageType.PONG, int(msg.pong.sequence)
    return None


# -- agent side ------------------------------------------------------------------------------


def capabilities_to_proto(caps: AgentCapabilities, out: Any) -> None:
    out.protocol_version = caps.protocol_version
    out.agent_id = caps.agent_id
    out.name = caps.name
    out.version = caps.version
    out.supported_events.extend(int(e) for e in caps.supported_events)
    f = caps.features
    of = out.features
    of.streaming_body = f.streaming_body
    of.websocket = f.websocket
    of.guardrails = f.guardrails
    # Configure has no correlation id on gRPC, so a push could never be acknowledged.
    of.config_push = False
    of.metrics_export = f.metrics_export
    of.concurrent_requests = f.concurrent_requests
    of.cancellation = f.cancellation
    of.flow_control = f.flow_control
    of.health_reporting = f.health_reporting
    lim = caps.limits
    out.limits.max_body_size = lim.max_body_size
    out.limits.max_concurrency = lim.max_concurrency
    out.limits.preferred_chunk_size = lim.preferred_chunk_size


def _grouped(headers: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for h in headers:
        out.setdefault(h.name, []).append(h.value)
    return out


def event_from_proto(msg: Any) -> tuple[MessageType, Any] | None:
    """An event ``ProxyToAgent`` message as ``(UDS message type, event)``; None if not one."""
    which = msg.WhichOneof("message")
    if which == "request_headers":
        rh = msg.request_headers
        md = rh.metadata
        return MessageType.REQUEST_HEADERS, RequestHeadersEvent(
            metadata=RequestMetadata(
                correlation_id=md.correlation_id,
                request_id=md.request_id,
                client_ip=md.client_ip,
                client_port=md.client_port,
                server_name=_opt(md, "server_name"),
                protocol=md.protocol,
                tls_version=_opt(md, "tls_version"),
                route_id=_opt(md, "route_id"),
                upstream_id=_opt(md, "upstream_id"),
                timestamp=_rfc3339(md.timestamp_ms),
                traceparent=_opt(md, "traceparent"),
            ),
            method=rh.method,
            uri=rh.uri,
            headers=_grouped(rh.headers),
        )
    if which in ("request_body_chunk", "response_body_chunk"):
        c = getattr(msg, which)
        if which == "request_body_chunk":
            return MessageType.REQUEST_BODY_CHUNK, RequestBodyChunkEvent(
                correlation_id=c.correlation_id,
                data=c.data,
                is_last=c.is_last,
                total_size=_opt(c, "total_size"),
                chunk_index=c.chunk_index,
                bytes_received=c.bytes_transferred,
            )
        return MessageType.RESPONSE_BODY_CHUNK, ResponseBodyChunkEvent(
            correlation_id=c.correlation_id,
            data=c.data,
            is_last=c.is_last,
            total_size=_opt(c, "total_size"),
            chunk_index=c.chunk_index,
            bytes_sent=c.bytes_transferred,
        )
    if which == "response_headers":
        rs = msg.response_headers
        return MessageType.RESPONSE_HEADERS, ResponseHeadersEvent(
            correlation_id=rs.correlation_id, status=rs.status_code, headers=_grouped(rs.headers)
        )
    if which == "request_complete":
        rc = msg.request_complete
        return MessageType.REQUEST_COMPLETE, RequestCompleteEvent(
            correlation_id=rc.correlation_id,
            status=rc.status_code,
            duration_ms=rc.duration_ms,
            request_body_size=rc.bytes_received,
            response_body_size=rc.bytes_sent,
            upstream_attempts=0,
            error=_opt(rc, "error"),
        )
    return None


def response_to_proto(resp: AgentResponse, correlation_id: str) -> Any:
    """agentpool's AgentResponse as an ``AgentToProxy{response}`` message.

    Raises WrongConnectionType for what gRPC cannot carry and the proxy must not lose: a body
    mutation that changes data, or a WebSocket decision other than allow.
    """
    for what, mut in (
        ("request_body_mutation", resp.request_body_mutation),
        ("response_body_mutation", resp.response_body_mutation),
    ):
        if mut is not None and mut.data is not None:
            raise WrongConnectionType(f"{what} cannot be carried over gRPC")
    if resp.websocket_decision not in (None, "allow"):
        raise WrongConnectionType("a WebSocket decision cannot be carried over gRPC")
    msg = pb.AgentToProxy()
    r = msg.response
    r.correlation_id = correlation_id
    d = resp.decision
    if isinstance(d, Allow):
        r.allow.SetInParent()
    elif isinstance(d, Block):
        r.block.status = d.status
        if d.body is not None:
            r.block.body = d.body
        for name, value in (d.headers or {}).items():
            r.block.headers.add(name=name, value=value)
    elif isinstance(d, Redirect):
        r.redirect.url = d.url
        r.redirect.status = d.status
    elif isinstance(d, Challenge):
        r.challenge.challenge_type = d.challenge_type
        r.challenge.params.update({str(k): str(v) for k, v in d.params.items()})
    else:
        raise Serialization(f"unknown decision {d!r}")
    for ops, out in (
        (resp.request_headers, r.request_headers),
        (resp.response_headers, r.response_headers),
    ):
        for op in ops:
            o = out.add()
            if op.op == "remove":
                o.remove = op.name
            else:
                h = o.set if op.op == "set" else o.add
                h.name = op.name
                h.value = op.value or ""
    a = resp.audit
    if a.tags or a.rule_ids or a.reason_codes or a.custom or a.confidence is not None:
        ra = r.audit
        ra.tags.extend(a.tags)
        ra.rule_ids.extend(a.rule_ids)
        if a.confidence is not None:
            ra.confidence = a.confidence
        ra.reason_codes.extend(a.reason_codes)
        for k, v in a.custom.items():
            ra.custom[str(k)] = v if isinstance(v, str) else orjson.dumps(v).decode()
    r.needs_more = resp.needs_more
    return msg


def health_to_proto(status: HealthStatus) -> Any:
    msg = pb.AgentToProxy()
    h = msg.health
    h.agent_id = status.agent_id
    h.state = int(status.state)
    if status.message is not None:
        h.message = status.message
    h.timestamp_ms = status.timestamp_ms
    return msg


def flow_to_proto(signal: FlowControlSignal) -> Any:
    msg = pb.AgentToProxy()
    fc = msg.flow_control
    fc.action = int(signal.action)
    if signal.correlation_id is not None:
        fc.correlation_id = signal.correlation_id
    if signal.buffer_available is not None:
        fc.buffer_available = signal.buffer_available
    fc.timestamp_ms = signal.timestamp_ms
    return msg


def metrics_to_proto(report: MetricsReport) -> Any:
    msg = pb.AgentToProxy()
    m = msg.metrics
    m.agent_id = report.agent_id
    m.timestamp_ms = report.timestamp_ms
    m.interval_ms = report.interval_ms
    for c in report.counters:
        pc = m.counters.add(name=c.name, value=c.value)
        if c.help is not None:
            pc.help = c.help
        pc.labels.update(c.labels)
    for g in report.gauges:
        pg = m.gauges.add(name=g.name, value=g.value)
        if g.help is not None:
            pg.help = g.help
        pg.labels.update(g.labels)
    for hm in report.histograms:
        ph = m.histograms.add(name=hm.name, sum=hm.sum, count=hm.count)
        if hm.help is not None:
            ph.help = hm.help
        ph.labels.update(hm.labels)
        for b in hm.buckets:
            ph.buckets.add(le=b.le, count=b.count)
    return msg
