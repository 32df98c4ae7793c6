"""Reliability under misbehaving agents (issue 7): fault injection against real processes.

Every scenario drives ``tests/agents/faulty_agent.py`` in a subprocess and checks that the failure
surfaces as a typed :class:`AgentProtocolError` within the configured timeouts, that no
exception reaches the event loop's handler, that other connections and agents keep working,
and that nothing is left behind: in-flight gauge 0, no waiter, no affinity or sticky session
on a closed connection, no task still running after ``shutdown()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import orjson
import pytest
from _helpers import hdrs, rss_bytes
from agents import FaultyAgentProc

from agentpool import (
    AgentProtocolError,
    CircuitBreakerOpen,
    ConnectionClosed,
    ConnectionFailed,
    FlowControlMode,
    FlowControlPaused,
    InvalidMessage,
    Io,
    MessageTooLarge,
    Timeout,
    Unavailable,
)
from agentpool._impl import core
from agentpool.circuit import CircuitBreakerConfig, CircuitState
from agentpool.config import AgentPoolConfig
from agentpool.connection import AgentConnection
from agentpool.messages import RequestBodyChunkEvent, RequestHeadersEvent
from agentpool.pool import AgentPool
from agentpool.reverse import ReverseConnectionConfig, ReverseConnectionListener

REQUEST_TIMEOUT = 0.3
CONNECT_TIMEOUT = 1.0
SLACK = 1.0  # scheduling slack on a loaded 2-core machine; hangs are caught by wait_for
_ids = itertools.count()


def headers_event(cid: str, uri: str = "/", fault: str | None = None) -> RequestHeadersEvent:
    return hdrs(
        cid,
        uri,
        host="example.com",
        headers=None if fault is None else {"x-fault": [fault]},
        request_id=f"r-{cid}",
        client_port=4000,
    )


def new_cid(prefix: str = "c") -> str:
    return f"{prefix}-{next(_ids)}"


class LoopGuard:
    """Records everything that reaches the loop's exception handler."""

    def __init__(self) -> None:
        self.errors: list[dict[str, Any]] = []

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.errors.append(context)


@pytest.fixture
async def loop_guard() -> AsyncIterator[LoopGuard]:
    loop = asyncio.get_running_loop()
    guard = LoopGuard()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(guard)
    try:
        yield guard
    finally:
        loop.set_exception_handler(previous)
    assert guard.errors == [], f"exceptions escaped into the event loop: {guard.errors}"


def _shared_agent(agent_id: str) -> Iterator[FaultyAgentProc]:
    agent = FaultyAgentProc(agent_id=agent_id)
    agent.start()
    try:
        agent.wait_ready()
        yield agent
    finally:
        agent.cleanup()


def _fresh(agent: FaultyAgentProc) -> FaultyAgentProc:
    """Reset a shared agent for the next test: running, no process-wide fault, empty log."""
    agent.set_fault(None, None)
    if not agent.alive() or not agent.accepting():
        agent.kill()
        agent.start()
        agent.wait_ready()
    agent.clear_log()
    return agent


@pytest.fixture(scope="module")
def faulty_proc() -> Iterator[FaultyAgentProc]:
    yield from _shared_agent("faulty")


@pytest.fixture(scope="module")
def healthy_proc() -> Iterator[FaultyAgentProc]:
    yield from _shared_agent("healthy")


@pytest.fixture
def faulty(faulty_proc: FaultyAgentProc) -> Iterator[FaultyAgentProc]:
    """The shared fault-injecting agent (per-request faults are chosen by the request)."""
    yield _fresh(faulty_proc)
    faulty_proc.set_fault(None, None)


@pytest.fixture
def healthy(healthy_proc: FaultyAgentProc) -> FaultyAgentProc:
    """A second, well-behaved agent process (the same program without faults)."""
    return _fresh(healthy_proc)


async def bounded(aw: Awaitable[Any], limit: float) -> tuple[Any, BaseException | None, float]:
    """Await ``aw`` with a hard cap (a hang fails the test); returns (value, error, seconds)."""
    started = time.monotonic()
    try:
        value = await asyncio.wait_for(aw, limit)
    except (asyncio.TimeoutError, TimeoutError) as exc:
        if not isinstance(exc, AgentProtocolError):
            pytest.fail(f"operation hung for more than {limit}s")
        return None, exc, time.monotonic() - started
    except AgentProtocolError as exc:
        return None, exc, time.monotonic() - started
    return value, None, time.monotonic() - started


async def open_conn(agent: FaultyAgentProc, **kw: Any) -> AgentConnection:
    kw.setdefault("connect_timeout", CONNECT_TIMEOUT)
    kw.setdefault("request_timeout", REQUEST_TIMEOUT)
    return await AgentConnection.open(agent.path, agent_id=agent.agent_id, **kw)


def cid_of(response: Any) -> str | None:
    custom = getattr(getattr(response, "audit", None), "custom", None) or {}
    value = custom.get("correlation_id")
    return value if isinstance(value, str) else None


# --- connection level -----------------------------------------------------------------------

# fault -> (acceptable error classes, whether the connection survives: True, False, None = either)
REQUEST_FAULTS: dict[str, tuple[tuple[type[BaseException], ...], bool | None]] = {
    "crash": ((ConnectionClosed, Io), False),
    "crash_partial": ((ConnectionClosed, Io), False),
    "close": ((ConnectionClosed, Io), False),
    "stall": ((Timeout,), True),
    "freeze": ((Timeout,), True),  # connected, but the agent reads nothing more
    "late:0.6": ((Timeout,), True),
    "garbage": ((InvalidMessage, MessageTooLarge), False),
    "oversize": ((MessageTooLarge,), False),
    "unknown_type": ((InvalidMessage,), False),
    "zero_length": ((InvalidMessage,), False),
    "badjson": ((InvalidMessage, Timeout), None),
    "badresponse": ((InvalidMessage,), True),
    "wrong_cid": ((Timeout,), True),
}


