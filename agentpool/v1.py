"""Legacy v1, both ends: framing, the JSON envelope, and the proxy's client protocol.

On the wire a v1 message is a 4-byte big-endian length and that many bytes of JSON. The proxy
sends ``{"version": 1, "event_type": NAME, "payload": EVENT}`` and the agent answers each
request, one at a time and in order, with an AgentResponse (``version`` 1 or 2) or, like the
official Python SDK for configure and request_complete, ``{"success": ...}``
(docs/protocol.md, "Legacy v1").

The proxy side is :class:`V1ClientProtocol`, which :class:`~agentpool.connection.AgentConnection`
runs for ``protocol="v1"``; the agent side is :class:`agentpool.agent.session_v1.V1Session`.
Both use :class:`FrameDecoder` and the event-name table here. This module never imports the
agent side.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, cast

import orjson

from . import codec as _codec
from ._impl import core
from .enums import MessageType
from .errors import ConnectionClosed, InvalidMessage, MessageTooLarge, VersionMismatch
from .messages import AgentResponse, Block, ConfigureEvent, RequestHeadersEvent

if TYPE_CHECKING:
    from .connection import AgentConnection

__all__ = [
    "EVENT_NAMES",
    "EVENT_TYPES",
    "MAX_MESSAGE_SIZE",
    "FrameDecoder",
    "V1ClientProtocol",
    "decode_envelope",
    "encode_frame",
    "encode_request",
    "parse_response",
]

log = logging.getLogger("agentpool.connection")

MAX_MESSAGE_SIZE = 10 * 1024 * 1024
"""Largest v1 message either end accepts (bytes of JSON after the length prefix)."""

#: The v1 ``event_type`` of each event message type.
EVENT_NAMES: dict[int, str] = {
    MessageType.REQUEST_HEADERS: "request_headers",
    MessageType.REQUEST_BODY_CHUNK: "request_body_chunk",
    MessageType.RESPONSE_HEADERS: "response_headers",
    MessageType.RESPONSE_BODY_CHUNK: "response_body_chunk",
    MessageType.REQUEST_COMPLETE: "request_complete",
    MessageType.WEBSOCKET_FRAME: "web_socket_frame",
    MessageType.GUARDRAIL_INSPECT: "guardrail_inspect",
    MessageType.CONFIGURE: "configure",
}

#: The message type of each v1 ``event_type`` (the inverse of :data:`EVENT_NAMES`).
EVENT_TYPES: dict[str, MessageType] = {name: MessageType(t) for t, name in EVENT_NAMES.items()}


def encode_frame(doc: bytes) -> bytes:
    """Prefix ``doc`` with its 4-byte big-endian length."""
    return len(doc).to_bytes(4, "big") + doc


class FrameDecoder:
    """Incremental v1 decoder: bytes in, complete JSON documents out, in order.

    A length over ``max_size`` stops decoding: :meth:`feed` returns the documents before it
    and sets :attr:`error` (a :class:`~agentpool.errors.MessageTooLarge`); the connection is
    then unusable (the caller closes it).
    """

    __slots__ = ("_buf", "error", "max_size")

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._buf = bytearray()
        self.max_size = max_size
        self.error: MessageTooLarge | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the documents it completes."""
        out: list[bytes] = []
        if self.error is not None:
            return out
        buf = self._buf
        buf += data
        pos = 0
        while len(buf) - pos >= 4:
            n = int.from_bytes(buf[pos : pos + 4], "big")
            if n > self.max_size:
                self.error = MessageTooLarge(n, self.max_size)
                break
            if len(buf) - pos < 4 + n:
                break
            out.append(bytes(buf[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        if pos:
            del buf[:pos]
        return out


# -- proxy side ---------------------------------------------------------------------------


def encode_request(event: Any, correlation_id: str, agent_id: str) -> bytes:
    """The framed v1 request for ``event`` (MessageTooLarge over :data:`MAX_MESSAGE_SIZE`).

    Request headers carry no correlation id in v1; a Configure event becomes
    ``{"agent_id": ..., "config": ...}``.
    """
    name = EVENT_NAMES[int(event.MESSAGE_TYPE)]
    if isinstance(event, ConfigureEvent):
        payload: Any = {"agent_id": agent_id, "config": event.config}
    else:
        payload = orjson.loads(_codec.get_codec("json").encode_event(event, correlation_id))
        if isinstance(event, RequestHeadersEvent):
            payload.pop("correlation_id", None)
    doc = orjson.dumps({"version": 1, "event_type": name, "payload": payload})
    if len(doc) > MAX_MESSAGE_SIZE:
        raise MessageTooLarge(len(doc), MAX_MESSAGE_SIZE)
    return encode_frame(doc)


def parse_response(doc: bytes) -> AgentResponse:
    """A v1 reply: an AgentResponse (version 1 or 2) or an SDK-style ``{"success": ...}``."""
    try:
        obj = orjson.loads(doc)
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage(f"v1 reply is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidMessage("v1 reply is not a JSON object")
    if "decision" not in obj and "success" in obj:
        if obj.get("success") is True:
            return AgentResponse.allow()
        return AgentResponse(
            decision=Block(status=500, body=str(obj.get("error") or "Configuration rejected"))
        )
    version = obj.get("version")
    if version is None:
        raise InvalidMessage("missing field `version`", field="version")
    if version not in (1, 2):
        raise VersionMismatch(1, version if isinstance(version, int) else -1)
    return _codec.get_codec("json").decode_response(doc)[1]


class V1ClientProtocol(asyncio.Protocol):
    """The proxy's side of one v1 connection: one exchange at a time (FIFO)."""

    def __init__(self, conn: AgentConnection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder()
        self._lock = asyncio.Lock()
        self._waiter: asyncio.Future[bytes] | None = None
        self.current_cid: str | None = None
        self.closed = False
        self.close_error: BaseException | None = None
        self._queued = 0

    @property
    def in_flight(self) -> int:
        return self._queued

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        decoder = self._decoder
        for doc in decoder.feed(data):
            w = self._waiter
            if w is None or w.done():
                log.warning("agent %r: unexpected v1 reply dropped", self.conn.agent_id)
                continue
            w.set_result(doc)
        if decoder.error is not None:
            self.close(decoder.error, abort=True)

    def eof_received(self) -> bool | None:
        self._fail(ConnectionClosed("agent closed the connection"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionClosed("agent closed the connection" if exc is None else str(exc)))
        self.transport = None
        self.conn._on_lost(self.close_error)

    def _fail(self, error: BaseException) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_error = error
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(core.clone_error(error))

    def close(self, error: BaseException | None = None, *, abort: bool = False) -> None:
        self._fail(error or ConnectionClosed("connection closed by the proxy"))
        if error is None:
            self.close_error = None
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
        else:
            self.conn._on_lost(self.close_error)

    async def exchange(self, frame: bytes, cid: str) -> bytes:
        self._queued += 1
        try:
            async with self._lock:
                if self.closed or self.transport is None:
                    raise core.clone_error(self.close_error or ConnectionClosed())
                loop = asyncio.get_running_loop()
                self._waiter = loop.create_future()
                self.current_cid = cid
                self.transport.write(frame)
                try:
                    return await self._waiter
                except asyncio.CancelledError:
                    # The reply still comes and would be taken for the next request's.
                    self.close(ConnectionClosed(f"v1 request {cid} abandoned"))
                    raise
                finally:
                    self._waiter = None
                    self.current_cid = None
        finally:
            self._queued -= 1


# -- agent side (the wire part; the session is agentpool.agent.session_v1) ------------------


def decode_envelope(doc: bytes) -> tuple[str, dict[str, Any]]:
    """``(event_type, payload)`` of a v1 request; InvalidMessage if it is not an envelope."""
    try:
        envelope = orjson.loads(doc)
        event_type, payload = envelope["event_type"], envelope["payload"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise InvalidMessage(f"bad v1 envelope: {exc}") from None
    if not isinstance(event_type, str) or not isinstance(payload, dict):
        raise InvalidMessage("bad v1 envelope: event_type must be a string, payload an object")
    return event_type, payload
