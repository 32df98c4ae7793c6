"""Agents in front of HTTP servers: routes, failure policy, header guard, per-request exchange.

This is the framework-neutral layer shared by :mod:`agentpool.asgi`, :mod:`agentpool.aiohttp`
and ``python -m agentpool proxy``: it turns a request into events, sends them to the agents a
route names (independent agents in one fan-out), and turns the replies into what the server
does next — a :class:`Reply` to send at once, header edits passed through the
:class:`HeaderGuard`, body chunks to forward (possibly mutated), or a WebSocket decision.
See docs/integrations.md for the behaviour in full.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import translate
from typing import Any, Literal, TypeAlias

import orjson

from ..config import AgentPoolConfig
from ..enums import EventType
from ..errors import AgentProtocolError
from ..messages import (
    AgentResponse,
    Allow,
    Block,
    BodyMutation,
    Challenge,
    HeaderOp,
    Redirect,
    RequestBodyChunkEvent,
    RequestCompleteEvent,
    RequestHeadersEvent,
    RequestMetadata,
    ResponseBodyChunkEvent,
    ResponseHeadersEvent,
    WebSocketClose,
    WebSocketFrameEvent,
)
from ..pool import AgentPool

__all__ = [
    "EVENT_NAMES",
    "HOP_BY_HOP",
    "NEVER_MUTABLE",
    "AgentRule",
    "BodyMode",
    "Exchange",
    "Failure",
    "Glue",
    "HeaderGuard",
    "Headers",
    "Reply",
    "Route",
    "Stop",
    "apply_header_ops",
    "decision_reply",
    "load_config",
]

log = logging.getLogger("agentpool.http")

Headers: TypeAlias = list[tuple[str, str]]
"""Header list with lower-case names, in order, repeated names kept."""

Failure: TypeAlias = Literal["open", "closed"] | int
"""What an agent failure does: ``"open"`` skips the agent, ``"closed"`` answers 503, an int
answers that status (with ``Retry-After`` when the rule sets ``retry_after``)."""

BodyMode: TypeAlias = Literal["none", "stream", "buffer"]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
"""Hop-by-hop headers (RFC 9110 §7.6.1): a proxy never forwards them."""

NEVER_MUTABLE = HOP_BY_HOP | {"host", ":authority", "content-length"}
"""Headers no agent may change, whatever the guard allows."""

EVENT_NAMES: dict[str, EventType] = {
    "request_headers": EventType.REQUEST_HEADERS,
    "request_body": EventType.REQUEST_BODY_CHUNK,
    "response_headers": EventType.RESPONSE_HEADERS,
    "response_body": EventType.RESPONSE_BODY_CHUNK,
    "request_complete": EventType.REQUEST_COMPLETE,
    "websocket": EventType.WEBSOCKET_FRAME,
}
"""Names of the events a rule may restrict an agent to (``AgentRule.events``)."""

_BAD_VALUE = re.compile(r"[\r\n\0]")
_HAS_TIMEOUT = hasattr(asyncio, "timeout")
_BODY_MODES = ("none", "stream", "buffer")
_DEFAULT_MAX_BODY = 10 * 1024 * 1024
_CLOSED_BODY = b"Service unavailable"
_NO_NAMES: frozenset[str] = frozenset()
_monotonic = time.monotonic


_stamp_sec = -1
_stamp_prefix = ""


def _timestamp() -> str:
    """RFC 3339 UTC with nanoseconds, like :func:`~agentpool.messages.rfc3339_now`, cheaper."""
    global _stamp_sec, _stamp_prefix
    ns = time.time_ns()
    secs = ns // 1_000_000_000
    if secs != _stamp_sec:
        _stamp_sec = secs
        _stamp_prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(secs))
    # the nanoseconds zero-padded to 9 digits: 1e9 added, its leading "1" cut
    return _stamp_prefix + str(ns - secs * 1_000_000_000 + 1_000_000_000)[1:] + "+00:00"


# --------------------------------------------------------------------------------------------
# configuration


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


@dataclass(slots=True)
class HeaderGuard:
    """Which header edits an agent may make.

    :data:`NEVER_MUTABLE` (Host, hop-by-hop headers, Content-Length, Transfer-Encoding) and
    headers named by the request's ``Connection`` header are always refused; ``deny`` adds
    names; a non-empty ``allow`` refuses everything it does not list. Names match
    case-insensitively; a trailing ``*`` matches a prefix (``x-agent-*``).
    """

    allow: Iterable[str] = ()
    deny: Iterable[str] = ()
    _allow: tuple[frozenset[str], tuple[str, ...]] = field(init=False, repr=False)
    _deny: tuple[frozenset[str], tuple[str, ...]] = field(init=False, repr=False)

    @staticmethod
    def _split(names: Iterable[str]) -> tuple[frozenset[str], tuple[str, ...]]:
        names = [n.lower() for n in names]
        return (
            frozenset(n for n in names if not n.endswith("*")),
            tuple(n[:-1] for n in names if n.endswith("*")),
        )

    def __post_init__(self) -> None:
        self._allow = self._split(self.allow)
        self._deny = self._split(self.deny)

    def permits(self, name: str, connection_tokens: frozenset[str] = frozenset()) -> bool:
        """Whether an agent may change header ``name`` (lower-case)."""
        if name in NEVER_MUTABLE or name in connection_tokens:
            return False
        exact, prefixes = self._deny
        if name in exact or name.startswith(prefixes):
            return False
        exact, prefixes = self._allow
        if exact or prefixes:
            return name in exact or name.startswith(prefixes)
        return True


@dataclass(slots=True)
class Reply:
    """A response the integration sends instead of (or in place of) the application's."""

    status: int
    headers: Headers = field(default_factory=list)
    body: bytes = b""


