"""Message classes for every Zentinel v2 agent-protocol message (docs/protocol.md).

Long on purpose (over 800 lines): one module for all 45 message classes. Every message of the
protocol is declared here once, as a reader of docs/protocol.md expects to find them, and the
codec's schemas (agentpool/codec/) build and check each class against this one declaration.

Field names and defaults are upstream's so code written against the Rust crate reads the same.
These are plain data holders; :mod:`agentpool.codec` turns them into wire payloads and back.
Body ``data`` is ``bytes`` on the Python side (base64 in JSON, raw ``bin`` in MessagePack).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, TypeAlias

from ._impl import core as _core
from ._version import __version__
from .enums import CancelReason, EventType, FlowAction, HealthState, MessageType

__all__ = [
    "AgentCapabilities",
    "AgentFeatures",
    "AgentLimits",
    "AgentResponse",
    "Allow",
    "AuditMetadata",
    "Block",
    "BodyMutation",
    "CancelRequest",
    "Challenge",
    "ConfigError",
    "ConfigUpdateRequest",
    "ConfigUpdateResponse",
    "ConfigUpdateType",
    "ConfigureEvent",
    "ControlMessage",
    "CounterMetric",
    "Decision",
    "Event",
    "FlowControlSignal",
    "GaugeMetric",
    "GuardrailInspectEvent",
    "HandshakeRequest",
    "HandshakeResponse",
    "HeaderOp",
    "HealthStatus",
    "HistogramBucket",
    "HistogramMetric",
    "ListUpdate",
    "LoadMetrics",
    "MetricsReport",
    "Ping",
    "Redirect",
    "RegistrationRequest",
    "RegistrationResponse",
    "RequestBodyChunkEvent",
    "RequestCompleteEvent",
    "RequestHeadersEvent",
    "RequestMetadata",
    "RequestReload",
    "ResourceMetrics",
    "ResponseBodyChunkEvent",
    "ResponseHeadersEvent",
    "RestartRequired",
    "RuleDefinition",
    "RuleUpdate",
    "WebSocketClose",
    "WebSocketDecision",
    "WebSocketFrameEvent",
    "default_allow",
    "now_ms",
    "rfc3339_now",
]


def now_ms() -> int:
    """Current Unix time in milliseconds (the protocol's ``timestamp_ms``)."""
    return time.time_ns() // 1_000_000


def rfc3339_now() -> str:
    """Current UTC time as RFC 3339 with nanoseconds, the way chrono's ``to_rfc3339`` writes it."""
    ns = time.time_ns()
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}+00:00"


# --------------------------------------------------------------------------------------------
# Handshake (frames 0x01 / 0x02, always JSON)


@dataclass(slots=True)
class HandshakeRequest:
    """``UdsHandshakeRequest``: what the proxy offers (§3.2)."""

    supported_versions: list[int] = field(default_factory=lambda: [2])
    proxy_id: str = "zentinel-proxy"
    proxy_version: str = __version__
    config: Any = None
    supported_encodings: list[str] = field(default_factory=lambda: ["json"])

    def max_version(self) -> int:
        """Highest offered version (first element upstream; 1 when empty)."""
        return self.supported_versions[0] if self.supported_versions else 1


@dataclass(slots=True)
class AgentFeatures:
    """``UdsFeatures``: optional protocol features an agent supports."""

    streaming_body: bool = False
    websocket: bool = False
    guardrails: bool = False
    config_push: bool = False
    metrics_export: bool = False
    concurrent_requests: int = 0
    cancellation: bool = False
    flow_control: bool = False
    health_reporting: bool = False


@dataclass(slots=True)
class AgentLimits:
    """``UdsLimits``: resource limits an agent announces."""

    max_body_size: int = 10_485_760
    max_concurrency: int = 100
    preferred_chunk_size: int = 65_536