@pytest.mark.parametrize("fault", sorted(REQUEST_FAULTS))
async def test_request_fault_is_typed_bounded_and_isolated(
    fault: str, faulty: FaultyAgentProc, healthy: FaultyAgentProc, loop_guard: LoopGuard
) -> None:
    expected, survives = REQUEST_FAULTS[fault]
    conn = await open_conn(faulty)
    other_conn = await open_conn(faulty)
    other_agent = await open_conn(healthy)
    try:
        cid = new_cid(fault)
        bystander_cids = [new_cid("by") for _ in range(5)]
        task = asyncio.ensure_future(conn.request(headers_event(cid, fault=fault), cid))
        await asyncio.sleep(0)
        bystanders = await asyncio.gather(
            *(other_agent.request(headers_event(b), b) for b in bystander_cids)
        )
        assert [cid_of(r) for r in bystanders] == bystander_cids
        _, error, took = await bounded(task, REQUEST_TIMEOUT + SLACK + 1)
        assert isinstance(error, expected), f"{fault}: expected {expected}, got {error!r}"
        assert took < REQUEST_TIMEOUT + SLACK
        assert str(error)
        assert conn.in_flight == 0
        if fault.startswith("crash"):
            assert faulty.wait_exit() != 0  # the whole agent is gone, its other connection too
        else:
            # another connection to the same (faulty) agent is unaffected
            ok = new_cid("same-agent")
            assert cid_of(await other_conn.request(headers_event(ok), ok)) == ok
        if survives is None:
            survives = conn.is_connected
        if survives and fault == "freeze":
            again = new_cid("frozen")
            _, error2, _ = await bounded(conn.request(headers_event(again), again), 2.0)
            assert isinstance(error2, Timeout)
        elif survives:
            assert conn.is_connected
            ok = new_cid("after")
            assert cid_of(await conn.request(headers_event(ok), ok)) == ok
        else:
            await bounded(conn.wait_closed(), 2.0)
            assert not conn.is_connected
            again = new_cid("dead")
            _, error2, _ = await bounded(conn.request(headers_event(again), again), 2.0)
            assert isinstance(error2, AgentProtocolError)
        if fault.startswith("late"):
            await asyncio.sleep(0.45)  # the late reply arrives now and must be dropped quietly
            ok = new_cid("after-late")
            assert cid_of(await conn.request(headers_event(ok), ok)) == ok
        assert conn.in_flight == 0
        for b in bystander_cids:
            assert cid_of(await other_agent.request(headers_event(b), b)) == b
    finally:
        for c in (conn, other_conn, other_agent):
            c.close()
        for c in (conn, other_conn, other_agent):
            await bounded(c.wait_closed(), 2.0)


async def test_benign_faults_answer(faulty: FaultyAgentProc, loop_guard: LoopGuard) -> None:
    """Slow, dripped (one byte at a time) and duplicated replies are decoded correctly."""
    conn = await open_conn(faulty)
    try:
        for fault in ("slow:0.1", "drip:0.0002", "twice", "ok"):
            cid = new_cid(fault)
            response, error, _ = await bounded(
                conn.request(headers_event(cid, fault=fault), cid), REQUEST_TIMEOUT + SLACK
            )
            assert error is None, f"{fault}: {error!r}"
            assert cid_of(response) == cid
        assert conn.in_flight == 0
        assert conn.is_connected
    finally:
        conn.close()
        await bounded(conn.wait_closed(), 2.0)


async def test_waiters_on_same_connection_survive_non_fatal_faults(
    faulty: FaultyAgentProc, loop_guard: LoopGuard
) -> None:
    """Stalled, mis-addressed and late replies only affect their own request."""
    conn = await open_conn(faulty)
    try:
        bad = {new_cid(f): f for f in ("stall", "wrong_cid", "late:0.5", "stall")}
        good = [new_cid("good") for _ in range(20)]
        tasks = [conn.request(headers_event(c, fault=f), c) for c, f in bad.items()]
        tasks += [conn.request(headers_event(c, uri="/fault/slow/0.05"), c) for c in good]
        results = await asyncio.wait_for(
            asyncio.gather(*tasks, return_exceptions=True), REQUEST_TIMEOUT + SLACK
        )
        assert all(isinstance(r, Timeout) for r in results[: len(bad)]), results[: len(bad)]
        assert [cid_of(r) for r in results[len(bad) :]] == good
        assert conn.in_flight == 0
    finally:
        conn.close()
        await bounded(conn.wait_closed(), 2.0)


async def test_crash_fails_every_waiter_at_once(
    faulty: FaultyAgentProc, loop_guard: LoopGuard
) -> None:
    """EOF fails all outstanding requests immediately, not one timeout each (DECISIONS 2)."""
    conn = await open_conn(faulty, request_timeout=5.0)
    try:
        stalled = [new_cid("st") for _ in range(10)]
        tasks = [
            asyncio.ensure_future(conn.request(headers_event(c, fault="stall"), c)) for c in stalled
        ]
        await asyncio.sleep(0.1)
        assert conn.in_flight == 10
        crash = new_cid("crash")
        tasks.append(
            asyncio.ensure_future(conn.request(headers_event(crash, fault="crash"), crash))
        )
        started = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 3.0)
        assert time.monotonic() - started < 2.0
        assert all(isinstance(r, (ConnectionClosed, Io)) for r in results), results
        assert conn.in_flight == 0
        assert not conn.is_connected
        assert faulty.wait_exit() != 0
    finally:
        conn.close()
        await bounded(conn.wait_closed(), 2.0)


