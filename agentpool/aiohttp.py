"""aiohttp middleware: Zentinel agents in front of an aiohttp application.

::

    app = web.Application()
    agentpool.aiohttp.setup(app, agents={"waf": "unix:/run/waf.sock"})

``setup`` opens the pool on startup, adds the agents, drains on cleanup, and installs a
middleware that asks the agents about every request (routes, failure policy, header guard
and body modes as in docs/integrations.md). A body the agents inspect is read by the
middleware (chunk by chunk, each chunk to the agents) and handed to the handler through
``await request.read()`` / ``text()`` / ``json()`` / ``post()``. Responses prepared by the
middleware (any ``web.Response``) can be replaced by a response-phase Block; a handler that
streams its own response gets the response header edits and its chunks (``write``) go through
the body agents; a response-phase Block then aborts the connection (the client sees the
response cut off). WebSocket handlers
(``web.WebSocketResponse``) get the handshake checked with a sticky session, then every text
and binary frame both ways (``receive``/``async for``, ``send_str``/``send_bytes``/
``send_json``/``send_frame``) goes through the agents, whose decision is applied.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

try:
    from aiohttp import WSMsgType, web
    from multidict import CIMultiDict
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"{__name__} needs aiohttp: pip install 'agentpool[aiohttp]' ({exc})"
    ) from exc

from .config import AgentPoolConfig
from .http import Exchange, Glue, HeaderGuard, Headers, Reply, Route, Stop
from .messages import WebSocketClose
from .pool import AgentPool

__all__ = ["GLUE_KEY", "exchange_of", "reply_response", "request_exchange", "setup"]

log = logging.getLogger("agentpool.aiohttp")

GLUE_KEY: web.AppKey[Glue] = web.AppKey("agentpool_glue", Glue)
_RequestKey = getattr(web, "RequestKey", None)  # aiohttp >= 3.13 warns on plain str keys
_EX_KEY: Any = (
    _RequestKey("agentpool_exchange", Exchange) if _RequestKey is not None else "agentpool_exchange"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def reply_response(reply: Reply) -> web.Response:
    """A ``web.Response`` for an agent's reply."""
    headers = CIMultiDict((k, v) for k, v in reply.headers if k != "content-length")
    return web.Response(status=reply.status, headers=headers, body=reply.body)


def _headers(raw: Any) -> Headers:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw]


def request_exchange(glue: Glue, request: web.BaseRequest) -> Exchange | None:
    """The :class:`~agentpool.http.Exchange` for an aiohttp request, or None (no agents)."""
    host = request.headers.get("host", "")
    plan = glue.plan(request.method, host, request.path)
    if plan is None or not plan.agents:
        return None
    peer = request.transport.get_extra_info("peername") if request.transport else None
    client_ip, client_port = ("", 0)
    if isinstance(peer, tuple) and len(peer) >= 2:
        client_ip, client_port = str(peer[0]), int(peer[1])
    ssl = request.transport.get_extra_info("ssl_object") if request.transport else None
    version = request.version
    return glue.exchange(
        plan,
        method=request.method,
        uri=request.raw_path,
        headers=_headers(request.raw_headers),
        client_ip=client_ip,
        client_port=client_port,
        server_name=host.split(":", 1)[0] or None,
        protocol=f"HTTP/{version.major}.{version.minor}",
        tls_version=ssl.version() if ssl is not None else None,
        tls_cipher=ssl.cipher()[0] if ssl is not None and ssl.cipher() else None,
    )


def exchange_of(request: web.BaseRequest) -> Exchange | None:
    """The exchange the middleware made for ``request`` (correlation id, routing metadata)."""
    ex: Exchange | None = request.get(_EX_KEY)
    return ex


def setup(
    app: web.Application,
    agents: Mapping[str, str | Mapping[str, Any]],
    routes: Sequence[Route] | None = None,
    *,
    guard: HeaderGuard | None = None,
    request_id_header: str | None = "x-request-id",
    config: AgentPoolConfig | None = None,
    pool: AgentPool | None = None,
) -> Glue:
    """Put the agents in front of ``app``; returns the :class:`~agentpool.http.Glue`."""
    glue = Glue(
        agents, routes, guard=guard, request_id_header=request_id_header, config=config, pool=pool
    )
    app[GLUE_KEY] = glue

    async def on_startup(_: web.Application) -> None:
        await glue.start()

    async def on_cleanup(_: web.Application) -> None:
        await glue.shutdown()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.on_response_prepare.append(_on_prepare)
    app.middlewares.append(_middleware(glue))
    return glue


