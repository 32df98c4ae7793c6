"""The servers a benchmark measures against, each run in its own process.

* The built-in agent (``agentpool bench --serve-agent PATH``): a minimal v2 agent on the core's
  framing and the codec, answering every event at once with an Allow carrying its correlation
  id (an Allow template with the id spliced in; no event is decoded beyond its id). With
  ``--hold`` it never answers events, so requests stay in flight (the memory probe).
* The grpcio server (``--serve-grpc PATH``): bidi streaming, one Allow per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

import orjson

from .._impl import core
from ..codec import (
    decode_handshake_request,
    encode_handshake_response,
    get_codec,
)
from ..enums import EventType, MessageType
from ..messages import AgentCapabilities, AgentFeatures, AgentLimits, HandshakeResponse
from .workload import (
    AGENT_ID,
    GRPC_METHOD,
    PLACEHOLDER,
    allow_reply_parts,
    json_cid,
    msgpack_cid,
    msgpack_str_header,
    response_json,
    split_around,
)

_T = TypeVar("_T")

_CAPABILITIES = AgentCapabilities(
    agent_id=AGENT_ID,
    name="bench",
    version="1.0.0",
    supported_events=[EventType(n) for n in range(1, 9)],
    features=AgentFeatures(
        streaming_body=True,
        websocket=True,
        guardrails=True,
        concurrent_requests=1000,
        cancellation=True,
    ),
    limits=AgentLimits(max_concurrency=1000),
)

_FIRST_EVENT = int(MessageType.REQUEST_HEADERS)
_LAST_EVENT = int(MessageType.CONFIGURE)
_PING = int(MessageType.PING)
_HANDSHAKE = int(MessageType.HANDSHAKE_REQUEST)


def _handshake_response(payload: bytes) -> tuple[bytes, str]:
    """The framed handshake answer and the encoding picked (msgpack when offered)."""
    request = decode_handshake_request(payload)
    offered = [str(getattr(e, "value", e)) for e in request.supported_encodings]
    encoding = next((e for e in offered if e in ("json", "msgpack")), "json")
    body = encode_handshake_response(HandshakeResponse(2, _CAPABILITIES, True, None, encoding))
    return core.encode_frame(MessageType.HANDSHAKE_RESPONSE, body), encoding


class _AgentProtocol(asyncio.Protocol):
    """One proxy connection to the built-in agent; replies to everything it reads at once."""

    def __init__(self, hold: bool = False) -> None:
        self._hold = hold
        self._transport: asyncio.Transport | None = None
        self._decoder = core.FrameDecoder()
        self._use("json")

    def _use(self, encoding: str) -> None:
        self._codec = get_codec(encoding)
        self._msgpack = encoding == "msgpack"
        self._head, self._tail = allow_reply_parts(encoding)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        try:
            frames = self._decoder.feed(data)
        except Exception:
            transport.close()
            return
        out: list[bytes] = []
        for msg_type, payload in frames:
            t = int(msg_type)
            if _FIRST_EVENT <= t <= _LAST_EVENT:
                if not self._hold:
                    out.append(self._allow(payload))
            elif t == _PING:
                out.append(core.encode_frame(MessageType.PONG, payload))
            elif t == _HANDSHAKE:
                frame, encoding = _handshake_response(payload)
                self._use(encoding)
                out.append(frame)
        if out:
            transport.write(b"".join(out) if len(out) > 1 else out[0])

    def _allow(self, payload: bytes) -> bytes:
        # The id is found by a byte search (the codec decodes the whole event for it, which
        # would make this agent, not the client measured, the bottleneck); the codec serves
        # the rare id the search misses.
        if self._msgpack:
            raw = msgpack_cid(payload) or self._codec.event_correlation_id(payload).encode()
            body = b"".join((self._head, msgpack_str_header(len(raw)), raw, self._tail))
        else:
            raw = json_cid(payload, 0, len(payload))
            if not raw or b"\\" in raw:
                raw = orjson.dumps(self._codec.event_correlation_id(payload))[1:-1]
            body = b"".join((self._head, raw, self._tail))
        return core.encode_frame(MessageType.AGENT_RESPONSE, body)


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
    """Serve until SIGTERM/SIGINT or until the parent process has gone."""
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
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

    async def start() -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        return await loop.create_unix_server(lambda: _AgentProtocol(hold), path, backlog=128)

    try:
        run_loop(_serve_until_signalled(start))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return 0


def grpc_module() -> Any:
    """Import grpcio lazily (an optional ``bench`` extra; it ships no type information)."""
    import grpc  # type: ignore[import-untyped,unused-ignore]
    import grpc.aio  # type: ignore[import-untyped,unused-ignore]

    return grpc


def run_grpc_server(path: str) -> int:
    """Serve a bidi-streaming echo of Allow replies over gRPC on ``unix:path`` until SIGTERM."""
    grpc = grpc_module()
    head, tail = split_around(response_json(PLACEHOLDER), PLACEHOLDER.encode())

    async def process(request_iterator: Any, context: Any) -> Any:
        async for request in request_iterator:
            yield head + json_cid(request, 0, len(request)) + tail

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
