"""``python -m agentpool proxy``: an aiohttp reverse proxy with Zentinel agents in front.

Streams both ways: request and response bodies go through chunk by chunk, held only while
an agent that reads them decides (``buffer`` mode reads the whole body first). Agents and
routes come from the command line or a JSON config file (docs/integrations.md).
``--workers N`` runs N processes on one port (SO_REUSEPORT). ``--demo`` starts a small
upstream and the example agents and prints curl lines to try.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from typing import Any

try:
    import aiohttp
    from aiohttp import web
    from multidict import CIMultiDict
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"{__name__} needs aiohttp: pip install 'agentpool[aiohttp]' ({exc})"
    ) from exc

from ._command import CommandError
from .http import HOP_BY_HOP, AgentRule, Exchange, Glue, Headers, Route, Stop, load_config

__all__ = ["build_app", "run", "upstream_app"]

log = logging.getLogger("agentpool.proxy")

_GLUE: web.AppKey[Glue] = web.AppKey("agentpool_proxy_glue", Glue)
_SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey(
    "agentpool_proxy_session", aiohttp.ClientSession
)
_SMALL_BODY = 64 * 1024
_REUSE_ENV = "AGENTPOOL_PROXY_REUSE_PORT"
_DROP_UP = HOP_BY_HOP | {"host", "content-length"}
_DROP_DOWN = HOP_BY_HOP | {"content-length"}


def _headers(raw: Any) -> Headers:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw]


def _response(status: int, headers: Headers, body: bytes) -> web.Response:
    return web.Response(
        status=status,
        headers=CIMultiDict((k, v) for k, v in headers if k != "content-length"),
        body=body,
    )


async def _request_body(
    ex: Exchange | None, request: web.Request, stopped: list[Any]
) -> AsyncIterator[bytes]:
    """The request body towards the upstream, through the agents' body stages."""
    pending: bytes | None = None
    try:
        async for chunk in request.content.iter_any():
            if pending is not None and ex is not None:
                out = await ex.request_body(pending, False)
                if out:
                    yield out
            elif pending is not None:
                yield pending
            pending = chunk
        if ex is not None:
            out = await ex.request_body(pending or b"", True)
            if out:
                yield out
        elif pending:
            yield pending
    except Stop as stop:
        stopped.append(stop.reply)
        raise


