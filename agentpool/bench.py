"""Round-trip benchmark: the agentpool pool vs a raw uvloop client vs grpcio aio streaming.

``python -m agentpool bench`` (or ``python benchmarks/roundtrip.py``) starts a fast benchmark
agent in a subprocess, then measures in one process and one run, with interleaved repetitions:

* ``raw``: a minimal ``asyncio.Protocol`` client, one Future per request, sending pre-encoded
  frames of the same size as the pool's (the honest ceiling of one Python client process);
* ``pool``: ``AgentPool.send_request_headers`` with a realistic 20-header event, JSON and
  MessagePack, over 1 and 4 connections;
* ``grpc``: grpcio aio bidirectional streaming over a Unix socket with messages of the same sizes
  (server in its own process).

Results are medians with min-max over the repetitions; ratios are taken per repetition (the
scenarios of one repetition run back to back) and then summarised the same way. Only Unix
sockets under /tmp are used and every process started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import orjson

__all__ = ["run", "run_agent", "run_grpc_server", "run_loop"]

_T = TypeVar("_T")

AGENT_ID = "bench"
GRPC_METHOD = "/zentinel.bench.Bench/Process"
CID_WIDTH = 32
_PLACEHOLDER = "@" * CID_WIDTH
_JSON_CID_MARK = b'"correlation_id":"'
_MSGPACK_CID_KEY = b"\xaecorrelation_id"

HEADERS: dict[str, list[str]] = {
    ":method": ["GET"],
    ":path": ["/api/v1/orders/12345?expand=items&currency=EUR"],
    "host": ["shop.example.com"],
    "user-agent": [
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/126.0.0.0 Safari/537.36"
    ],
    "accept": ["application/json, text/plain, */*"],
    "accept-encoding": ["gzip, deflate, br, zstd"],
    "accept-language": ["en-US,en;q=0.9,de;q=0.8"],
    "authorization": [
        "Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwiaWF0Ijox"
        "NzY3MjI1NjAwfQ.c2lnbmF0dXJlLXBsYWNlaG9sZGVy"
    ],
    "cache-control": ["no-cache"],
    "connection": ["keep-alive"],
    "cookie": ["session=3f9a1c27b6e84d0f9a51c2e7; theme=dark; lang=en"],
    "dnt": ["1"],
    "origin": ["https://shop.example.com"],
    "pragma": ["no-cache"],
    "referer": ["https://shop.example.com/orders"],
    "sec-fetch-dest": ["empty"],
    "sec-fetch-mode": ["cors"],
    "sec-fetch-site": ["same-origin"],
    "x-forwarded-for": ["203.0.113.7"],
    "x-request-id": ["5b0f7c1e-8d4a-4f55-9a0e-2c6d1b7e9f30"],
}

METADATA: dict[str, Any] = {
    "request_id": "9d2b6a4e-3c1f-4e8a-b7d5-0f6e2a1c8b94",
    "client_ip": "203.0.113.7",
    "client_port": 52314,
    "server_name": "shop.example.com",
    "protocol": "HTTP/1.1",
    "tls_version": "TLSv1.3",
    "tls_cipher": "TLS_AES_128_GCM_SHA256",
    "route_id": "api",
    "upstream_id": "orders-backend",
    "timestamp": "2026-01-01T00:00:00.123456789+00:00",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
}

METHOD = "GET"
URI = "/api/v1/orders/12345?expand=items&currency=EUR"


def cid_str(n: int) -> str:
    """Fixed-width correlation id (a W3C trace id is 32 hex digits), so frames keep one size."""
    return f"{n:032x}"


def event_wire_dict(correlation_id: str) -> dict[str, Any]:
    """The RequestHeaders event as upstream puts it on the wire (PROTOCOL §5.1)."""
    return {
        "correlation_id": correlation_id,
        "metadata": {"correlation_id": correlation_id, **METADATA},
        "method": METHOD,
        "uri": URI,
        "headers": HEADERS,
    }


def event_json(correlation_id: str) -> bytes:
    """JSON payload of the benchmark event, keys sorted at every level like upstream."""
    return orjson.dumps(event_wire_dict(correlation_id), option=orjson.OPT_SORT_KEYS)


def response_wire_dict(correlation_id: str) -> dict[str, Any]:
    """An Allow reply in upstream struct order, carrying the id in ``audit.custom``."""
    return {
        "version": 2,
        "decision": "allow",
        "request_headers": [],
        "response_headers": [],
        "routing_metadata": {},
        "audit": {
            "tags": [],
            "rule_ids": [],
            "confidence": None,
            "reason_codes": [],
            "custom": {"correlation_id": correlation_id},
        },
        "needs_more": False,
        "request_body_mutation": None,
        "response_body_mutation": None,
        "websocket_decision": None,
    }


def response_json(correlation_id: str) -> bytes:
    return orjson.dumps(response_wire_dict(correlation_id))


def _frame(msg_type: int, payload: bytes) -> bytes:
    return (len(payload) + 1).to_bytes(4, "big") + bytes((msg_type,)) + payload


def _split_template(payload: bytes, marker: bytes) -> list[bytes]:
    parts = payload.split(marker)
    if len(parts) < 2:
        raise RuntimeError("placeholder missing from template")
    return parts


# --------------------------------------------------------------------------------------------
# Built-in benchmark agent (subprocess): v2 handshake, Allow for every event, echo pings.
# --------------------------------------------------------------------------------------------


def _handshake_response(encoding: str) -> bytes:
    caps = {
        "agent_id": AGENT_ID,
        "name": "bench",
        "version": "1.0.0",
        "supported_events": [1, 2, 3, 4, 5, 6, 7, 8],
        "features": {
            "streaming_body": True,
            "websocket": True,
            "guardrails": True,
            "config_push": False,
            "metrics_export": False,
            "concurrent_requests": 1000,
            "cancellation": True,
            "flow_control": False,
            "health_reporting": False,
        },
        "limits": {
            "max_body_size": 10485760,
            "max_concurrency": 1000,
            "preferred_chunk_size": 65536,
        },
    }
    body = {
        "protocol_version": 2,
        "capabilities": caps,
        "success": True,
        "error": None,
        "encoding": encoding,
    }
    return _frame(0x02, orjson.dumps(body))


class _ReplyTemplate:
    """Pre-built Allow reply frames; only the correlation id is spliced in per request."""

    __slots__ = ("_json", "_msgpack")

    def __init__(self) -> None:
        import msgpack

        self._json = _split_template(response_json(_PLACEHOLDER), _PLACEHOLDER.encode())
        packed: bytes = msgpack.packb(response_wire_dict(_PLACEHOLDER))
        marker = bytes((0xA0 | CID_WIDTH,)) if CID_WIDTH < 32 else b"\xd9" + bytes((CID_WIDTH,))
        self._msgpack = _split_template(packed, marker + _PLACEHOLDER.encode())

    def json(self, cid: bytes) -> bytes:
        head, tail = self._json
        n = len(head) + len(cid) + len(tail) + 1
        return b"".join((n.to_bytes(4, "big"), b"\x20", head, cid, tail))

    def msgpack(self, cid: bytes) -> bytes:
        head, tail = self._msgpack
        n = len(cid)
        if n < 32:
            hdr = bytes((0xA0 | n,))
        elif n < 256:
            hdr = b"\xd9" + bytes((n,))
        else:
            hdr = b"\xda" + n.to_bytes(2, "big")
        size = len(head) + len(hdr) + n + len(tail) + 1
        return b"".join((size.to_bytes(4, "big"), b"\x20", head, hdr, cid, tail))


def _json_cid(buf: bytes, start: int, stop: int) -> bytes:
    i = buf.find(_JSON_CID_MARK, start, stop)
    if i < 0:
        return b""
    i += len(_JSON_CID_MARK)
    j = buf.find(b'"', i, stop)
    return buf[i:j] if j > 0 else b""


def _msgpack_cid(buf: bytes, start: int, stop: int) -> bytes:
    i = buf.find(_MSGPACK_CID_KEY, start, stop)
    if i < 0:
        return b""
    i += len(_MSGPACK_CID_KEY)
    if i >= stop:
        return b""
    b = buf[i]
    if 0xA0 <= b <= 0xBF:
        n, i = b & 0x1F, i + 1
    elif b in (0xD9, 0xC4) and i + 1 < stop:
        n, i = buf[i + 1], i + 2
    elif b in (0xDA, 0xC5) and i + 2 < stop:
        n, i = int.from_bytes(buf[i + 1 : i + 3], "big"), i + 3
    else:
        return b""
    return buf[i : i + n]


class _AgentProtocol(asyncio.Protocol):
    """One proxy connection to the built-in agent; replies to everything it reads at once."""

    def __init__(self, template: _ReplyTemplate, hold: bool = False) -> None:
        self._template = template
        self._hold = hold
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._msgpack = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        end = len(buf)
        pos = 0
        out: list[bytes] = []
        while end - pos >= 5:
            stop = pos + 4 + int.from_bytes(buf[pos : pos + 4], "big")
            if stop > end:
                break
            t = buf[pos + 4]
            if 0x10 <= t <= 0x17:
                if self._hold:
                    pass
                elif self._msgpack:
                    out.append(self._template.msgpack(_msgpack_cid(buf, pos + 5, stop)))
                else:
                    out.append(self._template.json(_json_cid(buf, pos + 5, stop)))
            elif t == 0x41:
                out.append(buf[pos : pos + 4] + b"\x42" + buf[pos + 5 : stop])
            elif t == 0x01:
                out.append(self._handshake(buf[pos + 5 : stop]))
            pos = stop
        self._buf = buf[pos:] if pos < end else b""
        if out and self._transport is not None:
            self._transport.write(b"".join(out) if len(out) > 1 else out[0])

    def _handshake(self, payload: bytes) -> bytes:
        offered = orjson.loads(payload).get("supported_encodings") or ["json"]
        encoding = next((e for e in offered if e in ("json", "msgpack")), "json")
        self._msgpack = encoding == "msgpack"
        return _handshake_response(encoding)


def run_loop(coro: Coroutine[Any, Any, _T], *, use_uvloop: bool = True) -> _T:
    """Run ``coro`` on a fresh uvloop loop (plain asyncio when uvloop is missing or not wanted)."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            pass
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)


