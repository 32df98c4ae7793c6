"""Shared test configuration: every async test runs on asyncio and on uvloop."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import pytest
from agents import AgentProc, spawn_agent

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop,
    }
    if uvloop is not None and not os.environ.get("AGENTPOOL_TEST_NO_UVLOOP"):
        factories["uvloop"] = uvloop.new_event_loop
    return factories


def pytest_report_header(config: pytest.Config) -> str:
    import agentpool
    from agentpool.framing import HAS_EXTENSIONS

    kind = "compiled" if HAS_EXTENSIONS else "pure-Python"
    where = os.path.dirname(agentpool.__file__)
    return f"agentpool {agentpool.__version__} from {where} ({kind} core)"


# -- example agents shared by the pool tests (one process per test module) ----------------------
# Helpers without fixtures (events, pool configs, bounded waits, a fake clock) are in
# tests/_helpers.py; process control and the test agents are in tests/agents/.


@pytest.fixture(scope="module")
def waf() -> Iterator[AgentProc]:
    """The ``waf`` example agent on a Unix socket (JSON)."""
    with spawn_agent("waf") as agent:
        yield agent


@pytest.fixture(scope="module")
def control() -> Iterator[AgentProc]:
    """The ``control`` example agent on a Unix socket, steered by ``x-test-*`` headers."""
    with spawn_agent("control") as agent:
        yield agent


@pytest.fixture
async def stub_dns() -> AsyncIterator[tuple[Any, int]]:
    """A stub DNS server on a loopback UDP port (tests/_dns.py, needs dnspython): (server, port)."""
    from _dns import StubDns

    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(StubDns, local_addr=("127.0.0.1", 0))
    try:
        yield proto, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()
