"""agentpool: a connection pool for Zentinel v2 external processing agents.

The top level holds what a proxy or an agent author writes: the pool and its configuration,
events, responses and decisions, the errors, the agent base class and server, and the
Prometheus collector. Everything else lives in its module: message types of the control
channel and the handshake in ``agentpool.messages``, enums in ``agentpool.enums``, payload
codecs in ``agentpool.codec``, framing in ``agentpool.framing``, the config-push ledger in
``agentpool.control``, connections in ``agentpool.connection`` (README, "Where things are").

The agent side (``Agent``, ``AgentServer``, ``ErrorPolicy``, ``connect_reverse``,
``serve_reverse``) is imported on first use (PEP 562), so ``import agentpool`` in a proxy
does not load it.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .circuit import CircuitBreakerConfig
from .config import AgentPoolConfig
from .control import ConfigPusherConfig
from .enums import CancelReason, EventType, FlowControlMode, HealthState, LoadBalanceStrategy
from .errors import (
    AddressInUse,
    AgentNotFound,
    AgentProtocolError,
    CircuitBreakerOpen,
    ConnectionClosed,
    ConnectionFailed,
    DuplicateCorrelationId,
    FlowControlPaused,
    InvalidEndpoint,
    InvalidMessage,
    Io,
    MessageTooLarge,
    RequestCancelled,
    Serialization,
    Timeout,
    Unavailable,
    VersionMismatch,
    WrongConnectionType,
)
from .messages import (
    AgentResponse,
    Allow,
    AuditMetadata,
    Block,
    BodyMutation,
    Challenge,
    ConfigureEvent,
    Decision,
    Event,
    GuardrailInspectEvent,
    HeaderOp,
    Redirect,
    RequestBodyChunkEvent,
    RequestCompleteEvent,
    RequestHeadersEvent,
    RequestMetadata,
    ResponseBodyChunkEvent,
    ResponseHeadersEvent,
    WebSocketClose,
    WebSocketDecision,
    WebSocketFrameEvent,
)
from .metrics import AgentPoolCollector, MetricsCollectorConfig
from .pool import AgentPool
from .reverse import ReverseConnectionConfig, ReverseConnectionListener

if TYPE_CHECKING:
    from .agent import Agent, AgentServer, ErrorPolicy, connect_reverse, serve_reverse

__all__ = [
    "AddressInUse",
    "Agent",
    "AgentNotFound",
    "AgentPool",
    "AgentPoolCollector",
    "AgentPoolConfig",
    "AgentProtocolError",
    "AgentResponse",
    "AgentServer",
    "Allow",
    "AuditMetadata",
    "Block",
    "BodyMutation",
    "CancelReason",
    "Challenge",
    "CircuitBreakerConfig",
    "CircuitBreakerOpen",
    "ConfigPusherConfig",
    "ConfigureEvent",
    "ConnectionClosed",
    "ConnectionFailed",
    "Decision",
    "DuplicateCorrelationId",
    "ErrorPolicy",
    "Event",
    "EventType",
    "FlowControlMode",
    "FlowControlPaused",
    "GuardrailInspectEvent",
    "HeaderOp",
    "HealthState",
    "InvalidEndpoint",
    "InvalidMessage",
    "Io",
    "LoadBalanceStrategy",
    "MessageTooLarge",
    "MetricsCollectorConfig",
    "Redirect",
    "RequestBodyChunkEvent",
    "RequestCancelled",
    "RequestCompleteEvent",
    "RequestHeadersEvent",
    "RequestMetadata",
    "ResponseBodyChunkEvent",
    "ResponseHeadersEvent",
    "ReverseConnectionConfig",
    "ReverseConnectionListener",
    "Serialization",
    "Timeout",
    "Unavailable",
    "VersionMismatch",
    "WebSocketClose",
    "WebSocketDecision",
    "WebSocketFrameEvent",
    "WrongConnectionType",
    "__version__",
    "connect_reverse",
    "serve_reverse",
]

# The agent side, imported on first use: name -> module.
_AGENT_SIDE: dict[str, str] = {
    "Agent": ".agent",
    "AgentServer": ".agent",
    "ErrorPolicy": ".agent",
    "connect_reverse": ".agent",
    "serve_reverse": ".agent",
}

# Names that left the top level (0.1 exported them): they still resolve, with a
# DeprecationWarning that names their module.
_MOVED: dict[str, str] = {
    **dict.fromkeys(
        ("HAS_EXTENSIONS", "MAX_MESSAGE_SIZE", "FrameDecoder", "encode_frame"), "framing"
    ),
    **dict.fromkeys(("JSON_CODEC", "MSGPACK_CODEC", "Codec", "get_codec"), "codec"),
    **dict.fromkeys(("AgentConnection", "ConnectionListener"), "connection"),
    **dict.fromkeys(("CircuitBreaker", "CircuitState"), "circuit"),
    **dict.fromkeys(
        ("ConfigPusher", "ConfigUpdateHandler", "PushResult", "PushStatus", "PushTarget"),
        "control",
    ),
    **dict.fromkeys(("Encoding", "FlowAction", "FlowState", "MessageType"), "enums"),
    **dict.fromkeys(
        ("MetricsCollector", "MetricsSnapshot", "ProtocolMetrics"),
        "metrics",
    ),
    "AgentPoolStats": "pool",
    **dict.fromkeys(
        (
            "AgentCapabilities",
            "AgentFeatures",
            "AgentLimits",
            "CancelRequest",
            "ConfigError",
            "ConfigUpdateRequest",
            "ConfigUpdateResponse",
            "ConfigUpdateType",
            "ControlMessage",
            "CounterMetric",
            "GaugeMetric",
            "HandshakeRequest",
            "HandshakeResponse",
            "HealthStatus",
            "HistogramBucket",
            "HistogramMetric",
            "ListUpdate",
            "LoadMetrics",
            "MetricsReport",
            "Ping",
            "RegistrationRequest",
            "RegistrationResponse",
            "RequestReload",
            "ResourceMetrics",
            "RestartRequired",
            "RuleDefinition",
            "RuleUpdate",
            "default_allow",
        ),
        "messages",
    ),
}


def __getattr__(name: str) -> Any:
    module = _AGENT_SIDE.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value
        return value
    home = _MOVED.get(name)
    if home is not None:
        warnings.warn(
            f"agentpool.{name} is deprecated; import it from agentpool.{home}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(f".{home}", __name__), name)
    raise AttributeError(f"module 'agentpool' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
