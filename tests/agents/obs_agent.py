"""Agent process for the observability tests (run it as a script, tests start it).

``python tests/agents/obs_agent.py --socket PATH [--encoding json|msgpack] [--agent-id ID]`` serves
an agent whose behaviour is chosen per request by request headers:

* ``x-obs-metrics: <json>`` sends a MetricsReport built from the JSON
  (``{"counters": [...], "gauges": [...], "histograms": [...]}``, each metric as its dataclass
  fields; histogram buckets as ``[le, count]`` pairs, ``le`` may be ``"+Inf"``) before replying.
* ``x-obs-config: <json>`` sends a ConfigUpdateRequest (``{"type": "rule_update", ...}`` with
  the update's fields) to the proxy, waits for the proxy's ConfigUpdateResponse frame and puts
  ``{"request_id", "accepted", "error"}`` as JSON in ``routing_metadata["config"]``.
* ``x-obs-action`` (comma separated): ``pause``, ``resume``, ``health:<int>``,
  ``after:<seconds>:<action>`` (the same action later, on the same connection), ``configs``
  (the Configure events received so far, as JSON in ``routing_metadata["configs"]``).

``on_configure`` rejects a pushed ``list_update`` whose ``list_id`` is ``"reject"``.
Ready line on stdout: ``agentpool agent listening on <endpoint>`` (what tests/agents.py reads).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from typing import Any

from agentpool.agent import Agent, AgentServer, AgentSession, current_session
from agentpool.enums import FlowAction, HealthState
from agentpool.errors import AgentProtocolError
from agentpool.messages import (
    AgentResponse,
    ConfigError,
    ConfigUpdateType,
    CounterMetric,
    GaugeMetric,
    HistogramBucket,
    HistogramMetric,
    ListUpdate,
    MetricsReport,
    RequestHeadersEvent,
    RequestReload,
    RestartRequired,
    RuleDefinition,
    RuleUpdate,
)


def _le(value: Any) -> float:
    return math.inf if value == "+Inf" else float(value)


def build_report(agent_id: str, spec: dict[str, Any]) -> MetricsReport:
    """The MetricsReport described by ``spec`` (see the module docstring)."""
    return MetricsReport(
        agent_id=agent_id,
        timestamp_ms=1_700_000_000_000,
        interval_ms=10_000,
        counters=[CounterMetric(**c) for c in spec.get("counters", [])],
        gauges=[GaugeMetric(**g) for g in spec.get("gauges", [])],
        histograms=[
            HistogramMetric(
                name=h["name"],
                sum=h["sum"],
                count=h["count"],
                buckets=[HistogramBucket(_le(le), n) for le, n in h.get("buckets", [])],
                help=h.get("help"),
                labels=h.get("labels", {}),
            )
            for h in spec.get("histograms", [])
        ],
    )


def build_update(spec: dict[str, Any]) -> ConfigUpdateType:
    """The config update type described by ``spec`` (``type`` + the update's fields)."""
    fields = {k: v for k, v in spec.items() if k != "type"}
    kind = spec["type"]
    if kind == "request_reload":
        return RequestReload()
    if kind == "rule_update":
        fields["rules"] = [RuleDefinition(**r) for r in fields.get("rules", [])]
        return RuleUpdate(**fields)
    if kind == "list_update":
        return ListUpdate(**fields)
    if kind == "restart_required":
        return RestartRequired(**fields)
    if kind == "config_error":
        return ConfigError(**fields)
    raise ValueError(f"unknown update type {kind!r}")


class ObsAgent(Agent):
    """The observability test agent (see the module docstring)."""

    name = "agentpool observability test agent"

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.configs: list[Any] = []
        self._later: set[asyncio.Task[None]] = set()

    async def on_configure(self, config: Any, config_version: str | None) -> bool:
        self.configs.append({"config": config, "version": config_version})
        update = config.get("update_type", {}) if isinstance(config, dict) else {}
        return not (update.get("type") == "list_update" and update.get("list_id") == "reject")

    async def _act(self, session: AgentSession, action: str) -> None:
        if action == "pause":
            await session.send_flow_control(FlowAction.PAUSE)
        elif action == "resume":
            await session.send_flow_control(FlowAction.RESUME)
        elif action.startswith("health:"):
            await session.send_health(HealthState(int(action.split(":", 1)[1])), "obs test")
        elif action.startswith("after:"):
            _, delay, later = action.split(":", 2)
            task = asyncio.get_running_loop().create_task(self._after(session, float(delay), later))
            self._later.add(task)
            task.add_done_callback(self._later.discard)

    async def _after(self, session: AgentSession, delay: float, action: str) -> None:
        await asyncio.sleep(delay)
        if session.transport is not None:
            await self._act(session, action)

    async def on_request_headers(self, event: RequestHeadersEvent) -> AgentResponse:
        headers = event.headers
        meta = {"cid": event.metadata.correlation_id, "pid": str(os.getpid())}
        session = current_session.get()
        for spec in headers.get("x-obs-metrics", []):
            await session.send_metrics(build_report(self.agent_id, json.loads(spec)))
        for spec in headers.get("x-obs-config", []):
            try:
                resp = await session.request_config_update(
                    build_update(json.loads(spec)), timeout=5.0
                )
            except AgentProtocolError as exc:
                meta["config"] = json.dumps({"exception": str(exc)})
            else:
                meta["config"] = json.dumps(
                    {"request_id": resp.request_id, "accepted": resp.accepted, "error": resp.error}
                )
        for spec in headers.get("x-obs-action", []):
            for action in filter(None, (a.strip() for a in spec.split(","))):
                if action == "configs":
                    meta["configs"] = json.dumps(self.configs)
                else:
                    await self._act(session, action)
        return AgentResponse(routing_metadata=meta)


async def _serve(path: str, encoding: str, agent_id: str) -> None:
    encodings = ("json",) if encoding == "json" else ("msgpack", "json")
    server = AgentServer(ObsAgent(agent_id), path=path, encodings=encodings)
    await server.start()
    print(f"agentpool agent listening on {server.endpoint}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--encoding", choices=("json", "msgpack"), default="json")
    parser.add_argument("--agent-id", default="obs")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args.socket, args.encoding, args.agent_id))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
