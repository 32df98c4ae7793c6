"""A fault-injecting Zentinel v2 agent, run as its own process by the reliability tests.

It speaks the v2 UDS framing and the JSON handshake itself (only the frame codec of
agentpool's core and orjson are used, none of agentpool's connection or server code), and
answers every event (0x10..0x17) with an AgentResponse ``allow`` carrying the event's
correlation id, unless a fault is selected.

Selecting a fault, most specific first:

* per request: the request URI contains ``/fault/<name>[/<arg>]`` or a header
  ``x-fault: <name>[:<arg>]`` (RequestHeaders only);
* per process: a control file (``--control PATH``) holding JSON
  ``{"default": "<name>[:<arg>]", "handshake": "<name>"}``, re-read whenever it changes;
* per process: ``--fault <name>[:<arg>]`` and ``--handshake <name>``.

Request faults: ``ok``, ``crash`` (os._exit on receipt), ``crash_partial`` (half a reply
frame, then os._exit), ``close`` (close the connection without a reply), ``stall`` (never
answer this request, keep serving others), ``freeze`` (stop reading the connection, never
answer), ``slow:<s>`` / ``late:<s>`` (answer after ``s`` seconds), ``drip[:<s>]`` (the reply
frame one byte at a time, ``s`` seconds apart), ``garbage`` (bytes that are not a frame),
``oversize`` (a length prefix above 16 MiB), ``unknown_type`` (a frame with type 0x99),
``zero_length`` (a zero length prefix), ``badjson`` (an 0x20 frame whose payload is not
JSON), ``badresponse`` (valid JSON with the id but no ``version``), ``wrong_cid`` (answer
with a correlation id nobody asked for), ``twice`` (answer twice), ``pause`` (FlowControl
pause ``{"action":1}`` never resumed, then the answer), ``block`` (a Block 403 decision).

Handshake faults: ``close``, ``crash``, ``stall``, ``garbage``, ``wrong_type`` (0x20 instead of
0x02), ``badjson``, ``fail`` (success false), ``bad_encoding`` (picks an encoding the proxy did
not offer), ``drip`` (a valid response one byte at a time), ``missing_caps`` (capabilities
without ``limits``).

``--log PATH`` appends one JSON line per frame received (``{"type", "cid"}``), so a test can
see what reached the agent (e.g. Cancel frames).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from typing import Any

import orjson

from agentpool._impl import core

HANDSHAKE_REQUEST = 0x01
HANDSHAKE_RESPONSE = 0x02
AGENT_RESPONSE = 0x20
FLOW_CONTROL = 0x33
CANCEL = 0x40
PING = 0x41
PONG = 0x42
EVENT_TYPES = range(0x10, 0x18)


def capabilities(agent_id: str) -> dict[str, Any]:
    """Capabilities of a default agent (PROTOCOL.md §10.2) with concurrency advertised."""
    return {
        "agent_id": agent_id,
        "name": "faulty",
        "version": "1.0.0",
        "supported_events": [1, 2, 3, 4, 5, 6, 7, 8],
        "features": {
            "streaming_body": True,
            "websocket": False,
            "guardrails": True,
            "config_push": False,
            "metrics_export": False,
            "concurrent_requests": 100,
            "cancellation": True,
            "flow_control": True,
            "health_reporting": False,
        },
        "limits": {
            "max_body_size": 10485760,
            "max_concurrency": 100,
            "preferred_chunk_size": 65536,
        },
    }


def allow_payload(cid: str) -> bytes:
    return orjson.dumps(
        {"version": 2, "decision": "allow", "audit": {"custom": {"correlation_id": cid}}}
    )


def block_payload(cid: str) -> bytes:
    return orjson.dumps(
        {
            "version": 2,
            "decision": {"block": {"status": 403, "body": None, "headers": None}},
            "audit": {"custom": {"correlation_id": cid}},
        }
    )


def split_fault(spec: str | None) -> tuple[str, str | None]:
    if not spec:
        return "ok", None
    name, _, arg = spec.partition(":")
    return name.strip(), (arg.strip() or None)


class Control:
    """Process-wide fault defaults: CLI flags overridden by an optional JSON control file."""

    def __init__(self, fault: str | None, handshake: str | None, path: str | None) -> None:
        self.cli_fault = fault
        self.cli_handshake = handshake
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._data: dict[str, Any] = {}

    def _load(self) -> dict[str, Any]:
        if not self.path:
            return {}
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._data = None, {}
            return self._data
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                with open(self.path, "rb") as f:
                    data = orjson.loads(f.read() or b"{}")
            except (OSError, orjson.JSONDecodeError):
                return self._data
            self._stamp = stamp
            self._data = data if isinstance(data, dict) else {}
        return self._data

    def default_fault(self) -> str | None:
        return self._load().get("default") or self.cli_fault

    def handshake_fault(self) -> str | None:
        return self._load().get("handshake") or self.cli_handshake


def request_fault(event: dict[str, Any], control: Control) -> tuple[str, str | None]:
    uri = event.get("uri")
    if isinstance(uri, str) and "/fault/" in uri:
        parts = uri.split("/fault/", 1)[1].split("?", 1)[0].split("/")
        return parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    headers = event.get("headers")
    if isinstance(headers, dict):
        values = headers.get("x-fault")
        if isinstance(values, list) and values:
            return split_fault(str(values[0]))
    return split_fault(control.default_fault())


class AgentConnectionHandler:
    """One proxy connection: handshake, then a task per event so faults don't serialise."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        agent_id: str,
        control: Control,
        log: Any,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.agent_id = agent_id
        self.control = control
        self.log = log
        self.decoder = core.FrameDecoder()
        self.tasks: set[asyncio.Task[None]] = set()
        self.held: list[bytes] | None = None
        self.drip_lock = asyncio.Lock()

    def send(self, msg_type: int, payload: bytes) -> None:
        self.send_raw(core.encode_frame(msg_type, payload))

    def send_raw(self, data: bytes) -> None:
        if self.held is not None:
            self.held.append(data)
        elif not self.writer.is_closing():
            self.writer.write(data)

    async def drip(self, data: bytes, gap: float) -> None:
        """Write ``data`` one byte at a time; other replies wait so frames never interleave."""
        async with self.drip_lock:
            self.held = []
            try:
                for i in range(len(data)):
                    if self.writer.is_closing():
                        return
                    self.writer.write(data[i : i + 1])
                    await self.writer.drain()
                    await asyncio.sleep(gap)
            finally:
                held, self.held = self.held, None
                for chunk in held:
                    self.send_raw(chunk)

    async def next_frame(self) -> tuple[int, bytes] | None:
        pending: list[tuple[int, bytes]] = []
        while not pending:
            data = await self.reader.read(65536)
            if not data:
                return None
            pending = self.decoder.feed(data)
            if len(pending) > 1:
                raise RuntimeError("handshake frame followed by more data")
        return int(pending[0][0]), pending[0][1]

    async def handshake(self) -> bool:
        fault, arg = split_fault(self.control.handshake_fault())
        first = await self.next_frame()
        if first is None:
            return False
        msg_type, payload = first
        self.record(msg_type, payload)
        if msg_type != HANDSHAKE_REQUEST:
            return False
        request = orjson.loads(payload)
        offered = request.get("supported_encodings") or ["json"]
        response: dict[str, Any] = {
            "protocol_version": 2,
            "capabilities": capabilities(self.agent_id),
            "success": True,
            "error": None,
            "encoding": "json",
        }
        if fault == "close":
            return False
        if fault == "crash":
            os._exit(3)
        if fault == "stall":
            await asyncio.Event().wait()
        if fault == "garbage":
            self.send_raw(b"\xffGARBAGE-NOT-A-FRAME\x00\x01\x02")
            await self.writer.drain()
            return False
        if fault == "wrong_type":
            self.send(AGENT_RESPONSE, allow_payload("handshake"))
            return False
        if fault == "badjson":
            self.send(HANDSHAKE_RESPONSE, b"{not json")
            return False
        if fault == "fail":
            response.update(success=False, error=arg or "agent refuses", protocol_version=0)
        if fault == "bad_encoding":
            response["encoding"] = "msgpack" if "msgpack" not in offered else "cbor"
        if fault == "missing_caps":
            del response["capabilities"]["limits"]
        data = core.encode_frame(HANDSHAKE_RESPONSE, orjson.dumps(response))
        if fault == "drip":
            await self.drip(data, float(arg or 0.001))
        else:
            self.send_raw(data)
        await self.writer.drain()
        return bool(response["success"])

    def record(self, msg_type: int, payload: bytes) -> None:
        if self.log is None:
            return
        cid = ""
        with contextlib.suppress(Exception):
            obj = orjson.loads(payload)
            if isinstance(obj, dict):
                cid = str(obj.get("correlation_id", "") or obj.get("sequence", ""))
        self.log.write(orjson.dumps({"type": msg_type, "cid": cid}) + b"\n")
        self.log.flush()

    async def serve(self) -> None:
        try:
            if not await self.handshake():
                return
            while True:
                data = await self.reader.read(65536)
                if not data:
                    return
                for msg_type, payload in self.decoder.feed(data):
                    self.dispatch(int(msg_type), payload)
        except Exception:
            return
        finally:
            for task in list(self.tasks):
                task.cancel()
            with contextlib.suppress(Exception):
                self.writer.close()

    def dispatch(self, msg_type: int, payload: bytes) -> None:
        self.record(msg_type, payload)
        if msg_type == PING:
            self.send(PONG, payload)
        elif msg_type in EVENT_TYPES:
            event = orjson.loads(payload)
            task = asyncio.get_running_loop().create_task(self.answer(event))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def answer(self, event: dict[str, Any]) -> None:
        cid = event.get("correlation_id")
        if not isinstance(cid, str):
            cid = str((event.get("metadata") or {}).get("correlation_id", ""))
        fault, arg = request_fault(event, self.control)
        reply = allow_payload(cid)
        if fault == "ok":
            self.send(AGENT_RESPONSE, reply)
        elif fault == "block":
            self.send(AGENT_RESPONSE, block_payload(cid))
        elif fault == "crash":
            os._exit(4)
        elif fault == "crash_partial":
            frame = core.encode_frame(AGENT_RESPONSE, reply)
            self.send_raw(frame[: len(frame) // 2])
            await self.writer.drain()
            os._exit(5)
        elif fault == "close":
            self.writer.close()
        elif fault == "stall":
            await asyncio.Event().wait()
        elif fault == "freeze":
            self.writer.transport.pause_reading()
            await asyncio.Event().wait()
        elif fault in ("slow", "late"):
            await asyncio.sleep(float(arg or (0.2 if fault == "slow" else 2.0)))
            self.send(AGENT_RESPONSE, reply)
        elif fault == "drip":
            await self.drip(core.encode_frame(AGENT_RESPONSE, reply), float(arg or 0.0005))
        elif fault == "garbage":
            self.send_raw(b"\xde\xad\xbe\xef garbage, not a frame \x00\xff" * 4)
        elif fault == "oversize":
            self.send_raw((0x7FFFFFF0).to_bytes(4, "big") + bytes([AGENT_RESPONSE]) + reply)
        elif fault == "unknown_type":
            self.send_raw((len(reply) + 1).to_bytes(4, "big") + b"\x99" + reply)
        elif fault == "zero_length":
            self.send_raw(b"\x00\x00\x00\x00")
        elif fault == "badjson":
            self.send(AGENT_RESPONSE, b'{"version":2,"decision":')
        elif fault == "badresponse":
            self.send(
                AGENT_RESPONSE,
                orjson.dumps({"decision": "allow", "audit": {"custom": {"correlation_id": cid}}}),
            )
        elif fault == "wrong_cid":
            self.send(AGENT_RESPONSE, allow_payload(f"nobody-asked-{cid}"))
        elif fault == "twice":
            self.send(AGENT_RESPONSE, reply)
            self.send(AGENT_RESPONSE, reply)
        elif fault == "pause":
            self.send(FLOW_CONTROL, b'{"action":1}')
            self.send(AGENT_RESPONSE, reply)
        else:
            self.send(AGENT_RESPONSE, reply)


async def serve(args: argparse.Namespace, log: Any) -> None:
    control = Control(args.fault, args.handshake, args.control)
    handlers: set[AgentConnectionHandler] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = AgentConnectionHandler(reader, writer, args.agent_id, control, log)
        handlers.add(handler)
        try:
            await handler.serve()
        except asyncio.CancelledError:
            pass
        finally:
            handlers.discard(handler)

    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.socket)
    server = await asyncio.start_unix_server(on_connect, path=args.socket)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.socket)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--agent-id", default="faulty")
    parser.add_argument("--fault", default=None, help="default request fault, NAME[:ARG]")
    parser.add_argument("--handshake", default=None, help="handshake fault NAME[:ARG]")
    parser.add_argument("--control", default=None, help="JSON control file, re-read on change")
    parser.add_argument("--log", default=None, help="append a JSON line per received frame")
    args = parser.parse_args(argv)
    if args.log:
        with open(args.log, "ab") as log:
            asyncio.run(serve(args, log))
    else:
        asyncio.run(serve(args, None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
