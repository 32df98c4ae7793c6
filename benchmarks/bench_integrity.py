"""Cost of the verdict-integrity checks on the proxy's hot path (no I/O).

Prints ns per call of the event encoders (where validation happens) and of the protocol
core's per-request routing (where the duplicate-id check and tombstones live)::

    python benchmarks/bench_integrity.py

To compare with an older build, run the same file with ``PYTHONPATH`` pointing at that
build's checkout (from a directory that is not this one). Figures: docs/performance.md.
"""

from __future__ import annotations

import asyncio
import timeit
from collections.abc import Callable
from typing import Any

from agentpool._impl import core
from agentpool.codec import JSON_CODEC, MSGPACK_CODEC
from agentpool.messages import (
    AgentResponse,
    RequestBodyChunkEvent,
    RequestHeadersEvent,
    RequestMetadata,
)

CID = "c-0123456789"
META = RequestMetadata(
    correlation_id=CID,
    request_id="r-1",
    client_ip="10.0.0.5",
    client_port=40000,
    server_name="example.com",
    tls_version="TLSv1.3",
    route_id="default",
)
HEADERS = RequestHeadersEvent(
    metadata=META,
    method="GET",
    uri="/api/v1/items?id=42",
    headers={f"x-h{i}": [f"value-{i}"] for i in range(20)},
)
CHUNK = RequestBodyChunkEvent(
    correlation_id=CID, data=b"a" * 4096, is_last=False, chunk_index=3, bytes_received=12288
)


def per_call_ns(fn: Callable[[], object], number: int = 20000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e9


class _Transport:
    def write(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


def routing_ns() -> float:
    """``request`` for 64 events, one flush, one ``data_received`` with the 64 replies."""
    loop = asyncio.new_event_loop()
    c: Any = core.AgentProtocolCore(loop, lambda *a: None, lambda e: None)
    c.connection_made(_Transport())
    c.set_decoder(JSON_CODEC.decode_response)
    cids = [f"cid-{i:04d}" for i in range(64)]
    replies = b"".join(
        core.encode_frame(0x20, JSON_CODEC.encode_response(AgentResponse.allow(), cid))
        for cid in cids
    )
    payload = JSON_CODEC.encode_event(HEADERS, "x")

    def route() -> None:
        for cid in cids:
            c.request(0x10, payload, cid)
        c._flush()
        c.data_received(replies)

    try:
        return per_call_ns(route, 300) / 64
    finally:
        loop.close()


def main() -> None:
    rows = {
        "JSON RequestHeaders encode (20 headers)": per_call_ns(
            lambda: JSON_CODEC.encode_event(HEADERS, CID)
        ),
        "JSON 4 KiB body chunk encode": per_call_ns(lambda: JSON_CODEC.encode_event(CHUNK, CID)),
        "MessagePack RequestHeaders encode": per_call_ns(
            lambda: MSGPACK_CODEC.encode_event(HEADERS, CID)
        ),
        "core routing per request (64 in flight)": routing_ns(),
    }
    compiled = getattr(core, "COMPILED", False)
    print(f"core: {'compiled' if compiled else 'pure-Python'}")
    for name, ns in rows.items():
        print(f"{name}: {ns:.0f} ns")


if __name__ == "__main__":
    main()