@dataclass(slots=True)
class AgentCapabilities:
    """Agent capabilities from the handshake (``UdsCapabilities`` plus ``protocol_version``)."""

    agent_id: str
    name: str
    version: str
    supported_events: list[EventType] = field(default_factory=lambda: [EventType.REQUEST_HEADERS])
    features: AgentFeatures = field(default_factory=AgentFeatures)
    limits: AgentLimits = field(default_factory=AgentLimits)
    protocol_version: int = 2

    def supports_event(self, event: EventType | int) -> bool:
        """Whether the agent subscribed to ``event``."""
        return event in self.supported_events


@dataclass(slots=True)
class HandshakeResponse:
    """``UdsHandshakeResponse``: the agent's answer, with the encoding it picked (§3.3)."""

    protocol_version: int
    capabilities: AgentCapabilities
    success: bool
    error: str | None = None
    encoding: str = "json"

    @classmethod
    def failure(cls, error: str) -> HandshakeResponse:
        """What a Rust agent sends when it refuses the handshake."""
        return cls(0, AgentCapabilities("", "", ""), False, error, "json")


# --------------------------------------------------------------------------------------------
# Events (proxy -> agent)


@dataclass(slots=True)
class RequestMetadata:
    """Per-request metadata sent with request headers (§5.1)."""

    correlation_id: str
    request_id: str
    client_ip: str
    client_port: int
    server_name: str | None = None
    protocol: str = "HTTP/1.1"
    tls_version: str | None = None
    tls_cipher: str | None = None
    route_id: str | None = None
    upstream_id: str | None = None
    timestamp: str = field(default_factory=rfc3339_now)
    traceparent: str | None = None


@dataclass(slots=True)
class RequestHeadersEvent:
    """Request headers (0x10); its correlation id is ``metadata.correlation_id``."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.REQUEST_HEADERS
    EVENT_TYPE: ClassVar[EventType] = EventType.REQUEST_HEADERS

    metadata: RequestMetadata
    method: str
    uri: str
    headers: dict[str, list[str]] = field(default_factory=dict)

    @property
    def correlation_id(self) -> str:
        return self.metadata.correlation_id


@dataclass(slots=True)
class RequestBodyChunkEvent:
    """One request body chunk (0x11)."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.REQUEST_BODY_CHUNK
    EVENT_TYPE: ClassVar[EventType] = EventType.REQUEST_BODY_CHUNK

    correlation_id: str
    data: bytes
    is_last: bool
    total_size: int | None = None
    chunk_index: int = 0
    bytes_received: int = 0


@dataclass(slots=True)
class ResponseHeadersEvent:
    """Upstream response headers (0x12)."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.RESPONSE_HEADERS
    EVENT_TYPE: ClassVar[EventType] = EventType.RESPONSE_HEADERS

    correlation_id: str
    status: int
    headers: dict[str, list[str]] = field(default_factory=dict)


@dataclass(slots=True)
class ResponseBodyChunkEvent:
    """One response body chunk (0x13); the counter is ``bytes_sent``."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.RESPONSE_BODY_CHUNK
    EVENT_TYPE: ClassVar[EventType] = EventType.RESPONSE_BODY_CHUNK

    correlation_id: str
    data: bytes
    is_last: bool
    total_size: int | None = None
    chunk_index: int = 0
    bytes_sent: int = 0


@dataclass(slots=True)
class RequestCompleteEvent:
    """End-of-request summary (0x14)."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.REQUEST_COMPLETE
    EVENT_TYPE: ClassVar[EventType] = EventType.REQUEST_COMPLETE

    correlation_id: str
    status: int
    duration_ms: int
    request_body_size: int
    response_body_size: int
    upstream_attempts: int
    error: str | None = None


@dataclass(slots=True)
class WebSocketFrameEvent:
    """One WebSocket frame (0x15); ``opcode`` is ``"text"``, ``"binary"``, ``"close"``, ..."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.WEBSOCKET_FRAME
    EVENT_TYPE: ClassVar[EventType] = EventType.WEBSOCKET_FRAME

    correlation_id: str
    opcode: str
    data: bytes
    client_to_server: bool
    frame_index: int
    fin: bool
    route_id: str | None = None
    client_ip: str = ""


