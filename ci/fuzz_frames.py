"""Long-running fuzzer for the v2 frame decoder (both cores) and the response decoders.

Each input is split into chunks (sizes drawn from the input itself) and fed to a
``FrameDecoder`` of the compiled core (``agentpool._core``, when importable) and of the
pure-Python twin (``agentpool._core_py``) with the same chunking. The two must agree exactly
(same frames, same error class and message), and the only exceptions allowed are
``AgentProtocolError`` subclasses. Every decoded payload, and the raw tail of the input, also
go through ``codec.decode_response`` of the JSON and MessagePack codecs, where again only
``AgentProtocolError`` may come out. Anything else is a finding: the harness raises and the
fuzzer stops with the reproducer.

Engines:

* ``atheris`` (libFuzzer; ``pip install atheris``)::

      python ci/fuzz_frames.py -atheris_runs=2000000 [corpus_dir]    # or -max_total_time=600

  Python-level coverage guides it (the py twin and the codec are instrumented); the compiled
  core is not instrumented, it is exercised differentially against the twin.
* ``--random N`` (no atheris needed): N inputs from a seeded mutation loop over valid frames::

      python ci/fuzz_frames.py --random 1000000 --seed 1

Both print how many inputs ran and how many ended in each typed error (atheris: every
250,000 inputs on stderr, since libFuzzer exits without running exit hooks).
"""

from __future__ import annotations

import collections
import importlib
import random
import sys
import time
from collections.abc import Callable
from typing import Any

STATS: collections.Counter[str] = collections.Counter()

with_atheris = not (len(sys.argv) > 1 and sys.argv[1] == "--random")
if with_atheris:
    import atheris

    with atheris.instrument_imports():
        import agentpool._core_py as core_py
        import agentpool.codec as codec
        from agentpool.errors import AgentProtocolError
else:
    import agentpool._core_py as core_py
    import agentpool.codec as codec
    from agentpool.errors import AgentProtocolError

try:
    core_c: Any = importlib.import_module("agentpool._core")
except ImportError:  # the pure-Python install has no compiled core
    core_c = None

CORES: list[Any] = [m for m in (core_c, core_py) if m is not None]
CODECS = [codec.get_codec("json"), codec.get_codec("msgpack")]
MAX_SIZES = (core_py.MAX_MESSAGE_SIZE, 64, 5, 1)
REPORT_EVERY = 250_000  # libFuzzer exits without running atexit hooks: report as we go


def _decode_all(mod: Any, data: bytes, cuts: list[int], max_size: int) -> tuple[list[Any], Any]:
    dec = mod.FrameDecoder(max_size)
    frames: list[tuple[int, bytes]] = []
    start = 0
    for end in [*cuts, len(data), None]:
        chunk = b"" if end is None else data[start:end]
        try:
            frames.extend((int(t), bytes(p)) for t, p in dec.feed(chunk))
        except AgentProtocolError as exc:
            if not dec.failed:
                raise AssertionError(
                    f"{mod.__name__}: raised {exc!r} but .failed is False"
                ) from exc
            return frames, (type(exc).__name__, str(exc))
        if end is None:
            break
        start = end
    if dec.failed:
        raise AssertionError(f"{mod.__name__}: .failed without an error")
    return frames, None


def _decode_payload(payload: bytes) -> None:
    for c in CODECS:
        try:
            c.decode_response(payload)
            STATS["response_ok"] += 1
        except AgentProtocolError as exc:
            STATS[f"response_{type(exc).__name__}"] += 1


