"""Decoded replies are lazy: validated in full at once, fields built on first read.

A lazy reply must behave exactly like one built field by field (equality, repr, pickling,
copying, assignment), must fail at decode time when malformed, and must never show data of
another reply, whatever happens to the bytes it was decoded from afterwards.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import pickle
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from agents import AgentProc, spawn_agent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentpool import codec as C
from agentpool._impl import core
from agentpool.codec import response as CR
from agentpool.codec import schema as CS
from agentpool.config import AgentPoolConfig
from agentpool.errors import InvalidMessage
from agentpool.messages import (
    RESPONSE_FIELDS,
    AgentResponse,
    Allow,
    AuditMetadata,
    Block,
    BodyMutation,
    HeaderOp,
    RequestHeadersEvent,
    RequestMetadata,
    WebSocketClose,
)
from agentpool.pool import AgentPool

CODECS = [C.JSON_CODEC, C.MSGPACK_CODEC]


def _other_core() -> Any | None:
    import importlib

    name = "agentpool._core_py" if getattr(core, "COMPILED", False) else "agentpool._core"
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


CORES = [core] + ([m] if (m := _other_core()) is not None else [])


def rich(i: int) -> AgentResponse:
    """A reply with every lazy field set to values that identify ``i``."""
    return AgentResponse(
        decision=Block(400 + i % 100, f"body-{i}", {"x-i": str(i)}),
        request_headers=[HeaderOp.set("x-i", str(i)), HeaderOp.remove(f"r-{i}")],
        response_headers=[HeaderOp.add("y-i", str(i))],
        routing_metadata={"i": str(i)},
        audit=AuditMetadata([f"t{i}"], [f"rule{i}"], 0.5, [f"rc{i}"], {"n": i}),
        needs_more=bool(i % 2),
        request_body_mutation=BodyMutation.replace(i, f"d{i}"),
        response_body_mutation=BodyMutation.drop_chunk(i),
        websocket_decision=WebSocketClose(1000 + i % 100, f"w{i}"),
    )


def as_received(resp: AgentResponse, cid: str) -> AgentResponse:
    """What decoding ``resp`` sent under ``cid`` gives: the id is added to ``audit.custom``."""
    out = copy.deepcopy(resp)
    out.audit.custom = {"correlation_id": cid, **out.audit.custom}
    return out


SHAPES: list[Callable[[int], AgentResponse]] = [
    lambda i: AgentResponse(),
    lambda i: AgentResponse.block(),
    rich,
    lambda i: AgentResponse(request_headers=[HeaderOp.set("a", str(i))]),
    lambda i: AgentResponse.websocket_drop(),
]


def fresh(codec: C.Codec, shape: int, cid: str = "cid-7") -> AgentResponse:
    """A decoded reply none of whose lazy fields has been read."""
    got_cid, resp = codec.decode_response(codec.encode_response(SHAPES[shape](7), cid))
    assert got_cid == cid
    return resp


@pytest.mark.parametrize("shape", range(len(SHAPES)))
@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_lazy_reply_is_a_plain_agent_response(codec: C.Codec, shape: int) -> None:
    want = as_received(SHAPES[shape](7), "cid-7")
    assert type(fresh(codec, shape)) is AgentResponse
    assert fresh(codec, shape) == want
    assert want == fresh(codec, shape)
    assert repr(fresh(codec, shape)) == repr(want)
    assert pickle.loads(pickle.dumps(fresh(codec, shape))) == want
    # pickled as the same reply built eagerly is (slot state only, no lazy part)
    assert fresh(codec, shape).__reduce_ex__(4)[1:] == want.__reduce_ex__(4)[1:]
    assert copy.copy(fresh(codec, shape)) == want
    assert copy.deepcopy(fresh(codec, shape)) == want
    assert dataclasses.replace(fresh(codec, shape)) == want
    assert dataclasses.asdict(fresh(codec, shape)) == dataclasses.asdict(want)
    assert dataclasses.astuple(fresh(codec, shape)) == dataclasses.astuple(want)
    r = fresh(codec, shape)
    assert [getattr(r, f) for f in RESPONSE_FIELDS] == [getattr(want, f) for f in RESPONSE_FIELDS]
    assert dataclasses.replace(fresh(codec, shape), needs_more=True).needs_more is True


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_copies_share_like_a_dataclass(codec: C.Codec) -> None:
    r = fresh(codec, 2)
    shallow = copy.copy(r)
    assert shallow.request_headers is r.request_headers and shallow.audit is r.audit
    deep = copy.deepcopy(fresh(codec, 2))
    deep.request_headers.append(HeaderOp.remove("z"))
    assert fresh(codec, 2).request_headers[-1] == HeaderOp.remove("r-7")


@pytest.mark.parametrize("shape", [0, 2])
@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_assignment_before_first_read_wins(codec: C.Codec, shape: int) -> None:
    mine = AuditMetadata(tags=["mine"])
    r = fresh(codec, shape)
    r.audit = mine
    assert r.request_headers == as_received(SHAPES[shape](7), "cid-7").request_headers
    assert r.audit is mine
    r = fresh(codec, shape)
    r.request_headers = [HeaderOp.set("k", "v")]
    r.websocket_decision = "allow"
    assert r.audit.custom["correlation_id"] == "cid-7"
    assert r.request_headers == [HeaderOp.set("k", "v")] and r.websocket_decision == "allow"
    r.routing_metadata["x"] = "y"
    assert r.routing_metadata["x"] == "y"
    r = fresh(codec, shape)
    r.add_request_header(HeaderOp.add("n", "1")).with_routing_metadata("a", "b")
    assert r.request_headers[-1] == HeaderOp.add("n", "1") and r.routing_metadata["a"] == "b"


def test_unknown_attributes_still_raise() -> None:
    r = fresh(C.JSON_CODEC, 0)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        r.nope  # type: ignore[attr-defined]  # noqa: B018
    assert not hasattr(AgentResponse(), "nope")
    assert r.is_allow and isinstance(r.decision, Allow)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"request_headers": [{"set": {"name": "a"}}]}, "request_headers.set.value"),
        ({"response_headers": [{"add": {"name": 1, "value": "v"}}]}, "response_headers"),
        ({"routing_metadata": {"k": 1}}, "routing_metadata"),
        ({"audit": {"tags": ["ok", 2]}}, "audit.tags"),
        ({"audit": {"custom": []}}, "audit.custom"),
        ({"request_body_mutation": {"chunk_index": -1}}, "request_body_mutation"),
        ({"websocket_decision": {"close": {"code": 1000}}}, "websocket_decision"),
    ],
)
@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_malformed_lazy_field_fails_at_decode(
    codec: C.Codec, doc: dict[str, Any], field: str
) -> None:
    obj = {"version": 2, "decision": "allow", **doc}
    payload = CS._dumps(obj) if codec is C.JSON_CODEC else CS._packb(obj, use_bin_type=True)
    with pytest.raises(InvalidMessage) as info:
        codec.decode_response(payload)
    assert (info.value.field or "").startswith(field), (info.value.field, str(info.value))


class _NullTransport:
    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        pass


@pytest.mark.parametrize("mod", CORES, ids=lambda m: m.__name__)
@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
async def test_replies_read_late_never_cross(codec: C.Codec, mod: Any) -> None:
    """300 replies (plain Allows and rich ones) fed in random chunks from one buffer that is
    overwritten after every read; only then is any reply's lazy field read."""
    loop = asyncio.get_running_loop()
    proto = mod.AgentProtocolCore(loop, lambda t, p: None, lambda e: None)
    proto.connection_made(_NullTransport())
    proto.set_decoder(codec.decode_response)
    proto.set_fast_paths(None, CR._response_factory(mod), codec.name)
    rng = random.Random(12)
    cids = [f"c{i:03d}-{rng.randrange(1 << 30):x}" for i in range(300)]
    futs = [proto.request(0x10, b"{}", cid) for cid in cids]
    sent = {cid: (rich(i) if i % 3 else AgentResponse()) for i, cid in enumerate(cids)}
    order = cids[:]
    rng.shuffle(order)
    wire = b"".join(mod.encode_frame(0x20, codec.encode_response(sent[cid], cid)) for cid in order)
    buf = bytearray(len(wire))
    pos = 0
    while pos < len(wire):
        n = rng.randrange(1, 900)
        chunk = wire[pos : pos + n]
        buf[: len(chunk)] = chunk
        proto.data_received(memoryview(buf)[: len(chunk)])
        buf[:] = b"\xff" * len(buf)  # the reader reuses its buffer
        pos += n
    assert proto.decode_errors == 0 and proto.unmatched_responses == 0
    for cid, fut in zip(cids, futs):
        assert fut.done()
        assert fut.result() == as_received(sent[cid], cid)
        assert fut.result().audit.custom["correlation_id"] == cid


