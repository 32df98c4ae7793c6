"""The agentpool exception hierarchy.

One base, :class:`AgentProtocolError`, with a subclass per upstream error kind. The
messages match upstream's ``Display`` strings so logs and alerts built for the Rust
proxy keep working (the closing parenthesis of ``MessageTooLarge`` is restored).
"""

from __future__ import annotations

import errno

__all__ = [
    "AddressInUse",
    "AgentNotFound",
    "AgentProtocolError",
    "CircuitBreakerOpen",
    "ConnectionClosed",
    "ConnectionFailed",
    "DuplicateCorrelationId",
    "FlowControlPaused",
    "InvalidEndpoint",
    "InvalidMessage",
    "Io",
    "MessageTooLarge",
    "RequestCancelled",
    "Serialization",
    "Timeout",
    "Unavailable",
    "VersionMismatch",
    "WrongConnectionType",
    "format_duration",
]


_DURATION_UNITS = ((1_000_000_000, 9, "s"), (1_000_000, 6, "ms"), (1_000, 3, "µs"))


def format_duration(seconds: float) -> str:
    """Render a duration the way Rust's ``Duration`` Debug does (``30s``, ``100ms``, ``1.5s``)."""
    if seconds < 0:
        seconds = 0.0
    nanos = round(seconds * 1_000_000_000)
    unit = next((u for u in _DURATION_UNITS if nanos >= u[0]), None)
    if unit is None:
        return f"{nanos}ns"
    size, width, suffix = unit
    whole, frac = divmod(nanos, size)
    if frac == 0:
        return f"{whole}{suffix}"
    digits = str(frac).rjust(width, "0").rstrip("0")
    return f"{whole}.{digits}{suffix}"


class AgentProtocolError(Exception):
    """Base of every error raised by agentpool."""


class ConnectionFailed(AgentProtocolError):
    """Connecting, handshaking or finding a usable connection failed."""

    def __init__(self, message: str) -> None:
        super().__init__(f"Connection failed: {message}")
        self.reason = message


class InvalidEndpoint(ConnectionFailed):
    """An endpoint string that can never be connected to (bad scheme, missing or bad port...).

    Raised at once by :meth:`AgentPool.add_agent` instead of registering an agent that would
    be retried forever; ``endpoint`` is the string given.
    """

    def __init__(self, endpoint: str, problem: str) -> None:
        super().__init__(f"invalid endpoint {endpoint!r}: {problem}")
        self.endpoint = endpoint
        self.problem = problem


class ConnectionClosed(AgentProtocolError):
    """The connection closed (EOF, reset, close()) or the waiter was dropped."""

    def __init__(self, detail: str | None = None) -> None:
        super().__init__("Connection closed" if not detail else f"Connection closed: {detail}")
        self.detail = detail


class VersionMismatch(AgentProtocolError):
    """The peer speaks a protocol version we do not."""

    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"Protocol version mismatch: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class MessageTooLarge(AgentProtocolError):
    """A frame's length exceeds the limit."""

    def __init__(self, size: int, max: int) -> None:
        super().__init__(f"Message too large: {size} bytes (max: {max})")
        self.size = size
        self.max = max


class InvalidMessage(AgentProtocolError):
    """A frame or payload is malformed; ``field`` names the offending field when known."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"Invalid message format: {message}")
        self.reason = message
        self.field = field


class AgentNotFound(InvalidMessage):
    """No agent of that id is registered (upstream reports it as an invalid message)."""

    def __init__(self, agent_id: str) -> None:
        super().__init__(f"Agent {agent_id} not found", field="agent_id")
        self.agent_id = agent_id


class Timeout(AgentProtocolError, TimeoutError):
    """An operation did not finish within its deadline (``timeout`` seconds).

    ``phase`` says what timed out (``connect``, ``handshake``, ``request``, ``ping``...);
    ``agent_id`` and ``correlation_id`` name the agent and request when known. The message
    starts with upstream's text (``Timeout after 5s``) and adds them in parentheses.
    """

    def __init__(
        self,
        timeout: float,
        *,
        agent_id: str | None = None,
        phase: str = "request",
        correlation_id: str | None = None,
    ) -> None:
        message = f"Timeout after {format_duration(timeout)}"
        details = []
        if agent_id is not None or correlation_id is not None or phase != "request":
            details.append(phase)
        if agent_id is not None:
            details.append(f"agent {agent_id!r}")
        if correlation_id is not None:
            details.append(f"correlation id {correlation_id!r}")
        if details:
            message += f" ({', '.join(details)})"
        super().__init__(message)
        self.timeout = timeout
        self.agent_id = agent_id
        self.phase = phase
        self.correlation_id = correlation_id


class RequestCancelled(ConnectionClosed):
    """The proxy cancelled the request (``cancel_request``, ``cancel``, shutdown).

    A :class:`ConnectionClosed` for compatibility; it never counts as an agent failure.
    """


class DuplicateCorrelationId(AgentProtocolError):
    """Refused before sending: the correlation id is still in flight (or owes a reply).

    A reply is matched to its request by correlation id only, so a second request with an id
    whose reply is still owed could receive the first one's verdict (docs/protocol.md).
    """

    def __init__(self, correlation_id: str, where: str) -> None:
        super().__init__(
            f"Duplicate correlation id: {correlation_id!r} is still in flight on {where}"
        )
        self.correlation_id = correlation_id
        self.where = where


class Unavailable(AgentProtocolError):
    """The agent cannot take requests right now."""

    def __init__(self, detail: str | None = None) -> None:
        super().__init__("Agent unavailable" if not detail else f"Agent unavailable: {detail}")
        self.detail = detail


class CircuitBreakerOpen(Unavailable):
    """The agent's circuit breaker is open: the call failed fast without touching the agent."""

    def __init__(self, agent_id: str) -> None:
        super().__init__(f"circuit breaker open for agent '{agent_id}'")
        self.agent_id = agent_id


class Io(AgentProtocolError):
    """A socket-level I/O error."""

    def __init__(self, error: object) -> None:
        super().__init__(f"IO error: {error}")
        self.error = error


class Serialization(AgentProtocolError):
    """A message could not be encoded."""

    def __init__(self, message: str) -> None:
        super().__init__(f"Serialization error: {message}")
        self.reason = message


class WrongConnectionType(AgentProtocolError):
    """An operation is not supported by this kind of connection."""

    def __init__(self, message: str) -> None:
        super().__init__(f"Wrong connection type: {message}")
        self.reason = message


class FlowControlPaused(AgentProtocolError):
    """The agent asked for backpressure and the pool is in fail-closed mode."""

    def __init__(self, agent_id: str) -> None:
        super().__init__(f"Flow control paused: agent '{agent_id}' requested backpressure")
        self.agent_id = agent_id


class AddressInUse(ConnectionFailed, OSError):
    """A Unix socket path cannot be bound: a live listener owns it, or it is not a socket.

    Also an :class:`OSError` with ``errno`` ``EADDRINUSE``, like the error a taken TCP port
    raises, so code that handles a busy address handles both.
    """

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"cannot listen on unix:{path}: {detail}")
        self.errno = errno.EADDRINUSE
        self.path = path
