"""The agent side over gRPC: serve an :class:`~agentpool.agent.Agent` as ``AgentServiceV2``.

:class:`GrpcAgentServer` answers ``ProcessStream`` calls with the handlers of the same Agent
subclass that :class:`~agentpool.agent.AgentServer` serves on UDS/TCP, so one agent can be
reached by a Zentinel proxy over either transport. Behaviour on the stream follows the Rust
agent server: events before a successful handshake are ignored; pings are answered with a
Pong; Cancel cancels the running handler (no reply); Configure runs ``on_configure`` without
a reply (the gRPC message has no correlation id); guardrail and WebSocket events are not
served (their replies cannot be expressed on gRPC) and get no reply. Events of one stream are
handled concurrently (at most ``Agent.max_concurrency`` at once) and answered in completion
order. A reply that gRPC cannot carry (a body mutation, a WebSocket decision) is logged and
replaced by the error policy's answer (Block 500 by default), never sent with part of its
meaning lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import Any

import orjson

from ..enums import CancelReason, FlowAction, HealthState, MessageType
from ..errors import AgentProtocolError
from ..grpc import _convert
from ..grpc import agent_v2_pb2 as pb
from ..grpc._client import GrpcTLS, grpc_module
from ..messages import FlowControlSignal, HealthStatus, MetricsReport, now_ms
from ._flusher import DEFAULT_MAX_WRITE_BUFFER
from .base import Agent, ErrorPolicy, handle_event
from .session import current_session

__all__ = ["GrpcAgentServer", "GrpcSession"]

log = logging.getLogger("agentpool.grpc.server")

_SERVICE = "zentinel.agent.v2.AgentServiceV2"


class GrpcSession:
    """One proxy's ``ProcessStream`` on the agent side.

    Offers the push helpers of :class:`~agentpool.agent.AgentSession` (health, metrics, flow
    control) and ``write_raw`` (tests send malformed messages with it).
    """

    def __init__(self, server: GrpcAgentServer, context: Any) -> None:
        self.server = server
        self.agent = server.agent
        self.context = context
        self.handshaken = False
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.on_error: ErrorPolicy = server.on_error or server.agent.on_error
        self._slots = asyncio.Semaphore(max(1, int(server.agent.max_concurrency)))
        self._background: set[asyncio.Future[None]] = set()
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._out_size = 0
        self._over = False
        self.closed = asyncio.Event()

    # -- outbound ---------------------------------------------------------------------------

    def write_raw(self, data: bytes) -> None:
        """Queue bytes to send as one message, unchecked."""
        self._queue(data)

    def _send(self, msg: Any) -> None:
        self._queue(msg.SerializeToString())

    def _queue(self, data: bytes) -> None:
        if self._over:
            return
        self._out_size += len(data)
        if self._out_size > self.server.max_write_buffer:
            # the proxy stopped reading: drop the stream rather than hold replies forever
            log.warning(
                "gRPC proxy %s does not read its replies (%d bytes queued); closing",
                self.context.peer(),
                self._out_size,
            )
            self._over = True
            self.close()
            return
        self._out.put_nowait(data)

    def close(self) -> None:
        """End the stream (after what is queued; at once when over the write bound)."""
        if self._over:
            while not self._out.empty():
                self._out.get_nowait()
        self._out.put_nowait(None)

    def abort(self) -> None:
        self.close()

    def send_health(self, state: HealthState, message: str | None = None) -> None:
        self._send(
            _convert.health_to_proto(
                HealthStatus(
                    agent_id=self.agent.agent_id,
                    state=state,
                    message=message,
                    timestamp_ms=now_ms(),
                )
            )
        )

    def send_metrics(self, report: MetricsReport) -> None:
        self._send(_convert.metrics_to_proto(report))

    def send_flow_control(self, action: FlowAction, correlation_id: str | None = None) -> None:
        signal_ = FlowControlSignal(
            action=action, correlation_id=correlation_id, timestamp_ms=now_ms()
        )
        self._send(_convert.flow_to_proto(signal_))

    def pause(self) -> None:
        self.send_flow_control(FlowAction.PAUSE)

    def resume(self) -> None:
        self.send_flow_control(FlowAction.RESUME)

    # -- the call -----------------------------------------------------------------------------

    async def run(self, request_iterator: Any) -> Any:
        """The stream handler body: an async generator of serialized AgentToProxy messages."""
        reader = asyncio.ensure_future(self._read(request_iterator))
        try:
            while True:
                item = await self._out.get()
                if item is None:
                    break
                self._out_size -= len(item)
                yield item
            if self._over:
                grpc = grpc_module()
                await self.context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "the proxy does not read its replies"
                )
        finally:
            reader.cancel()
            for task in list(self.tasks.values()):
                task.cancel()
            self.tasks.clear()
            self.closed.set()

    async def _read(self, request_iterator: Any) -> None:
        slots = self._slots
        try:
            async for raw in request_iterator:
                # at most max_concurrency handlers: past that, stop reading (flow control)
                await slots.acquire()
                try:
                    started = self._on_message(raw)
                except Exception:
                    log.exception("error handling a gRPC message from %s", self.context.peer())
                    started = False
                if not started:
                    slots.release()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("gRPC stream from %s ended: %r", self.context.peer(), exc)
        # The proxy ended its side: finish once the running handlers have answered.
        if self.tasks:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.close()

    def _on_message(self, raw: bytes) -> bool:
        """Handle one message; True when it started a handler (which frees a slot when done)."""
        msg = pb.ProxyToAgent()
        try:
            msg.ParseFromString(raw)
        except Exception as exc:
            log.warning("undecodable ProxyToAgent message from %s: %s", self.context.peer(), exc)
            return False
        which = msg.WhichOneof("message")
        if not self.handshaken:
            if which == "handshake":
                self._handshake(msg.handshake)
            else:
                log.warning("gRPC %s before the handshake ignored", which)
            return False
        if which == "ping":
            reply = pb.AgentToProxy()
            reply.pong.sequence = msg.ping.sequence
            reply.pong.ping_timestamp_ms = msg.ping.timestamp_ms
            reply.pong.timestamp_ms = now_ms()
            self._send(reply)
        elif which == "cancel":
            self._cancel(msg.cancel)
        elif which == "configure":
            self._spawn(self._configure(msg.configure))
        else:
            try:
                item = _convert.event_from_proto(msg)
            except AgentProtocolError as exc:
                kind = _convert.event_kind(msg)
                if kind is None:
                    log.warning("bad gRPC %s message: %s", which, exc)
                    return False
                # an event that cannot be read is answered by the error policy, as on UDS
                msg_type, cid = kind
                log.warning(
                    "cannot decode gRPC %s %r (%s); answering %s", which, cid, exc, self.on_error
                )
                resp = self.on_error.response(msg_type, "decode-error")
                self._send(_convert.response_to_proto(resp, cid))
                return False
            if item is None:
                log.warning("gRPC %s is not served over gRPC; no reply", which)
                return False
            msg_type, event = item
            cid = str(event.correlation_id)
            token = current_session.set(self)  # type: ignore[arg-type]
            try:
                task = asyncio.ensure_future(self._run(msg_type, event, cid))
            finally:
                current_session.reset(token)
            self.tasks[cid] = task
            task.add_done_callback(functools.partial(self._task_done, cid))
            return True
        return False

    def _handshake(self, req: Any) -> None:
        from ..messages import HandshakeRequest

        config: Any = None
        if req.config_json:
            try:
                config = orjson.loads(req.config_json)
            except orjson.JSONDecodeError:
                config = None
        request = HandshakeRequest(
            supported_versions=list(req.supported_versions),
            proxy_id=req.proxy_id,
            proxy_version=req.proxy_version,
            config=config,
            supported_encodings=["protobuf"],
        )
        error = None
        if 2 not in request.supported_versions:
            error = f"unsupported protocol versions {request.supported_versions}; agent speaks 2"
        else:
            error = self.agent.on_handshake(request)
        reply = pb.AgentToProxy()
        hs = reply.handshake
        hs.protocol_version = 2 if error is None else 0
        _convert.capabilities_to_proto(self.agent.capabilities(), hs.capabilities)
        hs.success = error is None
        if error is not None:
            hs.error = error
        self._send(reply)
        if error is not None:
            self.close()
            return
        self.handshaken = True

    def _task_done(self, cid: str, task: asyncio.Task[None]) -> None:
        self._slots.release()
        if self.tasks.get(cid) is task:
            del self.tasks[cid]

    async def _run(self, msg_type: MessageType, event: Any, cid: str) -> None:
        policy = self.on_error
        response = await handle_event(self.agent, msg_type, event, cid, policy)
        try:
            reply = _convert.response_to_proto(response, cid)
        except AgentProtocolError as exc:
            # gRPC cannot carry what the handler decided: answer the error policy instead
            log.error("reply to %r cannot be sent over gRPC (%s); answering %s", cid, exc, policy)
            reply = _convert.response_to_proto(policy.response(msg_type), cid)
        self._send(reply)

    def _cancel(self, c: Any) -> None:
        try:
            reason = CancelReason(c.reason - 1)
        except ValueError:
            reason = CancelReason.MANUAL
        task = self.tasks.pop(c.correlation_id, None)
        if task is not None:
            task.cancel()
        self._spawn(self._on_cancel(c.correlation_id, reason))

    def _spawn(self, coro: Any) -> None:
        fut = asyncio.ensure_future(coro)
        self._background.add(fut)
        fut.add_done_callback(self._background.discard)

    async def _on_cancel(self, cid: str, reason: CancelReason) -> None:
        try:
            await self.agent.on_cancel(cid, reason)
        except Exception:
            log.exception("on_cancel failed")

    async def _configure(self, c: Any) -> None:
        try:
            config = orjson.loads(c.config_json) if c.config_json else None
            version = c.config_version if c.HasField("config_version") else None
            await self.agent.on_configure(config, version)
        except Exception:
            log.exception("on_configure failed")


class GrpcAgentServer:
    """Serve ``agent`` as ``zentinel.agent.v2.AgentServiceV2`` on ``host:port``.

    ``port`` 0 picks a free port (read :attr:`port` after :meth:`start`). ``ssl``: a
    :class:`GrpcTLS` whose ``certificate_chain``/``private_key`` are the server's (and
    ``root_certificates``, when given, are required of clients), or grpc
    ``ServerCredentials``. Messages are limited to 4 MiB each way. A proxy that lets more than
    ``max_write_buffer`` bytes of replies pile up gets no more replies on that stream, which is
    aborted with RESOURCE_EXHAUSTED (the status reaches the proxy once it reads again). As on
    :class:`~agentpool.agent.AgentServer`, a stream runs at most ``agent.max_concurrency``
    handlers at once (then stops reading), and ``on_error`` (default: the agent's) answers
    failed handlers, and replies that gRPC cannot carry.
    """

    def __init__(
        self,
        agent: Agent,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl: Any = None,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
        on_error: ErrorPolicy | None = None,
    ) -> None:
        if on_error is not None and not isinstance(on_error, ErrorPolicy):
            raise TypeError(f"on_error must be an ErrorPolicy, not {type(on_error).__name__}")
        self.agent = agent
        self.host = host
        self.port = port
        self.ssl = ssl
        self.on_error = on_error
        #: Largest message sent or received (grpcio's default receive limit).
        self.max_message_size = _convert.MAX_MESSAGE_SIZE
        #: Replies queued for one proxy that does not read them, beyond which its stream ends.
        self.max_write_buffer = max_write_buffer
        self._server: Any = None
        self._sessions: set[GrpcSession] = set()

    @property
    def endpoint(self) -> str:
        scheme = "grpcs" if self.ssl is not None else "grpc"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def sessions(self) -> list[GrpcSession]:
        """The connected proxy streams that completed the handshake."""
        return [s for s in self._sessions if s.handshaken]

    async def _process(self, request_iterator: Any, context: Any) -> Any:
        session = GrpcSession(self, context)
        self._sessions.add(session)
        try:
            async for item in session.run(request_iterator):
                yield item
        finally:
            self._sessions.discard(session)

    async def start(self) -> None:
        grpc = grpc_module()
        limit = self.max_message_size
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        handler = grpc.method_handlers_generic_handler(
            _SERVICE, {"ProcessStream": grpc.stream_stream_rpc_method_handler(self._process)}
        )
        server.add_generic_rpc_handlers((handler,))
        address = f"{self.host}:{self.port}"
        if self.ssl is not None:
            creds = self.ssl
            if isinstance(creds, GrpcTLS):
                if creds.certificate_chain is None or creds.private_key is None:
                    raise ValueError("GrpcTLS for a server needs certificate_chain and private_key")
                creds = grpc.ssl_server_credentials(
                    [(creds.private_key, creds.certificate_chain)],
                    root_certificates=creds.root_certificates,
                    require_client_auth=creds.root_certificates is not None,
                )
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        self.port = port
        await server.start()
        self._server = server

    async def close(self, grace: float = 0.5) -> None:
        """Stop listening and end every stream (running handlers get ``grace`` seconds)."""
        for session in list(self._sessions):
            session.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.stop(grace)
            self._server = None

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        await self._server.wait_for_termination()

    async def __aenter__(self) -> GrpcAgentServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send_health(self, state: HealthState, message: str | None = None) -> int:
        sessions = self.sessions
        for s in sessions:
            s.send_health(state, message)
        return len(sessions)

    async def send_flow_control(self, action: FlowAction) -> int:
        sessions = self.sessions
        for s in sessions:
            s.send_flow_control(action)
        return len(sessions)

    async def send_metrics(self, report: MetricsReport) -> int:
        sessions = self.sessions
        for s in sessions:
            s.send_metrics(report)
        return len(sessions)