class _Proxy:
    def __init__(self, glue: Glue, upstream: str) -> None:
        self.glue = glue
        self.upstream = upstream.rstrip("/")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        glue = self.glue
        host = request.headers.get("host", "")
        plan = glue.plan(request.method, host, request.path)
        ex: Exchange | None = None
        peer = request.transport.get_extra_info("peername") if request.transport else None
        client_ip = str(peer[0]) if isinstance(peer, tuple) else ""
        headers = _headers(request.raw_headers)
        if plan is not None and plan.agents:
            version = request.version
            ex = glue.exchange(
                plan,
                method=request.method,
                uri=request.raw_path,
                headers=headers,
                client_ip=client_ip,
                client_port=int(peer[1]) if isinstance(peer, tuple) else 0,
                server_name=host.split(":", 1)[0] or None,
                protocol=f"HTTP/{version.major}.{version.minor}",
            )
        if request.headers.get("upgrade", "").lower() == "websocket":
            try:
                return await self._websocket(request, ex, headers)
            finally:
                if ex is not None:
                    ex.finish_websocket()
        try:
            return await self._handle(request, ex, headers, host, client_ip)
        finally:
            if ex is not None:
                ex.finish()

    async def _websocket(
        self, request: web.Request, ex: Exchange | None, headers: Headers
    ) -> web.StreamResponse:
        """Proxy a WebSocket: the handshake checked with a sticky session, then every frame."""
        if ex is not None:
            reply = await ex.request_headers(session=True)
            if reply is not None:
                return _response(reply.status, reply.headers, reply.body)
            headers = ex.headers
        skip = _DROP_UP | {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions"}
        up_headers = CIMultiDict((k, v) for k, v in headers if k not in skip)
        protocols = [
            p.strip() for p in request.headers.get("sec-websocket-protocol", "").split(",")
        ]
        up_headers.pop("sec-websocket-protocol", None)
        session = request.app[_SESSION]
        url = self.upstream + request.raw_path
        try:
            upstream = await session.ws_connect(
                url, headers=up_headers, protocols=[p for p in protocols if p], autoclose=False
            )
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("upstream WebSocket %s failed: %s", url, exc)
            return web.Response(status=502, text="Bad gateway")
        client = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else ())
        await client.prepare(request)
        closing: list[tuple[int, str]] = []

        async def pump(src: Any, dst: Any, client_to_server: bool) -> None:
            async for msg in src:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    data, opcode = msg.data.encode(), "text"
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    data, opcode = msg.data, "binary"
                else:
                    break
                if ex is not None and ex.plan.websocket:
                    verdict = await ex.websocket_frame(opcode, data, client_to_server)
                    if verdict is False:
                        continue
                    if verdict is not True:
                        closing.append((verdict.code, verdict.reason))
                        break
                if opcode == "text":
                    await dst.send_str(msg.data)
                else:
                    await dst.send_bytes(msg.data)

        up_task = asyncio.ensure_future(pump(upstream, client, False))
        down_task = asyncio.ensure_future(pump(client, upstream, True))
        try:
            await asyncio.wait({up_task, down_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up_task, down_task):
                task.cancel()
            await asyncio.gather(up_task, down_task, return_exceptions=True)
            code, reason = closing[0] if closing else (1000, "")
            await client.close(code=code, message=reason.encode())
            await upstream.close()
        return client

    async def _handle(
        self,
        request: web.Request,
        ex: Exchange | None,
        headers: Headers,
        host: str,
        client_ip: str,
    ) -> web.StreamResponse:
        if ex is not None:
            reply = await ex.request_headers()
            if reply is None and request.content_length is not None:
                reply = ex.too_large(request.content_length)
            if reply is not None:
                ex.status = reply.status
                return _response(reply.status, reply.headers, reply.body)
            headers = ex.headers
        conn_tokens = {
            t.strip().lower() for k, v in headers if k == "connection" for t in v.split(",")
        }
        up_headers = CIMultiDict(
            (k, v) for k, v in headers if k not in _DROP_UP and k not in conn_tokens
        )
        forwarded = request.headers.get("x-forwarded-for")
        up_headers["x-forwarded-for"] = f"{forwarded}, {client_ip}" if forwarded else client_ip
        if host:
            up_headers["x-forwarded-host"] = host
        stopped: list[Any] = []
        data: Any = None
        if request.body_exists:
            inspect = ex is not None and (
                ex.inspects_request_body or ex.plan.max_request_body is not None
            )
            if inspect:
                data = _request_body(ex, request, stopped)
            else:
                data = request.content
                if request.content_length is not None:
                    up_headers["content-length"] = str(request.content_length)
        session = request.app[_SESSION]
        try:
            async with session.request(
                request.method,
                self.upstream + request.raw_path,
                headers=up_headers,
                data=data,
                allow_redirects=False,
                auto_decompress=False,
                skip_auto_headers=("user-agent", "accept-encoding", "accept", "content-type"),
            ) as up:
                return await self._respond(request, ex, up)
        except Stop as stop:
            stopped.append(stop.reply)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            if not stopped:
                log.warning("upstream request failed: %s", exc)
                if ex is not None:
                    ex.status = 502
                return web.Response(status=502, text="Bad gateway")
        reply = stopped[0]
        if ex is not None:
            ex.status = reply.status
        return _response(reply.status, reply.headers, reply.body)

    async def _respond(
        self, request: web.Request, ex: Exchange | None, up: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        headers = [h for h in _headers(up.raw_headers) if h[0] not in _DROP_DOWN]
        length = up.content_length
        if ex is not None and not ex.inspects_response:
            ex.status = up.status
        elif ex is not None:
            try:
                reply = await ex.response_headers(up.status, headers)
            except Stop as stop:
                reply = stop.reply
            if reply is not None:
                ex.status = reply.status
                return _response(reply.status, reply.headers, reply.body)
            if ex.inspects_response_body:
                if ex.buffers_response_body:
                    try:
                        body = await ex.response_body(await up.read(), True)
                    except Stop as stop:
                        ex.status = stop.reply.status
                        r = stop.reply
                        return _response(r.status, r.headers, r.body)
                    return _response(up.status, headers, body)
                length = None
        if (
            length is not None
            and length <= _SMALL_BODY
            and (ex is None or not ex.inspects_response_body)
        ):
            body = await up.read()  # small and complete: one write downstream
            if ex is not None:
                ex.response_bytes += len(body)
            return web.Response(
                status=up.status, reason=up.reason, headers=CIMultiDict(headers), body=body
            )
        response = web.StreamResponse(status=up.status, reason=up.reason)
        response.headers.extend(headers)
        if length is not None:
            response.content_length = length
        await response.prepare(request)
        if ex is None or not ex.inspects_response_body:
            async for chunk in up.content.iter_any():
                await response.write(chunk)
                if ex is not None:
                    ex.response_bytes += len(chunk)
        else:
            pending: bytes | None = None
            async for chunk in up.content.iter_any():
                if pending is not None:
                    out = await ex.response_body(pending, False)
                    if out:
                        await response.write(out)
                pending = chunk
            out = await ex.response_body(pending or b"", True)
            if out:
                await response.write(out)
        await response.write_eof()
        return response


def build_app(
    upstream: str,
    agents: dict[str, Any],
    routes: Sequence[Route] | None = None,
    **glue_kwargs: Any,
) -> web.Application:
    """The proxy as an aiohttp application (mount it, or run it with ``web.run_app``)."""
    glue = Glue(agents, routes, **glue_kwargs)
    proxy = _Proxy(glue, upstream)
    app = web.Application(client_max_size=0)
    app[_GLUE] = glue

    async def startup(app: web.Application) -> None:
        await glue.start()
        app[_SESSION] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )

    async def cleanup(app: web.Application) -> None:
        await app[_SESSION].close()
        await glue.shutdown()

    app.on_startup.append(startup)
    app.on_cleanup.append(cleanup)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


# -------------------------------------------------------------------------- demo upstream


def upstream_app() -> web.Application:
    """A small upstream: echoes method, path and request headers as JSON."""

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.path_qs,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": body.decode("latin-1"),
            }
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


