"""``uvicorn --factory http_fastapi_app:app``: a FastAPI app (HTTP and WebSocket routes) behind
the script agent. No ``from __future__ import annotations``: FastAPI reads the handlers'
annotations at run time."""

import os
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from http_apps import routes

from agentpool.asgi import AgentMiddleware


def app() -> FastAPI:
    api = FastAPI()

    @api.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.send_text(f"echo:{await websocket.receive_text()}")
        except WebSocketDisconnect:
            return

    @api.api_route("/{path:path}", methods=["GET", "POST"])
    async def echo(path: str, request: Request) -> dict[str, Any]:
        return {
            "path": "/" + path,
            "body": (await request.body()).decode("latin-1"),
            "added": request.headers.get("x-added"),
            "agentpool": request.scope.get("agentpool"),
        }

    api.add_middleware(
        AgentMiddleware, agents={"script": os.environ["AP_TEST_AGENT"]}, routes=routes()
    )
    return api
