"""A raw Zentinel v2 agent that misbehaves on cue, for the verdict-integrity tests.

It speaks the UDS framing and the JSON handshake itself (agentpool's frame codec and orjson
only, none of its connection or server code). Every reply says which event it answers:
``routing_metadata["ev"]`` is the event's tag, ``"<type>:<correlation id>:<chunk index>"``,
so a test can tell a verdict delivered to the wrong event.

In process (``CueAgent``), a test picks what happens to each event with ``policy(tag, cid,
msg_type, obj) -> action``: ``"now"``, ``"block"`` (a Block 403 now), ``"hold"`` (kept until
``release(tag)``), ``"twice"`` (two replies in one write), ``"none"`` (never answered).
``extra_after_handshake`` frames are written in the same write as the HandshakeResponse;
``handshake_delay(connection index)`` delays that write, ``later`` lists
``(connection index, delay, frame)`` written after the handshake, and ``refusal`` makes the
handshake fail with that error string.

As a process (``python tests/agents/integrity_agent.py --socket PATH --late S``, the stress run),
each event gets a random action: at once (60 %), after a random delay up to 20 ms (28 %, out
of order), after ``--late`` seconds (2 %, past the proxy's request timeout), twice in one
write (9.5 %), or never (0.5 %).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from agentpool._impl import core

HANDSHAKE_REQUEST = 0x01
HANDSHAKE_RESPONSE = 0x02
AGENT_RESPONSE = 0x20
HEALTH_STATUS = 0x30
FLOW_CONTROL = 0x33
CANCEL = 0x40
PING = 0x41
PONG = 0x42

Policy = Callable[[str, str, int, Any], str]


def capabilities(agent_id: str) -> dict[str, Any]:
    return {
        "agent_id": agent_id,
        "name": "cue",
        "version": "1.0.0",
        "supported_events": [1, 2, 3, 4, 5, 6, 7, 8],
        "features": {
            "streaming_body": True,
            "websocket": False,
            "guardrails": True,
            "config_push": False,
            "metrics_export": False,
            "concurrent_requests": 1000,
            "cancellation": True,
            "flow_control": True,
            "health_reporting": True,
        },
        "limits": {
            "max_body_size": 10485760,
            "max_concurrency": 1000,
            "preferred_chunk_size": 65536,
        },
    }


def handshake_frame(
    agent_id: str = "cue", protocol_version: int = 2, refusal: str | None = None
) -> bytes:
    response = {
        "protocol_version": protocol_version,
        "capabilities": capabilities(agent_id),
        "success": refusal is None,
        "error": refusal,
        "encoding": "json",
    }
    return core.encode_frame(HANDSHAKE_RESPONSE, orjson.dumps(response))


def event_tag(msg_type: int, obj: Any) -> tuple[str, str]:
    """``(correlation id, tag)`` of an event payload decoded from JSON."""
    cid = obj.get("correlation_id") or (obj.get("metadata") or {}).get("correlation_id") or ""
    return cid, f"{msg_type}:{cid}:{obj.get('chunk_index', '')}"


def reply_frame(cid: str, tag: str, block: bool = False) -> bytes:
    decision: Any = {"block": {"status": 403, "body": None, "headers": None}} if block else "allow"
    payload = {
        "version": 2,
        "decision": decision,
        "routing_metadata": {"ev": tag},
        "audit": {"custom": {"correlation_id": cid}},
    }
    return core.encode_frame(AGENT_RESPONSE, orjson.dumps(payload))


class CueAgent:
    """In-process agent on a fresh Unix socket; see the module docstring."""

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        extra_after_handshake: list[bytes] | None = None,
        protocol_version: int = 2,
    ) -> None:
        self.policy: Policy = policy or (lambda tag, cid, t, obj: "now")
        self.extra_after_handshake = extra_after_handshake or []
        self.protocol_version = protocol_version
        self.dir = tempfile.mkdtemp(prefix="api-", dir="/tmp")
        self.path = os.path.join(self.dir, "a.sock")
        self.events: list[str] = []  # tags, in arrival order
        self.cancels: list[tuple[str, int]] = []
        self.held: dict[str, tuple[asyncio.StreamWriter, bytes]] = {}
        self.connections = 0
        self.handshake_delay: Callable[[int], Any] | None = None
        self.later: list[tuple[int, float, bytes]] = []
        self.refusal: str | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._arrived = asyncio.Event()

    @property
    def endpoint(self) -> str:
        return f"unix:{self.path}"

    async def __aenter__(self) -> CueAgent:
        self._server = await asyncio.start_unix_server(self._handle, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        shutil.rmtree(self.dir, ignore_errors=True)

    def release(self, tag: str, *, block: bool = False) -> None:
        """Write the reply held for ``tag`` now."""
        writer, cid_b = self.held.pop(tag)
        writer.write(reply_frame(cid_b.decode(), tag, block))

    async def wait_for(self, pred: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), 0.05)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        decoder = core.FrameDecoder()
        index = self.connections
        self.connections += 1
        loop = asyncio.get_running_loop()
        try:
            shaken = False
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for msg_type, payload in decoder.feed(data):
                    if not shaken:
                        shaken = True
                        if self.handshake_delay is not None:
                            await asyncio.sleep(await self.handshake_delay(index))
                        out = handshake_frame("cue", self.protocol_version, self.refusal)
                        writer.write(out + b"".join(self.extra_after_handshake))
                        for i, delay, frame in self.later:
                            if i == index:
                                loop.call_later(delay, _write, writer, frame)
                        continue
                    self._on_frame(writer, int(msg_type), payload)
                self._arrived.set()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    def _on_frame(self, writer: asyncio.StreamWriter, msg_type: int, payload: bytes) -> None:
        if msg_type == CANCEL:
            obj = orjson.loads(payload)
            self.cancels.append((obj["correlation_id"], obj["reason"]))
            return
        if msg_type == PING:
            writer.write(core.encode_frame(PONG, payload))
            return
        if not 0x10 <= msg_type <= 0x17:
            return
        obj = orjson.loads(payload)
        cid, tag = event_tag(msg_type, obj)
        self.events.append(tag)
        action = self.policy(tag, cid, msg_type, obj)
        if action in ("now", "block"):
            writer.write(reply_frame(cid, tag, action == "block"))
        elif action == "twice":
            writer.write(reply_frame(cid, tag) + reply_frame(cid, tag))
        elif action == "hold":
            self.held[tag] = (writer, cid.encode())


# -- the stress agent (a process) ------------------------------------------------------------


async def serve_stress(path: str, late: float, seed: int) -> None:
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = core.FrameDecoder()
        shaken = False
        try:
            while True:
                data = await reader.read(262144)
                if not data:
                    return
                for msg_type, payload in decoder.feed(data):
                    t = int(msg_type)
                    if not shaken:
                        shaken = True
                        writer.write(handshake_frame("stress"))
                        continue
                    if t == PING:
                        writer.write(core.encode_frame(PONG, payload))
                        continue
                    if not 0x10 <= t <= 0x17:
                        continue
                    cid, tag = event_tag(t, orjson.loads(payload))
                    frame = reply_frame(cid, tag)
                    r = rng.random()
                    if r < 0.60:
                        writer.write(frame)
                    elif r < 0.88:
                        loop.call_later(rng.random() * 0.02, _write, writer, frame)
                    elif r < 0.90:
                        loop.call_later(late * (1.0 + rng.random()), _write, writer, frame)
                    elif r < 0.995:
                        writer.write(frame + frame)
                    # else: never answered
        except ConnectionError:
            pass
        finally:
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await asyncio.start_unix_server(handle, path)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()


def _write(writer: asyncio.StreamWriter, frame: bytes) -> None:
    if not writer.is_closing():
        writer.write(frame)


@contextlib.asynccontextmanager
async def cue_agent(policy: Policy | None = None, **kw: Any) -> AsyncIterator[CueAgent]:
    async with CueAgent(policy, **kw) as agent:
        yield agent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--late", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    asyncio.run(serve_stress(args.socket, args.late, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
