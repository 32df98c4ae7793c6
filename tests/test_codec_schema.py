"""Each message is declared once, by its schema: the encoders are derived from the decode
schemas, and the one hand-written event writer (RequestHeaders as JSON, in the core) and the
body-chunk fast path must write exactly what the schema-derived encoder writes."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import orjson
from hypothesis import given
from test_codec_hypothesis import SETTINGS, events, text

from agentpool import codec as C
from agentpool.codec import control, handshake, response, schema
from agentpool.codec import events as CE
from agentpool.messages import RequestMetadata


def _structs() -> list[schema._Struct]:
    found: list[schema._Struct] = []
    for mod in (control, CE, handshake, response):
        for value in vars(mod).values():
            items = value.values() if isinstance(value, dict) else [value]
            found.extend(v for v in items if isinstance(v, schema._Struct))
    return found


@SETTINGS
@given(event=events, cid=text)
def test_event_bytes_equal_the_schema_derived_map(event: Any, cid: str) -> None:
    """The fast paths (the core's RequestHeaders writer, the body-chunk path) write what the
    schema-derived encoder writes."""
    md = getattr(event, "metadata", None)
    if isinstance(md, RequestMetadata):  # the injected id is the metadata's too
        expected_md = list(CE._METADATA.encode(dataclasses.replace(md, correlation_id=cid)).items())
        assert list(CE._event_obj(event, cid, True)["metadata"].items()) == expected_md
    derived = orjson.dumps(CE._event_obj(event, cid, False), option=orjson.OPT_SORT_KEYS)
    assert C.JSON_CODEC.encode_event(event, cid) == derived
    packed = msgpack.packb(CE._event_obj(event, cid, True), use_bin_type=True)
    assert C.MSGPACK_CODEC.encode_event(event, cid) == packed


# Fields kept beside the wire form and never sent: the pool's fail-open mark on a reply, the
# protocol version the handshake carries outside the capabilities.
LOCAL_ONLY = {"AgentResponse": {"fail_open"}, "AgentCapabilities": {"protocol_version"}}


def test_every_dataclass_field_is_declared() -> None:
    """A message field missing from its schema would be silently dropped on the wire."""
    checked = 0
    for struct in _structs():
        cls = struct.build
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            continue
        declared = {f.attr for f in struct.fields}
        wire_only = {"correlation_id"} if cls.__name__ == "RequestHeadersEvent" else set()
        local = LOCAL_ONLY.get(cls.__name__, set())
        assert declared - wire_only <= {f.name for f in dataclasses.fields(cls)}, struct.name
        missing = {f.name for f in dataclasses.fields(cls)} - declared - local
        assert not missing, (struct.name, missing)
        checked += 1
    assert checked >= 25


def test_schema_keys_are_unique_and_ordered() -> None:
    for struct in _structs():
        assert len(set(struct.keys)) == len(struct.keys), struct.name
        assert struct.keys == tuple(f.key for f in struct.fields)
