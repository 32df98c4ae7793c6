"""agentpool: a connection pool for Zentinel v2 external processing agents."""

from __future__ import annotations

from . import errors
from ._impl import HAS_EXTENSIONS, core
from ._version import __version__
from .enums import (
    CancelReason,
    Encoding,
    EventType,
    FlowAction,
    FlowControlMode,
    FlowState,
    HealthState,
    LoadBalanceStrategy,
    MessageType,
)
from .errors import (
    AgentProtocolError,
    CircuitBreakerOpen,
    ConnectionClosed,
    ConnectionFailed,
    FlowControlPaused,
    InvalidMessage,
    Io,
    MessageTooLarge,
    Serialization,
    Timeout,
    Unavailable,
    VersionMismatch,
    WrongConnectionType,
)

FrameDecoder = core.FrameDecoder
encode_frame = core.encode_frame
MAX_MESSAGE_SIZE: int = core.MAX_MESSAGE_SIZE

__all__ = [
    "HAS_EXTENSIONS",
    "MAX_MESSAGE_SIZE",
    "AgentProtocolError",
    "CancelReason",
    "CircuitBreakerOpen",
    "ConnectionClosed",
    "ConnectionFailed",
    "Encoding",
    "EventType",
    "FlowAction",
    "FlowControlMode",
    "FlowControlPaused",
    "FlowState",
    "FrameDecoder",
    "HealthState",
    "InvalidMessage",
    "Io",
    "LoadBalanceStrategy",
    "MessageTooLarge",
    "MessageType",
    "Serialization",
    "Timeout",
    "Unavailable",
    "VersionMismatch",
    "WrongConnectionType",
    "__version__",
    "encode_frame",
    "errors",
]
