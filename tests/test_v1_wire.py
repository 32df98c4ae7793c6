"""agentpool.v1, the v1 wire format both ends share: frame decoder, envelopes, requests.

The v1 conversations themselves (proxy client against v1 agents) are in test_v1.py; here the
shared pieces, and what a v1 agent does with envelopes that are not v1 requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator

import orjson
import pytest

from agentpool import v1
from agentpool.agent import Agent, AgentServer
from agentpool.errors import InvalidMessage, MessageTooLarge
from agentpool.messages import ConfigureEvent, RequestHeadersEvent, RequestMetadata

T = 5.0


def _headers(cid: str) -> RequestHeadersEvent:
    return RequestHeadersEvent(
        metadata=RequestMetadata(
            correlation_id=cid, request_id="r", client_ip="127.0.0.1", client_port=1
        ),
        method="GET",
        uri="/",
        headers={"host": ["example.com"]},
    )


def test_event_tables_are_inverse() -> None:
    assert len(v1.EVENT_TYPES) == len(v1.EVENT_NAMES) == 8
    for msg_type, name in v1.EVENT_NAMES.items():
        assert v1.EVENT_TYPES[name] == msg_type


def test_decoder_splits_and_joins_documents() -> None:
    docs = [b'{"a":1}', b"", b'{"b":' + b"2" * 300 + b"}"]
    stream = b"".join(v1.encode_frame(d) for d in docs)
    for step in (1, 3, 7, len(stream)):
        dec = v1.FrameDecoder()
        out: list[bytes] = []
        for i in range(0, len(stream), step):
            out += dec.feed(stream[i : i + step])
        assert out == docs and dec.error is None, step


def test_decoder_oversize_returns_what_came_before_then_stops() -> None:
    dec = v1.FrameDecoder(max_size=10)
    data = v1.encode_frame(b"0123456789") + (11).to_bytes(4, "big") + b"x" * 11
    assert dec.feed(data) == [b"0123456789"]
    assert isinstance(dec.error, MessageTooLarge) and dec.error.size == 11
    assert dec.feed(v1.encode_frame(b"{}")) == []


def test_encode_request_envelope() -> None:
    frame = v1.encode_request(_headers("c1"), "c1", "legacy")
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    doc = orjson.loads(frame[4:])
    assert doc["version"] == 1 and doc["event_type"] == "request_headers"
    assert "correlation_id" not in doc["payload"] and doc["payload"]["uri"] == "/"
    cfg = orjson.loads(v1.encode_request(ConfigureEvent(config={"k": 1}), "x", "legacy")[4:])
    assert cfg == {
        "version": 1,
        "event_type": "configure",
        "payload": {"agent_id": "legacy", "config": {"k": 1}},
    }
    assert v1.decode_envelope(frame[4:]) == ("request_headers", doc["payload"])


@pytest.mark.parametrize(
    "doc",
    [
        b"not json",
        b"[]",
        b'{"payload":{}}',
        b'{"event_type":["x"],"payload":{}}',
        b'{"event_type":"configure","payload":[1]}',
    ],
)
def test_decode_envelope_rejects_what_is_not_a_request(doc: bytes) -> None:
    with pytest.raises(InvalidMessage, match="bad v1 envelope"):
        v1.decode_envelope(doc)


@contextlib.asynccontextmanager
async def _v1_agent() -> AsyncIterator[str]:
    d = tempfile.mkdtemp(prefix="ap-", dir="/tmp")
    try:
        async with AgentServer(Agent(), path=f"{d}/a.sock", protocol="v1") as server:
            assert server.path is not None
            yield server.path
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize(
    "envelope",
    [
        {"event_type": ["request_headers"], "payload": {}},
        {"event_type": "configure", "payload": [1]},
    ],
)
async def test_v1_agent_closes_on_a_malformed_envelope(envelope: object) -> None:
    """A malformed request closes the connection at once (it never stalls the session)."""
    async with _v1_agent() as path:
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(v1.encode_frame(orjson.dumps(envelope)))
            assert await asyncio.wait_for(reader.read(), T) == b""
        finally:
            writer.close()


async def test_v1_agent_answers_unknown_event_types_with_allow() -> None:
    async with _v1_agent() as path:
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(v1.encode_frame(b'{"version":1,"event_type":"nope","payload":{}}'))
            n = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), T), "big")
            reply = v1.parse_response(await asyncio.wait_for(reader.readexactly(n), T))
            assert reply.is_allow
        finally:
            writer.close()
