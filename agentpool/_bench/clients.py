"""The clients a benchmark compares. Each exposes ``async setup()``, ``make_rt(i)`` (returns one
round trip as an async callable, ``i`` the worker index), ``frame_size`` and ``async close()``.

* ``RawClient``: a minimal ``asyncio.Protocol`` client, one Future per request, writing
  pre-encoded frames of the pool's size and routing replies by a byte search for the id (the
  honest ceiling of one Python client process);
* ``RawCodecClient``: the same, but each event built as a dict and orjson-encoded and each
  reply orjson-decoded, as written by hand;
* ``PoolClient``, ``BatchClient``, ``FanOutClient``: ``AgentPool.send_request_headers``,
  ``send_batch`` and ``fan_out`` with the realistic event object;
* ``GrpcClient``: grpcio aio bidirectional streaming with messages of the same size.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

import orjson

from .._impl import core
from ..codec import encode_handshake_request, get_codec
from ..config import AgentPoolConfig
from ..enums import MessageType
from ..messages import HandshakeRequest
from ..pool import AgentPool
from .agent import grpc_module
from .workload import (
    AGENT_ID,
    CID_WIDTH,
    GRPC_METHOD,
    PLACEHOLDER,
    cid_str,
    event_frame_parts,
    event_json,
    event_wire_dict,
    json_cid,
    make_event,
    split_around,
)

RoundTrip = Callable[[], Awaitable[None]]

_AGENT_RESPONSE = MessageType.AGENT_RESPONSE
_HANDSHAKE_RESPONSE = MessageType.HANDSHAKE_RESPONSE


class _RawProtocol(asyncio.Protocol):
    """Minimal v2 client: one Future per request, reply routed by its correlation id."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.waiters: dict[Any, asyncio.Future[Any]] = {}
        self.handshake: asyncio.Future[bytes] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._decoder = core.FrameDecoder()

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
        for msg_type, payload in self._decoder.feed(data):
            if msg_type == _AGENT_RESPONSE:
                self.reply(payload)
            elif msg_type == _HANDSHAKE_RESPONSE and not self.handshake.done():
                self.handshake.set_result(payload)

    def reply(self, payload: bytes) -> None:
        fut = self.waiters.pop(json_cid(payload, 0, len(payload)), None)
        if fut is not None and not fut.done():
            fut.set_result(None)


class RawClient:
    """Raw ceiling: pre-encoded JSON frames, ``transport.write`` per request, no decoding."""

    kind = "raw"
    protocol_class: Any = _RawProtocol

    def __init__(self, path: str, connections: int) -> None:
        self.path = path
        self.connections = connections
        self.protocols: list[_RawProtocol] = []
        self._parts = event_frame_parts()
        self.frame_size = sum(map(len, self._parts)) + 2 * CID_WIDTH
        self._ids = itertools.count()

    async def setup(self) -> None:
        loop = asyncio.get_running_loop()
        offer = HandshakeRequest(proxy_version="bench", supported_encodings=["json"])
        hello = core.encode_frame(MessageType.HANDSHAKE_REQUEST, encode_handshake_request(offer))
        for _ in range(self.connections):
            _, proto = await loop.create_unix_connection(self.protocol_class, self.path)
            assert proto.transport is not None
            proto.transport.write(hello)
            reply = orjson.loads(await asyncio.wait_for(proto.handshake, 5.0))
            if not reply.get("success") or reply.get("encoding", "json") != "json":
                raise RuntimeError(f"raw client handshake refused: {reply!r}")
            self.protocols.append(proto)

    def make_rt(self, worker: int) -> RoundTrip:
        proto = self.protocols[worker % len(self.protocols)]
        transport = proto.transport
        assert transport is not None
        waiters = proto.waiters
        create_future = proto.loop.create_future
        head, middle, tail = self._parts
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

    def reply(self, payload: bytes) -> None:
        reply = orjson.loads(payload)
        fut = self.waiters.pop(reply["audit"]["custom"]["correlation_id"], None)
        if fut is not None and not fut.done():
            fut.set_result(reply)