class Stop(Exception):
    """Raised by an :class:`Exchange` when ``reply`` replaces the application's response."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply


def apply_header_ops(
    headers: Headers,
    ops: Iterable[HeaderOp],
    guard: HeaderGuard,
    where: str,
    connection_tokens: frozenset[str] = frozenset(),
) -> int:
    """Apply ``ops`` to ``headers`` in place through ``guard``; returns how many were refused."""
    refused = 0
    for op in ops:
        name = op.name.lower()
        if not guard.permits(name, connection_tokens):
            refused += 1
            log.warning("refused %s of header %r by an agent (%s)", op.op, name, where)
            continue
        if op.op == "remove":
            headers[:] = [h for h in headers if h[0] != name]
            continue
        value = op.value or ""
        if "\r" in value or "\n" in value or "\0" in value:
            refused += 1
            log.warning("refused header %r with a control character (%s)", name, where)
            continue
        if op.op == "set":
            headers[:] = [h for h in headers if h[0] != name]
        headers.append((name, value))
    return refused


def decision_reply(response: AgentResponse) -> Reply | None:
    """The reply a non-Allow decision stands for (None for Allow).

    A Block's own headers never include framing or hop-by-hop headers (:data:`NEVER_MUTABLE`)
    nor values with CR/LF/NUL; those are dropped. Challenge mapping:

    with a ``url`` param: 302 to it plus ``x-agentpool-challenge: <type>``; otherwise 401
    with ``WWW-Authenticate: <type> k="v", ...`` (params sorted); the body is JSON
    ``{"challenge_type": ..., "params": {...}}`` in both cases.
    """
    decision = response.decision
    if isinstance(decision, Allow):
        return None
    if isinstance(decision, Block):
        headers = [
            (k.lower(), v)
            for k, v in (decision.headers or {}).items()
            if k.lower() not in NEVER_MUTABLE and not _BAD_VALUE.search(k + v)
        ]
        body = (decision.body or "").encode()
        if body and not any(k == "content-type" for k, _ in headers):
            headers.append(("content-type", "text/plain; charset=utf-8"))
        return Reply(decision.status, headers, body)
    if isinstance(decision, Redirect):
        if _BAD_VALUE.search(decision.url) or not 300 <= decision.status <= 399:
            log.warning("agent sent an invalid redirect (%d %r)", decision.status, decision.url)
            return Reply(502, [("content-type", "text/plain; charset=utf-8")], b"Bad gateway")
        return Reply(decision.status, [("location", decision.url)])
    if isinstance(decision, Challenge):
        params = decision.params
        body = orjson.dumps({"challenge_type": decision.challenge_type, "params": params})
        headers = [("content-type", "application/json")]
        kind = decision.challenge_type
        url = params.get("url")
        if url:
            headers += [("location", url), ("x-agentpool-challenge", kind)]
            status = 302
        else:
            auth = ", ".join(f'{k}="{v}"' for k, v in sorted(params.items()) if '"' not in k + v)
            headers.append(("www-authenticate", f"{kind} {auth}".strip()))
            status = 401
        return Reply(status, [(k, v) for k, v in headers if not _BAD_VALUE.search(v)], body)
    raise AgentProtocolError(f"unknown decision {decision!r}")


def _mutated(data: bytes, mutation: BodyMutation | None) -> bytes | None:
    """The chunk after a body mutation (None: pass through); ``data`` is base64."""
    if mutation is None or mutation.data is None:
        return None
    if mutation.data == "":
        return b""
    try:
        return base64.b64decode(mutation.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AgentProtocolError(
            f"body mutation data for chunk {mutation.chunk_index} is not base64: {exc}"
        ) from None


# --------------------------------------------------------------------------------------------
# resolved per-route plan


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


# --------------------------------------------------------------------------------------------
# the glue object: pool, routes, guard


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


class Glue:
    """A pool, its agents, the routes and the guard; makes one :class:`Exchange` per request.

    ``agents`` maps agent names to endpoints (``unix:/path``, ``/path``, ``host:port``) or to
    ``{"endpoint": ..., <AgentRule fields>}`` (that agent's defaults on every route).
    Without ``routes`` every request goes to every agent, in ``agents`` order.
    """

    def __init__(
        self,
        agents: Mapping[str, str | Mapping[str, Any]],
        routes: Sequence[Route] | None = None,
        *,
        guard: HeaderGuard | None = None,
        request_id_header: str | None = "x-request-id",
        config: AgentPoolConfig | None = None,
        pool: AgentPool | None = None,
    ) -> None:
        self.endpoints, self.rules = _parse_agents(agents)
        self.routes = list(routes) if routes is not None else None
        if self.routes is not None:
            for route in self.routes:
                for rule in route.agents:
                    assert isinstance(rule, AgentRule)
                    if rule.agent not in self.endpoints:
                        raise ValueError(f"route {route.path!r} names unknown agent {rule.agent!r}")
        self.guard = guard or HeaderGuard()
        self.request_id_header = request_id_header.lower() if request_id_header else None
        self._own_pool = pool is None
        self.pool = pool if pool is not None else AgentPool(config)
        self._plans: dict[int, _Plan] = {}
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._prefix = f"{os.getpid():x}-{os.urandom(4).hex()}-"
        self._counter = itertools.count(1)
        self.refused_header_ops = 0

    # -- lifecycle

    @property
    def started(self) -> bool:
        return self._started

    async def start(self) -> None:
        """Open the pool and add every agent (idempotent; concurrent callers wait)."""
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            if self._own_pool:
                await self.pool.start()
            for name, endpoint in self.endpoints.items():
                if name not in self.pool.agent_ids():
                    await self.pool.add_agent(name, endpoint)
            self._plans.clear()
            self._started = True

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Let pending RequestComplete sends finish (bounded), then drain and close the pool."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        if self._own_pool:
            await self.pool.shutdown()
        self._started = False

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background; :meth:`shutdown` waits for it."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- routing

    def plan(self, method: str, host: str, path: str) -> _Plan | None:
        """The resolved agents for a request, or None when no route matches.

        Plans are cached once every agent's capabilities are known (an agent unreachable at
        start gets request headers only until it has connected).
        """
        if self.routes is None:
            plan = self._plans.get(-1)
            if plan is None or not plan.final:
                plan = self._plans[-1] = _plan(
                    self.pool, None, list(self.rules.values()), self.rules
                )
            return plan
        for i, route in enumerate(self.routes):
            if route.matches(method, host, path):
                plan = self._plans.get(i)
                if plan is None or not plan.final:
                    rules = [r for r in route.agents if isinstance(r, AgentRule)]
                    plan = self._plans[i] = _plan(self.pool, route, rules, self.rules)
                return plan
        return None

    def correlation_id(self) -> str:
        """A new correlation id: process id, a random per-Glue part and a counter.

        Never the client's request id (that one goes to the agents as ``request_id``): the
        pool refuses an id still owed a reply on a connection — an abandoned request leaves
        one — so a client choosing ids could make requests fail, or collide with others.
        """
        return self._prefix + str(next(self._counter))

    def exchange(
        self,
        plan: _Plan,
        *,
        method: str,
        uri: str,
        headers: Headers,
        client_ip: str = "",
        client_port: int = 0,
        server_name: str | None = None,
        protocol: str = "HTTP/1.1",
        tls_version: str | None = None,
        tls_cipher: str | None = None,
    ) -> Exchange:
        """A new :class:`Exchange` for one request routed by ``plan``."""
        return Exchange(
            self,
            plan,
            method,
            uri,
            headers,
            client_ip,
            client_port,
            server_name,
            protocol,
            tls_version,
            tls_cipher,
        )


# --------------------------------------------------------------------------------------------
# one request


async def _timed(coro: Awaitable[AgentResponse], timeout: float | None) -> AgentResponse:
    if timeout is None:
        return await coro
    if _HAS_TIMEOUT:
        async with asyncio.timeout(timeout):
            return await coro
    return await asyncio.wait_for(coro, timeout)  # pragma: no cover - Python 3.10


def _failure_reply(agent: _Agent) -> Reply | None:
    policy = agent.failure
    if policy == "open":
        return None
    if policy == "closed":
        return Reply(503, [("content-type", "text/plain; charset=utf-8")], _CLOSED_BODY)
    headers = [("content-type", "text/plain; charset=utf-8")]
    if agent.retry_after is not None:
        headers.append(("retry-after", str(agent.retry_after)))
    return Reply(int(policy), headers, _CLOSED_BODY)


class _BodyStage:
    """One agent's view of a body: chunk by chunk (held until a final verdict) or buffered."""

    __slots__ = ("agent", "buffer", "disabled", "held", "index", "seen")

    def __init__(self, agent: _Agent) -> None:
        self.agent = agent
        self.index = 0
        self.seen = 0
        self.held: list[list[Any]] = []
        self.buffer: list[bytes] = []
        self.disabled = False


