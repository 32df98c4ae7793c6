"""Frame codec: encode_frame and the incremental FrameDecoder (active core)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agentpool
from agentpool import InvalidMessage, MessageTooLarge
from agentpool.enums import MessageType
from agentpool.framing import MAX_MESSAGE_SIZE, FrameDecoder, encode_frame

MAX = MAX_MESSAGE_SIZE
KNOWN = sorted(int(t) for t in MessageType)


def test_encode_layout() -> None:
    frame = encode_frame(MessageType.PING, b'{"sequence":0}')
    assert frame[:4] == (15).to_bytes(4, "big")
    assert frame[4] == 0x41
    assert frame[5:] == b'{"sequence":0}'


def test_encode_empty_payload_is_legal() -> None:
    assert encode_frame(0x42, b"") == b"\x00\x00\x00\x01\x42"
    assert FrameDecoder().feed(b"\x00\x00\x00\x01\x42") == [(MessageType.PONG, b"")]


def test_encode_accepts_buffers() -> None:
    assert encode_frame(0x20, bytearray(b"ab")) == encode_frame(0x20, memoryview(b"ab"))


def test_encode_rejects_unknown_type() -> None:
    with pytest.raises(InvalidMessage, match="Unknown message type: 0x7f"):
        encode_frame(0x7F, b"{}")


def test_encode_rejects_oversize_payload() -> None:
    encode_frame(0x20, b"\0" * MAX)  # the writer allows exactly 16 MiB
    with pytest.raises(MessageTooLarge) as info:
        encode_frame(0x20, b"\0" * (MAX + 1))
    assert info.value.size == MAX + 1
    assert str(info.value) == f"Message too large: {MAX + 1} bytes (max: {MAX})"


def test_decoder_types_are_enum_members() -> None:
    ((mt, payload),) = FrameDecoder().feed(encode_frame(0x20, b"{}"))
    assert mt is MessageType.AGENT_RESPONSE
    assert type(payload) is bytes


def test_split_and_coalesced_frames() -> None:
    frames = [encode_frame(t, bytes([i % 256]) * (i * 7)) for i, t in enumerate(KNOWN * 3)]
    stream = b"".join(frames)
    expected = FrameDecoder().feed(stream)
    assert len(expected) == len(frames)
    for step in (1, 2, 3, 5, 17, 4096):
        dec = FrameDecoder()
        got = []
        for i in range(0, len(stream), step):
            got.extend(dec.feed(stream[i : i + step]))
        assert got == expected
        assert dec.buffered == 0


def test_buffered_counts_partial_frame() -> None:
    dec = FrameDecoder()
    frame = encode_frame(0x20, b"x" * 10)
    assert dec.feed(frame[:7]) == []
    assert dec.buffered == 7
    assert dec.feed(frame[7:]) == [(MessageType.AGENT_RESPONSE, b"x" * 10)]
    assert dec.buffered == 0


@pytest.mark.parametrize(
    ("data", "exc", "text"),
    [
        (b"\0\0\0\0", InvalidMessage, "Invalid message format: Zero-length message"),
        (
            (MAX + 1).to_bytes(4, "big"),
            MessageTooLarge,
            f"Message too large: {MAX + 1} bytes (max: {MAX})",
        ),
        (b"\0\0\0\x02\x7f{", InvalidMessage, "Invalid message format: Unknown message type: 0x7f"),
        (b"\0\0\0\x02{}", InvalidMessage, "Invalid message format: Unknown message type: 0x7b"),
    ],
)
def test_fatal_framing_errors(data: bytes, exc: type[Exception], text: str) -> None:
    dec = FrameDecoder()
    with pytest.raises(exc) as info:
        dec.feed(data)
    assert str(info.value) == text
    assert dec.failed
    with pytest.raises(exc):
        dec.feed(encode_frame(0x20, b"{}"))


def test_oversize_detected_from_prefix_alone() -> None:
    with pytest.raises(MessageTooLarge):
        FrameDecoder().feed(b"\x01\x00\x00\x01")


def test_frames_before_error_are_delivered_first() -> None:
    dec = FrameDecoder()
    good = encode_frame(0x20, b"{}")
    assert dec.feed(good + b"\0\0\0\0") == [(MessageType.AGENT_RESPONSE, b"{}")]
    assert dec.failed
    with pytest.raises(InvalidMessage, match="Zero-length"):
        dec.feed(b"")


def test_custom_max_size() -> None:
    dec = FrameDecoder(max_size=10)
    assert dec.feed(encode_frame(0x20, b"x" * 9)) == [(MessageType.AGENT_RESPONSE, b"x" * 9)]
    with pytest.raises(MessageTooLarge):
        dec.feed(encode_frame(0x20, b"x" * 10))
    with pytest.raises(ValueError):
        FrameDecoder(max_size=0)


def test_large_stream_does_not_grow_buffer_unbounded() -> None:
    dec = FrameDecoder()
    frame = encode_frame(0x20, b"y" * 1000)
    rng = random.Random(7)
    stream = frame * 500
    pos = 0
    count = 0
    while pos < len(stream):
        n = rng.randint(1, 3000)
        count += len(dec.feed(stream[pos : pos + n]))
        pos += n
        assert dec.buffered < len(frame) + 3000
    assert count == 500


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(KNOWN), st.binary(max_size=300)), max_size=12),
    st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
)
def test_any_split_gives_same_frames(frames: list[tuple[int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(t, p) for t, p in frames)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    dec = FrameDecoder()
    got: list[tuple[MessageType, bytes]] = []
    prev = 0
    for p in [*points, len(stream)]:
        got.extend(dec.feed(stream[prev:p]))
        prev = p
    assert [(int(t), p) for t, p in got] == frames


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_random_bytes_only_raise_typed_errors(chunks: list[bytes]) -> None:
    dec = FrameDecoder(max_size=1 << 20)
    for chunk in chunks:
        try:
            for mt, payload in dec.feed(chunk):
                assert isinstance(mt, MessageType)
                assert isinstance(payload, bytes)
        except agentpool.AgentProtocolError:
            assert dec.failed
            return
