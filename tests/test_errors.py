"""Every error is an AgentProtocolError with upstream's message text."""

from __future__ import annotations

import pytest

import agentpool
from agentpool import errors


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (
            errors.ConnectionFailed("No healthy connections for agent waf"),
            "Connection failed: No healthy connections for agent waf",
        ),
        (errors.ConnectionClosed(), "Connection closed"),
        (errors.VersionMismatch(2, 99), "Protocol version mismatch: expected 2, got 99"),
        (
            errors.MessageTooLarge(16777217, 16777216),
            "Message too large: 16777217 bytes (max: 16777216)",
        ),
        (
            errors.InvalidMessage("Agent waf not found"),
            "Invalid message format: Agent waf not found",
        ),
        (errors.Timeout(30.0), "Timeout after 30s"),
        (errors.Timeout(0.1), "Timeout after 100ms"),
        (errors.Timeout(1.5), "Timeout after 1.5s"),
        (errors.Timeout(0.00025), "Timeout after 250µs"),
        (errors.Unavailable(), "Agent unavailable"),
        (errors.Io("early eof"), "IO error: early eof"),
        (errors.Serialization("bad"), "Serialization error: bad"),
        (errors.WrongConnectionType("grpc"), "Wrong connection type: grpc"),
        (
            errors.FlowControlPaused("waf"),
            "Flow control paused: agent 'waf' requested backpressure",
        ),
    ],
)
def test_upstream_display_strings(exc: errors.AgentProtocolError, text: str) -> None:
    assert str(exc) == text
    assert isinstance(exc, agentpool.AgentProtocolError)


def test_fields_are_kept() -> None:
    e = errors.InvalidMessage("missing field `version`", field="version")
    assert (e.reason, e.field) == ("missing field `version`", "version")
    t = errors.Timeout(2.0)
    assert t.timeout == 2.0
    assert isinstance(t, TimeoutError)
    breaker = errors.CircuitBreakerOpen("waf")
    assert isinstance(breaker, errors.Unavailable)
    assert breaker.agent_id == "waf"
    assert "circuit breaker open" in str(breaker)


def test_every_public_error_derives_from_the_root() -> None:
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, errors.AgentProtocolError), name
