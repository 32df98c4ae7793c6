"""Micro benchmarks of the payload codecs (agentpool.codec) against bare serializers.

Run::

    pytest benchmarks/bench_codec.py -o python_files='bench_*.py' --benchmark-group-by=group

Each group puts the codec next to its baseline measured in the same run:

* ``encode-json``: ``JSON_CODEC.encode_event`` of a realistic RequestHeaders event (20
  headers, full metadata) vs a bare ``orjson.dumps(OPT_SORT_KEYS)`` of the equivalent
  (pre-built) dict vs stdlib ``json.dumps(sort_keys=True)`` of that dict.
* ``encode-msgpack``: ``MSGPACK_CODEC.encode_event`` vs a bare ``msgpack.packb`` of the dict.
* ``encode-body-json``: ``JSON_CODEC.encode_event`` of a 4 KiB request body chunk (base64) vs a
  bare ``orjson.dumps(OPT_SORT_KEYS)`` of the equivalent dict (base64 done beforehand).
* ``decode-event``: the agent side, ``decode_event`` in both encodings vs bare parsing.
* ``decode-response``: the proxy hot path, ``decode_response`` of an Allow (the canonical
  bytes every Rust agent sends), a Block, and a reply with header ops, vs bare ``orjson.loads``.

Nothing is asserted about time; figures go to docs/performance.md.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
import orjson
import pytest

from agentpool.codec import JSON_CODEC, MSGPACK_CODEC
from agentpool.messages import (
    AgentResponse,
    AuditMetadata,
    Block,
    HeaderOp,
    RequestBodyChunkEvent,
    RequestHeadersEvent,
    RequestMetadata,
)

CID = "2xKf9aQm7Rt"


def make_event() -> RequestHeadersEvent:
    """A realistic request: 20 headers (2 multi-valued), every metadata field set."""
    headers = {
        ":method": ["POST"],
        ":path": ["/v1/orders?id=42&debug=1"],
        "host": ["api.example.com"],
        "user-agent": ["Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"],
        "accept": ["application/json", "text/plain;q=0.5"],
        "accept-encoding": ["gzip, deflate, br"],
        "accept-language": ["en-US,en;q=0.9"],
        "content-type": ["application/json"],
        "content-length": ["42"],
        "cookie": ["session=abc123", "theme=dark"],
        "authorization": ["Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.sig"],
        "x-forwarded-for": ["198.51.100.1"],
        "x-forwarded-proto": ["https"],
        "x-request-id": ["3f0b2c1e-8d4a-4b7e-9c2f-6a1d5e8b7c90"],
        "x-real-ip": ["203.0.113.7"],
        "cache-control": ["no-cache"],
        "origin": ["https://app.example.com"],
        "referer": ["https://app.example.com/checkout"],
        "sec-fetch-mode": ["cors"],
        "traceparent": ["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"],
    }
    assert len(headers) == 20
    return RequestHeadersEvent(
        metadata=RequestMetadata(
            correlation_id=CID,
            request_id="3f0b2c1e-8d4a-4b7e-9c2f-6a1d5e8b7c90",
            client_ip="203.0.113.7",
            client_port=51234,
            server_name="api.example.com",
            protocol="HTTP/1.1",
            tls_version="TLSv1.3",
            tls_cipher="TLS_AES_128_GCM_SHA256",
            route_id="api-v1",
            upstream_id="orders-backend",
            timestamp="2026-07-01T09:07:07.123456789+00:00",
            traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        method="POST",
        uri="/v1/orders?id=42&debug=1",
        headers=headers,
    )


EVENT = make_event()
EVENT_DICT: dict[str, Any] = orjson.loads(JSON_CODEC.encode_event(EVENT, CID))


def test_event_dict_is_equivalent() -> None:
    assert orjson.dumps(EVENT_DICT, option=orjson.OPT_SORT_KEYS) == JSON_CODEC.encode_event(
        EVENT, CID
    )


@pytest.mark.benchmark(group="encode-json")
def test_encode_event_json_codec(benchmark: Any) -> None:
    benchmark(JSON_CODEC.encode_event, EVENT, CID)


@pytest.mark.benchmark(group="encode-json")
def test_encode_event_json_bare_orjson(benchmark: Any) -> None:
    benchmark(orjson.dumps, EVENT_DICT, option=orjson.OPT_SORT_KEYS)


@pytest.mark.benchmark(group="encode-json")
def test_encode_event_json_stdlib(benchmark: Any) -> None:
    benchmark(json.dumps, EVENT_DICT, sort_keys=True, separators=(",", ":"))


@pytest.mark.benchmark(group="encode-msgpack")
def test_encode_event_msgpack_codec(benchmark: Any) -> None:
    benchmark(MSGPACK_CODEC.encode_event, EVENT, CID)


@pytest.mark.benchmark(group="encode-msgpack")
def test_encode_event_msgpack_bare(benchmark: Any) -> None:
    benchmark(msgpack.packb, EVENT_DICT, use_bin_type=True)


BODY_CHUNK = RequestBodyChunkEvent(CID, bytes(range(256)) * 16, False, 65536, 3, 16384)
BODY_CHUNK_DICT: dict[str, Any] = orjson.loads(JSON_CODEC.encode_event(BODY_CHUNK, CID))


@pytest.mark.benchmark(group="encode-body-json")
def test_encode_body_chunk_json_codec(benchmark: Any) -> None:
    benchmark(JSON_CODEC.encode_event, BODY_CHUNK, CID)


@pytest.mark.benchmark(group="encode-body-json")
def test_encode_body_chunk_json_bare_orjson(benchmark: Any) -> None:
    benchmark(orjson.dumps, BODY_CHUNK_DICT, option=orjson.OPT_SORT_KEYS)


JSON_EVENT = JSON_CODEC.encode_event(EVENT, CID)
MSGPACK_EVENT = MSGPACK_CODEC.encode_event(EVENT, CID)


@pytest.mark.benchmark(group="decode-event")
def test_decode_event_json_codec(benchmark: Any) -> None:
    benchmark(JSON_CODEC.decode_event, 0x10, JSON_EVENT)


@pytest.mark.benchmark(group="decode-event")
def test_decode_event_json_bare_orjson(benchmark: Any) -> None:
    benchmark(orjson.loads, JSON_EVENT)


@pytest.mark.benchmark(group="decode-event")
def test_decode_event_msgpack_codec(benchmark: Any) -> None:
    benchmark(MSGPACK_CODEC.decode_event, 0x10, MSGPACK_EVENT)


@pytest.mark.benchmark(group="decode-event")
def test_decode_event_msgpack_bare(benchmark: Any) -> None:
    benchmark(msgpack.unpackb, MSGPACK_EVENT, raw=False)


RESPONSES = {
    "allow": AgentResponse(),
    "block": AgentResponse(
        decision=Block(403, "Access denied", {"content-type": "text/plain"}),
        audit=AuditMetadata(tags=["security"], rule_ids=["942100"]),
    ),
    "header_ops": AgentResponse(
        request_headers=[HeaderOp.set("x-agent-processed", "true"), HeaderOp.remove("x-debug")],
        response_headers=[HeaderOp.add("set-cookie", "waf=1; Path=/")],
    ),
}
JSON_RESPONSES = {k: JSON_CODEC.encode_response(v, "7Rv2cW9kP11") for k, v in RESPONSES.items()}
MSGPACK_RESPONSES = {
    k: MSGPACK_CODEC.encode_response(v, "7Rv2cW9kP11") for k, v in RESPONSES.items()
}
# Upstream 0.6.20 agents built with binary-uds answer with positional arrays.
MSGPACK_POSITIONAL_BLOCK = msgpack.packb(
    [
        2,
        {"block": [403, "Access denied", {"content-type": "text/plain"}]},
        [],
        [],
        {},
        [["security"], ["942100"], None, [], {"correlation_id": "7Rv2cW9kP11"}],
        False,
        None,
        None,
        None,
    ]
)


@pytest.mark.benchmark(group="decode-response")
@pytest.mark.parametrize("shape", sorted(RESPONSES))
def test_decode_response_json_codec(benchmark: Any, shape: str) -> None:
    cid, _ = benchmark(JSON_CODEC.decode_response, JSON_RESPONSES[shape])
    assert cid == "7Rv2cW9kP11"


@pytest.mark.benchmark(group="decode-response")
@pytest.mark.parametrize("shape", sorted(RESPONSES))
def test_decode_response_json_bare_orjson(benchmark: Any, shape: str) -> None:
    benchmark(orjson.loads, JSON_RESPONSES[shape])


@pytest.mark.benchmark(group="decode-response")
@pytest.mark.parametrize("shape", sorted(RESPONSES))
def test_decode_response_msgpack_codec(benchmark: Any, shape: str) -> None:
    cid, _ = benchmark(MSGPACK_CODEC.decode_response, MSGPACK_RESPONSES[shape])
    assert cid == "7Rv2cW9kP11"


@pytest.mark.benchmark(group="decode-response")
def test_decode_response_msgpack_positional_block(benchmark: Any) -> None:
    cid, _ = benchmark(MSGPACK_CODEC.decode_response, MSGPACK_POSITIONAL_BLOCK)
    assert cid == "7Rv2cW9kP11"


@pytest.mark.benchmark(group="encode-response")
@pytest.mark.parametrize("shape", sorted(RESPONSES))
def test_encode_response_json_codec(benchmark: Any, shape: str) -> None:
    benchmark(JSON_CODEC.encode_response, RESPONSES[shape], "7Rv2cW9kP11")
