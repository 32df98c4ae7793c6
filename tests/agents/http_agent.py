"""Scripted agent for the HTTP integration tests: ``python tests/agents/http_agent.py SOCKET_PATH``.

Behaviour by request path:
``/block`` Block 403 with a body and a header; ``/redirect`` Redirect 302;
``/challenge`` Challenge captcha; ``/edit`` request header edits (three the guard refuses:
Host, Transfer-Encoding, x-forbidden-*) and a response header; ``/stall`` never answers;
``/__completes`` answers 200 with the request ids (``request_id:status``) of the
RequestComplete events seen so far (the test reads the agent's state over HTTP).
Request body chunks: ``attack`` blocks 403, ``secret`` is replaced by ``XXXXXX``; with
``x-needs-more: 1`` every non-last chunk answers needs_more. Response body chunks: ``upstream``
becomes ``UPSTREAM``; ``/respblock`` blocks on response headers. WebSocket frames: ``drop-me``
is dropped, ``close-me`` closes 4000, server frames ``hidden`` are dropped, ``slow*`` frames
are answered after 0.2 s, ``stall`` never.
"""

from __future__ import annotations

import asyncio
import base64
import signal
import sys

import orjson

from agentpool import AgentServer
from agentpool.agent import Agent
from agentpool.messages import (
    AgentResponse,
    Block,
    BodyMutation,
    HeaderOp,
    RequestBodyChunkEvent,
    RequestCompleteEvent,
    RequestHeadersEvent,
    ResponseBodyChunkEvent,
    ResponseHeadersEvent,
    WebSocketFrameEvent,
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class ScriptAgent(Agent):
    agent_id = "script"
    name = "integration test agent"

    def __init__(self) -> None:
        self.completes: list[str] = []
        self.needs_more: set[str] = set()
        self.paths: dict[str, str] = {}
        self.rids: dict[str, str] = {}

    async def on_request_headers(self, event: RequestHeadersEvent) -> AgentResponse:
        path = event.uri.split("?", 1)[0]
        cid = event.metadata.correlation_id
        self.paths[cid] = path
        self.rids[cid] = event.metadata.request_id
        if event.headers.get("x-needs-more") == ["1"]:
            self.needs_more.add(cid)
        meta = {"seen-path": path, "traceparent": event.metadata.traceparent or ""}
        if path == "/block":
            return AgentResponse(
                decision=Block(403, "blocked by agent", {"x-blocked": "1"}), routing_metadata=meta
            )
        if path == "/redirect":
            return AgentResponse.redirect("https://example.test/login", 302)
        if path == "/challenge":
            return AgentResponse.challenge("captcha", {"realm": "test"})
        if path.endswith("/stall"):
            await asyncio.Event().wait()
        if path == "/__completes":
            body = orjson.dumps(self.completes).decode()
            return AgentResponse(decision=Block(200, body, {"content-type": "application/json"}))
        resp = AgentResponse(routing_metadata=meta)
        if path == "/edit":
            resp.request_headers = [
                HeaderOp.set("x-added", "by-agent"),
                HeaderOp.remove("x-remove-me"),
                HeaderOp.set("host", "evil.example"),
                HeaderOp.set("transfer-encoding", "chunked"),
                HeaderOp.set("x-forbidden-by-guard", "1"),
                HeaderOp.set("x-client-ip", event.metadata.client_ip),
                HeaderOp.set("x-request-id-seen", event.metadata.request_id),
            ]
            resp.response_headers = [HeaderOp.set("x-resp-added", "yes")]
        return resp

    async def on_request_body_chunk(self, event: RequestBodyChunkEvent) -> AgentResponse:
        if b"attack" in event.data:
            return AgentResponse.block(403, "attack in body")
        resp = AgentResponse()
        if b"secret" in event.data:
            resp.request_body_mutation = BodyMutation.replace(
                event.chunk_index, _b64(event.data.replace(b"secret", b"XXXXXX"))
            )
        if event.correlation_id in self.needs_more and not event.is_last:
            resp.needs_more = True
        return resp

    async def on_response_headers(self, event: ResponseHeadersEvent) -> AgentResponse:
        if self.paths.get(event.correlation_id) == "/respblock":
            return AgentResponse.block(451, "response blocked")
        return AgentResponse(
            response_headers=[HeaderOp.set("x-resp-status-seen", str(event.status))]
        )

    async def on_response_body_chunk(self, event: ResponseBodyChunkEvent) -> AgentResponse:
        resp = AgentResponse()
        if b"upstream" in event.data:
            resp.response_body_mutation = BodyMutation.replace(
                event.chunk_index, _b64(event.data.replace(b"upstream", b"UPSTREAM"))
            )
        return resp

    async def on_request_complete(self, event: RequestCompleteEvent) -> AgentResponse:
        self.completes.append(f"{self.rids.pop(event.correlation_id, '')}:{event.status}")
        self.paths.pop(event.correlation_id, None)
        return AgentResponse()

    async def on_websocket_frame(self, event: WebSocketFrameEvent) -> AgentResponse:
        if event.data.startswith(b"slow"):
            await asyncio.sleep(0.2)
        if event.data == b"stall":
            await asyncio.Event().wait()
        if event.data == b"drop-me" or (event.data == b"hidden" and not event.client_to_server):
            return AgentResponse.websocket_drop()
        if event.data == b"close-me":
            return AgentResponse.websocket_close(4000, "closed by agent")
        return AgentResponse.websocket_allow()


async def _main(path: str) -> None:
    server = AgentServer(ScriptAgent(), path=path)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"agentpool agent listening on {server.endpoint}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.close()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1]))