@pytest.fixture(scope="module")
def echo() -> Iterator[AgentProc]:
    with spawn_agent("echo") as agent:
        yield agent


@pytest.fixture(scope="module")
def bench_agent() -> Iterator[AgentProc]:
    with spawn_agent("bench") as agent:
        yield agent


def _hdrs(cid: str, i: int) -> RequestHeadersEvent:
    meta = RequestMetadata(correlation_id=cid, request_id=cid, client_ip="127.0.0.1", client_port=1)
    return RequestHeadersEvent(
        metadata=meta, method="GET", uri=f"/{i}", headers={"x-n": [str(i)], "host": ["h"]}
    )


@pytest.mark.parametrize("example", ["echo", "bench"])
async def test_pool_replies_read_after_all_arrived(
    example: str, request: pytest.FixtureRequest
) -> None:
    """Over a real socket: 200 concurrent requests on one connection, every reply read only
    after all have arrived, each still answers its own event."""
    agent: AgentProc = request.getfixturevalue("echo" if example == "echo" else "bench_agent")
    config = AgentPoolConfig(
        connections_per_agent=1,
        max_concurrent_per_connection=256,
        request_timeout=10.0,
        connect_timeout=5.0,
    )
    async with AgentPool(config) as pool:
        await pool.add_agent("a", agent.endpoint)
        cids = [f"late-{i}" for i in range(200)]
        replies = await asyncio.gather(
            *(pool.send_request_headers("a", cid, _hdrs(cid, i)) for i, cid in enumerate(cids))
        )
    for i, (cid, r) in enumerate(zip(cids, replies)):
        assert isinstance(r.decision, Allow) and not r.fail_open
        assert r.audit.custom.get("correlation_id") == cid
        if example == "echo":
            assert HeaderOp.add("x-echo-x-n", str(i)) in r.request_headers
        else:
            assert r == as_received(AgentResponse(), cid)