async def _serve_until_signalled(start: Callable[[], Awaitable[Any]]) -> None:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    parent = os.getppid()

    def watch_parent() -> None:
        if os.getppid() != parent:
            on_signal()
        else:
            loop.call_later(1.0, watch_parent)

    loop.call_later(1.0, watch_parent)
    server = await start()
    try:
        await stop
    finally:
        close = getattr(server, "close", None)
        if close is not None:
            result = close()
            if asyncio.iscoroutine(result):
                await result


def run_agent(path: str, hold: bool = False) -> int:
    """Serve the built-in benchmark agent on the Unix socket ``path`` until SIGTERM.

    ``hold=True`` never answers events (only the handshake and pings): requests stay in flight,
    which is what the memory measurement needs.
    """
    template = _ReplyTemplate()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

    async def start() -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        return await loop.create_unix_server(
            lambda: _AgentProtocol(template, hold), path, backlog=128
        )

    try:
        run_loop(_serve_until_signalled(start))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return 0


def _grpc() -> Any:
    """Import grpcio lazily (an optional ``bench`` extra; it ships no type information)."""
    import grpc  # type: ignore[import-untyped,unused-ignore]
    import grpc.aio  # type: ignore[import-untyped,unused-ignore]

    return grpc


def run_grpc_server(path: str) -> int:
    """Serve a bidi-streaming echo of Allow replies over gRPC on ``unix:path`` until SIGTERM."""
    grpc = _grpc()
    head, tail = _split_template(response_json(_PLACEHOLDER), _PLACEHOLDER.encode())

    async def process(request_iterator: Any, context: Any) -> Any:
        async for request in request_iterator:
            yield head + _json_cid(request, 0, len(request)) + tail

    async def start() -> Any:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        handler = grpc.method_handlers_generic_handler(
            GRPC_METHOD.split("/")[1], {"Process": grpc.stream_stream_rpc_method_handler(process)}
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"unix:{path}")
        await server.start()

        class _Stop:
            async def close(self) -> None:
                await server.stop(0.5)

        return _Stop()

    run_loop(_serve_until_signalled(start), use_uvloop=False)
    return 0