@dataclass(slots=True)
class GuardrailInspectEvent:
    """Guardrail inspection (0x16): ``inspection_type`` is prompt_injection or pii_detection."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.GUARDRAIL_INSPECT
    EVENT_TYPE: ClassVar[EventType] = EventType.GUARDRAIL_INSPECT

    correlation_id: str
    inspection_type: str
    content: str
    model: str | None = None
    categories: list[str] = field(default_factory=list)
    route_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class ConfigureEvent:
    """Configuration delivery (0x17); also carries config pushes (docs/pool.md)."""

    MESSAGE_TYPE: ClassVar[MessageType] = MessageType.CONFIGURE
    EVENT_TYPE: ClassVar[EventType] = EventType.CONFIGURE

    config: Any = None
    config_version: str | None = None
    correlation_id: str = ""


Event: TypeAlias = (
    RequestHeadersEvent
    | RequestBodyChunkEvent
    | ResponseHeadersEvent
    | ResponseBodyChunkEvent
    | RequestCompleteEvent
    | WebSocketFrameEvent
    | GuardrailInspectEvent
    | ConfigureEvent
)


# --------------------------------------------------------------------------------------------
# Agent response (0x20)


@dataclass(slots=True, frozen=True)
class Allow:
    """Let the request through."""


@dataclass(slots=True)
class Block:
    """Reject the request with ``status`` (and optional body and headers)."""

    status: int = 403
    body: str | None = None
    headers: dict[str, str] | None = None


@dataclass(slots=True)
class Redirect:
    """Redirect the client to ``url``."""

    url: str
    status: int = 302


@dataclass(slots=True)
class Challenge:
    """Challenge the client (captcha, ...)."""

    challenge_type: str
    params: dict[str, str] = field(default_factory=dict)


Decision: TypeAlias = Allow | Block | Redirect | Challenge

_ALLOW = Allow()


@dataclass(slots=True)
class HeaderOp:
    """A header mutation: ``set`` (replace), ``add`` (append) or ``remove``.

    Build them with :meth:`set`, :meth:`add` and :meth:`remove`.
    """

    op: Literal["set", "add", "remove"]
    name: str
    value: str | None = None

    @classmethod
    def set(cls, name: str, value: str) -> HeaderOp:
        """Replace header ``name`` with ``value``."""
        return cls("set", name, value)

    @classmethod
    def add(cls, name: str, value: str) -> HeaderOp:
        """Append a ``name: value`` header."""
        return cls("add", name, value)

    @classmethod
    def remove(cls, name: str) -> HeaderOp:
        """Remove header ``name``."""
        return cls("remove", name, None)


@dataclass(slots=True)
class AuditMetadata:
    """Audit data; on UDS ``custom["correlation_id"]`` routes the reply."""

    tags: list[str] = field(default_factory=list)
    rule_ids: list[str] = field(default_factory=list)
    confidence: float | None = None
    reason_codes: list[str] = field(default_factory=list)
    custom: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class BodyMutation:
    """Body chunk mutation: ``data`` None passes through, ``""`` drops, else replaces."""

    data: str | None = None
    chunk_index: int = 0

    @classmethod
    def pass_through(cls, chunk_index: int = 0) -> BodyMutation:
        return cls(None, chunk_index)

    @classmethod
    def drop_chunk(cls, chunk_index: int = 0) -> BodyMutation:
        return cls("", chunk_index)

    @classmethod
    def replace(cls, chunk_index: int, data: str) -> BodyMutation:
        return cls(data, chunk_index)

    def is_pass_through(self) -> bool:
        return self.data is None

    def is_drop(self) -> bool:
        return self.data == ""


@dataclass(slots=True)
class WebSocketClose:
    """Close the WebSocket with an RFC 6455 ``code``."""

    code: int
    reason: str = ""


WebSocketDecision: TypeAlias = Literal["allow", "drop"] | WebSocketClose


# Field metadata of AgentResponse: ``_LAZY`` fields of a decoded reply are built on first read;
# ``_LOCAL`` fields are never on the wire.
_LAZY: Any = {"lazy": True}
_LOCAL: Any = {"wire": False}


class _LazyFields:
    """Holds a decoded reply's not-yet-built fields (see :class:`AgentResponse`)."""

    __slots__ = ("_lazy",)