async def test_cancel_and_close_release_waiters(
    faulty: FaultyAgentProc, loop_guard: LoopGuard
) -> None:
    conn = await open_conn(faulty, request_timeout=5.0)
    try:
        a, b = new_cid("cancel"), new_cid("closed")
        ta = asyncio.ensure_future(conn.request(headers_event(a, fault="stall"), a))
        tb = asyncio.ensure_future(conn.request(headers_event(b, fault="stall"), b))
        await asyncio.sleep(0.05)
        assert await conn.cancel(a) is True
        _, err_a, took = await bounded(ta, 1.0)
        assert isinstance(err_a, ConnectionClosed) and took < 0.5
        assert conn.in_flight == 1
        conn.close()
        _, err_b, took = await bounded(tb, 1.0)
        assert isinstance(err_b, ConnectionClosed) and took < 0.5
        assert conn.in_flight == 0
        await bounded(conn.wait_closed(), 2.0)
        await asyncio.sleep(0.2)
        assert any(f["type"] == 0x40 and f["cid"] == a for f in faulty.frames())
    finally:
        conn.close()


async def test_caller_cancellation_leaves_no_waiter(
    faulty: FaultyAgentProc, loop_guard: LoopGuard
) -> None:
    conn = await open_conn(faulty, request_timeout=5.0)
    try:
        cid = new_cid("outer")
        with pytest.raises((asyncio.TimeoutError, TimeoutError)):
            await asyncio.wait_for(conn.request(headers_event(cid, fault="stall"), cid), 0.1)
        assert conn.in_flight == 0
        ok = new_cid("ok")
        assert cid_of(await conn.request(headers_event(ok), ok)) == ok
    finally:
        conn.close()
        await bounded(conn.wait_closed(), 2.0)


HANDSHAKE_FAULTS: dict[str, tuple[type[BaseException], ...]] = {
    "close": (ConnectionClosed, ConnectionFailed, Io),
    "crash": (ConnectionClosed, ConnectionFailed, Io),
    "stall": (Timeout, ConnectionFailed),
    "garbage": (InvalidMessage, MessageTooLarge, ConnectionFailed),
    "wrong_type": (InvalidMessage, ConnectionFailed),
    "badjson": (InvalidMessage, ConnectionFailed),
    "fail": (ConnectionFailed,),
    "bad_encoding": (InvalidMessage, ConnectionFailed),
    "missing_caps": (InvalidMessage, ConnectionFailed),
}


@pytest.mark.parametrize("fault", sorted(HANDSHAKE_FAULTS))
async def test_handshake_fault_is_typed_and_bounded(
    fault: str, faulty: FaultyAgentProc, loop_guard: LoopGuard
) -> None:
    faulty.set_fault(handshake=fault)
    conn, error, took = await bounded(open_conn(faulty, connect_timeout=0.5), 0.5 + SLACK + 1)
    if conn is not None:
        conn.close()
    assert isinstance(error, HANDSHAKE_FAULTS[fault]), f"{fault}: {error!r}"
    assert took < 0.5 + SLACK
    if fault == "fail":
        assert "agent refuses" in str(error)
    if fault == "crash":
        assert faulty.wait_exit() != 0


async def test_handshake_in_one_byte_pieces_succeeds(
    faulty: FaultyAgentProc, loop_guard: LoopGuard
) -> None:
    faulty.set_fault(handshake="drip:0.0002")
    conn = await open_conn(faulty, connect_timeout=3.0)
    try:
        assert conn.capabilities is not None and conn.capabilities.agent_id == "faulty"
        cid = new_cid("hs")
        assert cid_of(await conn.request(headers_event(cid), cid)) == cid
    finally:
        conn.close()
        await bounded(conn.wait_closed(), 2.0)


async def test_connect_to_missing_socket_fails_fast(loop_guard: LoopGuard) -> None:
    _, error, took = await bounded(
        AgentConnection.open(
            "/tmp/agentpool-no-such-dir/x.sock", agent_id="x", connect_timeout=1.0
        ),
        3.0,
    )
    assert isinstance(error, (ConnectionFailed, Io, ConnectionClosed)), repr(error)
    assert took < 1.0


# --- pool level -----------------------------------------------------------------------------


def pool_config(**kw: Any) -> AgentPoolConfig:
    base: dict[str, Any] = dict(
        connections_per_agent=2,
        request_timeout=REQUEST_TIMEOUT,
        connect_timeout=CONNECT_TIMEOUT,
        health_check_interval=0.2,
        reconnect_interval=0.1,
        drain_timeout=1.0,
        ping_timeout=0.5,
        circuit_breaker=None,
    )
    base.update(kw)
    return AgentPoolConfig(**base)


@contextlib.asynccontextmanager
async def running_pool(
    config: AgentPoolConfig, **agents: FaultyAgentProc
) -> AsyncIterator[AgentPool]:
    """A started pool with the given agents; on exit: shutdown, then no task may be left."""
    before = asyncio.all_tasks()
    pool = AgentPool(config)
    await pool.start()
    try:
        for agent_id, agent in agents.items():
            await pool.add_agent(agent_id, agent.path)
        yield pool
    finally:
        await asyncio.wait_for(pool.shutdown(), config.drain_timeout + 5)
        await assert_no_tasks_left(before)


