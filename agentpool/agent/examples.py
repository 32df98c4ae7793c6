"""Example agents for ``python -m agentpool agent --example NAME``.

* ``waf``: Block 403 for URI paths starting with ``/admin``; Redirect 301 ``/old/X`` to
  ``/new/X``; otherwise Allow and set request header ``x-agentpool-checked: 1``.
* ``echo``: Allow and add an ``x-echo-<name>`` request header for every request header value.
* ``bench``: replies Allow carrying the correlation id straight from the raw payload (no event
  decoding), for round-trip benchmarks.
* ``control``: a test agent driven by request headers (``x-test-delay``, ``x-test-action``),
  see :class:`ControlAgent`.

Every example honours ``delay`` (seconds to wait before answering a request-headers event).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import orjson

from .. import codec as _codec
from ..enums import CancelReason, FlowAction, HealthState
from ..messages import (
    AgentResponse,
    AuditMetadata,
    Block,
    CounterMetric,
    GaugeMetric,
    HeaderOp,
    MetricsReport,
    RequestHeadersEvent,
    RequestReload,
)
from .base import Agent
from .session import current_session

__all__ = ["EXAMPLES", "BenchAgent", "ControlAgent", "EchoAgent", "WafAgent", "make_agent"]


class _Example(Agent):
    def __init__(self, *, delay: float = 0.0, agent_id: str | None = None) -> None:
        self.delay = delay
        if agent_id:
            self.agent_id = agent_id

    async def _pause(self) -> None:
        if self.delay > 0:
            await asyncio.sleep(self.delay)


class WafAgent(_Example):
    """Blocks ``/admin*`` with 403, redirects ``/old/*`` to ``/new/*``, marks the rest checked."""

    agent_id = "waf"
    name = "agentpool example WAF"

    async def on_request_headers(self, event: RequestHeadersEvent) -> AgentResponse:
        await self._pause()
        path = event.uri.split("?", 1)[0]
        if path.startswith("/admin"):
            return AgentResponse(
                decision=Block(status=403, body="Forbidden"),
                audit=AuditMetadata(tags=["waf"], rule_ids=["admin-path"]),
            )
        if path.startswith("/old/"):
            return AgentResponse.redirect("/new/" + event.uri[5:], 301)
        return AgentResponse(request_headers=[HeaderOp.set("x-agentpool-checked", "1")])


class EchoAgent(_Example):
    """Allows everything and echoes each request header as ``x-echo-<name>``."""

    agent_id = "echo"
    name = "agentpool example echo"

    async def on_request_headers(self, event: RequestHeadersEvent) -> AgentResponse:
        await self._pause()
        ops = [
            HeaderOp.add(f"x-echo-{name.lstrip(':')}", value)
            for name, values in event.headers.items()
            for value in values
        ]
        return AgentResponse(request_headers=ops)


class BenchAgent(_Example):
    """Fastest possible reply: Allow with the correlation id, no event decoding."""

    agent_id = "bench"
    name = "agentpool benchmark agent"
    _PREFIX = b'{"correlation_id":"'

    def __init__(self, *, delay: float = 0.0, agent_id: str | None = None) -> None:
        super().__init__(delay=delay, agent_id=agent_id)
        marker = "\x01cid\x01"
        template = _codec.get_codec("json").encode_response(AgentResponse.allow(), marker)
        escaped = orjson.dumps(marker)[1:-1]
        self._head, _, self._tail = template.partition(escaped)

    def fast_path(self, msg_type: int, payload: bytes, codec: _codec.Codec) -> bytes | None:
        if self.delay > 0:
            return None
        if codec.name == "json":
            if payload.startswith(self._PREFIX):
                end = payload.find(b'"', 19)
                if end > 0 and b"\\" not in payload[19:end]:
                    return self._head + payload[19:end] + self._tail
            cid = codec.event_correlation_id(payload)
            return self._head + orjson.dumps(cid)[1:-1] + self._tail
        return codec.encode_response(AgentResponse.allow(), codec.event_correlation_id(payload))


class ControlAgent(_Example):
    """Test agent whose behaviour is chosen per request by headers.

    ``x-test-delay: <seconds>`` waits before answering. ``x-test-action`` (comma-separated):
    ``pause`` / ``resume`` (send flow control), ``health:<int>`` (send a health status),
    ``metrics`` (send a metrics report), ``config-update`` (ask the proxy for a reload and put
    its answer in ``routing_metadata["config_update"]``), ``no-reply`` (never answer),
    ``close`` (close the connection without answering), ``exit`` (kill the process),
    ``garbage`` (send bytes that are not a frame), ``unknown-type`` (a frame with type 0x7f),
    ``oversize`` (a frame header announcing 2 GiB),
    ``cancelled`` (answer with the cancels seen so far in ``routing_metadata["cancelled"]``).
    Replies carry ``routing_metadata["cid"]`` and ``routing_metadata["pid"]``.
    """

    agent_id = "control"
    name = "agentpool test control agent"

    def __init__(self, *, delay: float = 0.0, agent_id: str | None = None) -> None:
        super().__init__(delay=delay, agent_id=agent_id)
        self.cancelled: list[str] = []
        self.configs: list[Any] = []

    async def on_cancel(self, correlation_id: str, reason: CancelReason) -> None:
        self.cancelled.append(f"{correlation_id}:{int(reason)}")

    async def on_configure(self, config: Any, config_version: str | None) -> bool:
        self.configs.append(config)
        return not (isinstance(config, dict) and config.get("reject"))

    async def on_request_headers(self, event: RequestHeadersEvent) -> AgentResponse:
        headers = event.headers
        await self._pause()
        delay = headers.get("x-test-delay")
        if delay:
            await asyncio.sleep(float(delay[0]))
        meta = {"cid": event.metadata.correlation_id, "pid": str(os.getpid())}
        session = current_session.get(None)
        for spec in headers.get("x-test-action", []):
            for action in filter(None, (a.strip() for a in spec.split(","))):
                if action == "no-reply":
                    await asyncio.Event().wait()
                elif action == "exit":
                    os._exit(3)
                elif session is None:
                    continue
                elif action == "pause":
                    await session.send_flow_control(FlowAction.PAUSE)
                elif action == "resume":
                    await session.send_flow_control(FlowAction.RESUME)
                elif action.startswith("health:"):
                    await session.send_health(HealthState(int(action.split(":", 1)[1])), "test")
                elif action == "metrics":
                    await session.send_metrics(
                        MetricsReport(
                            agent_id=self.agent_id,
                            timestamp_ms=1,
                            interval_ms=1000,
                            counters=[CounterMetric(name="agent_requests_total", value=7)],
                            gauges=[GaugeMetric(name="agent_in_flight_requests", value=2.0)],
                        )
                    )
                elif action == "config-update":
                    resp = await session.request_config_update(RequestReload(), timeout=5.0)
                    meta["config_update"] = f"{resp.request_id}:{resp.accepted}:{resp.error}"
                elif action == "close":
                    session.close()
                    await asyncio.Event().wait()
                elif action == "garbage":
                    session.write_raw(b"\x00\x00\x00\x00garbage")
                elif action == "unknown-type":
                    session.write_raw(b"\x00\x00\x00\x03\x7f{}")
                elif action == "oversize":
                    session.write_raw(b"\x7f\xff\xff\xff\x20")
                elif action == "cancelled":
                    meta["cancelled"] = ",".join(self.cancelled)
        return AgentResponse(routing_metadata=meta)


EXAMPLES: dict[str, type[_Example]] = {
    "waf": WafAgent,
    "echo": EchoAgent,
    "bench": BenchAgent,
    "control": ControlAgent,
}


def make_agent(name: str, *, delay: float = 0.0, agent_id: str | None = None) -> Agent:
    """Instantiate the example agent called ``name``."""
    try:
        cls = EXAMPLES[name]
    except KeyError:
        raise ValueError(
            f"unknown example agent {name!r}; choose from {sorted(EXAMPLES)}"
        ) from None
    return cls(delay=delay, agent_id=agent_id)
