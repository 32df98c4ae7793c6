"""Discovery sources against a stub DNS server on loopback and a watched file.

The DNS server is a small UDP responder (dnspython builds the replies) whose records and
TTLs the tests change while a DnsSource watches them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import hdrs
from agents import AgentProc, spawn_agent

from agentpool.config import AgentPoolConfig
from agentpool.discovery import (
    Discovery,
    DiscoverySource,
    DnsSource,
    FileSource,
    StaticSource,
    single_endpoint_updater,
)
from agentpool.errors import ConnectionFailed
from agentpool.messages import Allow
from agentpool.pool import AgentPool

pytest.importorskip("dns.message")
from _dns import StubDns


@pytest.fixture(scope="module")
def waf() -> Iterator[AgentProc]:
    with spawn_agent("waf", tcp=True) as agent:
        yield agent


def dns_source(dns_port: int, name: str, **kw: Any) -> DnsSource:
    kw.setdefault("retry_interval", 0.1)
    kw.setdefault("min_ttl", 0.05)
    kw.setdefault("lifetime", 1.0)
    return DnsSource(name, nameservers=["127.0.0.1"], dns_port=dns_port, **kw)


async def next_list(it: AsyncIterator[list[str]], timeout: float = 5.0) -> list[str]:
    return await asyncio.wait_for(it.__anext__(), timeout)


async def test_sources_follow_the_protocol(tmp_path: Path) -> None:
    assert isinstance(StaticSource(["tcp://a:1"]), DiscoverySource)
    assert isinstance(FileSource(tmp_path / "x"), DiscoverySource)
    with pytest.raises(ConnectionFailed):
        StaticSource(["not an endpoint"])
    got = [x async for x in StaticSource(["tcp://a:1", "tcp://a:1", "unix:/s"]).updates()]
    assert got == [["tcp://a:1", "unix:/s"]]


async def test_dns_a_and_aaaa_with_ttl_reresolution(stub_dns: tuple[StubDns, int]) -> None:
    dns_srv, port = stub_dns
    dns_srv.records[("waf.test", "A")] = (2, ["127.0.0.2", "127.0.0.3"])
    dns_srv.records[("waf.test", "AAAA")] = (2, ["::1"])
    source = dns_source(port, "waf.test", port=8443, scheme="tls")
    it = source.updates()
    try:
        assert await next_list(it) == [
            "tls://127.0.0.2:8443",
            "tls://127.0.0.3:8443",
            "tls://[::1]:8443",
        ]
        # the TTL (2 s) is honoured: no lookup before it runs out
        await asyncio.sleep(0.5)
        assert dns_srv.queries[("waf.test", "A")] == 1
        dns_srv.records[("waf.test", "A")] = (2, ["127.0.0.4"])
        assert await next_list(it) == ["tls://127.0.0.4:8443", "tls://[::1]:8443"]
        assert dns_srv.queries[("waf.test", "A")] == 2
    finally:
        await it.aclose()  # type: ignore[attr-defined]


async def test_dns_srv_ordering_and_target_resolution(stub_dns: tuple[StubDns, int]) -> None:
    dns_srv, port = stub_dns
    dns_srv.records[("_agent._tcp.waf.test", "SRV")] = (
        30,
        ["20 5 7002 b.waf.test.", "10 1 7001 a.waf.test.", "10 9 7003 c.waf.test."],
    )
    dns_srv.records[("a.waf.test", "A")] = (30, ["127.0.0.11"])
    dns_srv.records[("b.waf.test", "A")] = (30, ["127.0.0.12"])
    dns_srv.records[("c.waf.test", "A")] = (30, ["127.0.0.13"])
    names = dns_source(port, "_agent._tcp.waf.test", record="SRV")
    endpoints, ttl = await names.resolve()
    assert endpoints == ["tcp://c.waf.test:7003", "tcp://a.waf.test:7001", "tcp://b.waf.test:7002"]
    assert ttl == 30
    addrs = dns_source(port, "_agent._tcp.waf.test", record="SRV", resolve_targets=True)
    endpoints, _ = await addrs.resolve()
    assert endpoints == ["tcp://127.0.0.13:7003", "tcp://127.0.0.11:7001", "tcp://127.0.0.12:7002"]


async def test_dns_failures_keep_the_last_list(stub_dns: tuple[StubDns, int]) -> None:
    dns_srv, port = stub_dns
    dns_srv.records[("waf.test", "A")] = (0, ["127.0.0.2"])
    source = dns_source(port, "waf.test", record="A", port=1, min_ttl=0.05)
    disc_lists: list[list[str]] = []
    disc = Discovery("waf", source, lambda _id, eps: disc_lists.append(eps))
    async with disc:
        for _ in range(100):
            if disc_lists:
                break
            await asyncio.sleep(0.02)
        assert disc_lists == [["tcp://127.0.0.2:1"]]
        dns_srv.servfail = True
        before = source.lookups
        await asyncio.sleep(0.4)
        assert source.lookups > before  # retried
        dns_srv.servfail = False
        dns_srv.records.clear()  # NXDOMAIN: still no empty list
        await asyncio.sleep(0.3)
        assert disc_lists == [["tcp://127.0.0.2:1"]]
        dns_srv.records[("waf.test", "A")] = (0, ["127.0.0.5"])
        for _ in range(100):
            if len(disc_lists) > 1:
                break
            await asyncio.sleep(0.02)
        assert disc_lists == [["tcp://127.0.0.2:1"], ["tcp://127.0.0.5:1"]]
        assert disc.changes == 2


async def test_watched_file(tmp_path: Path) -> None:
    path = tmp_path / "waf.endpoints"
    source = FileSource(path, interval=0.05)
    it = source.updates()

    def write(text: str) -> None:
        tmp = tmp_path / "tmp"
        tmp.write_text(text)
        os.replace(tmp, path)

    try:
        first = asyncio.ensure_future(next_list(it))
        await asyncio.sleep(0.15)
        assert not first.done()  # no file yet: nothing, not an empty list
        write("# replicas\ntcp://127.0.0.2:7001\n\nnot-an-endpoint\ntls://[::1]:7002  # v6\n")
        assert await first == ["tcp://127.0.0.2:7001", "tls://[::1]:7002"]
        write("unix:/run/waf.sock\n")
        assert await next_list(it) == ["unix:/run/waf.sock"]
        path.unlink()
        nothing = asyncio.ensure_future(next_list(it))
        await asyncio.sleep(0.15)
        assert not nothing.done()
        write("tcp://127.0.0.9:1\n")
        assert await nothing == ["tcp://127.0.0.9:1"]
    finally:
        await it.aclose()  # type: ignore[attr-defined]


async def test_discovery_moves_the_pool_to_the_new_endpoint(
    waf: AgentProc, stub_dns: tuple[StubDns, int]
) -> None:
    """DNS says where the single replica is; when the answer changes, the pool follows."""
    dns_srv, port = stub_dns
    dns_srv.records[("waf.test", "A")] = (0, ["127.0.0.2"])  # nobody listens there
    source = dns_source(port, "waf.test", record="A", port=waf.port, min_ttl=0.05)
    config = AgentPoolConfig(connections_per_agent=1, connect_timeout=2.0, request_timeout=5.0)
    async with AgentPool(config) as pool:
        disc = Discovery("waf", source, single_endpoint_updater(pool))
        async with disc:
            for _ in range(500):
                if disc.changes:
                    break
                await asyncio.sleep(0.02)
            assert pool.agent_ids() == ["waf"]
            assert not pool.is_agent_healthy("waf")
            dns_srv.records[("waf.test", "A")] = (0, ["127.0.0.1"])
            moved = [f"tcp://127.0.0.1:{waf.port}"]
            # the new endpoint joins (healthy) before set_endpoints returns: wait for both
            for _ in range(500):
                if pool.is_agent_healthy("waf") and disc.endpoints == moved:
                    break
                await asyncio.sleep(0.02)
            assert disc.endpoints == moved
            reply = await pool.send_request_headers("waf", "c1", hdrs("c1"))
            assert isinstance(reply.decision, Allow)
            changes = disc.changes
            await asyncio.sleep(0.2)  # same answer again: no re-add
            assert disc.changes == changes