class RawCodecClient(RawClient):
    """What an engineer writes by hand: the raw client, but each event built as a dict and
    orjson-encoded, each reply orjson-decoded (no validation, no accounting)."""

    kind = "rawcodec"
    protocol_class: Any = _RawCodecProtocol

    def make_rt(self, worker: int) -> RoundTrip:
        proto = self.protocols[worker % len(self.protocols)]
        transport = proto.transport
        assert transport is not None
        waiters = proto.waiters
        create_future = proto.loop.create_future
        ids = self._ids
        dumps, sort = orjson.dumps, orjson.OPT_SORT_KEYS
        frame, event_type = core.encode_frame, MessageType.REQUEST_HEADERS

        async def rt() -> None:
            cid = cid_str(next(ids))
            payload = dumps(event_wire_dict(cid), option=sort)
            fut: asyncio.Future[Any] = create_future()
            waiters[cid] = fut
            transport.write(frame(event_type, payload))
            await fut

        return rt


def _raise_first(results: Iterable[object]) -> None:
    """Raise the first failure among per-request results (a scenario never hides one)."""
    for r in results:
        if isinstance(r, Exception):
            raise r


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

    async def _open(self, agents: list[str], connections: int) -> None:
        config = AgentPoolConfig(connections_per_agent=connections, encoding=self.encoding)
        self.pool = AgentPool(config)
        for agent in agents:
            await self.pool.add_agent(agent, f"unix:{self.path}")

    async def setup(self) -> None:
        await self._open([AGENT_ID], self.connections)
        probe = make_event()
        for n in range(2 * self.connections):
            await asyncio.wait_for(
                self.pool.send_request_headers(AGENT_ID, f"probe-{n}", probe), 5.0
            )
            self.pool.clear_correlation_affinity(f"probe-{n}")
        payload = get_codec(self.encoding).encode_event(make_event(), cid_str(0))
        self.frame_size = len(payload) + 5

    def make_rt(self, worker: int) -> RoundTrip:
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

    def make_rt(self, worker: int) -> RoundTrip:
        batch = self.pool.send_batch
        clear = self.pool.clear_correlation_affinity
        event = make_event()
        ids = self._ids
        n = self.per_rt

        async def rt() -> None:
            items = [(f"{next(ids):032x}", event) for _ in range(n)]
            _raise_first(await batch(AGENT_ID, items))
            for cid, _ in items:
                clear(cid)

        return rt


class FanOutClient(PoolClient):
    """agentpool: ``AgentPool.fan_out`` of one event to ``per_rt`` agents (the same agent
    process added under several ids, one connection each)."""

    kind = "fanout"
    per_rt = 4

    async def setup(self) -> None:
        self.agents = [f"{AGENT_ID}-{i}" for i in range(self.per_rt)]
        await self._open(self.agents, 1)
        out = await asyncio.wait_for(self.pool.fan_out(self.agents, "probe", make_event()), 5.0)
        self.pool.clear_correlation_affinity("probe")
        _raise_first(out.values())

    def make_rt(self, worker: int) -> RoundTrip:
        fan_out = self.pool.fan_out
        clear = self.pool.clear_correlation_affinity
        event = make_event()
        ids = self._ids
        agents = self.agents

        async def rt() -> None:
            cid = f"{next(ids):032x}"
            _raise_first((await fan_out(agents, cid, event)).values())
            clear(cid)

        return rt


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
            fut = waiters.pop(json_cid(reply, 0, len(reply)), None)
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
        parts = split_around(event_json(PLACEHOLDER), PLACEHOLDER.encode())
        self._parts = parts
        self.frame_size = sum(map(len, parts)) + 2 * CID_WIDTH + 5
        self._ids = itertools.count()

    async def setup(self) -> None:
        grpc = grpc_module()
        self.channel = grpc.aio.insecure_channel(f"unix:{self.path}")
        await asyncio.wait_for(self.channel.channel_ready(), 10.0)
        method = self.channel.stream_stream(GRPC_METHOD)
        self.streams = [_GrpcStream(method(), grpc.aio.EOF) for _ in range(self.n_streams)]

    def make_rt(self, worker: int) -> RoundTrip:
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
