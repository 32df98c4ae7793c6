"""Config push over the wire (DECISIONS 7) against a real agent process.

Run as a script, this file is the agent: ``python tests/test_pool_push.py --socket PATH``
serves an agent whose ``on_configure`` accepts pushes, rejects a ``list_update`` of the list
``reject`` and never answers one of the list ``silent``. Request headers are answered with the
configurations received so far in ``routing_metadata["configs"]`` (JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from _helpers import until
from agents import AgentProc, running

from agentpool.agent import Agent, AgentServer
from agentpool.config import AgentPoolConfig, ConfigPusherConfig
from agentpool.control import PushStatus, config_update_payload
from agentpool.messages import (
    AgentCapabilities,
    AgentResponse,
    ListUpdate,
    RequestHeadersEvent,
    RequestMetadata,
    RequestReload,
    RuleDefinition,
    RuleUpdate,
)
from agentpool.pool import AgentPool

# --------------------------------------------------------------------------- the agent


class PushAgent(Agent):
    agent_id = "push-agent"
    name = "config push test agent"

    def __init__(self, supports_push: bool) -> None:
        self.supports_push = supports_push
        self.configs: list[Any] = []

    def capabilities(self) -> AgentCapabilities:
        caps = super().capabilities()
        caps.features.config_push = self.supports_push
        return caps

    async def on_configure(self, config: Any, config_version: str | None) -> bool:
        self.configs.append({"config": config, "version": config_version})
        update = config.get("update_type", {}) if isinstance(config, dict) else {}
        if update.get("type") == "list_update":
            if update.get("list_id") == "reject":
                return False
            if update.get("list_id") == "silent":
                await asyncio.Event().wait()
        return True

    async def on_request_headers(self, event: RequestHeadersEvent) -> AgentResponse:
        return AgentResponse(routing_metadata={"configs": json.dumps(self.configs)})


async def _serve(path: str, supports_push: bool) -> None:
    server = AgentServer(PushAgent(supports_push), path=path)
    await server.start()
    print(f"agentpool agent listening on {server.endpoint}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--no-push", action="store_true")
    args, _ = parser.parse_known_args()
    asyncio.run(_serve(args.socket, not args.no_push))
    sys.exit(0)


# --------------------------------------------------------------------------- tests


class PushAgentProc(AgentProc):
    def __init__(self, supports_push: bool = True) -> None:
        super().__init__("push")
        self.supports_push = supports_push

    def argv(self) -> list[str]:
        assert self.path is not None
        argv = [sys.executable, __file__, "--socket", self.path]
        return argv if self.supports_push else [*argv, "--no-push"]


@pytest.fixture(scope="module")
def push_agent() -> Iterator[PushAgentProc]:
    with running(PushAgentProc()) as agent:
        yield agent


@pytest.fixture(scope="module")
def no_push_agent() -> Iterator[PushAgentProc]:
    with running(PushAgentProc(supports_push=False)) as agent:
        yield agent


def cfg(**push: Any) -> AgentPoolConfig:
    return AgentPoolConfig(
        connections_per_agent=2,
        request_timeout=5.0,
        health_check_interval=60.0,
        config_push=ConfigPusherConfig(**push),
    )


async def configs_seen(pool: AgentPool, agent_id: str) -> list[Any]:
    meta = RequestMetadata(correlation_id="q", request_id="q", client_ip="127.0.0.1", client_port=1)
    resp = await pool.send_request_headers(
        agent_id, "q", RequestHeadersEvent(metadata=meta, method="GET", uri="/", headers={})
    )
    seen: list[Any] = json.loads(resp.routing_metadata["configs"])
    return seen


def status(pool: AgentPool, push_id: str) -> PushStatus | None:
    result = pool.config_pusher.get_result(push_id)
    return None if result is None else result.status


def test_payload_shape() -> None:
    rule = RuleDefinition(id="r1", priority=5, definition={"match": "x"}, enabled=True)
    from agentpool.messages import ConfigUpdateRequest

    payload = config_update_payload(
        ConfigUpdateRequest(RuleUpdate("rs", [rule], ["old"]), "push-9", 17)
    )
    assert payload == {
        "update_type": {
            "type": "rule_update",
            "rule_set": "rs",
            "rules": [
                {
                    "id": "r1",
                    "priority": 5,
                    "definition": {"match": "x"},
                    "enabled": True,
                    "description": None,
                    "tags": [],
                }
            ],
            "remove_rules": ["old"],
        },
        "request_id": "push-9",
        "timestamp_ms": 17,
    }


async def test_push_accepted(push_agent: PushAgentProc) -> None:
    async with AgentPool(cfg()) as pool:
        await pool.add_agent("p", push_agent.endpoint)
        baseline = len(await configs_seen(pool, "p"))
        push_id = pool.push_config_to_agent("p", RequestReload())
        assert push_id is not None and push_id.startswith("push-")
        await until(lambda: status(pool, push_id) is PushStatus.ACKNOWLEDGED)
        target = pool.config_pusher.get_agent("p")
        assert target is not None and target.successful_pushes == 1
        assert pool.config_pusher.pending_count() == 0
        seen = (await configs_seen(pool, "p"))[baseline:]
        assert len(seen) == 1 and seen[0]["version"] == push_id
        assert seen[0]["config"]["update_type"] == {"type": "request_reload"}
        assert seen[0]["config"]["request_id"] == push_id
        # the push did not go through the request metrics
        assert pool.protocol_metrics.snapshot().requests_total == 2


async def test_push_rejected_with_reason(push_agent: PushAgentProc) -> None:
    async with AgentPool(cfg()) as pool:
        await pool.add_agent("p", push_agent.endpoint)
        push_id = pool.push_config_to_agent("p", ListUpdate("reject", ["1.2.3.4"], []))
        assert push_id is not None
        await until(lambda: status(pool, push_id) is PushStatus.FAILED)
        result = pool.config_pusher.get_result(push_id)
        assert result is not None and result.reason == "Configuration rejected"
        target = pool.config_pusher.get_agent("p")
        assert target is not None and target.failed_pushes == 1


async def test_push_unanswered_is_retried_then_expired(push_agent: PushAgentProc) -> None:
    config = cfg(ack_timeout=10.0, retry_interval=0.1, max_retries=3)
    async with AgentPool(config) as pool:
        await pool.add_agent("p", push_agent.endpoint)
        baseline = len(await configs_seen(pool, "p"))
        push_id = pool.push_config_to_agent("p", ListUpdate("silent", ["x"], []))
        assert push_id is not None
        deadline = time.monotonic() + 5.0
        while status(pool, push_id) is PushStatus.SENT and time.monotonic() < deadline:
            await asyncio.sleep(0.12)
            await pool.run_maintenance_once()
        result = pool.config_pusher.get_result(push_id)
        assert result is not None and result.status is PushStatus.EXPIRED
        assert result.attempts == 3
        await until(lambda: not pool._pushes_in_flight)
        received = (await configs_seen(pool, "p"))[baseline:]
        assert [c["version"] for c in received] == [
            push_id
        ] * 3  # the first send and two retries reached the agent
        target = pool.config_pusher.get_agent("p")
        assert target is not None and target.failed_pushes == 1


async def test_push_expires_after_ack_timeout(push_agent: PushAgentProc) -> None:
    config = cfg(ack_timeout=0.3, retry_interval=0.1, max_retries=100)
    async with AgentPool(config) as pool:
        await pool.add_agent("p", push_agent.endpoint)
        push_id = pool.push_config_to_agent("p", ListUpdate("silent", ["y"], []))
        assert push_id is not None
        t0 = time.monotonic()
        while status(pool, push_id) is PushStatus.SENT and time.monotonic() - t0 < 5.0:
            await asyncio.sleep(0.05)
            await pool.run_maintenance_once()
        assert status(pool, push_id) is PushStatus.EXPIRED
        assert 0.3 <= time.monotonic() - t0 < 2.0


async def test_out_of_band_ack(push_agent: PushAgentProc) -> None:
    async with AgentPool(cfg(ack_timeout=5.0, retry_interval=1.0)) as pool:
        await pool.add_agent("p", push_agent.endpoint)
        push_id = pool.push_config_to_agent("p", ListUpdate("silent", ["z"], []))
        assert push_id is not None
        pool.acknowledge_config_push(push_id, True)
        assert status(pool, push_id) is PushStatus.ACKNOWLEDGED
        pool.acknowledge_config_push("push-unknown", True)  # no-op


async def test_only_push_capable_agents_get_pushes(
    push_agent: PushAgentProc, no_push_agent: PushAgentProc
) -> None:
    async with AgentPool(cfg()) as pool:
        await pool.add_agent("yes", push_agent.endpoint)
        await pool.add_agent("no", no_push_agent.endpoint)
        assert pool.push_config_to_agent("no", RequestReload()) is None
        assert pool.push_config_to_agent("ghost", RequestReload()) is None
        ids = pool.push_config_to_all(RequestReload())
        assert len(ids) == 1
        await until(lambda: status(pool, ids[0]) is PushStatus.ACKNOWLEDGED)
        assert [c["version"] for c in await configs_seen(pool, "no")] == []
        await pool.remove_agent("yes")
        assert pool.push_config_to_all(RequestReload()) == []


async def test_push_to_unreachable_agent_is_retried_on_reconnect() -> None:
    agent = PushAgentProc()
    try:
        config = AgentPoolConfig(
            connections_per_agent=1,
            reconnect_interval=0.0,
            health_check_interval=60.0,
            config_push=ConfigPusherConfig(ack_timeout=10.0, retry_interval=0.05, max_retries=50),
        )
        async with AgentPool(config) as pool:
            agent.start()
            agent.wait_ready()
            await pool.add_agent("p", agent.endpoint)
            agent.kill()
            await until(lambda: not pool.is_agent_healthy("p"))
            push_id = pool.push_config_to_agent("p", RequestReload())
            assert push_id is not None
            await asyncio.sleep(0.1)
            assert status(pool, push_id) is PushStatus.SENT
            await agent.arestart()
            deadline = time.monotonic() + 5.0
            while status(pool, push_id) is PushStatus.SENT and time.monotonic() < deadline:
                await pool.run_maintenance_once()
                await asyncio.sleep(0.06)
            assert status(pool, push_id) is PushStatus.ACKNOWLEDGED
    finally:
        agent.cleanup()
