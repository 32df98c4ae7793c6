"""Hypothesis-driven fuzzing of everything that parses agent bytes.

Frame decoder (active core, and the two cores against each other when both are importable),
the payload decoders of the codecs, and a live :class:`AgentConnection` whose "agent" is a raw
socket sending hypothesis-chosen bytes after a valid handshake. The only acceptable outcomes
are a value or an :class:`AgentProtocolError` subclass, within the configured timeouts.
Example counts are modest so the module stays well under 20 s per core.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agentpool import AgentProtocolError, InvalidMessage, MessageTooLarge
from agentpool._impl import core
from agentpool.enums import MessageType

KNOWN_TYPES = sorted(int(t) for t in MessageType)
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _other_core() -> Any | None:
    """The core that is not active, when it is importable (for differential checks)."""
    name = "agentpool._core_py" if getattr(core, "COMPILED", False) else "agentpool._core"
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


OTHER_CORE = _other_core()
CORES = [core] + ([OTHER_CORE] if OTHER_CORE is not None else [])


# --- frame decoder -------------------------------------------------------------------------

frames_st = st.lists(
    st.tuples(st.sampled_from(KNOWN_TYPES), st.binary(max_size=64)), max_size=6
).map(lambda fs: b"".join(core.encode_frame(t, p) for t, p in fs))


def _corrupt(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for pos, val in edits:
        if buf:
            buf[pos % len(buf)] = val
    return bytes(buf)


stream_st = st.one_of(
    st.binary(max_size=256),
    frames_st,
    st.tuples(
        frames_st, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4)
    ).map(lambda t: _corrupt(*t)),
    st.tuples(frames_st, st.binary(max_size=16), frames_st).map(lambda t: t[0] + t[1] + t[2]),
)


def _run_decoder(
    mod: Any, data: bytes, cuts: list[int], max_size: int
) -> tuple[list[Any], str | None]:
    """Feed ``data`` split at ``cuts``; return the frames and the error class name, if any."""
    dec = mod.FrameDecoder(max_size)
    frames: list[Any] = []
    error: str | None = None
    bounds = [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]
    start = 0
    for end in [*bounds, None]:
        chunk = data[start:end] if end is not None else b""
        try:
            frames.extend((int(t), p) for t, p in dec.feed(chunk))
        except AgentProtocolError as exc:
            assert isinstance(exc, (InvalidMessage, MessageTooLarge)), repr(exc)
            assert dec.failed
            error = type(exc).__name__
            with pytest.raises(type(exc)):
                dec.feed(b"\x00\x00\x00\x02\x20{")
            break
        if end is None:
            break
        start = end
    if error is None:
        assert not dec.failed
        assert dec.buffered == len(data) - sum(4 + 1 + len(p) for _, p in frames)
        assert dec.buffered < 4 or int.from_bytes(data[-dec.buffered :][:4], "big") <= max_size
    return frames, error


@FAST
@given(
    data=stream_st,
    cuts=st.lists(st.integers(0, 400), max_size=8),
    max_size=st.sampled_from([1, 8, 64, core.MAX_MESSAGE_SIZE]),
)
def test_decoder_typed_errors_and_chunking_invariance(
    data: bytes, cuts: list[int], max_size: int
) -> None:
    whole = _run_decoder(core, data, [], max_size)
    split = _run_decoder(core, data, cuts, max_size)
    one_by_one = (
        _run_decoder(core, data, list(range(len(data))), max_size) if len(data) < 96 else whole
    )
    assert whole == split == one_by_one
    for mod in CORES[1:]:
        assert _run_decoder(mod, data, cuts, max_size) == whole


@FAST
@given(
    frames=frames_st,
    bad=st.sampled_from([b"\x00\x00\x00\x00", b"\x00\x00\x00\x05\x99", b"\x00\x00\x00\x01\x00"]),
    junk=st.binary(max_size=8),
)
def test_decoder_returns_good_frames_before_the_error(
    frames: bytes, bad: bytes, junk: bytes
) -> None:
    for mod in CORES:
        dec = mod.FrameDecoder()
        expected = [(int(t), p) for t, p in mod.FrameDecoder().feed(frames)]
        if expected:
            assert [(int(t), p) for t, p in dec.feed(frames + bad + junk)] == expected
        else:
            with pytest.raises(InvalidMessage):
                dec.feed(frames + bad + junk)
        assert dec.failed
        with pytest.raises(InvalidMessage):
            dec.feed(b"")


# --- payload decoders ----------------------------------------------------------------------

try:
    from agentpool import codec
except ImportError:  # pragma: no cover - until the codec lands
    codec = None  # type: ignore[assignment]
needs_codec = pytest.mark.skipif(codec is None, reason="agentpool.codec not available")

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)

FIELDS = [
    "version", "decision", "audit", "custom", "correlation_id", "request_headers",
    "response_headers", "routing_metadata", "needs_more", "request_body_mutation",
    "response_body_mutation", "websocket_decision", "block", "redirect", "challenge",
    "status", "body", "headers", "url", "protocol_version", "capabilities", "success",
    "error", "encoding", "agent_id", "state", "action", "metadata", "data", "is_last",
    "features", "limits", "supported_events", "reason", "sequence", "timestamp_ms",
    "update_type", "type", "request_id", "accepted", "counters", "gauges", "histograms",
]  # fmt: skip

shaped_objects = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 70000)
    | st.text(max_size=6)
    | st.sampled_from(FIELDS),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=6)
    ),
    max_leaves=25,
)


def _json(obj: Any) -> bytes:
    """Compact JSON that may hold integers beyond 64 bits and non-finite floats."""
    return json.dumps(obj, separators=(",", ":")).encode()


def _msgpack(obj: Any) -> bytes:
    import msgpack

    try:
        return bytes(msgpack.packb(obj))
    except (OverflowError, ValueError, TypeError):
        return b"\xc1"


payload_st = st.one_of(
    st.binary(max_size=128),
    json_values.map(_json),
    shaped_objects.map(_json),
    shaped_objects.map(_msgpack),
    st.builds(
        lambda cid, dec: _json(
            {"version": 2, "decision": dec, "audit": {"custom": {"correlation_id": cid}}}
        ),
        json_values,
        json_values,
    ),
)


def _only_typed(fn: Callable[[], object]) -> None:
    try:
        fn()
    except AgentProtocolError:
        pass


def _codecs() -> list[Any]:
    return [codec.get_codec("json"), codec.get_codec("msgpack")]


@needs_codec
@FAST
@given(payload=payload_st)
def test_decode_response_only_typed_errors(payload: bytes) -> None:
    for c in _codecs():
        try:
            cid, response = c.decode_response(payload)
        except AgentProtocolError:
            continue
        assert isinstance(cid, str)
        assert response is not None


@needs_codec
@FAST
@given(payload=payload_st, msg_type=st.sampled_from(KNOWN_TYPES))
def test_decode_event_and_control_only_typed_errors(payload: bytes, msg_type: int) -> None:
    for c in _codecs():
        if 0x10 <= msg_type <= 0x17:
            _only_typed(lambda c=c: c.decode_event(msg_type, payload))
        if 0x30 <= msg_type <= 0x33:
            _only_typed(lambda c=c: c.decode_control(msg_type, payload))
        assert isinstance(c.event_correlation_id(payload), str)


ALWAYS_JSON = [
    "decode_handshake_request",
    "decode_handshake_response",
    "decode_cancel",
    "decode_ping",
    "decode_registration_request",
    "decode_registration_response",
]


@needs_codec
@FAST
@given(payload=payload_st)
def test_json_only_decoders_only_typed_errors(payload: bytes) -> None:
    for name in ALWAYS_JSON:
        fn = getattr(codec, name, None)
        if fn is not None:
            _only_typed(lambda fn=fn: fn(payload))


# --- a live connection fed random bytes ----------------------------------------------------

HANDSHAKE_RESPONSE = orjson.dumps(
    {
        "protocol_version": 2,
        "capabilities": {
            "agent_id": "raw",
            "name": "raw",
            "version": "1",
            "supported_events": [1],
            "features": {
                "streaming_body": False,
                "websocket": False,
                "guardrails": False,
                "config_push": False,
                "metrics_export": False,
                "concurrent_requests": 0,
                "cancellation": False,
                "flow_control": False,
                "health_reporting": False,
            },
            "limits": {"max_body_size": 1024, "max_concurrency": 10, "preferred_chunk_size": 1024},
        },
        "success": True,
        "error": None,
        "encoding": "json",
    }
)


class RawAgent:
    """An in-test "agent" socket: valid handshake, then writes whatever ``script`` holds."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="apfz-", dir="/tmp")
        self.path = os.path.join(self.dir, "raw.sock")
        self.script: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        script = list(self.script)
        dec = core.FrameDecoder()
        try:
            frames: list[Any] = []
            while not frames:
                data = await reader.read(65536)
                if not data:
                    return
                frames = dec.feed(data)
            offered = orjson.loads(frames[0][1]).get("supported_encodings") or ["json"]
            encoding = offered[0]
            hello = orjson.loads(HANDSHAKE_RESPONSE)
            hello["encoding"] = encoding
            writer.write(core.encode_frame(0x02, orjson.dumps(hello)))
            got: list[Any] = []
            while not got:
                data = await reader.read(65536)
                if not data:
                    return
                got = dec.feed(data)
            event_codec = codec.get_codec(encoding)
            cid = event_codec.event_correlation_id(got[0][1])
            reply = core.encode_frame(0x20, event_codec.encode_response(_allow(), cid))
            for piece in script:
                writer.write(reply if piece == REPLY else piece)
                await writer.drain()
            await reader.read(65536)
        except (ConnectionError, AgentProtocolError, asyncio.CancelledError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def close(self) -> None:
        for w in list(self.writers):
            w.close()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
async def raw_agent() -> AsyncIterator[RawAgent]:
    agent = RawAgent()
    await agent.start()
    try:
        yield agent
    finally:
        await agent.close()


REPLY = b"@REPLY@"  # stands for the right answer, in the negotiated encoding


def _allow() -> Any:
    from agentpool.messages import AgentResponse

    return AgentResponse.allow()


agent_bytes_st = st.lists(
    st.one_of(
        st.binary(max_size=48),
        st.tuples(st.sampled_from([*KNOWN_TYPES, 0x00, 0x7F, 0xFF]), payload_st).map(
            lambda t: (len(t[1]) + 1).to_bytes(4, "big") + bytes([t[0]]) + t[1]
        ),
        st.just(REPLY),
        st.just(core.encode_frame(0x33, b'{"action":1}')),
        st.just(b"\x7f\xff\xff\xff\x20"),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(script=agent_bytes_st, encoding=st.sampled_from(["json", "msgpack"]))
@example(script=[REPLY, b"\x00\x00\x00\x00"], encoding="json")
@example(script=[REPLY, b"\x00\x00\x00\x05\x99garbage"], encoding="msgpack")
@example(script=[b"\x00\x00\x00\x05\x99", REPLY], encoding="json")
async def test_live_connection_fed_random_bytes(
    raw_agent: RawAgent, script: list[bytes], encoding: str
) -> None:
    connection = pytest.importorskip("agentpool.connection")
    messages = pytest.importorskip("agentpool.messages")
    raw_agent.script = script
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    conn = await connection.AgentConnection.open(
        raw_agent.path, agent_id="raw", encoding=encoding, connect_timeout=2.0, request_timeout=0.3
    )
    assert conn.encoding == encoding
    try:
        event = messages.RequestHeadersEvent(
            metadata=messages.RequestMetadata(
                correlation_id="fz", request_id="r", client_ip="127.0.0.1", client_port=1
            ),
            method="GET",
            uri="/",
            headers={},
        )
        try:
            resp = await asyncio.wait_for(conn.request(event, "fz"), 3.0)
            assert resp.audit.custom.get("correlation_id") == "fz"
        except AgentProtocolError:
            # the right answer first means a decision, whatever follows it
            assert script[0] != REPLY
        assert conn.in_flight == 0
    finally:
        conn.close()
        await asyncio.wait_for(conn.wait_closed(), 3.0)
        loop.set_exception_handler(None)
    assert errors == []


# --- the reverse listener fed random registration bytes ------------------------------------


def _registration(token: str | None, agent_id: Any) -> bytes:
    caps = orjson.loads(HANDSHAKE_RESPONSE)["capabilities"]
    doc: dict[str, Any] = {"protocol_version": 2, "agent_id": agent_id, "capabilities": caps}
    if token is not None:
        doc["auth_token"] = token
    return _json(doc)


registration_bytes_st = st.one_of(
    st.binary(max_size=64),
    st.tuples(st.sampled_from([0x01, 0x02, 0x20, 0x99]), payload_st).map(
        lambda t: (len(t[1]) + 1).to_bytes(4, "big") + bytes([t[0]]) + t[1]
    ),
    st.tuples(st.one_of(st.none(), st.text(max_size=8)), json_values).map(
        lambda t: core.encode_frame(0x01, _registration(*t))
    ),
    st.just(b"\x7f\xff\xff\xff\x01"),
)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=registration_bytes_st)
async def test_reverse_listener_fed_random_bytes(data: bytes) -> None:
    from agentpool.pool import AgentPool
    from agentpool.reverse import ReverseConnectionConfig, ReverseConnectionListener

    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    sock_dir = tempfile.mkdtemp(prefix="apfr-", dir="/tmp")
    path = os.path.join(sock_dir, "r.sock")
    config = ReverseConnectionConfig(
        handshake_timeout=0.1, require_auth=True, auth_tokens=frozenset({"t"})
    )
    pool = AgentPool()
    listener = await ReverseConnectionListener.bind_uds(path, config)
    accept = asyncio.ensure_future(listener.accept_one(pool))
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        with contextlib.suppress(ConnectionError, RuntimeError):
            writer.write(data)
        try:
            agent_id = await asyncio.wait_for(accept, 3.0)
            assert isinstance(agent_id, str) and agent_id
        except AgentProtocolError:
            pass
        async with asyncio.timeout(3.0):
            reply = b""
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(65536):
                    reply += chunk
                    if agent_id_registered(pool):
                        break
        if reply:
            ((msg_type, _payload),) = core.FrameDecoder().feed(reply)
            assert int(msg_type) == 0x02
        writer.close()
        assert listener.pending_handshakes == 0
    finally:
        accept.cancel()
        listener.close()
        await asyncio.wait_for(listener.wait_closed(), 3.0)
        await asyncio.wait_for(pool.shutdown(), 3.0)
        loop.set_exception_handler(None)
        shutil.rmtree(sock_dir, ignore_errors=True)
    assert errors == []


def agent_id_registered(pool: Any) -> bool:
    return bool(pool.agent_ids())
