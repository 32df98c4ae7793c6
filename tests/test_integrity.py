"""A verdict belongs to its event: one test per way the landed code could break that.

Against a raw agent on a real Unix socket that misbehaves on cue (tests/agents/integrity_agent.py);
every reply names the event it answers (``routing_metadata["ev"]``). Each test below failed
on the first release (439a0df) and passes now; they run on both cores and both loops.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import orjson
import pytest
from _helpers import hdrs, pool_config, until
from agents.integrity_agent import (
    FLOW_CONTROL,
    HEALTH_STATUS,
    CueAgent,
    cue_agent,
)

from agentpool import AgentPool
from agentpool._impl import core
from agentpool.circuit import CircuitBreakerConfig
from agentpool.codec import get_codec
from agentpool.connection import AgentConnection
from agentpool.enums import CancelReason
from agentpool.errors import (
    ConnectionClosed,
    ConnectionFailed,
    DuplicateCorrelationId,
    FlowControlPaused,
    MessageTooLarge,
    RequestCancelled,
    Serialization,
    Timeout,
    VersionMismatch,
)
from agentpool.messages import (
    Allow,
    Block,
    RequestBodyChunkEvent,
    RequestHeadersEvent,
    RequestMetadata,
)

H = 0x10  # RequestHeaders
B = 0x11  # RequestBodyChunk


cfg = pool_config(
    connections_per_agent=1,
    request_timeout=5.0,
    connect_timeout=2.0,
    reconnect_interval=0.05,
    keepalive=False,
)


def chunk(cid: str, index: int = 0, **kw: Any) -> RequestBodyChunkEvent:
    kw.setdefault("is_last", True)
    return RequestBodyChunkEvent(correlation_id=cid, data=b"x=1", chunk_index=index, **kw)


def ev(resp: Any) -> str:
    return str(resp.routing_metadata.get("ev"))


def proto(pool: AgentPool, agent_id: str = "a") -> Any:
    (st,) = [s for s in pool._agents[agent_id].conns if not s.closed]
    return st.conn.protocol_core


# -- 1. a late reply never answers the next event ------------------------------------------------


async def test_late_reply_to_timed_out_headers_never_answers_the_body_chunk() -> None:
    def policy(tag: str, cid: str, t: int, obj: Any) -> str:
        return "hold" if t == H else "block"

    async with cue_agent(policy) as agent, AgentPool(cfg(request_timeout=0.2)) as pool:
        await pool.add_agent("a", agent.endpoint)
        with pytest.raises(Timeout) as info:
            await pool.send_request_headers("a", "c1", hdrs("c1"))
        assert "'c1'" in str(info.value) and "'a'" in str(info.value)
        await agent.wait_for(lambda: agent.cancels == [("c1", int(CancelReason.TIMEOUT))])
        # The headers' reply is still owed: the chunk is refused, nothing is written.
        with pytest.raises(DuplicateCorrelationId):
            await pool.send_request_body_chunk("a", "c1", chunk("c1"))
        agent.release(f"{H}:c1:")  # the late Allow arrives and is consumed
        await until(lambda: proto(pool).late_replies == 1)
        resp = await pool.send_request_body_chunk("a", "c1", chunk("c1"))
        assert isinstance(resp.decision, Block) and ev(resp) == f"{B}:c1:0"
        assert agent.events == [f"{H}:c1:", f"{B}:c1:0"]
        assert proto(pool).in_flight == 0 and proto(pool).abandoned_pending == 0


async def test_late_reply_after_caller_gave_up_never_answers_the_next_event() -> None:
    def policy(tag: str, cid: str, t: int, obj: Any) -> str:
        return "hold" if t == H else "block"

    async with cue_agent(policy) as agent, AgentPool(cfg()) as pool:
        await pool.add_agent("a", agent.endpoint)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pool.send_request_headers("a", "c2", hdrs("c2")), 0.1)
        await agent.wait_for(lambda: agent.cancels == [("c2", int(CancelReason.MANUAL))])
        send = asyncio.ensure_future(pool.send_request_body_chunk("a", "c2", chunk("c2")))
        agent.release(f"{H}:c2:")
        try:
            resp = await send
        except DuplicateCorrelationId:
            await until(lambda: proto(pool).late_replies == 1)
            resp = await pool.send_request_body_chunk("a", "c2", chunk("c2"))
        assert isinstance(resp.decision, Block) and ev(resp) == f"{B}:c2:0"


async def test_reply_twice_in_one_write_never_answers_the_next_event() -> None:
    def policy(tag: str, cid: str, t: int, obj: Any) -> str:
        return "twice" if t == H else "block"

    async with cue_agent(policy) as agent, AgentPool(cfg()) as pool:
        await pool.add_agent("a", agent.endpoint)
        for i in range(20):
            cid = f"t{i}"
            r1 = await pool.send_request_headers("a", cid, hdrs(cid))
            r2 = await pool.send_request_body_chunk("a", cid, chunk(cid))
            assert isinstance(r1.decision, Allow) and ev(r1) == f"{H}:{cid}:"
            assert isinstance(r2.decision, Block) and ev(r2) == f"{B}:{cid}:0"


async def test_owed_replies_are_capped_then_the_connection_is_recycled() -> None:
    async with cue_agent(lambda *a: "none") as agent:
        config = cfg(request_timeout=0.05, max_abandoned_replies=2, health_check_interval=0.05)
        async with AgentPool(config) as pool:
            await pool.add_agent("a", agent.endpoint)
            first = proto(pool)
            for i in range(3):
                with pytest.raises(Timeout):
                    await pool.send_request_headers("a", f"n{i}", hdrs(f"n{i}"))
            assert first.closed and "max_abandoned=2" in str(first.close_error)
            await until(lambda: agent.connections == 2 and pool.is_agent_healthy("a"))


# -- 2. a correlation id in flight is refused -----------------------------------------------------


async def test_duplicate_correlation_id_on_one_connection_is_refused() -> None:
    def policy(tag: str, cid: str, t: int, obj: Any) -> str:
        return "hold" if obj.get("uri") == "/" else "block"

    async with cue_agent(policy) as agent, AgentPool(cfg()) as pool:
        await pool.add_agent("a", agent.endpoint)
        first = asyncio.ensure_future(pool.send_request_headers("a", "d", hdrs("d")))
        await agent.wait_for(lambda: len(agent.events) == 1)
        with pytest.raises(DuplicateCorrelationId, match="'d'"):
            await pool.send_request_headers("a", "d", hdrs("d", uri="/admin?q=' OR 1=1--"))
        agent.release(f"{H}:d:")
        resp = await first
        assert isinstance(resp.decision, Allow) and ev(resp) == f"{H}:d:"
        assert agent.events == [f"{H}:d:"]  # the second never reached the agent
        stats = await pool.agent_stats("a")
        assert stats is not None and stats.total_errors == 0


async def test_duplicate_correlation_id_across_connections_of_an_agent_is_refused() -> None:
    async with cue_agent(lambda *a: "hold") as agent, AgentPool(
        cfg(connections_per_agent=2)
    ) as pool:
        await pool.add_agent("a", agent.endpoint)
        first = asyncio.ensure_future(pool.send_request_headers("a", "x", hdrs("x")))
        await agent.wait_for(lambda: len(agent.events) == 1)
        # round robin would put the second on the other connection
        with pytest.raises(DuplicateCorrelationId, match="agent 'a'"):
            await pool.send_request_headers("a", "x", hdrs("x"))
        agent.release(f"{H}:x:")
        assert ev(await first) == f"{H}:x:"


# -- 3. a malformed event never reaches the agent -------------------------------------------------


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_malformed_events_are_refused_before_the_wire(encoding: str) -> None:
    bad: list[tuple[Any, str]] = [
        (hdrs("m", headers={"host": "example.com"}), "headers"),
        (hdrs("m", uri=None), "uri"),
        (hdrs("m", uri=b"/bytes"), "uri"),
        (RequestHeadersEvent(metadata=None, method="GET", uri="/"), "metadata"),  # type: ignore[arg-type]
        ({"metadata": {}, "method": "GET"}, "not an event"),
        (hdrs("m", headers={"host": [1]}), "headers"),
    ]
    async with cue_agent(lambda *a: "block") as agent, AgentPool(cfg(encoding=encoding)) as pool:
        await pool.add_agent("a", agent.endpoint)
        for event, field in bad:
            with pytest.raises(Serialization, match=field):
                await pool.send_request_headers("a", "m", event)
        for event, field in [
            (chunk("m", is_last="yes"), "is_last"),
            (chunk("m", index=-1), "chunk_index"),
            (RequestBodyChunkEvent(correlation_id="m", data="str", is_last=True), "data"),  # type: ignore[arg-type]
        ]:
            with pytest.raises(Serialization, match=field):
                await pool.send_request_body_chunk("a", "m", event)
        resp = await pool.send_request_headers("a", "ok", hdrs("ok"))
        assert isinstance(resp.decision, Block)
        assert agent.events == [f"{H}:ok:"]  # nothing malformed was sent
        stats = await pool.agent_stats("a")
        assert stats is not None and stats.total_errors == 0


async def test_dict_instead_of_event_on_a_connection() -> None:
    async with cue_agent() as agent:
        conn = await AgentConnection.open(agent.endpoint, agent_id="a")
        try:
            with pytest.raises(Serialization, match="not an event: dict"):
                conn.send({"uri": "/"}, "c")  # type: ignore[arg-type]
            assert conn.in_flight == 0 and agent.events == []
        finally:
            conn.close()


# -- 5. frames after the handshake are kept -------------------------------------------------------


def _frame(msg_type: int, obj: Any) -> bytes:
    return bytes(core.encode_frame(msg_type, orjson.dumps(obj)))


PAUSE = _frame(FLOW_CONTROL, {"action": 1})
DRAINING = _frame(HEALTH_STATUS, {"agent_id": "cue", "state": 3, "timestamp_ms": 1})


async def test_frames_in_the_handshake_write_are_handled() -> None:
    async with cue_agent(extra_after_handshake=[PAUSE, DRAINING]) as agent:
        conn = await AgentConnection.open(agent.endpoint, agent_id="a")
        try:
            await until(lambda: conn.is_paused)
            assert conn.health_state.name == "DRAINING"
        finally:
            conn.close()
        async with AgentPool(cfg(connections_per_agent=2)) as pool:
            await pool.add_agent("a", agent.endpoint)
            assert not pool.is_agent_healthy("a")
    async with cue_agent(extra_after_handshake=[PAUSE]) as agent:
        async with AgentPool(cfg()) as pool:
            await pool.add_agent("a", agent.endpoint)
            assert pool.is_agent_healthy("a")
            with pytest.raises(FlowControlPaused):
                await pool.send_request_headers("a", "p", hdrs("p"))
            assert agent.events == []


async def test_draining_reported_while_add_agent_opens_other_connections() -> None:
    agent = CueAgent()

    async def slow_second(index: int) -> float:
        return 0.3 if index == 1 else 0.0

    agent.handshake_delay = slow_second
    agent.later = [(0, 0.05, DRAINING)]
    async with agent, AgentPool(cfg(connections_per_agent=2)) as pool:
        await pool.add_agent("a", agent.endpoint)
        assert agent.connections == 2
        assert not pool.is_agent_healthy("a")


# -- 6. local errors are not agent failures -------------------------------------------------------


async def test_local_errors_count_neither_toward_health_nor_the_breaker() -> None:
    breaker = CircuitBreakerConfig(failure_threshold=5)

    def policy(tag: str, cid: str, t: int, obj: Any) -> str:
        return "hold" if cid.startswith("h") else "now"

    async with cue_agent(policy) as agent, AgentPool(cfg(circuit_breaker=breaker)) as pool:
        await pool.add_agent("a", agent.endpoint)
        for i in range(6):
            held = asyncio.ensure_future(pool.send_request_headers("a", f"h{i}", hdrs(f"h{i}")))
            await agent.wait_for(lambda i=i: f"{H}:h{i}:" in agent.events)
            await pool.cancel_request("a", f"h{i}")
            with pytest.raises(ConnectionClosed):  # RequestCancelled since 439a0df
                await held
            with pytest.raises(Serialization):
                await pool.send_request_headers("a", f"u{i}", hdrs(f"u{i}", uri="/\udcff"))
            with pytest.raises(MessageTooLarge):
                big = RequestBodyChunkEvent(f"b{i}", data=b"x" * (13 << 20), is_last=True)
                await pool.send_request_body_chunk("a", f"b{i}", big)
        (st,) = list(pool._agents["a"].conns)
        assert st.consecutive_errors == 0 and st.error_count == 0 and st.healthy
        assert pool.total_errors == 0 and pool.is_agent_healthy("a")
        assert st.in_flight == 0
        resp = await pool.send_request_headers("a", "ok", hdrs("ok"))  # breaker still closed
        assert ev(resp) == f"{H}:ok:"


# -- 7. invalid timeouts are rejected at the call -------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf])
async def test_invalid_per_call_timeouts_raise_value_error(bad: float) -> None:
    async with cue_agent(lambda *a: "none") as agent:
        conn = await AgentConnection.open(agent.endpoint, agent_id="a")
        try:
            with pytest.raises(ValueError, match="timeout"):
                await conn.request(hdrs("t"), "t", timeout=bad)
            with pytest.raises(ValueError, match="timeout"):
                conn.send(hdrs("t"), "t", timeout=bad)
            with pytest.raises(ValueError, match="timeout"):
                await conn.ping(timeout=bad)
            assert conn.in_flight == 0 and conn.protocol_core.requests_sent == 0
        finally:
            conn.close()


# -- 8. slot waiters are served first come, first served ------------------------------------------


async def test_slot_waiter_gets_the_freed_slot_before_a_busy_caller() -> None:
    async with cue_agent() as agent, AgentPool(cfg(max_concurrent_per_connection=1)) as pool:
        await pool.add_agent("a", agent.endpoint)

        async def busy() -> None:  # a proxy sending one event after another
            for i in range(30):
                await pool.send_request_headers("a", f"b{i}", hdrs(f"b{i}"))

        loop_task = asyncio.ensure_future(busy())
        await agent.wait_for(lambda: len(agent.events) >= 1)
        waiter = await pool.send_request_headers("a", "w", hdrs("w"))
        assert ev(waiter) == f"{H}:w:"
        position = agent.events.index(f"{H}:w:")
        assert position <= 3, agent.events[: position + 1]  # not after the whole loop
        await loop_task


# -- 9. a cancelled shutdown is not a finished one ------------------------------------------------


async def test_second_shutdown_waits_for_the_cancelled_first() -> None:
    async with cue_agent(lambda *a: "hold") as agent:
        pool = AgentPool(cfg(drain_timeout=0.5))
        await pool.start()
        await pool.add_agent("a", agent.endpoint)
        held = asyncio.ensure_future(pool.send_request_headers("a", "s", hdrs("s")))
        await agent.wait_for(lambda: len(agent.events) == 1)
        first = asyncio.ensure_future(pool.shutdown())
        await asyncio.sleep(0.05)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await pool.shutdown()
        assert pool.agent_ids() == []
        assert pool._maintenance_task is None
        with pytest.raises(ConnectionClosed):
            await held


# -- 10. cancelled send() futures leave nothing in flight -----------------------------------------


async def test_cancelled_send_futures_leave_nothing_in_flight() -> None:
    async with cue_agent(lambda *a: "none") as agent:
        conn = await AgentConnection.open(agent.endpoint, agent_id="a")
        try:
            futs = [conn.send(hdrs(f"f{i}"), f"f{i}") for i in range(1000)]
            for f in futs:
                f.cancel()
            await until(lambda: conn.in_flight == 0)
            await agent.wait_for(lambda: len(agent.cancels) == 1000)
            assert conn.protocol_core.abandoned_pending == 1000
        finally:
            conn.close()


# -- minor ----------------------------------------------------------------------------------------


async def test_handshake_with_a_version_that_was_not_offered_fails() -> None:
    async with cue_agent(protocol_version=99) as agent:
        with pytest.raises(VersionMismatch, match="expected 2, got 99"):
            await AgentConnection.open(agent.endpoint, agent_id="a")


async def test_huge_handshake_refusal_is_clipped() -> None:
    agent = CueAgent()
    agent.refusal = "no" * (1 << 19)
    async with agent:
        with pytest.raises(ConnectionFailed) as info:
            await AgentConnection.open(agent.endpoint, agent_id="a")
        assert len(str(info.value)) < 400 and "1048576 characters" in str(info.value)


async def test_agent_ids_are_logged_quoted(caplog: pytest.LogCaptureFixture) -> None:
    async with cue_agent() as agent, AgentPool(cfg()) as pool:
        with caplog.at_level(logging.INFO, logger="agentpool"):
            await pool.add_agent("evil\nINFO forged line", agent.endpoint)
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert "\nINFO forged line" not in text and "'evil\\nINFO forged line'" in text


async def test_cancel_tombstones_the_request_and_consumes_its_reply() -> None:
    async with cue_agent(lambda *a: "hold") as agent:
        conn = await AgentConnection.open(agent.endpoint, agent_id="a")
        try:
            fut = conn.send(hdrs("k"), "k")
            await agent.wait_for(lambda: len(agent.events) == 1)
            assert await conn.cancel("k", CancelReason.CLIENT_DISCONNECT)
            with pytest.raises(RequestCancelled):
                await fut
            await agent.wait_for(lambda: agent.cancels == [("k", 0)])
            assert conn.is_pending("k") and conn.protocol_core.abandoned_pending == 1
            agent.release(f"{H}:k:")
            await until(lambda: not conn.is_pending("k"))
            assert conn.protocol_core.late_replies == 1
            assert conn.protocol_core.unmatched_responses == 0
        finally:
            conn.close()


def test_headers_type_check_is_the_same_in_both_cores() -> None:
    import dataclasses

    from agentpool import _core_py

    cores = [_core_py] + ([core] if getattr(core, "COMPILED", False) else [])
    checkers = [
        c.HeadersEventEncoder(RequestHeadersEvent, RequestMetadata, orjson.dumps, None).check
        for c in cores
    ]
    good = hdrs("g")
    cases: list[tuple[Any, bool]] = [(good, True), ({"uri": "/"}, False)]
    for name, value in [("method", 1), ("uri", None), ("headers", {"h": "v"}), ("headers", [])]:
        cases.append((dataclasses.replace(good, **{name: value}), False))
    cases.append((dataclasses.replace(good, headers={"h": ["v", 2]}), False))
    meta = good.metadata
    for name, value in [
        ("client_port", 70000),
        ("client_port", -1),
        ("client_port", True),
        ("client_ip", None),
        ("server_name", 3),
        ("traceparent", b"x"),
        ("timestamp", None),
    ]:
        bad_meta = dataclasses.replace(meta, **{name: value})
        cases.append((dataclasses.replace(good, metadata=bad_meta), False))
    for event, expected in cases:
        for check in checkers:
            assert check(event, "g") is expected, (event, check)
        if not expected:
            with pytest.raises(Serialization):
                get_codec("msgpack").encode_event(event, "g")
    for check in checkers:
        assert not check(good, 1)


async def test_a_cancel_that_cannot_be_encoded_keeps_the_timer_running() -> None:
    async with cue_agent(lambda *a: "none") as agent:
        conn = await AgentConnection.open(agent.endpoint, agent_id="a", request_timeout=0.1)
        try:
            core_ = conn.protocol_core
            odd = core_.request(0x10, b"{}", "\udcff")  # an id the Cancel's JSON cannot carry
            normal = conn.send(hdrs("n"), "n")
            for fut in (odd, normal):
                with pytest.raises(Timeout):
                    await asyncio.wait_for(fut, 2.0)
            assert core_.abandoned_pending == 2 and conn.is_connected
            later = conn.send(hdrs("n2"), "n2")
            with pytest.raises(Timeout):
                await asyncio.wait_for(later, 2.0)
        finally:
            conn.close()
