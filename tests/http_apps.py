"""Applications the HTTP integration tests serve (uvicorn ``--factory``, aiohttp upstream).

``AP_TEST_AGENT`` is the script agent's endpoint (tests/agents/http_agent.py).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any
from urllib.parse import parse_qs

import orjson

from agentpool.asgi import AgentMiddleware
from agentpool.http import AgentRule, HeaderGuard, Route


def routes() -> list[Route]:
    return [
        Route("/skip/*", []),
        Route("/open/*", ["script"], failure="open", timeout=0.5),
        Route("/retry/*", ["script"], failure=503, retry_after=7, timeout=0.5),
        Route("/body/*", [AgentRule("script", request_body="stream")], timeout=2.0),
        Route(
            "/bodybuf/*",
            [AgentRule("script", request_body="buffer", max_body_size=64)],
            timeout=2.0,
        ),
        Route("/limit/*", ["script"], max_body_size=16),
        Route("/respbuf*", [AgentRule("script", response_body="buffer")], timeout=2.0),
        Route("/resp*", [AgentRule("script", response_body="stream")], timeout=2.0),
        Route("*", ["script"], timeout=0.5),
    ]


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Echoes path, headers and body as JSON; ``/slow`` waits 1 s; ``/resp*`` streams."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await _ws_echo(receive, send)
        return
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["path"]
    if path.endswith("/slow"):
        query = parse_qs(scope["query_string"].decode())
        await asyncio.sleep(float(query.get("s", ["1"])[0]))
    if path.startswith("/resp"):
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": b"hello upstream ", "more_body": True})
        await send({"type": "http.response.body", "body": b"bye upstream", "more_body": False})
        return
    headers: dict[str, list[str]] = {}
    for k, v in scope["headers"]:
        headers.setdefault(k.decode("latin-1"), []).append(v.decode("latin-1"))
    payload = orjson.dumps(
        {
            "path": path,
            "headers": headers,
            "body": body.decode("latin-1"),
            "pid": os.getpid(),
            "agentpool": scope.get("agentpool"),
        }
    )
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def _ws_echo(receive: Any, send: Any) -> None:
    message = await receive()
    assert message["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text == "say-hidden":
            await send({"type": "websocket.send", "text": "hidden"})
            await send({"type": "websocket.send", "text": "visible"})
        else:
            await send({"type": "websocket.send", "text": f"echo:{text}"})


def asgi() -> AgentMiddleware:
    """uvicorn factory: the echo app behind the script agent."""
    return AgentMiddleware(
        echo_app,
        agents={"script": os.environ["AP_TEST_AGENT"]},
        routes=routes(),
        guard=HeaderGuard(deny=["x-forbidden-*"]),
    )


def starlette() -> Any:
    """uvicorn factory: a Starlette app wrapped by ``add_middleware`` with the example WAF."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route as SRoute

    async def home(request: Request) -> JSONResponse:
        return JSONResponse({"checked": request.headers.get("x-agentpool-checked")})

    return Starlette(
        routes=[SRoute("/{path:path}", home)],
        middleware=[Middleware(AgentMiddleware, agents={"waf": os.environ["AP_TEST_AGENT"]})],
    )


async def _aio_echo(request: Any) -> Any:
    from aiohttp import web

    path = request.path
    if path == "/ws":
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.data == "say-hidden":
                await ws.send_str("hidden")
                await ws.send_str("visible")
            else:
                await ws.send_str(f"echo:{msg.data}")
        return ws
    body = await request.read()
    if path.endswith("/slow"):
        await asyncio.sleep(float(request.query.get("s", "1")))
    if path.startswith("/respbuf"):
        return web.Response(text="hello upstream bye upstream")
    if path.startswith("/resp"):
        resp = web.StreamResponse(headers={"content-type": "text/plain"})
        await resp.prepare(request)
        await resp.write(b"hello upstream ")
        await asyncio.sleep(0.01)
        await resp.write(b"bye upstream")
        await resp.write_eof()
        return resp
    headers: dict[str, list[str]] = {}
    for k, v in request.raw_headers:
        headers.setdefault(k.decode("latin-1").lower(), []).append(v.decode("latin-1"))
    return web.json_response(
        {"path": path, "headers": headers, "body": body.decode("latin-1"), "pid": os.getpid()}
    )


def aiohttp_upstream(argv: Any = None) -> Any:
    """``python -m aiohttp.web http_apps:aiohttp_upstream``: the echo app for the proxy."""
    from aiohttp import web

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _aio_echo)
    return app


def aiohttp_app(argv: Any = None) -> Any:
    """The echo app behind the script agent through ``agentpool.aiohttp.setup``."""
    from agentpool.aiohttp import setup

    app = aiohttp_upstream()
    setup(
        app,
        agents={"script": os.environ["AP_TEST_AGENT"]},
        routes=routes(),
        guard=HeaderGuard(deny=["x-forbidden-*"]),
    )
    return app


def proxy_config(agent: str, upstream: str) -> dict[str, Any]:
    """The proxy's JSON config with the same routes as :func:`routes`."""
    script = "script"
    return {
        "upstream": upstream,
        "agents": {script: agent},
        "guard": {"deny": ["x-forbidden-*"]},
        "routes": [
            {"path": "/skip/*", "agents": []},
            {"path": "/open/*", "agents": [script], "failure": "open", "timeout": 0.5},
            {
                "path": "/retry/*",
                "agents": [script],
                "failure": 503,
                "retry_after": 7,
                "timeout": 0.5,
            },
            {
                "path": "/body/*",
                "agents": [{"agent": script, "request_body": "stream"}],
                "timeout": 2,
            },
            {
                "path": "/bodybuf/*",
                "agents": [{"agent": script, "request_body": "buffer", "max_body_size": 64}],
                "timeout": 2,
            },
            {"path": "/limit/*", "agents": [script], "max_body_size": 16},
            {
                "path": "/respbuf*",
                "agents": [{"agent": script, "response_body": "buffer"}],
                "timeout": 2,
            },
            {
                "path": "/resp*",
                "agents": [{"agent": script, "response_body": "stream"}],
                "timeout": 2,
            },
            {"path": "*", "agents": [script], "timeout": 0.5},
        ],
    }
