"""Frame splitting: the compiled FrameDecoder vs its pure-Python twin, side by side.

Run: ``pytest benchmarks/bench_framing.py -o python_files='bench_*.py' --benchmark-group-by=func``
or ``python benchmarks/bench_framing.py`` for a one-run summary with the ratio.
"""

from __future__ import annotations

import timeit
import types

from agentpool.enums import MessageType

REPLY = (
    b'{"version":2,"decision":"allow","request_headers":[],"response_headers":[],'
    b'"routing_metadata":{},"audit":{"tags":[],"rule_ids":[],"confidence":null,'
    b'"reason_codes":[],"custom":{"correlation_id":"7Rv2cW9kP11"}},"needs_more":false,'
    b'"request_body_mutation":null,"response_body_mutation":null,"websocket_decision":null}'
)


def buffer_64k(core: types.ModuleType) -> bytes:
    """About 64 KiB of back-to-back AgentResponse frames (what one socket read can hold)."""
    frame = core.encode_frame(MessageType.AGENT_RESPONSE, REPLY)
    return frame * (65536 // len(frame))


def split_whole(core: types.ModuleType, data: bytes) -> int:
    return len(core.FrameDecoder().feed(data))


def split_chunked(core: types.ModuleType, data: bytes, chunk: int = 4096) -> int:
    dec = core.FrameDecoder()
    n = 0
    for i in range(0, len(data), chunk):
        n += len(dec.feed(data[i : i + chunk]))
    return n


def test_split_64k_whole(benchmark, core_impl: types.ModuleType) -> None:  # type: ignore[no-untyped-def]
    data = buffer_64k(core_impl)
    assert benchmark(split_whole, core_impl, data) == len(data) // (len(REPLY) + 5)


def test_split_64k_in_4k_reads(benchmark, core_impl: types.ModuleType) -> None:  # type: ignore[no-untyped-def]
    data = buffer_64k(core_impl)
    assert benchmark(split_chunked, core_impl, data) == len(data) // (len(REPLY) + 5)


def test_encode_frame(benchmark, core_impl: types.ModuleType) -> None:  # type: ignore[no-untyped-def]
    benchmark(core_impl.encode_frame, 0x10, REPLY)


def main() -> None:
    from agentpool import _core, _core_py  # type: ignore[attr-defined]

    cores = {"compiled": _core, "pure": _core_py}
    rows: dict[str, dict[str, float]] = {}
    for _ in range(5):  # interleaved repetitions, best of
        for name, core in cores.items():
            data = buffer_64k(core)
            r = rows.setdefault(name, {})
            for label, fn in (
                ("split 64 KiB whole (µs)", lambda c=core, d=data: split_whole(c, d)),
                ("split 64 KiB in 4 KiB reads (µs)", lambda c=core, d=data: split_chunked(c, d)),
                ("encode_frame 340 B (ns)", lambda c=core: c.encode_frame(0x10, REPLY)),
            ):
                number = 20000 if "ns" in label else 200
                t = min(timeit.repeat(fn, number=number, repeat=3)) / number
                t *= 1e9 if "ns" in label else 1e6
                r[label] = min(r.get(label, t), t)
    print(f"{'':36} {'compiled':>10} {'pure':>10} {'ratio':>7}")
    for label in rows["compiled"]:
        c, p = rows["compiled"][label], rows["pure"][label]
        print(f"{label:36} {c:10.2f} {p:10.2f} {p / c:6.1f}x")


if __name__ == "__main__":
    main()
