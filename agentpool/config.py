"""Configuration of :class:`agentpool.AgentPool`.

Field names and defaults are upstream's ``AgentPoolConfig`` (docs/pool.md); durations are
float seconds. The extra fields (``encoding``, ``circuit_breaker``, ``max_reconnect_backoff``,
``ping_timeout``, ``keepalive``, ``proxy_id``, the sub-configs) are agentpool additions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ._version import __version__
from .circuit import CircuitBreakerConfig
from .control import ConfigPusherConfig
from .enums import FlowControlMode, LoadBalanceStrategy
from .metrics import MetricsCollectorConfig

__all__ = [
    "CHANNEL_BUFFER_SIZE",
    "MAX_RECONNECT_BACKOFF",
    "AgentPoolConfig",
    "CircuitBreakerConfig",
    "ConfigPusherConfig",
    "MetricsCollectorConfig",
]

CHANNEL_BUFFER_SIZE = 64
"""Upstream's outbound queue bound (kept for the ``channel_buffer_size`` default)."""

MAX_RECONNECT_BACKOFF = 120.0
"""Cap of the reconnect backoff, seconds (upstream 0.6.41: two minutes)."""

_ENCODINGS = ("json", "msgpack")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _non_negative_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def _duration(name: str, value: object, *, allow_zero: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if math.isnan(value) or math.isinf(value) or value < 0 or (not allow_zero and value == 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number of seconds {bound}, got {value!r}")


@dataclass(slots=True)
class AgentPoolConfig:
    """Pool settings; every upstream field with its upstream default (durations in seconds).

    ``max_reconnect_attempts`` no longer stops reconnection (docs/pool.md): the first
    ``max_reconnect_attempts`` failed attempts are spaced by ``reconnect_interval``, later ones
    back off exponentially up to ``max_reconnect_backoff`` (120 s), forever. With
    ``keepalive``, maintenance pings v2 connections idle for a ``health_check_interval`` and
    replaces those that do not answer within ``ping_timeout``.
    """

    connections_per_agent: int = 4
    load_balance_strategy: LoadBalanceStrategy = LoadBalanceStrategy.ROUND_ROBIN
    connect_timeout: float = 5.0
    request_timeout: float = 30.0
    reconnect_interval: float = 5.0
    max_reconnect_attempts: int = 3
    drain_timeout: float = 30.0
    max_concurrent_per_connection: int = 100
    health_check_interval: float = 10.0
    channel_buffer_size: int = CHANNEL_BUFFER_SIZE
    flow_control_mode: FlowControlMode = FlowControlMode.FAIL_CLOSED
    flow_control_wait_timeout: float = 0.1
    sticky_session_timeout: float | None = 300.0
    correlation_affinity_ttl: float = 300.0
    max_correlation_affinities: int = 100_000
    # agentpool additions
    encoding: str = "json"
    circuit_breaker: CircuitBreakerConfig | None = field(default_factory=CircuitBreakerConfig)
    max_reconnect_backoff: float = MAX_RECONNECT_BACKOFF
    ping_timeout: float = 2.0
    keepalive: bool = True
    proxy_id: str = "zentinel-proxy"
    proxy_version: str = __version__
    handshake_config: Any = None
    metrics: MetricsCollectorConfig = field(default_factory=MetricsCollectorConfig)
    config_push: ConfigPusherConfig = field(default_factory=ConfigPusherConfig)
    # replies a connection may owe to abandoned requests before it is recycled
    # (docs/protocol.md, "Abandoned requests")
    max_abandoned_replies: int = 1024

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ``ValueError`` naming the first bad one."""
        _positive_int("connections_per_agent", self.connections_per_agent)
        _positive_int("max_concurrent_per_connection", self.max_concurrent_per_connection)
        _positive_int("channel_buffer_size", self.channel_buffer_size)
        _positive_int("max_correlation_affinities", self.max_correlation_affinities)
        _non_negative_int("max_reconnect_attempts", self.max_reconnect_attempts)
        _non_negative_int("max_abandoned_replies", self.max_abandoned_replies)
        try:
            self.load_balance_strategy = LoadBalanceStrategy(self.load_balance_strategy)
        except ValueError:
            raise ValueError(
                f"load_balance_strategy must be a LoadBalanceStrategy, "
                f"got {self.load_balance_strategy!r}"
            ) from None
        try:
            self.flow_control_mode = FlowControlMode(self.flow_control_mode)
        except ValueError:
            raise ValueError(
                f"flow_control_mode must be a FlowControlMode, got {self.flow_control_mode!r}"
            ) from None
        _duration("connect_timeout", self.connect_timeout, allow_zero=False)
        _duration("request_timeout", self.request_timeout, allow_zero=False)
        _duration("reconnect_interval", self.reconnect_interval)
        _duration("drain_timeout", self.drain_timeout)
        _duration("health_check_interval", self.health_check_interval, allow_zero=False)
        _duration("flow_control_wait_timeout", self.flow_control_wait_timeout)
        if self.sticky_session_timeout is not None:
            _duration("sticky_session_timeout", self.sticky_session_timeout)
        _duration("correlation_affinity_ttl", self.correlation_affinity_ttl)
        _duration("max_reconnect_backoff", self.max_reconnect_backoff)
        _duration("ping_timeout", self.ping_timeout, allow_zero=False)
        encoding = getattr(self.encoding, "value", self.encoding)
        if encoding not in _ENCODINGS:
            raise ValueError(f"encoding must be 'json' or 'msgpack', got {self.encoding!r}")
        self.encoding = str(encoding)
        if not isinstance(self.proxy_id, str) or not self.proxy_id:
            raise ValueError(f"proxy_id must be a non-empty string, got {self.proxy_id!r}")
        if self.circuit_breaker is not None and not isinstance(
            self.circuit_breaker, CircuitBreakerConfig
        ):
            raise ValueError(
                "circuit_breaker must be a CircuitBreakerConfig or None, "
                f"got {type(self.circuit_breaker).__name__}"
            )
        if not isinstance(self.metrics, MetricsCollectorConfig):
            raise ValueError(
                f"metrics must be a MetricsCollectorConfig, got {type(self.metrics).__name__}"
            )
        if not isinstance(self.config_push, ConfigPusherConfig):
            raise ValueError(
                f"config_push must be a ConfigPusherConfig, got {type(self.config_push).__name__}"
            )

    def reconnect_delay(self, failed_attempts: int) -> float:
        """Wait before the next reconnect after ``failed_attempts`` consecutive failures."""
        if failed_attempts <= self.max_reconnect_attempts:
            delay = self.reconnect_interval
        else:
            exponent = min(failed_attempts - self.max_reconnect_attempts, 32)
            delay = max(self.reconnect_interval, 0.001) * (2.0**exponent)
        return min(delay, self.max_reconnect_backoff)