async def assert_no_tasks_left(before: set[asyncio.Task[Any]]) -> None:
    current = asyncio.current_task()
    deadline = time.monotonic() + 2.0
    while True:
        left = {t for t in asyncio.all_tasks() - before if t is not current and not t.done()}
        if not left or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert not left, f"tasks still running after shutdown: {left}"


def assert_clean(pool: AgentPool) -> None:
    """Nothing left behind: gauge, waiters, affinities/sessions on closed connections."""
    snap = pool.protocol_metrics.snapshot()
    assert snap.in_flight_requests == 0
    assert pool.protocol_metrics.in_flight_requests == 0
    for stats in pool.agent_stats_sync():
        assert stats.total_in_flight == 0, stats
    for entry in pool._agents.values():
        for st in entry.conns:
            assert st.in_flight == 0
            assert st.conn.in_flight == 0 or not st.conn.is_connected
            if st.closed:
                assert st.conn.in_flight == 0
        for st in entry.conns:
            if st.closed:
                assert entry.affinity.drop_state(st) == 0, "affinity points at a closed connection"
    sessions = pool._sessions
    for st in [s for e in pool._agents.values() for s in e.conns if s.closed]:
        assert sessions.drop_state(st) == 0, "sticky session points at a closed connection"


async def healthy_traffic(pool: AgentPool, agent_id: str, n: int) -> list[Any]:
    cids = [new_cid(agent_id) for _ in range(n)]
    return list(
        await asyncio.gather(
            *(pool.send_request_headers(agent_id, c, headers_event(c)) for c in cids),
            return_exceptions=True,
        )
    )


# one fault of each kind (the connection-level tests above cover every fault)
POOL_FAULTS = ["crash", "close", "stall", "late:0.6", "garbage", "unknown_type", "wrong_cid",
               "freeze"]  # fmt: skip


@pytest.mark.parametrize("fault", POOL_FAULTS)
async def test_pool_fault_isolated_and_clean(
    fault: str, faulty: FaultyAgentProc, healthy: FaultyAgentProc, loop_guard: LoopGuard
) -> None:
    async with running_pool(pool_config(), f=faulty, h=healthy) as pool:
        session = new_cid("sess")
        pool.create_sticky_session(session, "f")
        cid = new_cid(fault)
        faulty_call = asyncio.ensure_future(
            pool.send_request_headers_with_sticky_session(
                session, "f", cid, headers_event(cid, fault=fault)
            )
        )
        traffic = asyncio.ensure_future(healthy_traffic(pool, "h", 50))
        _, error, took = await bounded(faulty_call, REQUEST_TIMEOUT + SLACK + 1)
        assert isinstance(error, AgentProtocolError), f"{fault}: {error!r}"
        assert took < REQUEST_TIMEOUT + SLACK
        results = await asyncio.wait_for(traffic, 5.0)
        assert all(not isinstance(r, BaseException) for r in results), results
        await asyncio.sleep(0.1)
        assert_clean(pool)
        # the faulty agent comes back (restarted if it crashed) and is served again without help
        if fault.startswith("crash"):
            assert faulty.wait_exit() != 0
            await faulty.arestart()
        deadline = time.monotonic() + 5.0
        while True:
            ok = new_cid("back")
            try:
                await pool.send_request_headers("f", ok, headers_event(ok))
                break
            except AgentProtocolError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        pool.clear_correlation_affinity(cid)
        assert_clean(pool)
        assert not pool.has_sticky_session(session) or not _session_closed(pool, session)


def _session_closed(pool: AgentPool, session: str) -> bool:
    st = pool._sessions.lookup(session, time.monotonic(), None)
    return st is not None and bool(st.closed)


async def test_pool_body_chunks_after_connection_died(
    faulty: FaultyAgentProc, loop_guard: LoopGuard
) -> None:
    """Affinity to a connection that died is dropped; chunks fall back or fail typed."""
    async with running_pool(pool_config(connections_per_agent=1), f=faulty) as pool:
        cid = new_cid("aff")
        await pool.send_request_headers("f", cid, headers_event(cid))
        assert pool.correlation_affinity_count() == 1
        kill = new_cid("close")
        _, error, _ = await bounded(
            pool.send_request_headers("f", kill, headers_event(kill, fault="close")), 3.0
        )
        assert isinstance(error, (ConnectionClosed, Io))
        await asyncio.sleep(0.05)
        assert_clean(pool)
        chunk = RequestBodyChunkEvent(correlation_id=cid, data=b"x", is_last=True)
        _, error, _ = await bounded(pool.send_request_body_chunk("f", cid, chunk), 3.0)
        assert error is None or isinstance(error, AgentProtocolError)
        assert_clean(pool)


@pytest.mark.parametrize(
    "mode", [FlowControlMode.FAIL_CLOSED, FlowControlMode.FAIL_OPEN, FlowControlMode.WAIT_AND_RETRY]
)
async def test_pause_never_resumed(
    mode: FlowControlMode, faulty: FaultyAgentProc, loop_guard: LoopGuard
) -> None:
    config = pool_config(
        connections_per_agent=1, flow_control_mode=mode, flow_control_wait_timeout=0.2
    )
    async with running_pool(config, f=faulty) as pool:
        cid = new_cid("pause")
        await pool.send_request_headers("f", cid, headers_event(cid, fault="pause"))
        deadline = time.monotonic() + 2.0
        while pool.protocol_metrics.snapshot().paused_connections != 1:
            assert time.monotonic() < deadline, "pause never took effect"
            await asyncio.sleep(0.02)
        nxt = new_cid("paused")
        response, error, took = await bounded(
            pool.send_request_headers("f", nxt, headers_event(nxt)), 3.0
        )
        if mode == FlowControlMode.FAIL_OPEN:
            assert error is None and response.fail_open is True
        else:
            assert isinstance(error, FlowControlPaused), repr(error)
            if mode == FlowControlMode.WAIT_AND_RETRY:
                assert 0.15 < took < 0.2 + SLACK
        snap = pool.protocol_metrics.snapshot()
        assert snap.flow_control_rejections_total >= 1
        assert snap.flow_control_pauses_total == 1
        assert_clean(pool)