class Exchange:
    """The agents' side of one HTTP request (or WebSocket connection)."""

    __slots__ = (
        "_connection_tokens",
        "_event",
        "_lock",
        "_req_stages",
        "_resp_stages",
        "_ws_index",
        "client_ip",
        "complete_sent",
        "correlation_id",
        "edited",
        "glue",
        "headers",
        "method",
        "plan",
        "pool",
        "request_bytes",
        "response_bytes",
        "response_ops",
        "routing_metadata",
        "skipped",
        "started",
        "status",
        "uri",
    )

    def __init__(
        self,
        glue: Glue,
        plan: _Plan,
        method: str,
        uri: str,
        headers: Headers,
        client_ip: str,
        client_port: int,
        server_name: str | None,
        protocol: str,
        tls_version: str | None,
        tls_cipher: str | None,
    ) -> None:
        self.glue = glue
        self.pool = glue.pool
        self.plan = plan
        self.method = method
        self.uri = uri
        self.headers = headers
        self.client_ip = client_ip
        self.started = _monotonic()
        hdrs: dict[str, list[str]] = {}
        for name, value in headers:
            values = hdrs.get(name)
            if values is None:
                hdrs[name] = [value]
            else:
                values.append(value)
        rid_name = glue.request_id_header
        found = hdrs.get(rid_name) if rid_name is not None else None
        cid = glue.correlation_id()
        request_id = found[-1] if found else cid
        found = hdrs.get("traceparent")
        traceparent = found[-1] if found else None
        self.correlation_id = cid
        found = hdrs.get("connection")
        self._connection_tokens = (
            frozenset(t.strip().lower() for v in found for t in v.split(","))
            if found
            else _NO_NAMES
        )
        self._event = RequestHeadersEvent(
            RequestMetadata(
                cid,
                request_id,
                client_ip,
                client_port,
                server_name,
                protocol,
                tls_version,
                tls_cipher,
                plan.route,
                None,
                _timestamp(),
                traceparent,
            ),
            method,
            uri,
            hdrs,
        )
        self.skipped: frozenset[str] = _NO_NAMES
        self.response_ops: list[HeaderOp] = []
        self.routing_metadata: dict[str, str] = {}
        self.status = 0
        self.request_bytes = 0
        self.response_bytes = 0
        self.complete_sent = False
        self.edited = False
        self._req_stages = [_BodyStage(a) for a in plan.request_body] if plan.request_body else []
        self._resp_stages = (
            [_BodyStage(a) for a in plan.response_body] if plan.response_body else []
        )
        self._ws_index = 0
        self._lock: asyncio.Lock | None = None

    # -- request headers

    async def _ask(
        self, agent: _Agent, coro: Awaitable[AgentResponse]
    ) -> AgentResponse | Reply | None:
        """Await one agent call: its response, a failure Reply, or None (fail open: skip)."""
        try:
            if agent.timeout is None:
                return await coro
            return await _timed(coro, agent.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._failed(agent, exc)

    def _failed(self, agent: _Agent, exc: Exception) -> Reply | None:
        """Log an agent failure, skip the agent from now on; its policy's Reply or None."""
        if isinstance(exc, (AgentProtocolError, TimeoutError, OSError)):
            log.warning(
                "agent %r failed for %s (%s): %s",
                agent.agent,
                self.correlation_id,
                type(exc).__name__,
                exc,
            )
        else:
            log.error("agent %r call failed for %s", agent.agent, self.correlation_id, exc_info=exc)
        self.skipped = self.skipped | {agent.agent}
        return _failure_reply(agent)

    def _absorb(
        self, agent: _Agent, result: AgentResponse | Reply | None, request_ops: bool
    ) -> Reply | None:
        if result is None or isinstance(result, Reply):
            return result
        if result.routing_metadata:
            self.routing_metadata.update(result.routing_metadata)
        reply = decision_reply(result)
        if reply is not None:
            if result.response_headers:
                self.glue.refused_header_ops += apply_header_ops(
                    reply.headers, result.response_headers, self.glue.guard, agent.agent
                )
            return reply
        if request_ops and result.request_headers:
            self.edited = True
            self.glue.refused_header_ops += apply_header_ops(
                self.headers,
                result.request_headers,
                self.glue.guard,
                agent.agent,
                self._connection_tokens,
            )
        if result.response_headers:
            self.response_ops.extend(result.response_headers)
        if (
            request_ops
            and result.needs_more
            and agent.request_body == "none"
            and agent.body_capable
            and all(s.agent.agent != agent.agent for s in self._req_stages)
        ):
            # the agent wants the body to decide: it gets the body streamed
            self._req_stages.append(_BodyStage(dataclasses.replace(agent, request_body="stream")))
        return None

    async def request_headers(self, session: bool = False) -> Reply | None:
        """Ask the route's agents about the request headers; a Reply stops the request.

        On None, ``headers`` carries the guarded edits. ``session=True`` (WebSocket) binds a
        sticky session per agent, keyed by the correlation id.
        """
        agents = self.plan.headers
        pool = self.pool
        cid = self.correlation_id
        event = self._event
        if len(agents) == 1 and not session:
            agent = agents[0]
            if agent.timeout is None:
                try:  # the common case without the extra coroutine layer of _ask
                    response = await pool.send_request_headers(agent.agent, cid, event)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    return self._absorb(agent, self._failed(agent, exc), True)
                return self._absorb(agent, response, True)
            return self._absorb(
                agent,
                await self._ask(agent, pool.send_request_headers(agent.agent, cid, event)),
                True,
            )
        if session or self.plan.sequential:
            for agent in agents:
                if session:
                    coro = self._sticky(agent)
                else:
                    event.headers = self._header_map()
                    coro = pool.send_request_headers(agent.agent, cid, event)
                reply = self._absorb(agent, await self._ask(agent, coro), True)
                if reply is not None:
                    return reply
            return None
        tasks = [
            asyncio.ensure_future(self._ask(a, pool.send_request_headers(a.agent, cid, event)))
            for a in agents
        ]
        try:
            for agent, task in zip(agents, tasks):
                reply = self._absorb(agent, await task, True)
                if reply is not None:
                    return reply  # the agents after it are not waited for
            return None
        finally:
            pending = [t for t in tasks if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _sticky(self, agent: _Agent) -> AgentResponse:
        self.pool.create_sticky_session(self.correlation_id, agent.agent)
        response, _ = await self.pool.send_request_headers_with_sticky_session(
            self.correlation_id, agent.agent, self.correlation_id, self._event
        )
        return response

    def _header_map(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, value in self.headers:
            out.setdefault(name, []).append(value)
        return out

    # -- bodies

    @property
    def inspects_request_body(self) -> bool:
        return bool(self._req_stages)

    @property
    def inspects_response(self) -> bool:
        return bool(self.plan.response_headers or self._resp_stages or self.response_ops)

    @property
    def inspects_response_body(self) -> bool:
        return bool(self._resp_stages)

    @property
    def buffers_response_body(self) -> bool:
        return any(s.agent.response_body == "buffer" for s in self._resp_stages)

    def too_large(self, size: int) -> Reply | None:
        """The 413 reply when a request body of ``size`` bytes is over the route's limit."""
        limit = self.plan.max_request_body
        if limit is not None and size > limit:
            return Reply(
                413, [("content-type", "text/plain; charset=utf-8")], b"Request body too large"
            )
        return None

    async def request_body(self, data: bytes, last: bool) -> bytes:
        """Pass one request body chunk through the body agents; returns what to forward.

        Raises :class:`Stop` with a Reply for a block, a failure or a body over the limit.
        """
        self.request_bytes += len(data)
        reply = self.too_large(self.request_bytes)
        if reply is not None:
            raise Stop(reply)
        for stage in self._req_stages:
            data = await self._stage(stage, data, last, True)
        return data

    async def response_body(self, data: bytes, last: bool) -> bytes:
        """Pass one response body chunk through the body agents; returns what to send."""
        self.response_bytes += len(data)
        for stage in self._resp_stages:
            data = await self._stage(stage, data, last, False)
        return data

    async def _stage(self, stage: _BodyStage, data: bytes, last: bool, request: bool) -> bytes:
        agent = stage.agent
        if stage.disabled or agent.agent in self.skipped:
            return b"".join([*(h[1] for h in stage.held), *stage.buffer, data])
        mode = agent.request_body if request else agent.response_body
        stage.seen += len(data)
        if mode == "buffer":
            if stage.seen > agent.max_body_size:
                if request:
                    raise Stop(
                        self.too_large(stage.seen) or Reply(413, [], b"Request body too large")
                    )
                raise Stop(Reply(502, [], b"Response body too large for inspection"))
            stage.buffer.append(data)
            if not last:
                return b""
            data = b"".join(stage.buffer)
            stage.buffer.clear()
        elif stage.seen > agent.max_body_size and request:
            raise Stop(Reply(413, [], b"Request body too large"))
        index = stage.index
        stage.index += 1
        cid = self.correlation_id
        total = stage.seen if last else None
        if request:
            coro = self.pool.send_request_body_chunk(
                agent.agent, cid, RequestBodyChunkEvent(cid, data, last, total, index, stage.seen)
            )
        else:
            coro = self.pool.send_response_body_chunk(
                agent.agent, cid, ResponseBodyChunkEvent(cid, data, last, total, index, stage.seen)
            )
        stage.held.append([index, data])
        async with self._serial():
            result = await self._ask(agent, coro)
        if result is None:
            stage.disabled = True
        elif isinstance(result, Reply):
            raise Stop(result)
        else:
            reply = self._absorb(agent, result, False)
            if reply is not None:
                raise Stop(reply)
            mutation = result.request_body_mutation if request else result.response_body_mutation
            if mutation is not None:
                try:
                    new = _mutated(data, mutation)
                except AgentProtocolError as exc:
                    log.warning("agent %r: %s", agent.agent, exc)
                    self.skipped = self.skipped | {agent.agent}
                    failed = _failure_reply(agent)
                    if failed is not None:
                        raise Stop(failed) from None
                    new = None
                if new is not None:
                    target = next(
                        (h for h in stage.held if h[0] == mutation.chunk_index), stage.held[-1]
                    )
                    target[1] = new
            if result.needs_more and not last:
                return b""
        out = b"".join(h[1] for h in stage.held)
        stage.held.clear()
        return out

    # -- response headers

    async def response_headers(self, status: int, headers: Headers) -> Reply | None:
        """Apply the request-phase response edits, ask the response-header agents; a Reply
        replaces the response (only possible before it starts)."""
        self.status = status
        if self.response_ops:
            self.glue.refused_header_ops += apply_header_ops(
                headers, self.response_ops, self.glue.guard, "request phase"
            )
        agents = [a for a in self.plan.response_headers if a.agent not in self.skipped]
        if not agents:
            return None
        cid = self.correlation_id
        hdrs: dict[str, list[str]] = {}
        for name, value in headers:
            hdrs.setdefault(name, []).append(value)
        event = ResponseHeadersEvent(cid, status, hdrs)
        async with self._serial():
            results = await asyncio.gather(
                *(
                    self._ask(a, self.pool.send_response_headers(a.agent, cid, event))
                    for a in agents
                )
            )
        for agent, result in zip(agents, results):
            if result is None or isinstance(result, Reply):
                if result is not None:
                    return result
                continue
            reply = decision_reply(result)
            if reply is not None:
                return reply
            if result.response_headers:
                self.glue.refused_header_ops += apply_header_ops(
                    headers, result.response_headers, self.glue.guard, agent.agent
                )
        return None

    # -- websocket

    async def websocket_frame(
        self, opcode: str, data: bytes, client_to_server: bool
    ) -> WebSocketClose | bool:
        """Ask the WebSocket agents about one frame: True forward, False drop, or a close."""
        async with self._serial():
            return await self._websocket_frame(opcode, data, client_to_server)

    async def _websocket_frame(
        self, opcode: str, data: bytes, client_to_server: bool
    ) -> WebSocketClose | bool:
        index = self._ws_index
        self._ws_index += 1
        cid = self.correlation_id
        event = WebSocketFrameEvent(
            cid, opcode, data, client_to_server, index, True, self.plan.route, self.client_ip
        )
        for agent in self.plan.websocket:
            if agent.agent in self.skipped:
                continue
            result = await self._ask(
                agent, self.pool.send_websocket_frame(agent.agent, cid, event, cid)
            )
            if result is None:
                continue
            if isinstance(result, Reply):
                return WebSocketClose(1011, "agent unavailable")
            decision = result.websocket_decision
            if isinstance(decision, WebSocketClose):
                return decision
            if decision == "drop":
                return False
        return True

    def _serial(self) -> asyncio.Lock:
        """One event of this request at a time per agent: an agent handles one event per
        correlation id and a newer one supersedes it (request body chunks, response events
        and WebSocket frames of both directions can be produced concurrently)."""
        lock = self._lock
        if lock is None:
            lock = self._lock = asyncio.Lock()
        return lock

    # -- end

    def finish(self, error: str | None = None) -> None:
        """Send RequestComplete in the background (agents that want it) and clear affinity."""
        if self.complete_sent:
            return
        self.complete_sent = True
        complete = self.plan.complete
        agents = [a for a in complete if a.agent not in self.skipped] if complete else complete
        if not agents:
            self.pool.clear_correlation_affinity(self.correlation_id)
            return
        self.glue.spawn(self._complete(agents, error))

    def finish_websocket(self) -> None:
        """End a WebSocket exchange: drop its sticky sessions and affinity."""
        self.complete_sent = True
        self.pool.clear_sticky_session(self.correlation_id)
        self.pool.clear_correlation_affinity(self.correlation_id)

    async def _complete(self, agents: list[_Agent], error: str | None) -> None:
        cid = self.correlation_id
        event = RequestCompleteEvent(
            cid,
            self.status,
            int((_monotonic() - self.started) * 1000),
            self.request_bytes,
            self.response_bytes,
            1,
            error,
        )
        try:
            results = await asyncio.gather(
                *(
                    _timed(self.pool.send_request_complete(a.agent, cid, event), a.timeout)
                    for a in agents
                ),
                return_exceptions=True,
            )
            for agent, result in zip(agents, results):
                if isinstance(result, BaseException):
                    log.debug("RequestComplete to %r failed: %s", agent.agent, result)
        finally:
            self.pool.clear_correlation_affinity(cid)