async def _read_body(ex: Exchange, request: web.Request) -> bytes:
    out: list[bytes] = []
    inspect = ex.inspects_request_body
    pending: bytes | None = None
    async for chunk in request.content.iter_any():
        if pending is not None:
            out.append(await ex.request_body(pending, False) if inspect else pending)
        if not inspect:
            ex.request_bytes += len(chunk)
            reply = ex.too_large(ex.request_bytes)
            if reply is not None:
                raise Stop(reply)
        pending = chunk
    if inspect:
        out.append(await ex.request_body(pending or b"", True))
    elif pending is not None:
        out.append(pending)
    return b"".join(out)


def _middleware(glue: Glue) -> Any:
    @web.middleware
    async def agentpool_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        ex = request_exchange(glue, request)
        if ex is None:
            return await handler(request)
        if request.headers.get("upgrade", "").lower() == "websocket":
            try:
                return await _websocket(ex, request, handler)
            finally:
                ex.finish_websocket()
        try:
            reply = await ex.request_headers()
            if reply is None and request.content_length is not None:
                reply = ex.too_large(request.content_length)
            if reply is not None:
                ex.status = reply.status
                return reply_response(reply)
            headers = ex.headers
            body: bytes | None = None
            if request.body_exists and (
                ex.inspects_request_body or ex.plan.max_request_body is not None
            ):
                try:
                    body = await _read_body(ex, request)
                except Stop as stop:
                    ex.status = stop.reply.status
                    return reply_response(stop.reply)
                headers = [h for h in headers if h[0] != "content-length"]
                headers.append(("content-length", str(len(body))))
            if headers != _headers(request.raw_headers) or body is not None:
                request = request.clone(headers=CIMultiDict(headers))
                if body is not None:
                    request._read_bytes = body  # the body as read and passed by the agents
            request[_EX_KEY] = ex
            response = await handler(request)
            if response.prepared or isinstance(response, web.WebSocketResponse):
                return response
            reply = await _response_phase(ex, response)
            if reply is not None:
                response = reply_response(reply)
                ex.status = reply.status
            request[_EX_KEY] = None
            await response.prepare(request)
            await response.write_eof()
            return response
        finally:
            ex.finish()

    return agentpool_middleware


async def _websocket(ex: Exchange, request: web.Request, handler: Handler) -> web.StreamResponse:
    """A WebSocket upgrade: the handshake asked with a sticky session; the frames are checked
    by the wrappers :func:`_on_prepare` installs on the handler's ``WebSocketResponse``."""
    reply = await ex.request_headers(session=True)
    if reply is not None:
        ex.status = reply.status
        return reply_response(reply)
    if ex.edited:
        request = request.clone(headers=CIMultiDict(ex.headers))
    request[_EX_KEY] = ex
    return await handler(request)


def _frame(msg_data: Any) -> bytes:
    return msg_data.encode() if isinstance(msg_data, str) else bytes(msg_data)