def count_events(agent: FaultyAgentProc) -> int:
    return sum(1 for f in agent.frames() if 0x10 <= f["type"] <= 0x17)


async def test_circuit_breaker_cycle(faulty: FaultyAgentProc, loop_guard: LoopGuard) -> None:
    breaker = CircuitBreakerConfig(
        failure_threshold=3, success_threshold=2, timeout=0.3, half_open_max_requests=1
    )
    config = pool_config(connections_per_agent=4, request_timeout=0.2, circuit_breaker=breaker)
    async with running_pool(config, f=faulty) as pool:
        state = pool._agents["f"].breaker

        async def call(fault: str | None = None) -> tuple[Any, BaseException | None, float]:
            cid = new_cid("cb")
            return await bounded(
                pool.send_request_headers("f", cid, headers_event(cid, fault=fault)), 3.0
            )

        for _ in range(3):
            _, error, _ = await call("stall")
            assert isinstance(error, Timeout)
        assert state.state is CircuitState.OPEN
        events_before = count_events(faulty)
        for _ in range(20):
            _, error, took = await call()
            assert isinstance(error, CircuitBreakerOpen), repr(error)
            assert took < 0.2  # refused at once, not after the 0.2 s request timeout
        assert "circuit breaker open" in str(error)
        await asyncio.sleep(0.1)
        assert count_events(faulty) == events_before, faulty.frames()
        # half-open after the timeout; a failing probe re-opens it
        await asyncio.sleep(0.35)
        _, error, _ = await call("stall")
        assert isinstance(error, Timeout)
        assert state.state is CircuitState.OPEN
        _, error, _ = await call()
        assert isinstance(error, CircuitBreakerOpen)
        # half-open again; two successful probes close it
        await asyncio.sleep(0.35)
        for _ in range(2):
            _, error, _ = await call()
            assert error is None, repr(error)
        assert state.state is CircuitState.CLOSED
        results = await asyncio.gather(*(call() for _ in range(20)))
        assert all(e is None for _, e, _ in results)
        assert_clean(pool)


async def test_unreachable_agent_fails_typed_then_recovers(loop_guard: LoopGuard) -> None:
    """An agent that is down when added is registered unhealthy and served once it starts."""
    agent = FaultyAgentProc()
    try:
        async with running_pool(pool_config()) as pool:
            await pool.add_agent("f", agent.path)
            cid = new_cid("down")
            _, error, took = await bounded(
                pool.send_request_headers("f", cid, headers_event(cid)), 3.0
            )
            assert isinstance(error, (ConnectionFailed, Unavailable)), repr(error)
            assert took < REQUEST_TIMEOUT  # failed at once, not after the request timeout
            await agent.astart()
            deadline = time.monotonic() + 5.0
            while True:
                ok = new_cid("up")
                _, error, _ = await bounded(
                    pool.send_request_headers("f", ok, headers_event(ok)), 3.0
                )
                if error is None:
                    break
                assert time.monotonic() < deadline, f"agent never served after start: {error!r}"
                await asyncio.sleep(0.1)
            assert_clean(pool)
    finally:
        agent.cleanup()


async def test_handshake_faults_on_reconnect_do_not_break_pool(
    faulty: FaultyAgentProc, healthy: FaultyAgentProc, loop_guard: LoopGuard
) -> None:
    """Reconnecting into a misbehaving handshake keeps failing typed and never hangs the pool."""
    async with running_pool(pool_config(), f=faulty, h=healthy) as pool:
        faulty.set_fault(handshake="stall")
        cid = new_cid("crash")
        await bounded(pool.send_request_headers("f", cid, headers_event(cid, fault="crash")), 3.0)
        await faulty.arestart()
        faulty.set_fault(handshake="stall")
        for hs in ("stall", "garbage", "close", "wrong_type"):
            faulty.set_fault(handshake=hs)
            await asyncio.sleep(0.25)
            results = await healthy_traffic(pool, "h", 20)
            assert all(not isinstance(r, BaseException) for r in results)
            x = new_cid("f")
            _, error, _ = await bounded(pool.send_request_headers("f", x, headers_event(x)), 3.0)
            assert error is None or isinstance(error, AgentProtocolError)
        faulty.set_fault(handshake=None)
        deadline = time.monotonic() + 8.0
        while True:
            ok = new_cid("ok")
            _, error, _ = await bounded(pool.send_request_headers("f", ok, headers_event(ok)), 3.0)
            if error is None:
                break
            assert time.monotonic() < deadline, repr(error)
            await asyncio.sleep(0.1)
        assert_clean(pool)


