"""What every benchmark sends and answers: the 20-header event, its wire bytes, the Allow reply.

The wire bytes come from the codec and the core's framing (the same bytes the pool puts on the
wire); only the ``rawcodec`` scenario builds the event dict by hand, because that is what it
measures. Correlation ids are fixed width so that every frame of a scenario has one size.
"""

from __future__ import annotations

from typing import Any

from ..codec import get_codec
from ..enums import MessageType
from ..messages import AgentResponse, RequestHeadersEvent, RequestMetadata

AGENT_ID = "bench"
GRPC_METHOD = "/zentinel.bench.Bench/Process"
CID_WIDTH = 32
PLACEHOLDER = "@" * CID_WIDTH

HEADERS: dict[str, list[str]] = {
    ":method": ["GET"],
    ":path": ["/api/v1/orders/12345?expand=items&currency=EUR"],
    "host": ["shop.example.com"],
    "user-agent": [
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/126.0.0.0 Safari/537.36"
    ],
    "accept": ["application/json, text/plain, */*"],
    "accept-encoding": ["gzip, deflate, br, zstd"],
    "accept-language": ["en-US,en;q=0.9,de;q=0.8"],
    "authorization": [
        "Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwiaWF0Ijox"
        "NzY3MjI1NjAwfQ.c2lnbmF0dXJlLXBsYWNlaG9sZGVy"
    ],
    "cache-control": ["no-cache"],
    "connection": ["keep-alive"],
    "cookie": ["session=3f9a1c27b6e84d0f9a51c2e7; theme=dark; lang=en"],
    "dnt": ["1"],
    "origin": ["https://shop.example.com"],
    "pragma": ["no-cache"],
    "referer": ["https://shop.example.com/orders"],
    "sec-fetch-dest": ["empty"],
    "sec-fetch-mode": ["cors"],
    "sec-fetch-site": ["same-origin"],
    "x-forwarded-for": ["203.0.113.7"],
    "x-request-id": ["5b0f7c1e-8d4a-4f55-9a0e-2c6d1b7e9f30"],
}

METADATA: dict[str, Any] = {
    "request_id": "9d2b6a4e-3c1f-4e8a-b7d5-0f6e2a1c8b94",
    "client_ip": "203.0.113.7",
    "client_port": 52314,
    "server_name": "shop.example.com",
    "protocol": "HTTP/1.1",
    "tls_version": "TLSv1.3",
    "tls_cipher": "TLS_AES_128_GCM_SHA256",
    "route_id": "api",
    "upstream_id": "orders-backend",
    "timestamp": "2026-01-01T00:00:00.123456789+00:00",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
}

METHOD = "GET"
URI = "/api/v1/orders/12345?expand=items&currency=EUR"

_JSON = get_codec("json")
_ALLOW = AgentResponse.allow()
_JSON_CID_MARK = b'"correlation_id":"'
_MSGPACK_CID_KEY = b"\xaecorrelation_id"


def cid_str(n: int) -> str:
    """Fixed-width correlation id (a W3C trace id is 32 hex digits), so frames keep one size."""
    return f"{n:032x}"


def make_event() -> RequestHeadersEvent:
    """The benchmark event as an agentpool ``RequestHeadersEvent``."""
    meta = RequestMetadata(correlation_id=cid_str(0), **METADATA)
    return RequestHeadersEvent(
        metadata=meta, method=METHOD, uri=URI, headers={k: list(v) for k, v in HEADERS.items()}
    )


def event_wire_dict(correlation_id: str) -> dict[str, Any]:
    """The event as a hand-written client builds it (the ``rawcodec`` scenario)."""
    return {
        "correlation_id": correlation_id,
        "metadata": {"correlation_id": correlation_id, **METADATA},
        "method": METHOD,
        "uri": URI,
        "headers": HEADERS,
    }


def event_json(correlation_id: str) -> bytes:
    """JSON payload of the benchmark event, as the pool's codec encodes it."""
    return _JSON.encode_event(make_event(), correlation_id)


def response_json(correlation_id: str) -> bytes:
    """JSON payload of an Allow reply carrying ``correlation_id``, as an agent encodes it."""
    return _JSON.encode_response(_ALLOW, correlation_id)


def split_around(payload: bytes, marker: bytes) -> list[bytes]:
    """``payload`` cut at every ``marker`` (at least once), to splice ids in per request."""
    parts = payload.split(marker)
    if len(parts) < 2:
        raise RuntimeError("placeholder missing from template")
    return parts


def event_frame_parts() -> list[bytes]:
    """The event frame (core framing included) cut around its two correlation ids."""
    from .._impl import core

    frame = core.encode_frame(MessageType.REQUEST_HEADERS, event_json(PLACEHOLDER))
    return split_around(frame, PLACEHOLDER.encode())


def allow_reply_parts(encoding: str) -> tuple[bytes, bytes]:
    """An Allow reply payload cut around its correlation id (for msgpack, before the id's
    string header), so an agent answers by splicing the id in."""
    placeholder = PLACEHOLDER.encode()
    payload = get_codec(encoding).encode_response(_ALLOW, PLACEHOLDER)
    if encoding == "json":
        head, tail = split_around(payload, placeholder)
    else:
        head, tail = split_around(payload, msgpack_str_header(CID_WIDTH) + placeholder)
    return head, tail


def msgpack_str_header(n: int) -> bytes:
    """The MessagePack header of a ``n``-byte string."""
    if n < 32:
        return bytes((0xA0 | n,))
    if n < 256:
        return b"\xd9" + bytes((n,))
    return b"\xda" + n.to_bytes(2, "big")


def json_cid(buf: bytes, start: int, stop: int) -> bytes:
    """The first ``"correlation_id":"..."`` value in ``buf[start:stop]``, found without
    parsing (what a minimal client does to route a reply); b"" if absent."""
    i = buf.find(_JSON_CID_MARK, start, stop)
    if i < 0:
        return b""
    i += len(_JSON_CID_MARK)
    j = buf.find(b'"', i, stop)
    return buf[i:j] if j > 0 else b""


def msgpack_cid(buf: bytes) -> bytes:
    """The first ``correlation_id`` string value in a MessagePack map, found without
    parsing; b"" if absent or not a string."""
    stop = len(buf)
    i = buf.find(_MSGPACK_CID_KEY)
    if i < 0:
        return b""
    i += len(_MSGPACK_CID_KEY)
    if i >= stop:
        return b""
    b = buf[i]
    if 0xA0 <= b <= 0xBF:
        n, i = b & 0x1F, i + 1
    elif b in (0xD9, 0xC4) and i + 1 < stop:
        n, i = buf[i + 1], i + 2
    elif b in (0xDA, 0xC5) and i + 2 < stop:
        n, i = int.from_bytes(buf[i + 1 : i + 3], "big"), i + 3
    else:
        return b""
    return buf[i : i + n]