@dataclass(slots=True)
class AgentResponse(_LazyFields):
    """An agent's reply to an event.

    ``fail_open`` is never on the wire: True marks a synthetic Allow made by the pool
    because the agent could not be asked (docs/pool.md, "Fail-open responses are marked").

    A reply decoded by the proxy has been validated in full, but its header ops, audit,
    routing metadata, body mutations and WebSocket decision become objects only when one of
    them is first read (most callers only look at ``decision``); equality, repr, pickling,
    copying and assignment behave as for any dataclass instance. Those fields are read
    through a small descriptor (``LazyField``, compiled with the core); the others are plain
    slots. This field list is the one
    place the reply's fields and their wire order are declared.
    """

    version: int = 2
    decision: Decision = _ALLOW
    request_headers: list[HeaderOp] = field(default_factory=list, metadata=_LAZY)
    response_headers: list[HeaderOp] = field(default_factory=list, metadata=_LAZY)
    routing_metadata: dict[str, str] = field(default_factory=dict, metadata=_LAZY)
    audit: AuditMetadata = field(default_factory=AuditMetadata, metadata=_LAZY)
    needs_more: bool = False
    request_body_mutation: BodyMutation | None = field(default=None, metadata=_LAZY)
    response_body_mutation: BodyMutation | None = field(default=None, metadata=_LAZY)
    websocket_decision: WebSocketDecision | None = field(default=None, metadata=_LAZY)
    fail_open: bool = field(default=False, metadata=_LOCAL)

    def __getstate__(self) -> tuple[None, dict[str, Any]]:
        return None, {f: getattr(self, f) for f in RESPONSE_FIELDS}

    def __setstate__(self, state: tuple[None, dict[str, Any]]) -> None:
        for name, value in state[1].items():
            object.__setattr__(self, name, value)

    @classmethod
    def allow(cls) -> AgentResponse:
        return cls()

    @classmethod
    def block(cls, status: int = 403, body: str | None = None) -> AgentResponse:
        return cls(decision=Block(status, body))

    @classmethod
    def redirect(cls, url: str, status: int = 302) -> AgentResponse:
        return cls(decision=Redirect(url, status))

    @classmethod
    def challenge(cls, challenge_type: str, params: dict[str, str] | None = None) -> AgentResponse:
        return cls(decision=Challenge(challenge_type, dict(params or {})))

    @classmethod
    def websocket_allow(cls) -> AgentResponse:
        return cls(websocket_decision="allow")

    @classmethod
    def websocket_drop(cls) -> AgentResponse:
        return cls(websocket_decision="drop")

    @classmethod
    def websocket_close(cls, code: int, reason: str) -> AgentResponse:
        return cls(websocket_decision=WebSocketClose(code, reason))

    @property
    def is_allow(self) -> bool:
        return isinstance(self.decision, Allow)

    def add_request_header(self, op: HeaderOp) -> AgentResponse:
        """Append a request-header mutation; returns self for chaining."""
        self.request_headers.append(op)
        return self

    def add_response_header(self, op: HeaderOp) -> AgentResponse:
        """Append a response-header mutation; returns self for chaining."""
        self.response_headers.append(op)
        return self

    def with_audit(self, audit: AuditMetadata) -> AgentResponse:
        self.audit = audit
        return self

    def with_routing_metadata(self, key: str, value: str) -> AgentResponse:
        self.routing_metadata[key] = value
        return self

    def set_needs_more(self, needs_more: bool = True) -> AgentResponse:
        self.needs_more = needs_more
        return self

    def with_request_body_mutation(self, mutation: BodyMutation) -> AgentResponse:
        self.request_body_mutation = mutation
        return self

    def with_response_body_mutation(self, mutation: BodyMutation) -> AgentResponse:
        self.response_body_mutation = mutation
        return self