# -------------------------------------------------------------------------- command line


def _glue_kwargs(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    data: dict[str, Any] = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            data = json.load(f)
    upstream = args.upstream or data.get("upstream")
    if not upstream:
        raise CommandError("no upstream: give --upstream or 'upstream' in the config file", 2)
    try:
        kwargs = load_config(data)
    except (TypeError, ValueError) as exc:
        raise CommandError(f"{args.config}: {exc}", 2) from None
    agents: dict[str, Any] = kwargs["agents"]
    failure: Any = args.failure
    if failure is not None and failure not in ("open", "closed"):
        if not failure.isdigit():
            raise CommandError(f"--failure wants open, closed or a status, got {failure!r}", 2)
        failure = int(failure)
    for spec in args.agent:
        name, sep, endpoint = spec.partition("=")
        if not sep or not name or not endpoint:
            raise CommandError(f"--agent wants NAME=ENDPOINT, got {spec!r}", 2)
        agents[name] = endpoint
    if failure is not None or args.timeout is not None:
        extra = {"failure": failure, "timeout": args.timeout}
        for name, spec in list(agents.items()):
            base = {"endpoint": spec} if isinstance(spec, str) else dict(spec)
            for key, value in extra.items():
                if value is not None:
                    base.setdefault(key, value)
            agents[name] = base
    if not agents:
        print("agentpool proxy: no agents given; forwarding without checks", file=sys.stderr)
    return upstream, kwargs


async def _serve(args: argparse.Namespace, ready: str = "") -> None:
    upstream, kwargs = _glue_kwargs(args)
    agents = kwargs.pop("agents")
    routes = kwargs.pop("routes", None)
    app = build_app(upstream, agents, routes, **kwargs)
    host, _, port = args.listen.rpartition(":")
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=30.0)
    await runner.setup()
    site = web.TCPSite(
        runner,
        host or "127.0.0.1",
        int(port),
        reuse_port=args.workers > 1 or bool(os.environ.get(_REUSE_ENV)),
    )
    await site.start()
    print(f"agentpool proxy listening on http://{args.listen} -> {upstream}{ready}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _run(coro: Any, loop: str) -> None:
    if loop == "uvloop":
        with contextlib.suppress(ImportError):
            import uvloop

            uvloop.run(coro)
            return
    asyncio.run(coro)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_agents(names: Sequence[str], directory: str) -> list[subprocess.Popen[bytes]]:
    procs = []
    for name in names:
        path = os.path.join(directory, f"{name}.sock")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "agentpool", "agent", "--example", name, "--socket", path],
                stdout=subprocess.DEVNULL,
            )
        )
    return procs


