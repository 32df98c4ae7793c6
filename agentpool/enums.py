"""Wire-level and policy enumerations shared by the core and the Python layer."""

from __future__ import annotations

import enum

__all__ = [
    "CancelReason",
    "Encoding",
    "EventType",
    "FlowAction",
    "FlowControlMode",
    "FlowState",
    "HealthState",
    "LoadBalanceStrategy",
    "MessageType",
]


class MessageType(enum.IntEnum):
    """v2 UDS frame type bytes (docs/protocol.md, "Wire summary")."""

    HANDSHAKE_REQUEST = 0x01
    HANDSHAKE_RESPONSE = 0x02
    REQUEST_HEADERS = 0x10
    REQUEST_BODY_CHUNK = 0x11
    RESPONSE_HEADERS = 0x12
    RESPONSE_BODY_CHUNK = 0x13
    REQUEST_COMPLETE = 0x14
    WEBSOCKET_FRAME = 0x15
    GUARDRAIL_INSPECT = 0x16
    CONFIGURE = 0x17
    AGENT_RESPONSE = 0x20
    HEALTH_STATUS = 0x30
    METRICS_REPORT = 0x31
    CONFIG_UPDATE_REQUEST = 0x32
    FLOW_CONTROL = 0x33
    CANCEL = 0x40
    PING = 0x41
    PONG = 0x42


class EventType(enum.IntEnum):
    """Event codes in ``capabilities.supported_events`` (agents write 8 for configure)."""

    CONFIGURE = 8
    REQUEST_HEADERS = 1
    REQUEST_BODY_CHUNK = 2
    RESPONSE_HEADERS = 3
    RESPONSE_BODY_CHUNK = 4
    REQUEST_COMPLETE = 5
    WEBSOCKET_FRAME = 6
    GUARDRAIL_INSPECT = 7


class Encoding(str, enum.Enum):
    """Payload encodings negotiated in the handshake."""

    JSON = "json"
    MSGPACK = "msgpack"


class CancelReason(enum.IntEnum):
    """Why a request is cancelled; the value is the 0-based UDS wire number (docs/protocol.md)."""

    CLIENT_DISCONNECT = 0
    TIMEOUT = 1
    BLOCKED_BY_AGENT = 2
    UPSTREAM_ERROR = 3
    PROXY_SHUTDOWN = 4
    MANUAL = 5


class HealthState(enum.IntEnum):
    """Agent-reported health (``{"state": <int>}`` on the wire)."""

    UNSPECIFIED = 0
    HEALTHY = 1
    DEGRADED = 2
    DRAINING = 3
    UNHEALTHY = 4


class FlowAction(enum.IntEnum):
    """Flow-control actions (``{"action": <int>}`` on the wire)."""

    PAUSE = 1
    RESUME = 2
    UPDATE_CAPACITY = 3


class FlowState(enum.IntEnum):
    """Per-connection flow state."""

    NORMAL = 0
    PAUSED = 1
    DRAINING = 2


class LoadBalanceStrategy(enum.IntEnum):
    """Connection selection strategies (docs/pool.md, "Selection")."""

    ROUND_ROBIN = 0
    LEAST_CONNECTIONS = 1
    HEALTH_BASED = 2
    RANDOM = 3


class FlowControlMode(enum.IntEnum):
    """What a send does when its connection is paused by the agent (docs/pool.md)."""

    FAIL_CLOSED = 0
    FAIL_OPEN = 1
    WAIT_AND_RETRY = 2