async def test_shutdown_with_requests_in_flight(
    faulty: FaultyAgentProc, loop_guard: LoopGuard
) -> None:
    """Shutdown drains up to drain_timeout, then fails the rest typed; no task is left."""
    config = pool_config(request_timeout=10.0, drain_timeout=0.3)
    before = asyncio.all_tasks()
    pool = AgentPool(config)
    await pool.start()
    await pool.add_agent("f", faulty.path)
    stalled = [new_cid("sd") for _ in range(8)]
    tasks = [
        asyncio.ensure_future(pool.send_request_headers("f", c, headers_event(c, fault="stall")))
        for c in stalled
    ]
    quick = new_cid("quick")
    tasks.append(
        asyncio.ensure_future(
            pool.send_request_headers("f", quick, headers_event(quick, fault="slow:0.1"))
        )
    )
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await asyncio.wait_for(pool.shutdown(), 5.0)
    assert time.monotonic() - started < 0.3 + SLACK
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2.0)
    assert cid_of(results[-1]) == quick
    assert all(isinstance(r, AgentProtocolError) for r in results[:-1]), results
    assert pool.protocol_metrics.snapshot().in_flight_requests == 0
    await assert_no_tasks_left(before)
    _, error, _ = await bounded(pool.send_request_headers("f", "late", headers_event("late")), 1.0)
    assert isinstance(error, AgentProtocolError)


# --- reverse listener abuse -----------------------------------------------------------------

LEGIT_AGENT = """
import asyncio, sys
from agentpool.agent.examples import make_agent
from agentpool.agent import connect_reverse

async def main(target, agent_id):
    agent = make_agent("bench")
    attempts = 0
    while True:
        attempts += 1
        try:
            conn = await connect_reverse(
                agent, target, agent_id=agent_id, auth_token="good-token", timeout=2.0
            )
            break
        except Exception as exc:
            print("retry", type(exc).__name__, exc, flush=True)
            await asyncio.sleep(0.05)
    print("registered", attempts, flush=True)
    await conn.wait_closed()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def registration_frame(agent_id: str, token: str | None) -> bytes:
    caps = capabilities_json(agent_id)
    doc: dict[str, Any] = {"protocol_version": 2, "agent_id": agent_id, "capabilities": caps}
    if token is not None:
        doc["auth_token"] = token
    return core.encode_frame(0x01, orjson.dumps(doc))


def capabilities_json(agent_id: str) -> dict[str, Any]:
    features = dict.fromkeys(
        ("streaming_body", "websocket", "guardrails", "config_push", "metrics_export",
         "cancellation", "flow_control", "health_reporting"),
        False,
    )  # fmt: skip
    features["concurrent_requests"] = 0
    return {
        "agent_id": agent_id,
        "name": agent_id,
        "version": "1",
        "supported_events": [1],
        "features": features,
        "limits": {"max_body_size": 1024, "max_concurrency": 10, "preferred_chunk_size": 1024},
    }


async def read_until_eof(reader: asyncio.StreamReader, limit: float) -> bytes:
    """Everything the peer sends until it closes (a reset counts as the close)."""
    data = bytearray()
    async with asyncio.timeout(limit):
        try:
            while chunk := await reader.read(65536):
                data += chunk
        except ConnectionError:
            pass
    return bytes(data)


async def dial(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect, retrying while the listen backlog is full (EAGAIN on Unix sockets)."""
    for _ in range(2000):
        try:
            return await asyncio.open_unix_connection(path)
        except BlockingIOError:
            await asyncio.sleep(0.002)
    raise AssertionError("listener backlog stayed full")


