"""The glue object: a pool, its agents, the routes and the guard; one per application.

The long-lived side of the integrations (lifecycle, routing, correlation ids), apart from the
per-request :class:`~agentpool.http.Exchange` it makes.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

from ..config import AgentPoolConfig
from ..pool import AgentPool
from .config import AgentRule, Route, _parse_agents
from .exchange import Exchange
from .guard import HeaderGuard, Headers
from .plan import _Plan, _plan

__all__ = ["Glue"]


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
