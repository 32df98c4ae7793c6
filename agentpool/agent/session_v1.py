"""One proxy connection on the agent side, legacy v1 (:class:`V1Session`).

v1 is a 4-byte length and a JSON envelope, one request at a time (``AgentServer(...,
protocol="v1")``); it lets tests drive the proxy's v1 client. The wire format is
:mod:`agentpool.v1`, shared with the proxy side.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, cast

import orjson

from .. import codec as _codec
from .. import v1
from ..enums import MessageType
from ..errors import AgentProtocolError, InvalidMessage
from ..messages import AgentResponse, Block
from ._flusher import Flusher
from .base import event_correlation_id, handle_event

if TYPE_CHECKING:
    from .server import AgentServer

__all__ = ["V1Session"]

log = logging.getLogger(__name__)

# v1 answers one request at a time; a proxy that pipelines more than this is not read further.
_V1_BACKLOG = 64


class V1Session(Flusher, asyncio.Protocol):
    """One proxy connection speaking legacy v1 (length + JSON envelope, one at a time).

    ``reply_version`` sets the ``version`` of replies; ``sdk_replies`` answers configure and
    request_complete with ``{"success": ...}`` like the official Python SDK does.
    """

    def __init__(self, server: AgentServer) -> None:
        super().__init__(server)
        self._decoder = v1.FrameDecoder()
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server._sessions.add(self)
        self._worker = self._loop.create_task(self._work())

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._sessions.discard(self)
        self.transport = None
        if self._worker is not None:
            self._worker.cancel()
        self._fail_drain_waiters()
        self.closed.set()

    def close(self) -> None:
        self._close_transport()

    def data_received(self, data: bytes) -> None:
        decoder = self._decoder
        for doc in decoder.feed(data):
            self._queue.put_nowait(doc)
        if decoder.error is not None:
            log.warning("v1 message too large (%d); closing", decoder.error.size)
            if self.transport is not None:
                self.transport.abort()
            return
        if self._queue.qsize() >= _V1_BACKLOG and not self._backlog_paused:
            self._backlog_paused = True
            self._sync_reading()

    async def _work(self) -> None:
        while True:
            doc = await self._queue.get()
            if self._backlog_paused and self._queue.qsize() <= _V1_BACKLOG // 2:
                self._backlog_paused = False
                self._sync_reading()
            try:
                out = await self._handle(doc)
            except InvalidMessage as exc:
                log.warning("bad v1 request: %s; closing", exc)
                self.close()
                return
            self._write(v1.encode_frame(out))

    async def _handle(self, doc: bytes) -> bytes:
        event_type, payload = v1.decode_envelope(doc)
        srv = self.server
        msg_type = v1.EVENT_TYPES.get(event_type)
        if msg_type is None:
            resp = AgentResponse.allow()
            cid = ""
        elif msg_type == MessageType.CONFIGURE:
            try:
                accepted = await self.agent.on_configure(payload.get("config"), None)
            except Exception:
                log.exception("v1 configure handler failed; answering %s", srv.on_error)
                resp = srv.on_error.response(msg_type)
                resp.version = srv.v1_reply_version
                return _codec.get_codec("json").encode_response(resp, "")
            if srv.v1_sdk_replies:
                body: dict[str, Any] = {"success": bool(accepted)}
                if not accepted:
                    body["error"] = "Configuration rejected"
                return orjson.dumps(body)
            resp = (
                AgentResponse.allow()
                if accepted
                else AgentResponse(decision=Block(status=500, body="Configuration rejected"))
            )
            cid = ""
        else:
            codec = _codec.get_codec("json")
            try:
                event = codec.decode_event(msg_type, orjson.dumps(payload))
            except AgentProtocolError as exc:
                log.warning(
                    "cannot decode v1 %r event: %s; answering %s", event_type, exc, srv.on_error
                )
                event = None
            if event is None:
                resp, cid = srv.on_error.response(msg_type, "decode-error"), ""
            else:
                cid = event_correlation_id(event)
                resp = await handle_event(self.agent, msg_type, event, cid, srv.on_error)
            if msg_type == MessageType.REQUEST_COMPLETE and srv.v1_sdk_replies:
                return orjson.dumps({"success": True})
        resp.version = srv.v1_reply_version
        return _codec.get_codec("json").encode_response(resp, cid)
