"""ASGI 3 middleware: Zentinel agents in front of any ASGI application.

::

    app = AgentMiddleware(app, agents={"waf": "unix:/run/waf.sock"})

Runs under uvicorn, hypercorn, granian, with Starlette and FastAPI. The lifespan opens one
pool per worker process, adds the agents and drains them on shutdown (the pool also opens on
the first request when the server runs no lifespan). Behaviour (routes, failure policy,
header guard, bodies, WebSocket) is described in docs/integrations.md.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any

from .config import AgentPoolConfig
from .http import Exchange, Glue, HeaderGuard, Headers, Reply, Route, Stop
from .messages import WebSocketClose
from .pool import AgentPool

__all__ = ["AgentMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("agentpool.asgi")


_PROTOCOLS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0", "2": "HTTP/2", "2.0": "HTTP/2.0", "3": "HTTP/3"}


_NAMES: dict[bytes, str] = {}
_NAMES_MAX = 512


def _name(raw: bytes) -> str:
    """A header name as a lower-case str; the first names seen are kept (at most 512 names of
    at most 64 bytes: clients choose them)."""
    name = raw.decode("latin-1").lower()
    if len(_NAMES) < _NAMES_MAX and len(raw) <= 64:
        _NAMES[raw] = name
    return name


def _latin1(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    names = _NAMES
    return [(names.get(k) or _name(k), v.decode("latin-1")) for k, v in headers]


def _raw(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


def _has_body(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether the request announces a body (a non-zero Content-Length or Transfer-Encoding)."""
    for name, value in headers:
        name = name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


async def _send_reply(send: Send, reply: Reply) -> None:
    headers = [h for h in reply.headers if h[0] != "content-length"]
    headers.append(("content-length", str(len(reply.body))))
    await send({"type": "http.response.start", "status": reply.status, "headers": _raw(headers)})
    await send({"type": "http.response.body", "body": reply.body, "more_body": False})


