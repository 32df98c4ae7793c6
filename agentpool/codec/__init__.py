"""Payload codecs for the v2 agent protocol: JSON (orjson) and MessagePack.

Framing is separate (``agentpool.framing``); this package only turns message objects into
payload bytes and back.

Output follows upstream byte for byte where upstream is deterministic (docs/protocol.md):
events are JSON with keys sorted at every level and the correlation id injected at the top;
responses, handshakes and control messages keep struct order. MessagePack output uses named
maps (never positional arrays, never a duplicate key) with raw ``bin`` bodies; MessagePack
input may be named maps or upstream's positional arrays (schema driven, skipped fields
honoured). Every decoding failure raises :class:`~agentpool.errors.InvalidMessage` naming the
field; encoding failures raise :class:`~agentpool.errors.Serialization`.

Modules: ``schema`` (converters and the ``_Struct`` engine every message is declared with),
``response`` (decisions and AgentResponse), ``events``, ``control`` (health, metrics, config
update, flow control), ``codecs`` (the ``Codec`` classes) and ``handshake`` (the always-JSON
messages: handshake, registration, cancel, ping).
"""

from __future__ import annotations

from .codecs import (
    JSON_CODEC,
    MSGPACK_CODEC,
    Codec,
    get_codec,
)
from .codecs import (
    fast_paths as fast_paths,
)
from .events import validate_event as validate_event
from .handshake import (
    decode_cancel,
    decode_handshake_request,
    decode_handshake_response,
    decode_ping,
    decode_registration_request,
    decode_registration_response,
    encode_cancel,
    encode_handshake_request,
    encode_handshake_response,
    encode_ping,
    encode_registration_request,
    encode_registration_response,
)
from .schema import (
    f32_shortest,
)

__all__ = [
    "JSON_CODEC",
    "MSGPACK_CODEC",
    "Codec",
    "decode_cancel",
    "decode_handshake_request",
    "decode_handshake_response",
    "decode_ping",
    "decode_registration_request",
    "decode_registration_response",
    "encode_cancel",
    "encode_handshake_request",
    "encode_handshake_response",
    "encode_ping",
    "encode_registration_request",
    "encode_registration_response",
    "f32_shortest",
    "get_codec",
]