class Abuser:
    """Raw client sockets against the listener; every one is closed at the end."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.writers: list[asyncio.StreamWriter] = []

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await dial(self.path)
        self.writers.append(writer)
        return reader, writer

    async def drip(self, gap: float) -> tuple[bytes, float]:
        """A valid registration one byte every ``gap`` s; (reply, seconds until closed)."""
        reader, writer = await self.open()
        t0 = time.monotonic()
        frame = registration_frame("drip", "good-token")
        try:
            for i in range(len(frame)):
                writer.write(frame[i : i + 1])
                await writer.drain()
                await asyncio.sleep(gap)
                if reader.at_eof():
                    break
        except (ConnectionError, RuntimeError):  # uvloop: write on a transport closed by the peer
            pass
        return await read_until_eof(reader, 10.0), time.monotonic() - t0

    async def bad_token(self, n: int) -> bytes:
        reader, writer = await self.open()
        with contextlib.suppress(ConnectionError, RuntimeError):
            writer.write(registration_frame(f"evil-{n}", f"bad-token-{n}"))
        return await read_until_eof(reader, 10.0)

    async def oversize(self, length: int, send: int) -> bytes:
        """A registration header announcing ``length`` bytes, then ``send`` bytes of it."""
        reader, writer = await self.open()
        try:
            writer.write(length.to_bytes(4, "big") + b"\x01")
            for _ in range(send // 65536):
                writer.write(b"A" * 65536)
                await writer.drain()
        except (ConnectionError, RuntimeError):  # uvloop: write on a transport closed by the peer
            pass
        return await read_until_eof(reader, 10.0)

    def close(self) -> None:
        for w in self.writers:
            w.close()
        self.writers.clear()


def start_legit(path: str, agent_id: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", LEGIT_AGENT, f"unix:{path}", agent_id],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


async def wait_registered(pool: AgentPool, agent_id: str, limit: float) -> float:
    started = time.monotonic()
    while agent_id not in pool.agent_ids():
        assert time.monotonic() - started < limit, f"{agent_id} never registered"
        await asyncio.sleep(0.01)
    for _ in range(10):
        cid = new_cid(agent_id)
        assert cid_of(await pool.send_request_headers(agent_id, cid, headers_event(cid))) == cid
    return round(time.monotonic() - started, 3)


def failure_replies(replies: list[bytes], reason: str) -> int:
    """Count registration failure replies naming ``reason``; b"" means dropped unanswered."""
    refused = 0
    for reply in replies:
        if reply == b"":
            continue
        frames = core.FrameDecoder().feed(reply)
        assert len(frames) == 1 and int(frames[0][0]) == 0x02, reply[:100]
        answer = orjson.loads(frames[0][1])
        assert answer["success"] is False and reason in answer["error"], answer
        refused += 1
    return refused


async def test_reverse_listener_abuse(loop_guard: LoopGuard) -> None:
    """Silent sockets, a slow drip, a bad-token flood and oversize frames are refused or time
    out with bounded memory, while legitimate agents (other processes) register."""
    handshake_timeout = 1.0
    sock_dir = tempfile.mkdtemp(prefix="aprv-", dir="/tmp")
    path = os.path.join(sock_dir, "rev.sock")
    config = ReverseConnectionConfig(
        handshake_timeout=handshake_timeout,
        require_auth=True,
        auth_tokens=frozenset({"good-token"}),
        request_timeout=2.0,
    )
    figures: dict[str, Any] = {}
    legits: list[subprocess.Popen[bytes]] = []
    abuser = Abuser(path)
    try:
        async with running_pool(pool_config(connections_per_agent=1)) as pool:
            listener = await ReverseConnectionListener.bind_uds(path, config)
            listener.start(pool)
            try:
                gc.collect()
                rss_before = rss_bytes()

                # Phase A, slots free: a slow drip, 500 bad tokens and oversize frames, while a
                # legitimate agent process starts and registers.
                legits.append(start_legit(path, "legit-a"))
                drip_task = asyncio.ensure_future(abuser.drip(0.02))
                flood: list[bytes] = []
                for wave in range(5):
                    flood += await asyncio.gather(
                        *(abuser.bad_token(wave * 100 + n) for n in range(100))
                    )
                big = await asyncio.gather(
                    abuser.oversize(0xFFFFFFFF, 0),
                    abuser.oversize(16 * 1024 * 1024, 4 * 1024 * 1024),
                    abuser.oversize(70 * 1024, 128 * 1024),
                )
                figures["legit_a_registered_s"] = await wait_registered(pool, "legit-a", 10.0)
                figures["bad_tokens_refused"] = failure_replies(
                    flood, "Invalid authentication token"
                )
                figures["bad_tokens_dropped"] = len(flood) - figures["bad_tokens_refused"]
                assert figures["bad_tokens_refused"] >= 250, figures
                assert big == [b"", b"", b""], "oversize frames are refused without a reply"
                drip_reply, drip_time = await drip_task
                assert drip_reply == b"", "a registration that never completes gets no reply"
                assert handshake_timeout * 0.9 < drip_time < handshake_timeout + SLACK + 1
                figures["drip_closed_after_s"] = round(drip_time, 3)

                # Phase B: 1,000 connections that never register fill every pending slot
                # (max_pending_handshakes); the rest are dropped at accept. A legitimate agent
                # that keeps retrying gets in once the silent ones time out.
                idle = [(await abuser.open())[0] for _ in range(1000)]
                figures["pending_peak"] = listener.pending_handshakes
                legits.append(start_legit(path, "legit-b"))
                more = await asyncio.gather(*(abuser.bad_token(1000 + n) for n in range(50)))
                figures["legit_b_registered_s"] = await wait_registered(
                    pool, "legit-b", handshake_timeout + 5.0
                )
                idle_ends = await asyncio.gather(*(read_until_eof(r, 5.0) for r in idle))
                assert all(data == b"" for data in idle_ends), "silent sockets get no reply"
                failure_replies(more, "Invalid authentication token")

                deadline = time.monotonic() + handshake_timeout + SLACK
                while listener.pending_handshakes:
                    assert time.monotonic() < deadline, listener.pending_handshakes
                    await asyncio.sleep(0.02)
                abuser.close()
                del idle, idle_ends, flood, more
                gc.collect()
                growth = rss_bytes() - rss_before
                figures.update(
                    rss_growth_mb=round(growth / 2**20, 1),
                    registered=listener.registered,
                    rejected=listener.rejected,
                    dropped=listener.dropped,
                )
                print("\nREVERSE ABUSE", figures)
                assert growth < 32 * 2**20, figures
                assert sorted(pool.agent_ids()) == ["legit-a", "legit-b"]
                assert listener.registered == 2
                assert listener.rejected + listener.dropped >= 1 + 500 + 3 + 1000 + 50
                assert_clean(pool)
            finally:
                listener.close()
                await asyncio.wait_for(listener.wait_closed(), 5.0)
    finally:
        abuser.close()
        for proc in legits:
            proc.kill()
            proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


async def test_agent_that_stops_reading_bounds_the_write_buffer(
    faulty: FaultyAgentProc, loop_guard: LoopGuard
) -> None:
    """An agent that stops reading: big requests back up and fail typed, the buffered data is
    bounded, and close() still completes (the transport is torn down, not drained)."""
    conn = await open_conn(faulty)
    try:
        frozen = new_cid("freeze")
        first = asyncio.ensure_future(conn.request(headers_event(frozen, fault="freeze"), frozen))
        await asyncio.sleep(0.05)
        gc.collect()
        rss_before = rss_bytes()
        big = "x" * (256 * 1024)
        cids = [new_cid("big") for _ in range(200)]  # 50 MiB offered to a socket nobody reads

        def big_event(cid: str) -> RequestHeadersEvent:
            event = headers_event(cid)
            event.headers["x-big"] = [big]
            return event

        results = await asyncio.wait_for(
            asyncio.gather(*(conn.request(big_event(c), c) for c in cids), return_exceptions=True),
            REQUEST_TIMEOUT + SLACK + 2,
        )
        _, first_error, _ = await bounded(first, 2.0)
        assert isinstance(first_error, Timeout)
        kinds = {type(r).__name__ for r in results}
        assert all(isinstance(r, (Timeout, Unavailable, ConnectionClosed)) for r in results), kinds
        assert conn.in_flight == 0
        gc.collect()
        growth = rss_bytes() - rss_before
        print("\nSTOPPED READING", {"errors": sorted(kinds), "rss_growth_mb": growth / 2**20})
        conn.close()
        _, error, _ = await bounded(conn.wait_closed(), 2.0)
        assert error is None
        assert growth < 20 * 2**20  # max_write_buffer is 4 MiB
    finally:
        conn.close()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(conn.wait_closed(), 0.5)
        if conn.is_connected or not faulty.accepting():
            faulty.kill()  # frees a transport stuck draining into the frozen socket


async def test_frozen_connection_is_replaced(
    faulty: FaultyAgentProc, loop_guard: LoopGuard
) -> None:
    """A connection whose agent stopped reading is found by maintenance and replaced."""
    config = pool_config(connections_per_agent=1, ping_timeout=0.3)
    async with running_pool(config, f=faulty) as pool:
        cid = new_cid("freeze")
        _, error, _ = await bounded(
            pool.send_request_headers("f", cid, headers_event(cid, fault="freeze")), 3.0
        )
        assert isinstance(error, Timeout)
        started = time.monotonic()
        outcomes: list[str] = []
        while True:
            ok = new_cid("thaw")
            _, error, _ = await bounded(pool.send_request_headers("f", ok, headers_event(ok)), 3.0)
            outcomes.append("ok" if error is None else type(error).__name__)
            if error is None:
                break
            assert time.monotonic() - started < 5.0, outcomes
            await asyncio.sleep(0.05)
        assert set(outcomes[:-1]) <= {"Timeout", "ConnectionFailed", "ConnectionClosed"}, outcomes
        assert_clean(pool)


@pytest.mark.parametrize("fault", ["unknown_type", "garbage", "close", "wrong_cid"])
async def test_reverse_agent_misbehaving_after_registration(
    fault: str, loop_guard: LoopGuard
) -> None:
    """A registered reverse agent that breaks the protocol fails typed and leaves the pool."""
    sock_dir = tempfile.mkdtemp(prefix="aprv-", dir="/tmp")
    path = os.path.join(sock_dir, "rev.sock")
    config = ReverseConnectionConfig(handshake_timeout=1.0, request_timeout=REQUEST_TIMEOUT)
    abuser = Abuser(path)
    try:
        async with running_pool(pool_config()) as pool:
            listener = await ReverseConnectionListener.bind_uds(path, config)
            listener.start(pool)
            try:
                reader, writer = await abuser.open()
                writer.write(registration_frame("rev", None))
                dec = core.FrameDecoder()
                frames: list[Any] = []
                while not frames:
                    frames = dec.feed(await asyncio.wait_for(reader.read(65536), 3.0))
                assert orjson.loads(frames[0][1])["success"] is True
                await wait_registered_only(pool, "rev")

                async def next_event() -> str:
                    got: list[Any] = []
                    while not got:
                        got = dec.feed(await asyncio.wait_for(reader.read(65536), 3.0))
                    return str(orjson.loads(got[0][1])["correlation_id"])

                good = new_cid("rev-ok")
                call = asyncio.ensure_future(
                    pool.send_request_headers("rev", good, headers_event(good))
                )
                cid = await next_event()
                writer.write(core.encode_frame(0x20, allow_json(cid)))
                assert cid_of(await asyncio.wait_for(call, 3.0)) == good

                bad = new_cid("rev-bad")
                call = asyncio.ensure_future(
                    pool.send_request_headers("rev", bad, headers_event(bad))
                )
                cid = await next_event()
                if fault == "unknown_type":
                    writer.write(b"\x00\x00\x00\x05\x99abcd")
                elif fault == "garbage":
                    writer.write(b"\xde\xad\xbe\xef not a frame")
                elif fault == "close":
                    writer.close()
                else:
                    writer.write(core.encode_frame(0x20, allow_json("nobody-" + cid)))
                _, error, took = await bounded(call, REQUEST_TIMEOUT + SLACK + 1)
                assert isinstance(error, AgentProtocolError), repr(error)
                assert took < REQUEST_TIMEOUT + SLACK
                if fault == "wrong_cid":
                    assert isinstance(error, Timeout)
                    assert pool.agent_ids() == ["rev"]
                else:
                    assert isinstance(error, (InvalidMessage, MessageTooLarge, ConnectionClosed))
                    deadline = time.monotonic() + 2.0
                    while pool.agent_ids() or listener.connection_count("rev"):
                        assert time.monotonic() < deadline, "dead reverse agent not dropped"
                        await asyncio.sleep(0.01)
                assert_clean(pool)
            finally:
                listener.close()
                await asyncio.wait_for(listener.wait_closed(), 5.0)
    finally:
        abuser.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def allow_json(cid: str) -> bytes:
    return orjson.dumps(
        {"version": 2, "decision": "allow", "audit": {"custom": {"correlation_id": cid}}}
    )


async def wait_registered_only(pool: AgentPool, agent_id: str) -> None:
    deadline = time.monotonic() + 3.0
    while agent_id not in pool.agent_ids():
        assert time.monotonic() < deadline, f"{agent_id} never registered"
        await asyncio.sleep(0.01)