# --------------------------------------------------------------------------------------------
# Clients under test. Each exposes ``async setup()``, ``make_rt(i) -> () -> Awaitable`` (one
# round trip, i = worker index) and ``async close()``.
# --------------------------------------------------------------------------------------------


class _RawProtocol(asyncio.Protocol):
    """Minimal v2 client: one Future per request, reply routed by its correlation id."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.waiters: dict[bytes, asyncio.Future[None]] = {}
        self.handshake: asyncio.Future[bytes] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        err = ConnectionError(f"raw client connection lost: {exc!r}")
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_exception(err)
        self.waiters.clear()
        if not self.handshake.done():
            self.handshake.set_exception(err)
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        end = len(buf)
        pos = 0
        waiters = self.waiters
        while end - pos >= 5:
            stop = pos + 4 + int.from_bytes(buf[pos : pos + 4], "big")
            if stop > end:
                break
            t = buf[pos + 4]
            if t == 0x20:
                fut = waiters.pop(_json_cid(buf, pos + 5, stop), None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            elif t == 0x02 and not self.handshake.done():
                self.handshake.set_result(buf[pos + 5 : stop])
            pos = stop
        self._buf = buf[pos:] if pos < end else b""


class RawClient:
    """Raw ceiling: pre-encoded JSON frames, ``transport.write`` per request, no decoding."""

    kind = "raw"
    protocol_class: Any = _RawProtocol

    def __init__(self, path: str, connections: int) -> None:
        self.path = path
        self.connections = connections
        self.protocols: list[_RawProtocol] = []
        payload = event_json(_PLACEHOLDER)
        parts = _split_template(payload, _PLACEHOLDER.encode())
        self._parts = parts
        self._head = (len(payload) + 1).to_bytes(4, "big") + b"\x10" + parts[0]
        self.frame_size = len(payload) + 5
        self._ids = itertools.count()

    async def setup(self) -> None:
        loop = asyncio.get_running_loop()
        hello = _frame(
            0x01,
            orjson.dumps(
                {
                    "supported_versions": [2],
                    "proxy_id": "zentinel-proxy",
                    "proxy_version": "bench",
                    "config": None,
                    "supported_encodings": ["json"],
                }
            ),
        )
        for _ in range(self.connections):
            _, proto = await loop.create_unix_connection(self.protocol_class, self.path)
            assert proto.transport is not None
            proto.transport.write(hello)
            reply = orjson.loads(await asyncio.wait_for(proto.handshake, 5.0))
            if not reply.get("success") or reply.get("encoding", "json") != "json":
                raise RuntimeError(f"raw client handshake refused: {reply!r}")
            self.protocols.append(proto)

    def make_rt(self, worker: int) -> Callable[[], Awaitable[None]]:
        proto = self.protocols[worker % len(self.protocols)]
        transport = proto.transport
        assert transport is not None
        waiters = proto.waiters
        create_future = proto.loop.create_future
        head = self._head
        middle, tail = self._parts[1], self._parts[2]
        ids = self._ids

        async def rt() -> None:
            cid = b"%032x" % next(ids)
            fut: asyncio.Future[None] = create_future()
            waiters[cid] = fut
            transport.write(b"".join((head, cid, middle, cid, tail)))
            await fut

        return rt

    async def close(self) -> None:
        for proto in self.protocols:
            if proto.transport is not None:
                proto.transport.close()
        for proto in self.protocols:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proto.closed, 2.0)


class _RawCodecProtocol(_RawProtocol):
    """The raw client's protocol, decoding every reply with orjson to route it."""

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        end = len(buf)
        pos = 0
        waiters = self.waiters
        loads = orjson.loads
        while end - pos >= 5:
            stop = pos + 4 + int.from_bytes(buf[pos : pos + 4], "big")
            if stop > end:
                break
            t = buf[pos + 4]
            if t == 0x20:
                reply = loads(buf[pos + 5 : stop])
                fut = waiters.pop(reply["audit"]["custom"]["correlation_id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(reply)
            elif t == 0x02 and not self.handshake.done():
                self.handshake.set_result(buf[pos + 5 : stop])
            pos = stop
        self._buf = buf[pos:] if pos < end else b""


class RawCodecClient(RawClient):
    """What an engineer writes by hand: the raw client, but each event built as a dict and
    orjson-encoded, each reply orjson-decoded (no validation, no accounting)."""

    kind = "rawcodec"
    protocol_class: Any = _RawCodecProtocol

    def make_rt(self, worker: int) -> Callable[[], Awaitable[None]]:
        proto = self.protocols[worker % len(self.protocols)]
        transport = proto.transport
        assert transport is not None
        waiters: dict[Any, Any] = proto.waiters
        create_future = proto.loop.create_future
        ids = self._ids
        dumps, sort = orjson.dumps, orjson.OPT_SORT_KEYS

        async def rt() -> None:
            cid = cid_str(next(ids))
            payload = dumps(event_wire_dict(cid), option=sort)
            fut: asyncio.Future[Any] = create_future()
            waiters[cid] = fut
            transport.write(b"".join(((len(payload) + 1).to_bytes(4, "big"), b"\x10", payload)))
            await fut

        return rt


class PoolClient:
    """agentpool: ``AgentPool.send_request_headers`` with a realistic event object."""

    kind = "pool"

    def __init__(self, path: str, connections: int, encoding: str, clear_affinity: bool) -> None:
        self.path = path
        self.connections = connections
        self.encoding = encoding
        self.clear_affinity = clear_affinity
        self.pool: Any = None
        self._ids = itertools.count()
        self.frame_size: int | None = None

    async def setup(self) -> None:
        from .config import AgentPoolConfig
        from .pool import AgentPool

        config = AgentPoolConfig(connections_per_agent=self.connections, encoding=self.encoding)
        self.pool = AgentPool(config)
        await self.pool.add_agent(AGENT_ID, f"unix:{self.path}")
        probe = make_event()
        for n in range(2 * self.connections):
            await asyncio.wait_for(
                self.pool.send_request_headers(AGENT_ID, f"probe-{n}", probe), 5.0
            )
            self.pool.clear_correlation_affinity(f"probe-{n}")
        with contextlib.suppress(Exception):
            from .codec import get_codec  # type: ignore[import-not-found,unused-ignore]

            payload = get_codec(self.encoding).encode_event(make_event(), cid_str(0))
            self.frame_size = len(payload) + 5

    def make_rt(self, worker: int) -> Callable[[], Awaitable[None]]:
        send = self.pool.send_request_headers
        clear = self.pool.clear_correlation_affinity
        event = make_event()
        ids = self._ids
        if self.clear_affinity:

            async def rt() -> None:
                cid = f"{next(ids):032x}"
                await send(AGENT_ID, cid, event)
                clear(cid)

        else:

            async def rt() -> None:
                await send(AGENT_ID, f"{next(ids):032x}", event)

        return rt

    async def close(self) -> None:
        if self.pool is not None:
            await asyncio.wait_for(self.pool.shutdown(), 10.0)


class BatchClient(PoolClient):
    """agentpool: ``AgentPool.send_batch`` of ``per_rt`` events to one agent per await."""

    kind = "batch"
    per_rt = 16

    def make_rt(self, worker: int) -> Callable[[], Awaitable[None]]:
        batch = self.pool.send_batch
        clear = self.pool.clear_correlation_affinity
        event = make_event()
        ids = self._ids
        n = self.per_rt

        async def rt() -> None:
            items = [(f"{next(ids):032x}", event) for _ in range(n)]
            for r in await batch(AGENT_ID, items):
                if isinstance(r, Exception):
                    raise r
            for cid, _ in items:
                clear(cid)

        return rt


class FanOutClient(PoolClient):
    """agentpool: ``AgentPool.fan_out`` of one event to ``per_rt`` agents (the same agent
    process added under several ids, one connection each)."""

    kind = "fanout"
    per_rt = 4

    async def setup(self) -> None:
        from .config import AgentPoolConfig
        from .pool import AgentPool

        config = AgentPoolConfig(connections_per_agent=1, encoding=self.encoding)
        self.pool = AgentPool(config)
        self.agents = [f"{AGENT_ID}-{i}" for i in range(self.per_rt)]
        for agent in self.agents:
            await self.pool.add_agent(agent, f"unix:{self.path}")
        out = await asyncio.wait_for(self.pool.fan_out(self.agents, "probe", make_event()), 5.0)
        self.pool.clear_correlation_affinity("probe")
        for r in out.values():
            if isinstance(r, Exception):
                raise r

    def make_rt(self, worker: int) -> Callable[[], Awaitable[None]]:
        fan_out = self.pool.fan_out
        clear = self.pool.clear_correlation_affinity
        event = make_event()
        ids = self._ids
        agents = self.agents

        async def rt() -> None:
            cid = f"{next(ids):032x}"
            for r in (await fan_out(agents, cid, event)).values():
                if isinstance(r, Exception):
                    raise r
            clear(cid)

        return rt


def make_event() -> Any:
    """The benchmark event as an agentpool ``RequestHeadersEvent``."""
    from .messages import RequestHeadersEvent, RequestMetadata

    meta = RequestMetadata(correlation_id=cid_str(0), **METADATA)
    return RequestHeadersEvent(
        metadata=meta, method=METHOD, uri=URI, headers={k: list(v) for k, v in HEADERS.items()}
    )


class _GrpcStream:
    """One bidi stream: a writer task draining a queue and a reader task resolving Futures."""

    def __init__(self, call: Any, eof: Any) -> None:
        self.call = call
        self.eof = eof
        self.waiters: dict[bytes, asyncio.Future[None]] = {}
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.tasks = [asyncio.create_task(self._writer()), asyncio.create_task(self._reader())]

    async def _writer(self) -> None:
        queue, call = self.queue, self.call
        while True:
            await call.write(await queue.get())

    async def _reader(self) -> None:
        waiters, call, eof = self.waiters, self.call, self.eof
        while True:
            reply = await call.read()
            if reply is eof:
                break
            fut = waiters.pop(_json_cid(reply, 0, len(reply)), None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        err = ConnectionError("grpc stream ended")
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(err)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task
        self.call.cancel()


class GrpcClient:
    """grpcio aio bidi streaming; requests multiplexed over the stream(s) by correlation id."""

    kind = "grpc"

    def __init__(self, path: str, streams: int) -> None:
        self.path = path
        self.streams: list[_GrpcStream] = []
        self.n_streams = streams
        self.channel: Any = None
        parts = _split_template(event_json(_PLACEHOLDER), _PLACEHOLDER.encode())
        self._parts = parts
        self.frame_size = sum(map(len, parts)) + 2 * CID_WIDTH + 5
        self._ids = itertools.count()

    async def setup(self) -> None:
        grpc = _grpc()
        self.channel = grpc.aio.insecure_channel(f"unix:{self.path}")
        await asyncio.wait_for(self.channel.channel_ready(), 10.0)
        method = self.channel.stream_stream(GRPC_METHOD)
        self.streams = [_GrpcStream(method(), grpc.aio.EOF) for _ in range(self.n_streams)]

    def make_rt(self, worker: int) -> Callable[[], Awaitable[None]]:
        stream = self.streams[worker % len(self.streams)]
        put = stream.queue.put_nowait
        waiters = stream.waiters
        loop = asyncio.get_running_loop()
        head, middle, tail = self._parts
        ids = self._ids

        async def rt() -> None:
            cid = b"%032x" % next(ids)
            fut: asyncio.Future[None] = loop.create_future()
            waiters[cid] = fut
            put(b"".join((head, cid, middle, cid, tail)))
            await fut

        return rt

    async def close(self) -> None:
        for stream in self.streams:
            await stream.close()
        if self.channel is not None:
            await self.channel.close(0.5)


# --------------------------------------------------------------------------------------------
# Scenarios and the driver
# --------------------------------------------------------------------------------------------


@dataclass
class Scenario:
    """One measured configuration; ``rates`` holds one round-trips/s figure per repetition."""

    name: str
    kind: str
    encoding: str
    in_flight: int
    connections: int
    client: Any = None
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    server_cpu_us: list[float] = field(default_factory=list)
    frame_size: int | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.kind} {self.encoding} {self.in_flight}x{self.connections}"


async def measure(
    rt_factory: Callable[[int], Callable[[], Awaitable[None]]],
    in_flight: int,
    warmup: float,
    duration: float,
    server_cpu: Callable[[], float] = lambda: 0.0,
    per_rt: int = 1,
) -> tuple[float, float, float]:
    """Run ``in_flight`` workers looping on a round trip.

    Returns (round trips per second, client CPU µs per round trip, server CPU µs per round
    trip), counting ``per_rt`` round trips (events) per call of a worker's ``rt``. CPU
    time of this process and of the serving process (``server_cpu`` reads its CPU seconds)
    is far less sensitive to a busy machine than throughput.
    """
    done = [0]
    running = [True]

    async def worker(rt: Callable[[], Awaitable[None]]) -> None:
        while running[0]:
            await rt()
            done[0] += per_rt

    loop = asyncio.get_running_loop()
    tasks = [asyncio.create_task(worker(rt_factory(i))) for i in range(in_flight)]
    c0 = c1 = 0
    t0 = t1 = p0 = p1 = s0 = s1 = 0.0
    try:
        if await _sleep_watching(tasks, warmup):
            c0, t0, p0, s0 = done[0], loop.time(), time.process_time(), server_cpu()
            if await _sleep_watching(tasks, duration):
                c1, t1, p1, s1 = done[0], loop.time(), time.process_time(), server_cpu()
    finally:
        running[0] = False
        _, pending = await asyncio.wait(tasks, timeout=10.0)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    errors = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
    if errors:
        raise errors[0]  # type: ignore[misc]
    if pending:
        raise RuntimeError(f"{len(pending)} round trips did not finish within 10 s")
    if t1 <= t0:
        raise RuntimeError("a worker stopped early")
    n = max(c1 - c0, 1)
    return (c1 - c0) / (t1 - t0), (p1 - p0) * 1e6 / n, (s1 - s0) * 1e6 / n


def process_cpu_reader(pid: int) -> Callable[[], float]:
    """CPU seconds (user + system, all threads) of process ``pid`` from /proc; 0 if unreadable."""
    path = f"/proc/{pid}/stat"
    tick = float(os.sysconf("SC_CLK_TCK"))

    def read() -> float:
        try:
            with open(path, encoding="ascii") as fh:
                fields = fh.read().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            return 0.0

    return read


async def _sleep_watching(tasks: list[asyncio.Task[None]], seconds: float) -> bool:
    """Sleep ``seconds``; False as soon as any worker has stopped (it failed)."""
    if seconds <= 0:
        return not any(t.done() for t in tasks)
    _, pending = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    return len(pending) == len(tasks)


def build_scenarios(args: argparse.Namespace) -> list[Scenario]:
    out: list[Scenario] = []
    wide = args.in_flight

    def add(kind: str, encoding: str, in_flight: int, conns: int) -> None:
        out.append(
            Scenario(f"{kind}-{encoding}-{in_flight}x{conns}", kind, encoding, in_flight, conns)
        )

    add("raw", "json", 1, 1)
    add("raw", "json", wide, 1)
    add("raw", "json", wide, 4)
    add("rawcodec", "json", wide, 4)
    add("batch", "json", wide, 4)
    add("fanout", "json", wide, 4)
    for enc in ("json", "msgpack"):
        add("pool", enc, 1, 1)
        add("pool", enc, wide, 1)
        add("pool", enc, wide, 4)
    if not args.no_grpc:
        add("grpc", "json", 1, 1)
        add("grpc", "json", wide, 1)
        add("grpc", "json", wide, 4)
    if args.only:
        tokens = {t.strip() for t in args.only.split(",") if t.strip()}
        out = [s for s in out if s.kind in tokens or s.name in tokens]
    return out


# --------------------------------------------------------------------------------------------
# Subprocesses
# --------------------------------------------------------------------------------------------


class Processes:
    """The subprocesses this run started; all are stopped by ``stop_all``."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], path: str, name: str, timeout: float = 15.0) -> int:
        """Start ``argv`` and wait until it accepts on the Unix socket ``path``; its pid."""
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            cwd=os.path.dirname(path),  # a source tree in the caller's directory would shadow
        )
        self.procs.append(proc)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} before accepting")
            if os.path.exists(path):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    try:
                        s.connect(path)
                        return proc.pid
                    except OSError:
                        pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not accept on {path} within {timeout:.0f} s")
            time.sleep(0.02)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(3.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(3.0)
        self.procs.clear()


def _agent_argv(impl: str, path: str) -> list[str]:
    if impl == "example":
        return [sys.executable, "-m", "agentpool", "agent", "--socket", path, "--example", "bench"]
    return [sys.executable, "-m", "agentpool", "bench", "--serve-agent", path]


def _example_available() -> bool:
    try:
        from .agent import examples

        return hasattr(examples, "BenchAgent") or "bench" in repr(vars(examples).keys())
    except Exception:
        return False


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _fmt_range(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def _paired(a: Scenario | None, b: Scenario | None) -> list[float]:
    if a is None or b is None or not a.rates or not b.rates:
        return []
    return [x / y for x, y in zip(a.rates, b.rates) if y > 0]


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def find(
    scenarios: list[Scenario], kind: str, encoding: str, in_flight: int, conns: int
) -> Scenario | None:
    for s in scenarios:
        if (s.kind, s.encoding, s.in_flight, s.connections) == (kind, encoding, in_flight, conns):
            return s
    return None


def _baselines(scenarios: list[Scenario], s: Scenario) -> tuple[Scenario | None, Scenario | None]:
    raw = find(scenarios, "raw", "json", s.in_flight, s.connections)
    grpc = find(scenarios, "grpc", "json", s.in_flight, s.connections)
    return raw, grpc or find(scenarios, "grpc", "json", s.in_flight, 1)


def targets(scenarios: list[Scenario], wide: int) -> list[dict[str, Any]]:
    """Issue #6 targets, each a paired ratio with its threshold."""
    f = find
    rows = [
        (
            "pool json 1x1 / raw 1x1",
            f(scenarios, "pool", "json", 1, 1),
            f(scenarios, "raw", "json", 1, 1),
            0.9,
        ),
        (
            f"pool json {wide}x4 / raw {wide}x1",
            f(scenarios, "pool", "json", wide, 4),
            f(scenarios, "raw", "json", wide, 1),
            1.0,
        ),
        (
            f"pool json {wide}x4 / raw {wide}x4",
            f(scenarios, "pool", "json", wide, 4),
            f(scenarios, "raw", "json", wide, 4),
            1.0,
        ),
        (
            f"pool json {wide}x4 / grpc {wide} on 1 stream",
            f(scenarios, "pool", "json", wide, 4),
            f(scenarios, "grpc", "json", wide, 1),
            30.0,
        ),
        (
            f"pool json {wide}x4 / grpc {wide} over 4 streams",
            f(scenarios, "pool", "json", wide, 4),
            f(scenarios, "grpc", "json", wide, 4),
            30.0,
        ),
        (
            f"pool json {wide}x4 / raw+codec {wide}x4",
            f(scenarios, "pool", "json", wide, 4),
            f(scenarios, "rawcodec", "json", wide, 4),
            1.5,
        ),
        (
            f"batch json {wide}x4 / raw {wide}x4 (per event)",
            f(scenarios, "batch", "json", wide, 4),
            f(scenarios, "raw", "json", wide, 4),
            1.3,
        ),
        (
            f"fanout json {wide}x4 / raw {wide}x4 (per event)",
            f(scenarios, "fanout", "json", wide, 4),
            f(scenarios, "raw", "json", wide, 4),
            1.3,
        ),
        (
            "pool json 1x1 / grpc 1",
            f(scenarios, "pool", "json", 1, 1),
            f(scenarios, "grpc", "json", 1, 1),
            2.5,
        ),
    ]
    out: list[dict[str, Any]] = []
    for name, a, b, threshold in rows:
        summary = _summary(_paired(a, b))
        out.append(
            {
                "target": name,
                "threshold": threshold,
                "ratio": summary,
                "met": None if summary is None else summary["median"] >= threshold,
            }
        )
    return out


def render_table(scenarios: list[Scenario], wide: int) -> str:
    """Markdown table of the run plus the target verdicts."""
    lines = [
        "| scenario | in flight | conns | enc | frame B | round trips/s median (min-max) "
        "| µs/rt | CPU µs/rt client + server | vs raw | vs grpc |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in scenarios:
        if not s.rates:
            lines.append(
                f"| {s.kind} | {s.in_flight} | {s.connections} | {s.encoding} | - "
                f"| failed: {s.error} | | | | |"
            )
            continue
        raw, grpc = _baselines(scenarios, s)
        med = statistics.median(s.rates)
        vs_raw = _summary(_paired(s, raw)) if s.kind != "raw" else None
        vs_grpc = _summary(_paired(s, grpc)) if s.kind != "grpc" else None
        lines.append(
            f"| {s.kind} | {s.in_flight} | {s.connections} | {s.encoding} | {s.frame_size or '-'} "
            f"| {_fmt_range(s.rates, '{:,.0f}')} | {1e6 / med:.1f} "
            f"| {statistics.median(s.cpu_us):.1f} + {statistics.median(s.server_cpu_us):.1f} "
            f"| {_ratio_text(vs_raw)} | {_ratio_text(vs_grpc)} |"
        )
    lines += [
        "",
        "| target | threshold | measured (median, min-max of paired ratios) | verdict |",
        "|---|---:|---:|---|",
    ]
    for t in targets(scenarios, wide):
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(
            f"| {t['target']} | ≥ {t['threshold']:g}x | {_ratio_text(t['ratio'])} | {verdict} |"
        )
    return "\n".join(lines)


def _ratio_text(summary: dict[str, float] | None) -> str:
    if summary is None:
        return "-"
    return f"{summary['median']:.2f}x ({summary['min']:.2f}-{summary['max']:.2f})"


def _environment(args: argparse.Namespace, agent_impl: str) -> dict[str, Any]:
    from ._impl import HAS_EXTENSIONS
    from ._version import __version__

    try:
        import uvloop

        uvloop_version = str(getattr(uvloop, "__version__", "?"))
    except ImportError:  # pragma: no cover
        uvloop_version = None
    grpc_version = None
    with contextlib.suppress(Exception):
        grpc_version = _grpc().__version__
    return {
        "agentpool": __version__,
        "compiled_core": HAS_EXTENSIONS,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "uvloop": uvloop_version,
        "grpcio": grpc_version,
        "agent": agent_impl,
        "repetitions": args.reps,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "in_flight": args.in_flight,
        "clear_affinity": not args.keep_affinity,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def _run(
    args: argparse.Namespace,
    scenarios: list[Scenario],
    agent_path: str,
    grpc_path: str | None,
    server_pids: dict[str, int],
) -> None:
    readers = {kind: process_cpu_reader(pid) for kind, pid in server_pids.items()}
    for s in scenarios:
        client: Any
        if s.kind == "raw":
            client = RawClient(agent_path, s.connections)
        elif s.kind == "rawcodec":
            client = RawCodecClient(agent_path, s.connections)
        elif s.kind in ("pool", "batch", "fanout"):
            cls = {"pool": PoolClient, "batch": BatchClient, "fanout": FanOutClient}[s.kind]
            client = cls(agent_path, s.connections, s.encoding, not args.keep_affinity)
        else:
            assert grpc_path is not None
            client = GrpcClient(grpc_path, s.connections)
        try:
            await asyncio.wait_for(client.setup(), 15.0)
            s.client = client
            s.frame_size = client.frame_size
        except Exception as exc:
            s.error = f"{type(exc).__name__}: {exc}"
            _progress(f"  setup of {s.label} failed: {s.error}")
            with contextlib.suppress(Exception):
                await client.close()
    live = [s for s in scenarios if s.client is not None]
    try:
        for rep in range(args.reps):
            order = live if rep % 2 == 0 else list(reversed(live))
            for s in order:
                if s.client is None:
                    continue
                try:
                    reader = readers["grpc" if s.kind == "grpc" else "agent"]
                    per_rt = getattr(s.client, "per_rt", 1)
                    rate, cpu, server = await measure(
                        s.client.make_rt,
                        max(1, s.in_flight // per_rt),
                        args.warmup,
                        args.duration,
                        reader,
                        per_rt,
                    )
                except Exception as exc:
                    s.error = f"{type(exc).__name__}: {exc}"
                    _progress(f"  [{rep + 1}/{args.reps}] {s.label:<26} FAILED: {s.error}")
                    with contextlib.suppress(Exception):
                        await s.client.close()
                    s.client = None
                    continue
                s.rates.append(rate)
                s.cpu_us.append(cpu)
                s.server_cpu_us.append(server)
                _progress(
                    f"  [{rep + 1}/{args.reps}] {s.label:<26} {rate:>10,.0f} rt/s  "
                    f"{1e6 / rate:7.1f} µs/rt  CPU µs/rt: client {cpu:5.1f} server {server:5.1f}"
                )
    finally:
        for s in live:
            if s.client is not None:
                with contextlib.suppress(Exception):
                    await s.client.close()


async def _memory_in_flight(path: str, n: int, connections: int) -> dict[str, Any]:
    """tracemalloc/RSS growth of the pool with ``n`` requests outstanding at a silent agent.

    The same number of tasks awaiting a bare Future is measured first and subtracted, so the
    figure is the pool's own overhead per request (waiter, affinity entry, metrics, buffered
    frame), not the caller's tasks.
    """
    import gc
    import tracemalloc

    from .config import AgentPoolConfig
    from .pool import AgentPool

    loop = asyncio.get_running_loop()

    def rss() -> int:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    async def settle() -> None:
        for _ in range(5):
            await asyncio.sleep(0.05)
        gc.collect()

    async def sized(
        start: Callable[[], list[asyncio.Task[Any]]], ready: Callable[[], bool]
    ) -> tuple[int, int]:
        await settle()
        m0, r0 = tracemalloc.get_traced_memory()[0], rss()
        tasks = start()
        deadline = loop.time() + 60.0
        while not ready():
            if loop.time() > deadline:
                raise RuntimeError("requests did not all get in flight within 60 s")
            await asyncio.sleep(0.05)
        await settle()
        m1, r1 = tracemalloc.get_traced_memory()[0], rss()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return m1 - m0, r1 - r0

    config = AgentPoolConfig(
        connections_per_agent=connections,
        max_concurrent_per_connection=n,
        request_timeout=600.0,
    )
    pool = AgentPool(config)
    await pool.add_agent(AGENT_ID, f"unix:{path}")
    event = make_event()
    tracemalloc.start()
    try:
        futures: list[asyncio.Future[None]] = []

        def start_bare() -> list[asyncio.Task[Any]]:
            async def wait_bare(fut: asyncio.Future[None]) -> None:
                await fut

            futures[:] = [loop.create_future() for _ in range(n)]
            return [asyncio.create_task(wait_bare(f)) for f in futures]

        bare_mem, bare_rss = await sized(start_bare, lambda: True)
        futures.clear()

        def start_pool() -> list[asyncio.Task[Any]]:
            send = pool.send_request_headers
            return [asyncio.create_task(send(AGENT_ID, cid_str(i), event)) for i in range(n)]

        def all_in_flight() -> bool:
            return int(pool.protocol_metrics.in_flight_requests) >= n

        pool_mem, pool_rss = await sized(start_pool, all_in_flight)
    finally:
        tracemalloc.stop()
        await asyncio.wait_for(pool.shutdown(), 30.0)
    return {
        "requests_in_flight": n,
        "connections": connections,
        "tracemalloc_bytes_pool_plus_tasks": pool_mem,
        "tracemalloc_bytes_bare_tasks": bare_mem,
        "tracemalloc_bytes_pool_overhead": pool_mem - bare_mem,
        "bytes_per_request": (pool_mem - bare_mem) / n,
        "rss_bytes_pool_plus_tasks": pool_rss,
        "rss_bytes_bare_tasks": bare_rss,
    }


def _run_memory(args: argparse.Namespace) -> int:
    tmp = tempfile.mkdtemp(prefix="apbench-", dir="/tmp")
    path = os.path.join(tmp, "agent.sock")
    procs = Processes()
    try:
        argv = [sys.executable, "-m", "agentpool", "bench", "--serve-agent", path, "--hold"]
        procs.start(argv, path, "holding agent")
        _progress(f"bench: {args.memory} requests in flight against a silent agent")
        result = run_loop(_memory_in_flight(path, args.memory, 4))
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    mib = 1024 * 1024
    print(
        f"{result['requests_in_flight']} requests in flight over {result['connections']} "
        f"connections: pool overhead {result['tracemalloc_bytes_pool_overhead'] / mib:.2f} MiB "
        f"({result['bytes_per_request']:.0f} B/request; tracemalloc, pool+tasks "
        f"{result['tracemalloc_bytes_pool_plus_tasks'] / mib:.2f} MiB minus bare tasks "
        f"{result['tracemalloc_bytes_bare_tasks'] / mib:.2f} MiB); RSS growth pool+tasks "
        f"{result['rss_bytes_pool_plus_tasks'] / mib:.2f} MiB, bare tasks "
        f"{result['rss_bytes_bare_tasks'] / mib:.2f} MiB"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"memory": result}, fh, indent=2)
    return 0


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark with parsed ``agentpool bench`` options (declared in agentpool.cli)."""
    if args.serve_agent:
        return run_agent(args.serve_agent, hold=args.hold)
    if args.serve_grpc:
        return run_grpc_server(args.serve_grpc)
    if args.memory is not None:
        if args.memory < 1:
            print("bench: --memory needs a positive count", file=sys.stderr)
            return 2
        return _run_memory(args)
    if args.reps is None:
        args.reps = 2 if args.quick else 5
    if args.duration is None:
        args.duration = 0.25 if args.quick else 1.0
    if args.warmup is None:
        args.warmup = 0.1 if args.quick else 0.25
    if args.reps < 1 or args.duration <= 0 or args.warmup < 0 or args.in_flight < 1:
        print("bench: --reps, --duration and --in-flight must be positive", file=sys.stderr)
        return 2
    if not args.no_grpc:
        try:
            _grpc()
        except ImportError:
            _progress("grpcio is not installed (pip install 'agentpool[bench]'): skipping gRPC")
            args.no_grpc = True

    impl = args.agent
    if impl == "auto":
        impl = "example" if _example_available() else "builtin"

    scenarios = build_scenarios(args)
    if not scenarios:
        print(f"bench: --only {args.only}: nothing left to run without grpcio", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="apbench-", dir="/tmp")
    agent_path = os.path.join(tmp, "agent.sock")
    grpc_path = os.path.join(tmp, "grpc.sock")
    procs = Processes()
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        _progress(f"bench: starting the {impl} agent on {agent_path}")
        pids: dict[str, int] = {}
        try:
            pids["agent"] = procs.start(_agent_argv(impl, agent_path), agent_path, f"{impl} agent")
        except RuntimeError as exc:
            if args.agent != "auto" or impl == "builtin":
                raise
            _progress(f"bench: {exc}; falling back to the built-in agent")
            impl = "builtin"
            pids["agent"] = procs.start(_agent_argv(impl, agent_path), agent_path, "builtin agent")
        if any(s.kind == "grpc" for s in scenarios):
            _progress(f"bench: starting the grpcio server on unix:{grpc_path}")
            argv_grpc = [sys.executable, "-m", "agentpool", "bench", "--serve-grpc", grpc_path]
            pids["grpc"] = procs.start(argv_grpc, grpc_path, "grpc server")
        _progress(
            f"bench: {len(scenarios)} scenarios x {args.reps} repetitions, "
            f"{args.duration:g} s each (+{args.warmup:g} s warm-up)"
        )
        run_loop(_run(args, scenarios, agent_path, grpc_path, pids))
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    elapsed = time.monotonic() - started

    env = _environment(args, impl)
    table = render_table(scenarios, args.in_flight)
    print(
        f"agentpool {env['agentpool']} (compiled core: {env['compiled_core']}), "
        f"Python {env['python']}, "
        f"uvloop {env['uvloop']}, grpcio {env['grpcio']}, {env['cpus']} CPUs, agent: {impl}; "
        f"{args.reps} x {args.duration:g} s per scenario, run took {elapsed:.0f} s"
    )
    print(table)
    if args.json:
        data = {
            "environment": env,
            "elapsed_s": elapsed,
            "scenarios": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "encoding": s.encoding,
                    "in_flight": s.in_flight,
                    "connections": s.connections,
                    "frame_size": s.frame_size,
                    "rates": s.rates,
                    "rate": _summary(s.rates),
                    "us_per_rt": (1e6 / statistics.median(s.rates)) if s.rates else None,
                    "client_cpu_us_per_rt": s.cpu_us,
                    "client_cpu_us_per_rt_median": (
                        statistics.median(s.cpu_us) if s.cpu_us else None
                    ),
                    "server_cpu_us_per_rt": s.server_cpu_us,
                    "server_cpu_us_per_rt_median": (
                        statistics.median(s.server_cpu_us) if s.server_cpu_us else None
                    ),
                    "vs_raw": _summary(_paired(s, _baselines(scenarios, s)[0]))
                    if s.kind != "raw"
                    else None,
                    "vs_grpc": _summary(_paired(s, _baselines(scenarios, s)[1]))
                    if s.kind != "grpc"
                    else None,
                    "error": s.error,
                }
                for s in scenarios
            ],
            "targets": targets(scenarios, args.in_flight),
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
    failed = [s for s in scenarios if not s.rates]
    return 1 if failed and len(failed) == len(scenarios) else 0
