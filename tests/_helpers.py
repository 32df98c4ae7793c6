"""Helpers shared by the test modules: events, pool configs, bounded waits, a proxy-side
connection, RSS, a fake clock.

Imported as ``from _helpers import ...`` (tests/ is the rootdir on sys.path; CI runs the
suite from a copy where ``tests`` is not a package).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from agentpool.config import AgentPoolConfig
from agentpool.connection import AgentConnection
from agentpool.messages import RequestHeadersEvent, RequestMetadata


def hdrs(
    cid: str,
    uri: Any = "/",
    *,
    method: str = "GET",
    host: str | None = "example.test",
    headers: Mapping[str, Any] | None = None,
    actions: str | None = None,
    delay: float | None = None,
    request_id: str | None = None,
    client_ip: str = "127.0.0.1",
    client_port: int = 1,
) -> RequestHeadersEvent:
    """A RequestHeaders event for ``cid``: a ``host`` header (none with ``host=None``), then
    ``headers`` over it, and the ``x-test-action`` / ``x-test-delay`` headers the control agent
    obeys. Values are passed through unchecked, so a test can build malformed events."""
    h: dict[str, Any] = {} if host is None else {"host": [host]}
    if headers:
        h.update(headers)
    if actions:
        h["x-test-action"] = [actions]
    if delay is not None:
        h["x-test-delay"] = [str(delay)]
    meta = RequestMetadata(
        correlation_id=cid,
        request_id=cid if request_id is None else request_id,
        client_ip=client_ip,
        client_port=client_port,
    )
    return RequestHeadersEvent(metadata=meta, method=method, uri=uri, headers=h)


def pool_config(**defaults: Any) -> Callable[..., AgentPoolConfig]:
    """A ``cfg(**overrides)`` building an AgentPoolConfig from a module's ``defaults``."""

    def cfg(**kw: Any) -> AgentPoolConfig:
        return AgentPoolConfig(**{**defaults, **kw})

    return cfg


async def until(pred: Callable[[], object], timeout: float = 5.0, interval: float = 0.01) -> None:
    """Wait until ``pred()`` is true, polling every ``interval`` s; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def proxy(endpoint: str, **kw: Any) -> AsyncIterator[AgentConnection]:
    """A proxy-side connection to the agent at ``endpoint`` (closed, bounded, at the end)."""
    conn = await AgentConnection.open(endpoint, agent_id="p", request_timeout=5.0, **kw)
    try:
        yield conn
    finally:
        conn.close()
        await asyncio.wait_for(conn.wait_closed(), 5.0)


def states(pool: Any, agent_id: str) -> list[Any]:
    """The connection states of ``agent_id`` in ``pool`` (the pool's private table)."""
    return list(pool._agents[agent_id].conns)


def rss_bytes() -> int:
    """This process's resident set size (Linux /proc), for bounded-memory checks."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class FakeClock:
    """A clock for code that takes ``clock=``: call it for the time, move it by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