RESPONSE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(AgentResponse))
"""AgentResponse's field names in declaration order."""
RESPONSE_WIRE_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(AgentResponse) if f.metadata.get("wire", True)
)
"""The keys of an AgentResponse on the wire, in upstream's struct order."""
RESPONSE_LAZY_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(AgentResponse) if f.metadata.get("lazy")
)
"""The fields a decoded reply builds on first read, in declaration order."""
_LAZY_SLOT: Any = _LazyFields.__dict__["_lazy"]
_LAZY_MEMBERS: dict[str, Any] = {n: AgentResponse.__dict__[n] for n in RESPONSE_LAZY_FIELDS}


# What the decoder left in a reply's ``_lazy`` slot -> its lazy fields by name: the
# correlation id of a canonical Allow, or ``(build, ...)`` that ``build`` turns into them.
_lazy_values: Any = _core.LazyValues(AuditMetadata)
if set(_lazy_values("")) != set(RESPONSE_LAZY_FIELDS):  # pragma: no cover
    raise TypeError("LazyValues does not build every lazy AgentResponse field")


# A lazy field reads its slot (C when compiled); an empty slot is filled from _lazy first.
for _name in RESPONSE_LAZY_FIELDS:
    setattr(
        AgentResponse,
        _name,
        _core.LazyField(AgentResponse, _name, _LAZY_MEMBERS, _LAZY_SLOT, _lazy_values),
    )
del _name


def default_allow() -> AgentResponse:
    """``AgentResponse::default_allow()``: a plain Allow."""
    return AgentResponse()


# --------------------------------------------------------------------------------------------
# Control messages (0x30-0x33 agent -> proxy; 0x40/0x41 proxy -> agent)


@dataclass(slots=True)
class LoadMetrics:
    """Agent load figures inside a tagged :class:`HealthStatus`."""

    in_flight: int = 0
    queue_depth: int = 0
    avg_latency_ms: float = 0.0
    p50_latency_ms: float = 0.0
    p95_latency_ms: float = 0.0
    p99_latency_ms: float = 0.0
    requests_processed: int = 0
    requests_rejected: int = 0
    requests_timed_out: int = 0


@dataclass(slots=True)
class ResourceMetrics:
    """Agent resource usage inside a tagged :class:`HealthStatus`."""

    cpu_percent: float | None = None
    memory_bytes: int | None = None
    memory_limit: int | None = None
    active_threads: int | None = None
    open_fds: int | None = None
    fd_limit: int | None = None
    connections: int | None = None


@dataclass(slots=True)
class HealthStatus:
    """Agent health report (0x30).

    ``state`` is UNSPECIFIED when the report carried none. The detail fields are filled from
    the tagged form (``{"status": "degraded", ...}``) and carried as extra keys otherwise.
    """

    agent_id: str
    state: HealthState
    message: str | None = None
    timestamp_ms: int = 0
    load: LoadMetrics | None = None
    resources: ResourceMetrics | None = None
    valid_until_ms: int | None = None
    disabled_features: list[str] = field(default_factory=list)
    timeout_multiplier: float | None = None
    drain_eta_ms: int | None = None
    unhealthy_reason: str | None = None
    recoverable: bool | None = None


@dataclass(slots=True)
class CounterMetric:
    name: str
    value: int
    help: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class GaugeMetric:
    name: str
    value: float
    help: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class HistogramBucket:
    """One cumulative bucket; ``le`` may be ``math.inf`` (``"+Inf"`` on the wire)."""

    le: float
    count: int


