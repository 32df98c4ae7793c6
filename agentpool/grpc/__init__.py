"""gRPC transport (``zentinel.agent.v2.AgentServiceV2``): ``pip install 'agentpool[grpc]'``.

Proxy side: :class:`GrpcAgentConnection`, opened by ``AgentPool.add_agent`` and
``AgentConnection.open`` for ``grpc://host:port`` / ``grpcs://host:port`` endpoints. The agent
side, :class:`agentpool.agent.grpc.GrpcAgentServer`, serves an :class:`~agentpool.agent.Agent`
over gRPC with the message conversion of this package. The conversion rules and what gRPC
cannot carry are described in docs/protocol.md ("gRPC transport"). Importing this package
imports grpcio and protobuf; ``import agentpool`` does not.
"""

from __future__ import annotations

from ._client import PROCESS_STREAM, GrpcAgentConnection, GrpcTLS, parse_grpc_endpoint
from ._convert import MAX_MESSAGE_SIZE

__all__ = [
    "MAX_MESSAGE_SIZE",
    "PROCESS_STREAM",
    "GrpcAgentConnection",
    "GrpcTLS",
    "parse_grpc_endpoint",
]
