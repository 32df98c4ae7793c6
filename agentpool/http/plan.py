"""The resolved per-route plan: each agent of a route with its rule merged and its
capabilities folded in, split by the events it takes.

Built once per route by :class:`~agentpool.http.Glue` (and rebuilt until every agent's
capabilities are known) so a request reads ready lists instead of merging rules each time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..enums import EventType
from ..pool import AgentPool
from .config import EVENT_NAMES, AgentRule, BodyMode, Failure, Route

_DEFAULT_MAX_BODY = 10 * 1024 * 1024


@dataclass(slots=True)
class _Agent:
    """An agent as one route uses it, with its capabilities folded in."""

    agent: str
    timeout: float | None
    failure: Failure
    retry_after: int | None
    request_body: BodyMode
    response_body: BodyMode
    max_body_size: int
    headers: bool
    response_headers: bool
    complete: bool
    websocket: bool
    body_capable: bool = False


@dataclass(slots=True)
class _Plan:
    route: str | None
    agents: list[_Agent]
    headers: list[_Agent]
    request_body: list[_Agent]
    response_headers: list[_Agent]
    response_body: list[_Agent]
    complete: list[_Agent]
    websocket: list[_Agent]
    max_request_body: int | None
    sequential: bool
    final: bool


def _plan(
    pool: AgentPool, route: Route | None, rules: Sequence[AgentRule], base: Mapping[str, AgentRule]
) -> _Plan:
    agents: list[_Agent] = []
    final = True
    route_defaults = route._defaults if route is not None else AgentRule("*")
    for given in rules:
        rule = given.merged(route_defaults).merged(base.get(given.agent, AgentRule(given.agent)))
        caps = pool.agent_capabilities_sync(rule.agent)
        final = final and caps is not None
        supported = set(caps.supported_events) if caps is not None else {EventType.REQUEST_HEADERS}
        if rule.events is not None:
            supported &= {EVENT_NAMES[e] for e in rule.events}
        limit = rule.max_body_size if rule.max_body_size is not None else _DEFAULT_MAX_BODY
        if caps is not None:
            limit = min(limit, caps.limits.max_body_size)
        agents.append(
            _Agent(
                agent=rule.agent,
                timeout=rule.timeout,
                failure=rule.failure if rule.failure is not None else "closed",
                retry_after=rule.retry_after,
                request_body=(rule.request_body or "none")
                if EventType.REQUEST_BODY_CHUNK in supported
                else "none",
                response_body=(rule.response_body or "none")
                if EventType.RESPONSE_BODY_CHUNK in supported
                else "none",
                max_body_size=limit,
                headers=EventType.REQUEST_HEADERS in supported,
                response_headers=EventType.RESPONSE_HEADERS in supported,
                complete=EventType.REQUEST_COMPLETE in supported,
                websocket=EventType.WEBSOCKET_FRAME in supported,
                body_capable=EventType.REQUEST_BODY_CHUNK in supported,
            )
        )
    req_body = [a for a in agents if a.request_body != "none"]
    limits = [a.max_body_size for a in req_body]
    if route is not None and route.max_body_size is not None:
        limits.append(route.max_body_size)
    return _Plan(
        route=route.name if route is not None else None,
        agents=agents,
        headers=[a for a in agents if a.headers],
        request_body=req_body,
        response_headers=[a for a in agents if a.response_headers],
        response_body=[a for a in agents if a.response_body != "none"],
        complete=[a for a in agents if a.complete],
        websocket=[a for a in agents if a.websocket],
        max_request_body=min(limits) if limits else None,
        sequential=route.sequential if route is not None else False,
        final=final,
    )
