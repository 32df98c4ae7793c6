"""A gRPC test agent process.

``python tests/agents/grpc_agent.py --listen HOST:PORT [--tls-dir D]``.

Serves :class:`GrpcTestAgent` with :class:`agentpool.agent.grpc.GrpcAgentServer` and prints the
usual ``agentpool agent listening on <endpoint>`` line. Behaviour per request is chosen by
headers, as for the UDS control agent: ``x-test-delay: <s>`` waits before answering;
``x-test-action`` (comma-separated): ``pause``/``resume`` (flow control), ``health:<n>``,
``metrics``, ``no-reply``, ``exit`` (kill the process), ``close`` (end the stream),
``garbage`` (a message that is not an AgentToProxy), ``no-decision`` (an AgentResponse with
this correlation id and no decision), ``huge`` (a reply over 4 MiB), ``mutate`` (a reply with
a body mutation, which gRPC cannot carry), ``cancelled`` (reply listing the cancels seen),
``peak`` (reply with the most handlers that ran at once).
Replies carry ``audit.custom["cid"]``, ``["pid"]`` and ``["headers"]`` (the request headers as
JSON). URIs starting with ``/admin`` are blocked 403 and ``/old`` redirected 301. Request body
chunks ask for more until the last one, then block if the body contains ``evil``.
``--refuse TEXT`` refuses every handshake. ``--tls-dir`` serves TLS with
``server.pem``/``server.key`` (and requires client certificates signed by ``ca.pem`` when
``--mtls``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import orjson

from agentpool.agent import Agent, current_session
from agentpool.agent.grpc import GrpcAgentServer
from agentpool.enums import CancelReason, FlowAction, HealthState
from agentpool.grpc import GrpcTLS
from agentpool.grpc import agent_v2_pb2 as pb
from agentpool.messages import (
    AgentResponse,
    AuditMetadata,
    Block,
    BodyMutation,
    CounterMetric,
    HandshakeRequest,
    HeaderOp,
    MetricsReport,
    Redirect,
    RequestBodyChunkEvent,
    RequestCompleteEvent,
    RequestHeadersEvent,
    ResponseHeadersEvent,
)


class GrpcTestAgent(Agent):
    agent_id = "grpc-test"
    name = "agentpool gRPC test agent"

    def __init__(self, refuse: str | None = None) -> None:
        self.cancelled: list[str] = []
        self.bodies: dict[str, bytearray] = {}
        self.refuse = refuse
        self.running = 0
        self.peak = 0

    def on_handshake(self, request: HandshakeRequest) -> str | None:
        return self.refuse

    async def on_cancel(self, correlation_id: str, reason: CancelReason) -> None:
        self.cancelled.append(f"{correlation_id}:{int(reason)}")

    def _audit(self, cid: str, **extra: Any) -> AuditMetadata:
        custom: dict[str, Any] = {"cid": cid, "pid": str(os.getpid())}
        custom.update(extra)
        return AuditMetadata(tags=["grpc-test"], custom=custom)

    async def on_request_headers(self, event: RequestHeadersEvent) -> AgentResponse:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            return await self._headers(event)
        finally:
            self.running -= 1

    async def _headers(self, event: RequestHeadersEvent) -> AgentResponse:
        headers = event.headers
        cid = event.metadata.correlation_id
        delay = headers.get("x-test-delay")
        if delay:
            await asyncio.sleep(float(delay[0]))
        session: Any = current_session.get(None)
        extra: dict[str, Any] = {"headers": orjson.dumps(headers).decode()}
        for spec in headers.get("x-test-action", []):
            for action in filter(None, (a.strip() for a in spec.split(","))):
                if action == "no-reply":
                    await asyncio.Event().wait()
                elif action == "exit":
                    os._exit(3)
                elif action == "pause":
                    session.send_flow_control(FlowAction.PAUSE)
                elif action == "resume":
                    session.send_flow_control(FlowAction.RESUME)
                elif action.startswith("health:"):
                    session.send_health(HealthState(int(action.split(":", 1)[1])), "test")
                elif action == "metrics":
                    session.send_metrics(
                        MetricsReport(
                            agent_id=self.agent_id,
                            timestamp_ms=1,
                            interval_ms=1000,
                            counters=[CounterMetric(name="agent_requests_total", value=7)],
                        )
                    )
                elif action == "close":
                    session.close()
                    await asyncio.Event().wait()
                elif action == "garbage":
                    session.write_raw(b"\xff\xff\xff garbage")
                    await asyncio.Event().wait()
                elif action == "no-decision":
                    msg = pb.AgentToProxy()
                    msg.response.correlation_id = cid
                    msg.response.needs_more = True
                    session.write_raw(msg.SerializeToString())
                    await asyncio.Event().wait()
                elif action == "huge":
                    extra["huge"] = "x" * (4 * 1024 * 1024 + 10)
                elif action == "mutate":
                    return AgentResponse(request_body_mutation=BodyMutation.replace(0, "changed"))
                elif action == "cancelled":
                    extra["cancelled"] = ",".join(self.cancelled)
                elif action == "peak":
                    extra["peak"] = self.peak
        path = event.uri.split("?", 1)[0]
        if path.startswith("/admin"):
            return AgentResponse(
                decision=Block(status=403, body="Forbidden", headers={"x-blocked": "1"}),
                audit=self._audit(cid, **extra),
            )
        if path.startswith("/old"):
            return AgentResponse(decision=Redirect("https://example.test/new", 301))
        return AgentResponse(audit=self._audit(cid, **extra)).add_request_header(
            HeaderOp.set("x-checked", "1")
        )

    async def on_request_body_chunk(self, event: RequestBodyChunkEvent) -> AgentResponse:
        buf = self.bodies.setdefault(event.correlation_id, bytearray())
        buf += event.data
        if not event.is_last:
            return AgentResponse(needs_more=True, audit=self._audit(event.correlation_id))
        body = bytes(self.bodies.pop(event.correlation_id))
        audit = self._audit(event.correlation_id, size=len(body), chunk_index=event.chunk_index)
        if b"evil" in body:
            return AgentResponse(decision=Block(status=422), audit=audit)
        return AgentResponse(audit=audit)

    async def on_response_headers(self, event: ResponseHeadersEvent) -> AgentResponse:
        extra = {"status": event.status, "headers": orjson.dumps(event.headers).decode()}
        return AgentResponse(audit=self._audit(event.correlation_id, **extra))

    async def on_request_complete(self, event: RequestCompleteEvent) -> AgentResponse:
        extra = {"status": event.status, "error": event.error or ""}
        return AgentResponse(audit=self._audit(event.correlation_id, **extra))


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--tls-dir", default=None)
    p.add_argument("--mtls", action="store_true")
    p.add_argument("--max-message", type=int, default=None)
    p.add_argument("--refuse", default=None, help="refuse every handshake with this error")
    p.add_argument("--max-write-buffer", type=int, default=None)
    p.add_argument("--max-concurrency", type=int, default=None)
    args = p.parse_args()
    host, _, port = args.listen.rpartition(":")
    ssl = None
    if args.tls_dir:
        d = Path(args.tls_dir)
        ssl = GrpcTLS(
            certificate_chain=(d / "server.pem").read_bytes(),
            private_key=(d / "server.key").read_bytes(),
            root_certificates=(d / "ca.pem").read_bytes() if args.mtls else None,
        )
    agent = GrpcTestAgent(args.refuse)
    if args.max_concurrency:
        agent.max_concurrency = args.max_concurrency
    server = GrpcAgentServer(agent, host=host, port=int(port), ssl=ssl)
    if args.max_message:
        server.max_message_size = args.max_message
    if args.max_write_buffer:
        server.max_write_buffer = args.max_write_buffer
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"agentpool agent listening on {server.endpoint}", flush=True)
    await stop.wait()
    await server.close()


if __name__ == "__main__":
    asyncio.run(main())
