"""Configuration: the routes and per-agent rules, and the config mapping that builds them.

Pure data with its validation (no pool, no I/O), so a config can be checked and a route
matched without starting anything; :mod:`agentpool.http.plan` resolves it against the pool.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import translate
from typing import Any, Literal, TypeAlias

from ..config import AgentPoolConfig
from ..enums import EventType
from .guard import HeaderGuard

__all__ = [
    "EVENT_NAMES",
    "AgentRule",
    "BodyMode",
    "Failure",
    "Route",
    "load_config",
]

Failure: TypeAlias = Literal["open", "closed"] | int
"""What an agent failure does: ``"open"`` skips the agent, ``"closed"`` answers 503, an int
answers that status (with ``Retry-After`` when the rule sets ``retry_after``)."""

BodyMode: TypeAlias = Literal["none", "stream", "buffer"]

EVENT_NAMES: dict[str, EventType] = {
    "request_headers": EventType.REQUEST_HEADERS,
    "request_body": EventType.REQUEST_BODY_CHUNK,
    "response_headers": EventType.RESPONSE_HEADERS,
    "response_body": EventType.RESPONSE_BODY_CHUNK,
    "request_complete": EventType.REQUEST_COMPLETE,
    "websocket": EventType.WEBSOCKET_FRAME,
}
"""Names of the events a rule may restrict an agent to (``AgentRule.events``)."""

_BODY_MODES = ("none", "stream", "buffer")


def _check_failure(value: object, where: str) -> None:
    if value in ("open", "closed"):
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise ValueError(
            f"{where}: failure must be 'open', 'closed' or an HTTP status, got {value!r}"
        )


@dataclass(slots=True, frozen=True)
class AgentRule:
    """How one agent takes part in a route; ``None`` fields inherit (route, then agent defaults).

    ``timeout`` bounds each event (seconds; None: the pool's ``request_timeout``).
    ``failure`` decides what a timeout, an unreachable agent or an open breaker does.
    ``request_body`` / ``response_body``: ``none``, ``stream`` (chunk by chunk, each chunk
    held until its verdict) or ``buffer`` (the whole body as one chunk, up to
    ``max_body_size``). ``events`` restricts the events sent (names in :data:`EVENT_NAMES`);
    the agent's handshake capabilities always restrict them too.
    """

    agent: str
    timeout: float | None = None
    failure: Failure | None = None
    retry_after: int | None = None
    request_body: BodyMode | None = None
    response_body: BodyMode | None = None
    max_body_size: int | None = None
    events: frozenset[str] | None = None

    def __post_init__(self) -> None:
        where = f"agent {self.agent!r}"
        if not isinstance(self.agent, str) or not self.agent:
            raise ValueError(f"agent name must be a non-empty string, got {self.agent!r}")
        if self.timeout is not None and (
            isinstance(self.timeout, bool)
            or not isinstance(self.timeout, (int, float))
            or not 0 < self.timeout < float("inf")
        ):
            raise ValueError(f"{where}: timeout must be a positive number, got {self.timeout!r}")
        if self.failure is not None:
            _check_failure(self.failure, where)
        for name in ("request_body", "response_body"):
            mode = getattr(self, name)
            if mode is not None and mode not in _BODY_MODES:
                raise ValueError(f"{where}: {name} must be one of {_BODY_MODES}, got {mode!r}")
        if self.max_body_size is not None and (
            isinstance(self.max_body_size, bool)
            or not isinstance(self.max_body_size, int)
            or self.max_body_size < 0
        ):
            raise ValueError(f"{where}: max_body_size must be an integer >= 0")
        if self.events is not None:
            events = frozenset(self.events)
            unknown = events - EVENT_NAMES.keys()
            if unknown:
                raise ValueError(
                    f"{where}: unknown events {sorted(unknown)}; use {sorted(EVENT_NAMES)}"
                )
            object.__setattr__(self, "events", events)

    def merged(self, base: AgentRule) -> AgentRule:
        """This rule with its unset fields taken from ``base``."""
        return AgentRule(
            self.agent,
            *(
                getattr(self, f) if getattr(self, f) is not None else getattr(base, f)
                for f in (
                    "timeout",
                    "failure",
                    "retry_after",
                    "request_body",
                    "response_body",
                    "max_body_size",
                    "events",
                )
            ),
        )


@dataclass(slots=True)
class Route:
    """Requests matching ``path`` (and ``methods``, ``hosts``) go to ``agents``, in order.

    Patterns are shell globs (``/api/*``, ``*.example.com``); an empty ``methods`` or
    ``hosts`` matches any. The route's ``timeout``/``failure``/body settings apply to each of
    its agents unless an :class:`AgentRule` in ``agents`` sets its own. ``sequential=True``
    sends request headers agent after agent (each sees the previous edits); otherwise
    independent agents are asked at once and their replies applied in route order.
    ``max_body_size`` bounds the request body even when no agent reads it (413 when over).
    """

    path: str = "*"
    agents: Sequence[str | AgentRule] = ()
    methods: Iterable[str] = ()
    hosts: Iterable[str] = ()
    timeout: float | None = None
    failure: Failure | None = None
    retry_after: int | None = None
    request_body: BodyMode | None = None
    response_body: BodyMode | None = None
    max_body_size: int | None = None
    sequential: bool = False
    name: str | None = None
    _path_re: re.Pattern[str] = field(init=False, repr=False)
    _host_re: re.Pattern[str] | None = field(init=False, repr=False)
    _methods: frozenset[str] = field(init=False, repr=False)
    _defaults: AgentRule = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._path_re = re.compile(translate(self.path))
        hosts = [h.lower() for h in self.hosts]
        self._host_re = re.compile("|".join(translate(h) for h in hosts)) if hosts else None
        self._methods = frozenset(m.upper() for m in self.methods)
        self._defaults = AgentRule(
            "*",
            self.timeout,
            self.failure,
            self.retry_after,
            self.request_body,
            self.response_body,
            self.max_body_size,
        )
        self.agents = [a if isinstance(a, AgentRule) else AgentRule(a) for a in self.agents]
        if self.name is None:
            self.name = self.path

    def matches(self, method: str, host: str, path: str) -> bool:
        if self._methods and method not in self._methods:
            return False
        if self._host_re is not None and not self._host_re.match(host.split(":", 1)[0].lower()):
            return False
        return self._path_re.match(path) is not None


def _parse_agents(
    agents: Mapping[str, str | Mapping[str, Any]],
) -> tuple[dict[str, str], dict[str, AgentRule]]:
    endpoints: dict[str, str] = {}
    rules: dict[str, AgentRule] = {}
    for name, spec in agents.items():
        if isinstance(spec, str):
            endpoints[name] = spec
            rules[name] = AgentRule(name)
            continue
        spec = dict(spec)
        try:
            endpoints[name] = str(spec.pop("endpoint"))
        except KeyError:
            raise ValueError(f"agent {name!r}: missing 'endpoint'") from None
        rules[name] = _rule_from_mapping(name, spec)
    return endpoints, rules


def _rule_from_mapping(name: str, spec: Mapping[str, Any]) -> AgentRule:
    spec = dict(spec)
    if "events" in spec and spec["events"] is not None:
        spec["events"] = frozenset(spec["events"])
    try:
        return AgentRule(name, **spec)
    except TypeError as exc:
        raise ValueError(f"agent {name!r}: {exc}") from None


def _route_from_mapping(spec: Mapping[str, Any]) -> Route:
    spec = dict(spec)
    agents: list[str | AgentRule] = []
    for item in spec.pop("agents", ()):
        if isinstance(item, str):
            agents.append(item)
        else:
            item = dict(item)
            try:
                agent = item.pop("agent")
            except KeyError:
                raise ValueError(
                    f"route {spec.get('path')!r}: agent entry without 'agent'"
                ) from None
            agents.append(_rule_from_mapping(agent, item))
    try:
        return Route(agents=agents, **spec)
    except TypeError as exc:
        raise ValueError(f"route {spec.get('path')!r}: {exc}") from None


def load_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a config mapping (the proxy's JSON file) into :class:`Glue` keyword arguments.

    Keys: ``agents`` (name → endpoint string or ``{"endpoint": ..., <AgentRule fields>}``),
    ``routes`` (list of ``{"path", "methods", "hosts", "agents": [name or {"agent": name,
    ...}], <Route fields>}``), ``guard`` (``{"allow": [...], "deny": [...]}``),
    ``request_id_header``, ``pool`` (:class:`~agentpool.AgentPoolConfig` fields).
    """
    known = {"agents", "routes", "guard", "request_id_header", "pool", "upstream", "listen"}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(known)}")
    out: dict[str, Any] = {"agents": dict(data.get("agents", {}))}
    if "routes" in data:
        out["routes"] = [_route_from_mapping(r) for r in data["routes"]]
    if "guard" in data:
        out["guard"] = HeaderGuard(**data["guard"])
    if "request_id_header" in data:
        out["request_id_header"] = data["request_id_header"]
    if "pool" in data:
        out["config"] = AgentPoolConfig(**data["pool"])
    return out