class AgentMiddleware:
    """Send every request (and WebSocket connection) through Zentinel agents.

    ``agents`` maps names to endpoints or to ``{"endpoint": ..., <AgentRule fields>}``;
    ``routes`` (a list of :class:`~agentpool.http.Route`) picks the agents per request (none:
    every agent for every path). ``guard`` limits the header edits agents may make.
    ``request_id_header`` names the header sent to the agents as ``request_id`` (the
    correlation id is always generated). Pass ``pool`` to share a started pool you manage yourself.
    The request's correlation id and the agents' routing metadata are in
    ``scope["agentpool"]``.
    """

    def __init__(
        self,
        app: ASGIApp,
        agents: Mapping[str, str | Mapping[str, Any]],
        routes: Sequence[Route] | None = None,
        *,
        guard: HeaderGuard | None = None,
        request_id_header: str | None = "x-request-id",
        config: AgentPoolConfig | None = None,
        pool: AgentPool | None = None,
    ) -> None:
        self.app = app
        self.glue = Glue(
            agents,
            routes,
            guard=guard,
            request_id_header=request_id_header,
            config=config,
            pool=pool,
        )

    @property
    def pool(self) -> AgentPool:
        return self.glue.pool

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # -- lifespan

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        glue = self.glue
        used = False

        async def rcv() -> Message:
            nonlocal used
            used = True
            message = await receive()
            if message["type"] == "lifespan.startup":
                await glue.start()
            return message

        async def snd(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await glue.shutdown()
            await send(message)

        try:
            await self.app(scope, rcv, snd)
        except Exception:
            if used:
                raise
            await self._own_lifespan(receive, send)

    async def _own_lifespan(self, receive: Receive, send: Send) -> None:
        """Lifespan for applications that do not speak it themselves."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.glue.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.glue.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- http

    def _exchange(self, scope: Scope, method: str) -> Exchange | None:
        glue = self.glue
        headers = _latin1(scope["headers"])
        host = ""
        for name, value in headers:
            if name == "host":
                host = value
                break
        path = scope["path"]
        plan = glue.plan(method, host, path)
        if plan is None or not plan.agents:
            return None
        raw = scope.get("raw_path")
        uri = raw.decode("latin-1") if raw else path
        query = scope.get("query_string")
        if query:
            uri += "?" + query.decode("latin-1")
        client = scope.get("client") or ("", 0)
        server_name = host.split(":", 1)[0] if host else None
        if not server_name:
            server = scope.get("server")
            server_name = server[0] if server else None
        version = scope.get("http_version", "1.1")
        protocol = _PROTOCOLS.get(version) or f"HTTP/{version}"
        tls_version = tls_cipher = None
        extensions = scope.get("extensions")
        tls = extensions.get("tls") if extensions else None
        if tls:
            tls_version = tls.get("tls_version")
            if isinstance(tls_version, int):
                tls_version = f"0x{tls_version:04x}"
            cipher = tls.get("cipher_suite")
            tls_cipher = str(cipher) if cipher is not None else None
        return Exchange(
            glue,
            plan,
            method,
            uri,
            headers,
            client[0] or "",
            int(client[1] or 0),  # granian gives the port as a string
            server_name,
            protocol,
            tls_version,
            tls_cipher,
        )

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        glue = self.glue
        if not glue.started:
            await glue.start()
        ex = self._exchange(scope, scope["method"])
        if ex is None:
            await self.app(scope, receive, send)
            return
        try:
            reply = await ex.request_headers()
            plan = ex.plan
            if reply is None and plan.max_request_body is not None:
                for name, value in scope["headers"]:
                    if name.lower() == b"content-length":
                        reply = ex.too_large(int(value)) if value.isdigit() else None
                        break
            if reply is not None:
                ex.status = reply.status
                await _send_reply(send, reply)
            elif (
                ex.edited
                or plan.complete
                or plan.max_request_body is not None
                or ex.inspects_request_body
                or ex.inspects_response
            ):
                await self._forward(ex, scope, receive, send)
            else:  # nothing to apply or watch: the app gets the request as it came
                scope["agentpool"] = {
                    "correlation_id": ex.correlation_id,
                    "routing_metadata": ex.routing_metadata,
                }
                await self.app(scope, receive, send)
        finally:
            ex.finish()

    async def _forward(self, ex: Exchange, scope: Scope, receive: Receive, send: Send) -> None:
        inspect_body = ex.inspects_request_body and _has_body(scope["headers"])
        if inspect_body or ex.edited:
            headers = ex.headers
            if inspect_body:
                headers = [h for h in headers if h[0] != "content-length"]
            scope = dict(scope)
            scope["headers"] = _raw(headers)
        scope["agentpool"] = {
            "correlation_id": ex.correlation_id,
            "routing_metadata": ex.routing_metadata,
        }
        limited = inspect_body or ex.plan.max_request_body is not None
        if not limited and not ex.inspects_response:
            counted = self._counting_send(ex, send) if ex.plan.complete else send
            await self.app(scope, receive, counted)
            return
        stopped: list[Reply] = []
        started = False

        async def rcv() -> Message:
            if stopped:  # the agents refused the body: nothing more of it reaches the app
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] != "http.request" or not limited:
                return message
            body = message.get("body", b"")
            more = message.get("more_body", False)
            try:
                while True:
                    if inspect_body:
                        out = await ex.request_body(body, not more)
                    else:
                        ex.request_bytes += len(body)
                        reply = ex.too_large(ex.request_bytes)
                        if reply is not None:
                            raise Stop(reply)
                        out = body
                    if out or not more:
                        return {"type": "http.request", "body": out, "more_body": more}
                    message = await receive()
                    if message["type"] != "http.request":
                        return message
                    body = message.get("body", b"")
                    more = message.get("more_body", False)
            except Stop as stop:
                stopped.append(stop.reply)
                return {"type": "http.disconnect"}

        buffer_body = ex.buffers_response_body
        pending: list[Message] = []
        chunks: list[bytes] = []

        async def snd(message: Message) -> None:
            nonlocal started
            if stopped:
                return
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                headers = _latin1(message.get("headers", ()))
                try:
                    reply = await ex.response_headers(status, headers)
                except Stop as stop:
                    reply = stop.reply
                if reply is not None:
                    stopped.append(reply)
                    return
                if ex.inspects_response_body:
                    headers = [h for h in headers if h[0] != "content-length"]
                message = dict(message)
                message["headers"] = _raw(headers)
                if buffer_body:
                    pending.append(message)
                    return
                started = True
                await send(message)
                return
            if kind != "http.response.body" or not ex.inspects_response_body:
                if kind == "http.response.body":
                    ex.response_bytes += len(message.get("body", b""))
                await send(message)
                return
            body = message.get("body", b"")
            more = message.get("more_body", False)
            try:
                out = await ex.response_body(body, not more)
            except Stop as stop:
                if started:
                    raise RuntimeError(
                        f"agent stopped the response of {ex.correlation_id} after it started"
                    ) from None
                stopped.append(stop.reply)
                return
            if buffer_body:
                chunks.append(out)
                if more:
                    return
                start = pending.pop()
                body = b"".join(chunks)
                start["headers"] = [
                    *start["headers"],
                    (b"content-length", str(len(body)).encode()),
                ]
                started = True
                await send(start)
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            if out or not more:
                await send({"type": "http.response.body", "body": out, "more_body": more})

        try:
            await self.app(scope, rcv, snd)
        except Exception:
            if not stopped or started:
                raise
            # the app failed on the refused body (Starlette raises ClientDisconnect): the
            # agent's reply below is the answer, the connection stays usable
            log.debug("application raised after an agent refusal", exc_info=True)
        finally:
            if stopped and not started:
                reply = stopped[0]
                ex.status = reply.status
                await _send_reply(send, reply)

    @staticmethod
    def _counting_send(ex: Exchange, send: Send) -> Send:
        async def snd(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                ex.status = message["status"]
            elif kind == "http.response.body":
                ex.response_bytes += len(message.get("body", b""))
            await send(message)

        return snd

    # -- websocket

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        glue = self.glue
        if not glue.started:
            await glue.start()
        ex = self._exchange(scope, "GET")
        if ex is None or not ex.plan.agents:
            await self.app(scope, receive, send)
            return
        try:
            reply = await ex.request_headers(session=True)
            if reply is not None:
                await self._deny(scope, receive, send, reply)
                return
            if ex.edited:
                scope = dict(scope)
                scope["headers"] = _raw(ex.headers)
            if not ex.plan.websocket:
                await self.app(scope, receive, send)
                return
            closed: list[WebSocketClose] = []

            async def close(decision: WebSocketClose) -> None:
                closed.append(decision)
                await send(
                    {"type": "websocket.close", "code": decision.code, "reason": decision.reason}
                )

            async def rcv() -> Message:
                while True:
                    if closed:  # closed by an agent: no further frame reaches the app
                        return {"type": "websocket.disconnect", "code": closed[0].code}
                    message = await receive()
                    if message["type"] != "websocket.receive":
                        return message
                    text = message.get("text")
                    data = text.encode() if text is not None else (message.get("bytes") or b"")
                    verdict = await ex.websocket_frame(
                        "text" if text is not None else "binary", data, True
                    )
                    if verdict is True:
                        return message
                    if isinstance(verdict, WebSocketClose):
                        await close(verdict)
                        return {"type": "websocket.disconnect", "code": verdict.code}

            async def snd(message: Message) -> None:
                if closed:
                    return
                if message["type"] == "websocket.send":
                    text = message.get("text")
                    data = text.encode() if text is not None else (message.get("bytes") or b"")
                    verdict = await ex.websocket_frame(
                        "text" if text is not None else "binary", data, False
                    )
                    if verdict is False:
                        return
                    if isinstance(verdict, WebSocketClose):
                        await close(verdict)
                        return
                await send(message)

            await self.app(scope, rcv, snd)
        finally:
            ex.finish_websocket()

    @staticmethod
    async def _deny(scope: Scope, receive: Receive, send: Send, reply: Reply) -> None:
        """Refuse a WebSocket handshake: the reply itself when the server can send an HTTP
        response (``websocket.http.response``), else a close (HTTP 403)."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        if "websocket.http.response" in (scope.get("extensions") or {}):
            headers = [h for h in reply.headers if h[0] != "content-length"]
            headers.append(("content-length", str(len(reply.body))))
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": reply.status,
                    "headers": _raw(headers),
                }
            )
            await send({"type": "websocket.http.response.body", "body": reply.body})
            return
        await send({"type": "websocket.close", "code": 1008, "reason": ""})