def one_input(data: bytes) -> None:
    """The fuzz target: differential frame decoding plus response decoding."""
    STATS["inputs"] += 1
    if STATS["inputs"] % REPORT_EVERY == 0:
        print(_summary(), file=sys.stderr, flush=True)
    if not data:
        return
    control, body = data[0], data[1:]
    max_size = MAX_SIZES[control & 3]
    step = (control >> 2) + 1
    cuts = list(range(step, len(body), step)) if control & 0x80 else []
    results = [_decode_all(mod, body, cuts, max_size) for mod in CORES]
    first = results[0]
    for other in results[1:]:
        if other != first:
            raise AssertionError(f"cores disagree on {body!r} (cuts {cuts}): {first} != {other}")
    frames, error = first
    STATS["frames"] += len(frames)
    STATS[f"decoder_{error[0] if error else 'ok'}"] += 1
    for msg_type, payload in frames:
        if msg_type == 0x20:
            _decode_payload(payload)
    _decode_payload(body)


SEEDS = [
    b'{"version":2,"decision":"allow","audit":{"custom":{"correlation_id":"c1"}}}',
    b'{"version":2,"decision":{"block":{"status":403,"body":"no","headers":null}},'
    b'"request_headers":[{"set":{"name":"x","value":"1"}}],"audit":{"tags":["t"],'
    b'"custom":{"correlation_id":"c2"}},"needs_more":false}',
    b"\x83\xa7version\x02\xa8decision\xa5allow\xa5audit\x81\xa6custom\x81\xaecorrelation_id\xa2c1",
    b'{"action":1}',
    b'{"agent_id":"a","state":2,"timestamp_ms":1}',
]


def _mutate(rng: random.Random, data: bytearray) -> bytearray:
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op == 1:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2 and data:
            del data[pos : pos + rng.randint(1, 8)]
        elif op == 3:
            data[pos:pos] = rng.choice(
                [b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\x00\x00\x00\x01\x99"]
            )
        elif op == 4:
            data[pos:pos] = bytes(rng.choice(SEEDS))
        else:
            data[pos:pos] = rng.choice([b"null", b"{}", b"[]", b'"', b"1e999", b"-1", b"\xc1"])
    return data


def random_mode(runs: int, seed: int, report: Callable[[str], None]) -> None:
    """Seeded mutation loop: valid frames of every type, then random edits."""
    rng = random.Random(seed)
    known = [0x01, 0x02, *range(0x10, 0x18), 0x20, *range(0x30, 0x34), 0x40, 0x41, 0x42]
    started = time.monotonic()
    for i in range(runs):
        frames = b"".join(
            core_py.encode_frame(rng.choice(known), rng.choice(SEEDS))
            for _ in range(rng.randint(0, 3))
        )
        body = _mutate(rng, bytearray(frames)) if rng.random() < 0.8 else bytearray(frames)
        control = rng.randrange(256)
        if rng.random() < 0.75:
            control &= ~3  # mostly the real 16 MiB limit
        one_input(bytes([control]) + bytes(body))
        if i and i % 100_000 == 0:
            report(f"{i} inputs, {time.monotonic() - started:.0f}s")


def seed_corpus() -> str:
    """A temporary corpus of valid frame streams (one per seed and type) to start from."""
    import tempfile

    corpus = tempfile.mkdtemp(prefix="fuzz-frames-")
    types = [0x02, 0x20, 0x30, 0x33, 0x42]
    for n, payload in enumerate(SEEDS):
        for t in types:
            stream = core_py.encode_frame(t, payload) * 2
            for control in (0x00, 0x83):
                with open(f"{corpus}/seed-{n}-{t:02x}-{control:02x}", "wb") as f:
                    f.write(bytes([control]) + stream)
    return corpus


def _summary() -> str:
    cores = ", ".join(m.__name__ for m in CORES)
    items = ", ".join(f"{k}={v}" for k, v in sorted(STATS.items()))
    return f"fuzz_frames: cores [{cores}]; {items}"


def main() -> int:
    if not with_atheris:
        runs = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
        seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 0
        started = time.monotonic()
        random_mode(runs, seed, lambda line: print(line, flush=True))
        print(_summary(), f"in {time.monotonic() - started:.1f}s", flush=True)
        return 0
    import atexit

    atexit.register(lambda: print(_summary(), flush=True))
    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        argv.append(seed_corpus())
    atheris.Setup(argv, one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