def _watch_frames(ex: Exchange, ws: web.WebSocketResponse) -> None:
    """Route the handler's frames through the agents: received frames before the handler sees
    them, sent frames before they go out; drop skips a frame, a close closes the connection
    (then nothing more reaches the handler or the client)."""
    receive, send_frame = ws.receive, ws.send_frame
    send_str, send_bytes = ws.send_str, ws.send_bytes
    closed: list[WebSocketClose] = []
    text, binary = WSMsgType.TEXT, WSMsgType.BINARY

    async def close(decision: WebSocketClose) -> None:
        closed.append(decision)
        await ws.close(code=decision.code, message=decision.reason.encode())

    async def checked_receive(timeout: float | None = None) -> Any:
        while True:
            msg = await receive(timeout)
            if closed or (msg.type is not text and msg.type is not binary):
                return msg
            opcode = "text" if msg.type is text else "binary"
            verdict = await ex.websocket_frame(opcode, _frame(msg.data), True)
            if verdict is True:
                return msg
            if isinstance(verdict, WebSocketClose):
                await close(verdict)
                return await receive(timeout)

    async def outgoing(opcode: str, data: bytes) -> bool:
        if closed:
            return False
        verdict = await ex.websocket_frame(opcode, data, False)
        if isinstance(verdict, WebSocketClose):
            await close(verdict)
            return False
        return verdict

    async def checked_send_str(data: str, compress: int | None = None) -> None:
        if await outgoing("text", data.encode()):
            await send_str(data, compress=compress)

    async def checked_send_bytes(data: bytes, compress: int | None = None) -> None:
        if await outgoing("binary", bytes(data)):
            await send_bytes(data, compress=compress)

    async def checked_send_frame(
        message: bytes, opcode: WSMsgType, compress: int | None = None
    ) -> None:
        if opcode is text or opcode is binary:
            if not await outgoing("text" if opcode is text else "binary", bytes(message)):
                return
        await send_frame(message, opcode, compress)

    ws.receive = checked_receive  # type: ignore[method-assign]
    ws.send_str = checked_send_str  # type: ignore[method-assign]
    ws.send_bytes = checked_send_bytes  # type: ignore[method-assign]
    ws.send_frame = checked_send_frame  # type: ignore[method-assign]


async def _response_phase(ex: Exchange, response: web.StreamResponse) -> Reply | None:
    headers = [(k.lower(), v) for k, v in response.headers.items()]
    try:
        reply = await ex.response_headers(response.status, headers)
        if reply is not None:
            return reply
        if ex.inspects_response_body and isinstance(response, web.Response):
            body = response.body
            data = bytes(body) if isinstance(body, (bytes, bytearray)) else b""
            response.body = await ex.response_body(data, True)
        else:
            ex.response_bytes += response.content_length or 0
    except Stop as stop:
        return stop.reply
    response.headers.clear()
    response.headers.extend((k, v) for k, v in headers if k != "content-length")
    return None


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Response header edits for responses a handler prepares itself (streaming)."""
    ex = request.get(_EX_KEY)
    if ex is None:
        return
    request[_EX_KEY] = None
    if isinstance(response, web.WebSocketResponse):
        if ex.plan.websocket:
            _watch_frames(ex, response)
        return
    headers = [(k.lower(), v) for k, v in response.headers.items()]
    reply = await ex.response_headers(response.status, headers)
    if reply is not None:
        # the handler streams this response itself: it cannot be replaced, so it is cut off
        log.warning("agent refused the streamed response of %s; aborting it", ex.correlation_id)
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("response refused by an agent")
    if ex.inspects_response_body and isinstance(response, web.FileResponse):
        # sendfile writes to the transport, not through write(): the agents see no chunk
        log.warning("the body of a FileResponse is not sent to agents (%s)", ex.correlation_id)
    elif ex.inspects_response_body:
        headers = [h for h in headers if h[0] != "content-length"]
        response.content_length = None
        _watch_body(ex, request, response)
    response.headers.clear()
    response.headers.extend(headers)


def _watch_body(ex: Exchange, request: web.Request, response: web.StreamResponse) -> None:
    """Route a streamed response's chunks (``write``/``write_eof``) through the body agents;
    a refusal once the response has started aborts the connection."""
    write, write_eof = response.write, response.write_eof
    done = False

    async def checked(data: Any, last: bool) -> bytes:
        try:
            return await ex.response_body(bytes(data), last)
        except Stop:
            log.warning("agent refused the streamed body of %s; aborting it", ex.correlation_id)
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("response body refused by an agent") from None

    async def checked_write(data: Any) -> None:
        out = await checked(data, False)
        if out:
            await write(out)

    async def checked_write_eof(data: bytes = b"") -> None:
        nonlocal done
        if not done:
            done = True
            out = await checked(data, True)
            if out:
                await write(out)
        await write_eof()

    response.write = checked_write  # type: ignore[method-assign]
    response.write_eof = checked_write_eof  # type: ignore[method-assign]