@dataclass(slots=True)
class HistogramMetric:
    name: str
    sum: float
    count: int
    buckets: list[HistogramBucket] = field(default_factory=list)
    help: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class MetricsReport:
    """Agent-reported metrics (0x31)."""

    agent_id: str
    timestamp_ms: int
    interval_ms: int
    counters: list[CounterMetric] = field(default_factory=list)
    gauges: list[GaugeMetric] = field(default_factory=list)
    histograms: list[HistogramMetric] = field(default_factory=list)


@dataclass(slots=True)
class RuleDefinition:
    id: str
    priority: int
    definition: Any
    enabled: bool = True
    description: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass(slots=True)
class RequestReload:
    TYPE: ClassVar[str] = "request_reload"


@dataclass(slots=True)
class RuleUpdate:
    TYPE: ClassVar[str] = "rule_update"

    rule_set: str
    rules: list[RuleDefinition] = field(default_factory=list)
    remove_rules: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ListUpdate:
    TYPE: ClassVar[str] = "list_update"

    list_id: str
    add: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)


@dataclass(slots=True)
class RestartRequired:
    TYPE: ClassVar[str] = "restart_required"

    reason: str
    grace_period_ms: int = 0


@dataclass(slots=True)
class ConfigError:
    TYPE: ClassVar[str] = "config_error"

    error: str
    field: str | None = None


ConfigUpdateType: TypeAlias = (
    RequestReload | RuleUpdate | ListUpdate | RestartRequired | ConfigError
)


@dataclass(slots=True)
class ConfigUpdateRequest:
    """Agent asks the proxy for a configuration change (0x32)."""

    update_type: ConfigUpdateType
    request_id: str
    timestamp_ms: int = 0


@dataclass(slots=True)
class ConfigUpdateResponse:
    """The proxy's answer to a :class:`ConfigUpdateRequest` (0x32 frame back to the agent)."""

    request_id: str
    accepted: bool
    error: str | None = None
    timestamp_ms: int = 0

    @classmethod
    def success(cls, request_id: str) -> ConfigUpdateResponse:
        return cls(request_id, True, None, now_ms())

    @classmethod
    def failure(cls, request_id: str, error: str) -> ConfigUpdateResponse:
        return cls(request_id, False, error, now_ms())


@dataclass(slots=True)
class FlowControlSignal:
    """Backpressure from the agent (0x33): PAUSE, RESUME or UPDATE_CAPACITY."""

    action: FlowAction
    correlation_id: str | None = None
    timestamp_ms: int = 0
    buffer_available: int | None = None

    @property
    def is_pause(self) -> bool:
        return self.action == FlowAction.PAUSE


ControlMessage: TypeAlias = (
    HealthStatus | MetricsReport | ConfigUpdateRequest | FlowControlSignal | ConfigUpdateResponse
)


@dataclass(slots=True)
class CancelRequest:
    """Cancel (0x40): ``reason`` is the 0-based UDS number (docs/protocol.md)."""

    correlation_id: str
    reason: CancelReason
    timestamp_ms: int = 0


@dataclass(slots=True)
class Ping:
    """Ping (0x41); the agent echoes the payload verbatim as Pong (0x42)."""

    sequence: int
    timestamp_ms: int = 0


# --------------------------------------------------------------------------------------------
# Reverse-connection registration (frames 0x01 / 0x02 on a reverse listener)


@dataclass(slots=True)
class RegistrationRequest:
    """Sent by an agent that dials the proxy (§7.2)."""

    protocol_version: int
    agent_id: str
    capabilities: AgentCapabilities
    auth_token: str | None = None
    metadata: Any = None


@dataclass(slots=True)
class RegistrationResponse:
    """The reverse listener's answer to a :class:`RegistrationRequest`."""

    success: bool
    error: str | None
    proxy_id: str
    proxy_version: str
    connection_id: str
