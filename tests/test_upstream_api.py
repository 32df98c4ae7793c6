"""Every public method of upstream's Rust ``AgentPool`` exists here, with the same async-ness.

The table is upstream's ``impl AgentPool`` (crates/agent-protocol, src/v2/pool.rs) method by
method. A Rust ``async fn`` must be awaitable here (a coroutine function, or a plain function
annotated to return a ``Coroutine`` — the ``send_*`` hot path skips one coroutine layer); a
Rust plain ``fn`` must not be. Accessors that return a reference upstream are properties here.
"""

from __future__ import annotations

import asyncio
import inspect
import typing
from collections.abc import Coroutine

import pytest

from agentpool import AgentPool

# name -> async upstream
UPSTREAM: dict[str, bool] = {
    "protocol_metrics": False,
    "metrics_collector": False,
    "export_prometheus": False,
    "config_pusher": False,
    "config_update_handler": False,
    "clear_correlation_affinity": False,
    "correlation_affinity_count": False,
    "cleanup_expired_affinities": False,
    "create_sticky_session": False,
    "refresh_sticky_session": False,
    "has_sticky_session": False,
    "clear_sticky_session": False,
    "sticky_session_count": False,
    "sticky_session_agent": False,
    "cleanup_expired_sessions": False,
    "send_request_headers_with_sticky_session": True,
    "push_config_to_agent": False,
    "push_config_to_all": False,
    "acknowledge_config_push": False,
    "add_agent": True,
    "remove_agent": True,
    "add_reverse_connection": True,
    "send_request_headers": True,
    "send_request_body_chunk": True,
    "send_response_headers": True,
    "send_response_body_chunk": True,
    "send_guardrail_inspect": True,
    "cancel_request": True,
    "stats": True,
    "agent_stats": True,
    "agent_capabilities": True,
    "is_agent_healthy": False,
    "agent_ids": False,
    "shutdown": True,
    "run_maintenance": True,
}
# Rust-only: constructors (``AgentPool(config)`` here) and Arc clones of the accessors.
NOT_PORTED = {"new", "with_config", "protocol_metrics_arc", "metrics_collector_arc"}


def _awaitable(fn: object) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    hints = typing.get_type_hints(fn)
    return typing.get_origin(hints.get("return")) is Coroutine


@pytest.mark.parametrize(("name", "is_async"), sorted(UPSTREAM.items()))
def test_method_matches_upstream(name: str, is_async: bool) -> None:
    attr = inspect.getattr_static(AgentPool, name)
    if isinstance(attr, property):
        assert not is_async, f"{name} is async upstream but a property here"
        return
    assert callable(attr), name
    assert _awaitable(attr) is is_async, (
        f"AgentPool.{name} should {'' if is_async else 'not '}be awaitable, as upstream"
    )


def test_no_upstream_method_forgotten() -> None:
    assert not (NOT_PORTED & set(UPSTREAM))
    ours = {n for n in dir(AgentPool) if not n.startswith("_")}
    assert set(UPSTREAM) <= ours


async def test_maintenance_runs_until_shutdown() -> None:
    pool = AgentPool()
    task = asyncio.ensure_future(pool.run_maintenance())
    await asyncio.sleep(0.05)
    assert not task.done()  # a loop, as upstream's: spawned, it keeps running
    await pool.shutdown()
    await asyncio.wait_for(task, 2.0)
    await pool.run_maintenance_once()  # the single pass stays callable