# --- the core's canonical-map decoder (compiled and pure twin) vs the codec's Python path ---

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
    st.sampled_from(["allow", "set", "add", "remove", "block", "correlation_id", "name"]),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _mutated(base: dict[str, Any], pick: int, value: Any, drop: bool) -> dict[str, Any]:
    d = copy.deepcopy(base)
    paths = _paths(d)[1:]
    path = paths[pick % len(paths)]
    parent = d
    for step in path[:-1]:
        parent = parent[step]
    if drop and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return d


def _python_path(d: dict[str, Any]) -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CR, "_response_from_map_fast", lambda d: None)
        try:
            return CR._response_from_map(d)
        except InvalidMessage as exc:
            return ("error", str(exc))


BASES = [
    CS._loads(C.JSON_CODEC.encode_response(r, "cid-1"))
    for r in (
        AgentResponse(),
        AgentResponse.block(),
        AgentResponse(
            decision=Block(403, "no", {"a": "b"}),
            request_headers=[HeaderOp.set("a", "1"), HeaderOp.remove("b")],
            response_headers=[HeaderOp.add("c", "2")],
            routing_metadata={"k": "v"},
            audit=AuditMetadata(["t"], ["r"], 0.25, ["rc"], {"x": "y", "n": 3}),
            needs_more=True,
        ),
    )
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(BASES),
    pick=st.integers(min_value=0, max_value=10_000),
    value=json_value,
    drop=st.booleans(),
    mutate=st.booleans(),
)
def test_core_map_decoder_agrees_with_the_python_path(
    base: dict[str, Any], pick: int, value: Any, drop: bool, mutate: bool
) -> None:
    d = _mutated(base, pick, value, drop) if mutate else copy.deepcopy(base)
    want = _python_path(copy.deepcopy(d))
    results = [CR._response_factory(mod).from_map(copy.deepcopy(d)) for mod in CORES]
    # the compiled decoder and its twin take exactly the same maps, with the same result
    assert all((r is None) == (results[0] is None) for r in results)
    for got in results:
        if got is not None:
            assert got == want
    if not mutate:
        assert results[0] is not None  # the canonical shapes are taken by the core
    # whatever the path, decoding gives the Python path's result
    try:
        full = CR._response_from_map(copy.deepcopy(d))
    except InvalidMessage as exc:
        full = ("error", str(exc))
    assert full == want


@settings(max_examples=400, deadline=None)
@given(conf=st.one_of(st.floats(), st.integers(min_value=-(2**70), max_value=2**70)))
def test_core_map_decoder_rounds_confidence_like_the_codec(conf: Any) -> None:
    d = copy.deepcopy(BASES[2])
    d["audit"]["confidence"] = conf
    want = C.f32_shortest(float(conf))
    for mod in CORES:
        got = CR._response_factory(mod).from_map(copy.deepcopy(d))
        assert got is not None
        have = got[1].audit.confidence
        if want != want:  # NaN
            assert have != have
        else:
            assert have == want and repr(have) == repr(want), (conf, have, want)