async def _wait_sockets(paths: Sequence[str], timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for path in paths:
        while True:
            try:
                _, writer = await asyncio.open_unix_connection(path)
            except OSError:
                if loop.time() > deadline:
                    raise SystemExit(f"agent socket {path} did not appear") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            break


async def _demo(args: argparse.Namespace) -> int:
    directory = tempfile.mkdtemp(prefix="agentpool-proxy-demo-")
    procs = _start_agents(("waf", "echo"), directory)
    up_runner = web.AppRunner(upstream_app(), access_log=None)
    try:
        await _wait_sockets([os.path.join(directory, f"{n}.sock") for n in ("waf", "echo")])
        await up_runner.setup()
        up_port = _free_port()
        await web.TCPSite(up_runner, "127.0.0.1", up_port).start()
        host, _, port = args.listen.rpartition(":")
        if args.listen == "127.0.0.1:8080":
            port = str(_free_port())
        listen = f"{host or '127.0.0.1'}:{port}"
        agents = {n: f"unix:{os.path.join(directory, n + '.sock')}" for n in ("waf", "echo")}
        routes = [
            Route("/admin*", ["waf"]),
            Route("*", ["waf", AgentRule("echo", failure="open")]),
        ]
        app = build_app(f"http://127.0.0.1:{up_port}", agents, routes)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host or "127.0.0.1", int(port)).start()
        base = f"http://{listen}"
        print(f"agentpool proxy demo on {base} (upstream :{up_port}, agents waf + echo)")
        print("try:")
        lines = [
            ("200, the WAF's and echo's header edits", f"curl -si {base}/hello"),
            ("403 from the WAF", f"curl -si {base}/admin"),
            ("301 redirect from the WAF", f"curl -si {base}/old/page"),
            ("header edits seen by the upstream", f"curl -s {base}/api -H 'x-team: blue'"),
        ]
        for what, cmd in lines:
            print(f"  {cmd:<52} # {what}")
        async with aiohttp.ClientSession() as client:
            for path, hdrs in (
                ("/hello", {}),
                ("/admin", {}),
                ("/old/page", {}),
                ("/api", {"x-team": "blue"}),
            ):
                async with client.get(base + path, headers=hdrs, allow_redirects=False) as r:
                    text = await r.text()
                    extra = r.headers.get("location", "")
                    if r.status == 200:
                        seen = json.loads(text)["headers"]
                        extra = ", ".join(
                            f"{k}: {v}" for k, v in sorted(seen.items()) if k.startswith("x-")
                        )
                    print(f"{path:<10} -> {r.status} {extra}".rstrip(), flush=True)
        if not args.once:
            print("serving; Ctrl-C to stop", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        await runner.cleanup()
        return 0
    finally:
        await up_runner.cleanup()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        with contextlib.suppress(OSError):
            for name in os.listdir(directory):
                os.unlink(os.path.join(directory, name))
            os.rmdir(directory)


def run(args: argparse.Namespace) -> int:
    """Run ``agentpool proxy`` with parsed options."""
    if not args.demo and not args.upstream and not args.config:
        raise CommandError("give --upstream URL (or --config FILE with an upstream, or --demo)", 2)
    if args.workers < 1:
        raise CommandError("--workers must be >= 1", 2)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    if args.demo:
        result = 0

        async def demo() -> None:
            nonlocal result
            result = await _demo(args)

        with contextlib.suppress(KeyboardInterrupt):
            _run(demo(), args.loop)
        return result
    if args.workers > 1:
        return _supervise(args)
    _glue_kwargs(args)  # configuration errors before anything starts
    with contextlib.suppress(KeyboardInterrupt):
        _run(_serve(args), args.loop)
    return 0




def _supervise(args: argparse.Namespace) -> int:
    """Run ``--workers`` copies of this proxy on one port (SO_REUSEPORT); forward signals."""
    _glue_kwargs(args)
    child = ["--listen", args.listen, "--loop", args.loop, "--log-level", args.log_level]
    for name in ("upstream", "config", "timeout", "failure"):
        value = getattr(args, name)
        if value is not None:
            child += [f"--{name}", str(value)]
    for spec in args.agent:
        child += ["--agent", spec]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "agentpool", "proxy", *child],
            env={**os.environ, _REUSE_ENV: "1"},
        )
        for _ in range(args.workers)
    ]

    def forward(sig: int, _: Any) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [p.wait() for p in procs]
    return max(codes, default=0)
