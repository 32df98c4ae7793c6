"""The agent side: write Zentinel agents in Python (docs/protocol.md, "Agent side").

Subclass :class:`Agent`, override the handlers you need, and serve it with
:class:`AgentServer` on a Unix socket or a TCP port, or dial a proxy's reverse listener with
:func:`connect_reverse`. ``agentpool.agent.grpc`` serves the same agent over gRPC (it imports
grpcio; this package does not). The example agents of ``agentpool agent --example NAME`` are
in ``agentpool.agent.examples``.

The proxy side (the pool and everything it uses) never imports this package.
"""

from __future__ import annotations

from .base import Agent, ErrorPolicy, handle_event
from .reverse import ReverseAgentConnection, connect_reverse, register_reverse, serve_reverse
from .server import AgentServer
from .session import AgentSession, current_session
from .session_v1 import V1Session

__all__ = [
    "Agent",
    "AgentServer",
    "AgentSession",
    "ErrorPolicy",
    "ReverseAgentConnection",
    "V1Session",
    "connect_reverse",
    "current_session",
    "handle_event",
    "register_reverse",
    "serve_reverse",
]
