"""Writing an agent: the :class:`Agent` base class, its :class:`ErrorPolicy` and the dispatch
of one decoded event to its handler (:func:`handle_event`), shared by every transport (v2
sessions, v1 sessions, gRPC streams).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .. import codec as _codec
from .._version import __version__
from ..enums import CancelReason, EventType, MessageType
from ..messages import (
    AgentCapabilities,
    AgentFeatures,
    AgentLimits,
    AgentResponse,
    AuditMetadata,
    Block,
    ConfigureEvent,
    GuardrailInspectEvent,
    HandshakeRequest,
    RequestBodyChunkEvent,
    RequestCompleteEvent,
    RequestHeadersEvent,
    ResponseBodyChunkEvent,
    ResponseHeadersEvent,
    WebSocketClose,
    WebSocketFrameEvent,
)

__all__ = ["DEFAULT_ERROR_POLICY", "Agent", "ErrorPolicy", "event_correlation_id", "handle_event"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ErrorPolicy:
    """What the agent answers for an event it cannot decode or whose handler fails.

    ``ErrorPolicy.block(status)`` (the default, status 500) answers Block: a security agent
    that crashed has not inspected the request, so letting it through would turn every bug
    or malformed event into a bypass. ``ErrorPolicy.allow()`` fails open, as upstream's Rust
    agents do, for agents whose verdict is advisory. Either way the failure is logged with
    the event's correlation id, and the reply carries the audit tag ``agent-error`` (handler
    raised, returned a non-response, or its response could not be encoded) or
    ``decode-error``. WebSocket frames also get ``websocket_decision``: ``"allow"``, or a
    close with code 1011 when blocking.
    """

    action: Literal["allow", "block"] = "block"
    status: int = 500
    body: str | None = None

    def __post_init__(self) -> None:
        if self.action not in ("allow", "block"):
            raise ValueError(f"ErrorPolicy action must be 'allow' or 'block', not {self.action!r}")
        if isinstance(self.status, bool) or not isinstance(self.status, int):
            raise ValueError(f"ErrorPolicy status must be an int, not {self.status!r}")
        if not 100 <= self.status <= 599:
            raise ValueError(f"ErrorPolicy status must be an HTTP status (100-599): {self.status}")

    @classmethod
    def allow(cls) -> ErrorPolicy:
        """Fail open: answer Allow."""
        return cls("allow")

    @classmethod
    def block(cls, status: int = 500, body: str | None = None) -> ErrorPolicy:
        """Fail closed: answer Block with ``status`` (and ``body``)."""
        return cls("block", status, body)

    def response(self, msg_type: int, tag: str = "agent-error") -> AgentResponse:
        """The reply this policy gives for a failed event of type ``msg_type``."""
        audit = AuditMetadata(tags=[tag])
        if self.action == "allow":
            resp = AgentResponse(audit=audit)
            if msg_type == MessageType.WEBSOCKET_FRAME:
                resp.websocket_decision = "allow"
            return resp
        resp = AgentResponse(decision=Block(self.status, self.body), audit=audit)
        if msg_type == MessageType.WEBSOCKET_FRAME:
            resp.websocket_decision = WebSocketClose(1011, "agent error")
        return resp

    def __str__(self) -> str:
        return "allow" if self.action == "allow" else f"block {self.status}"


DEFAULT_ERROR_POLICY = ErrorPolicy()


def event_correlation_id(event: Any) -> str:
    """The correlation id of a decoded event ("" when it has none)."""
    if isinstance(event, RequestHeadersEvent):
        return event.metadata.correlation_id
    return str(getattr(event, "correlation_id", "") or "")


class Agent:
    """Base class for Python agents: override the ``on_*`` handlers you need.

    Every event handler returns an :class:`AgentResponse` (default: Allow). Handlers of one
    connection run concurrently as tasks; a Cancel for a running request calls
    :meth:`on_cancel` and cancels the handler task (no reply is sent for it then).
    ``fast_path`` may be overridden to answer raw payloads without decoding (benchmarks).

    ``max_concurrency`` is advertised in the handshake (``concurrent_requests``) and
    enforced: a connection never runs more handlers at once; further events wait (and the
    connection stops reading) until one finishes. ``on_error`` answers events that cannot
    be decoded or whose handler fails (see :class:`ErrorPolicy`; Block 500 by default).
    """

    agent_id: str = "python-agent"
    name: str = "Python agent"
    version: str = __version__
    supported_events: Sequence[EventType] = (
        EventType.REQUEST_HEADERS,
        EventType.REQUEST_BODY_CHUNK,
        EventType.RESPONSE_HEADERS,
        EventType.RESPONSE_BODY_CHUNK,
        EventType.REQUEST_COMPLETE,
        EventType.WEBSOCKET_FRAME,
        EventType.GUARDRAIL_INSPECT,
        EventType.CONFIGURE,
    )
    max_concurrency: int = 100
    on_error: ErrorPolicy = DEFAULT_ERROR_POLICY

    def capabilities(self) -> AgentCapabilities:
        """What the handshake advertises."""
        return AgentCapabilities(
            agent_id=self.agent_id,
            name=self.name,
            version=self.version,
            supported_events=list(self.supported_events),
            features=AgentFeatures(
                streaming_body=True,
                websocket=True,
                guardrails=True,
                config_push=True,
                metrics_export=True,
                concurrent_requests=self.max_concurrency,
                cancellation=True,
                flow_control=True,
                health_reporting=True,
            ),
            limits=AgentLimits(),
        )

    def fast_path(self, msg_type: int, payload: bytes, codec: _codec.Codec) -> bytes | None:
        """Answer an event from its raw payload (return the AgentResponse payload) or None."""
        return None

    async def on_request_headers(self, event: RequestHeadersEvent) -> AgentResponse:
        return AgentResponse.allow()

    async def on_request_body_chunk(self, event: RequestBodyChunkEvent) -> AgentResponse:
        return AgentResponse.allow()

    async def on_response_headers(self, event: ResponseHeadersEvent) -> AgentResponse:
        return AgentResponse.allow()

    async def on_response_body_chunk(self, event: ResponseBodyChunkEvent) -> AgentResponse:
        return AgentResponse.allow()

    async def on_request_complete(self, event: RequestCompleteEvent) -> AgentResponse:
        return AgentResponse.allow()

    async def on_websocket_frame(self, event: WebSocketFrameEvent) -> AgentResponse:
        return AgentResponse.websocket_allow()

    async def on_guardrail_inspect(self, event: GuardrailInspectEvent) -> AgentResponse:
        return AgentResponse.allow()

    async def on_configure(self, config: Any, config_version: str | None) -> bool:
        """Accept (True) or reject (False) a configuration pushed by the proxy."""
        return True

    async def on_cancel(self, correlation_id: str, reason: CancelReason) -> None:
        """The proxy cancelled ``correlation_id`` (its handler task is cancelled next)."""

    def on_handshake(self, request: HandshakeRequest) -> str | None:
        """Return an error string to refuse the proxy, None to accept."""
        return None


async def handle_event(
    agent: Agent,
    msg_type: int,
    event: Any,
    cid: str = "",
    on_error: ErrorPolicy | None = None,
) -> AgentResponse:
    """Run the agent's handler for one decoded event.

    A handler that raises or returns something other than an :class:`AgentResponse` is
    answered by ``on_error`` (default: the agent's :attr:`Agent.on_error`), logged with
    the correlation id.
    """
    try:
        if msg_type == MessageType.REQUEST_HEADERS:
            result: Any = await agent.on_request_headers(event)
        elif msg_type == MessageType.REQUEST_BODY_CHUNK:
            result = await agent.on_request_body_chunk(event)
        elif msg_type == MessageType.RESPONSE_HEADERS:
            result = await agent.on_response_headers(event)
        elif msg_type == MessageType.RESPONSE_BODY_CHUNK:
            result = await agent.on_response_body_chunk(event)
        elif msg_type == MessageType.REQUEST_COMPLETE:
            result = await agent.on_request_complete(event)
        elif msg_type == MessageType.WEBSOCKET_FRAME:
            result = await agent.on_websocket_frame(event)
        elif msg_type == MessageType.GUARDRAIL_INSPECT:
            result = await agent.on_guardrail_inspect(event)
        else:
            assert isinstance(event, ConfigureEvent)
            if await agent.on_configure(event.config, event.config_version):
                return AgentResponse.allow()
            return AgentResponse(decision=Block(status=500, body="Configuration rejected"))
    except asyncio.CancelledError:
        raise
    except Exception:
        policy = agent.on_error if on_error is None else on_error
        log.exception(
            "handler for event 0x%02x (correlation id %r) failed; answering %s",
            msg_type,
            cid,
            policy,
        )
        return policy.response(msg_type)
    if not isinstance(result, AgentResponse):
        policy = agent.on_error if on_error is None else on_error
        log.error(
            "handler for event 0x%02x (correlation id %r) returned %s, not an AgentResponse;"
            " answering %s",
            msg_type,
            cid,
            type(result).__name__,
            policy,
        )
        return policy.response(msg_type)
    return result
