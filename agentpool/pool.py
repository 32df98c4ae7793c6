"""The agent pool: Zentinel's ``AgentPool`` for asyncio (docs/pool.md).

Long on purpose (over 2,000 lines): :class:`AgentPool` is one class, as upstream's pool is
one struct. The request path, fan-out, endpoint sets, recovery and sessions all read and
update the same per-agent entries, slot and flow waiters and counters, and each of those
carries invariants that a reader checks in one place. The parts that need none of that state
live elsewhere: the per-frame work in the core, the breaker in ``circuit``, endpoint records in
``endpoints``, config push in ``control``, and metrics in ``metrics``.

An :class:`AgentPool` keeps ``connections_per_agent`` connections to each agent, picks one per
event with the compiled selection core, routes body chunks by correlation affinity and
long-lived streams by sticky session, applies flow control and a per-agent circuit breaker,
and repairs itself in :meth:`AgentPool.run_maintenance` (replacing dead connections and
reconnecting with capped backoff, forever). Method names are upstream's, in snake_case.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import tls as _tls
from ._impl import core
from .circuit import CircuitBreaker, CircuitBreakerConfig, CircuitState
from .config import AgentPoolConfig
from .connection import AgentConnection, ConnectionListener
from .control import ConfigPushDelivery, ConfigPusher, ConfigUpdateHandler
from .endpoints import (
    EndpointRecord,
    EndpointsBreaker,
    EndpointStats,
    _EndpointBreaker,
    normalize_endpoints,
    refresh_selection,
)
from .enums import CancelReason, FlowControlMode, HealthState
from .errors import (
    AgentNotFound,
    AgentProtocolError,
    CircuitBreakerOpen,
    ConnectionClosed,
    ConnectionFailed,
    DuplicateCorrelationId,
    FlowControlPaused,
    InvalidMessage,
    RequestCancelled,
    Serialization,
    Timeout,
    Unavailable,
)
from .messages import (
    AgentCapabilities,
    AgentResponse,
    ConfigUpdateRequest,
    ConfigUpdateResponse,
    ConfigUpdateType,
    ConfigureEvent,
    GuardrailInspectEvent,
    HealthStatus,
    MetricsReport,
    RequestBodyChunkEvent,
    RequestCompleteEvent,
    RequestHeadersEvent,
    ResponseBodyChunkEvent,
    ResponseHeadersEvent,
    WebSocketFrameEvent,
)
from .metrics import MetricsCollector

__all__ = ["AgentPool", "AgentPoolStats", "EndpointStats", "is_uds_endpoint"]

log = logging.getLogger(__name__)

_monotonic = time.monotonic
ConnState = core.ConnState

if TYPE_CHECKING:
    # a request _send_all submitted at once: what _settle accounts when it completes
    _Submitted = tuple[
        asyncio.Future[AgentResponse],
        "_AgentEntry | EndpointRecord",
        ConnState,
        CircuitBreaker | EndpointsBreaker | None,
        int,
        float,
    ]

# What a send does, as bit flags (the table under "Sending" in docs/pool.md).
_TRACK = 1  # protocol metrics: requests/responses/in-flight/errors
_DURATION = 2  # record request_duration
_FLOW = 4  # flow-control check
_STORE_AFFINITY = 8
_USE_AFFINITY = 16
_NEW_REQUEST = 32  # refused while the pool shuts down
_NO_BREAKER = 64  # control-plane traffic neither gated by nor feeding the circuit breaker

_KIND_HEADERS = _TRACK | _DURATION | _FLOW | _STORE_AFFINITY | _NEW_REQUEST
_KIND_BODY = _FLOW | _USE_AFFINITY
_KIND_RESPONSE_HEADERS = 0
_KIND_RESPONSE_BODY = _FLOW | _USE_AFFINITY
_KIND_GUARDRAIL = _TRACK | _FLOW | _NEW_REQUEST
_KIND_COMPLETE = _USE_AFFINITY
_KIND_WEBSOCKET = _FLOW
_KIND_CONFIGURE = _NO_BREAKER

_EVENT_KINDS: dict[type, int] = {
    RequestHeadersEvent: _KIND_HEADERS,
    RequestBodyChunkEvent: _KIND_BODY,
    ResponseHeadersEvent: _KIND_RESPONSE_HEADERS,
    ResponseBodyChunkEvent: _KIND_RESPONSE_BODY,
    GuardrailInspectEvent: _KIND_GUARDRAIL,
}
Event = (
    RequestHeadersEvent
    | RequestBodyChunkEvent
    | ResponseHeadersEvent
    | ResponseBodyChunkEvent
    | GuardrailInspectEvent
)


def _event_kind(event: object) -> int:
    kind = _EVENT_KINDS.get(type(event))
    if kind is None:
        raise TypeError(f"not an event the pool sends: {type(event).__name__}")
    return kind


_UNHEALTHY_REPORTS = (HealthState.UNHEALTHY, HealthState.DRAINING)
# Failures that never reached the agent (refused or cancelled by us): they count toward
# neither the consecutive-error rule nor the breaker nor ``total_errors``.
_LOCAL_ERRORS = (DuplicateCorrelationId, RequestCancelled, Serialization, ValueError, TypeError)
# serialization time (encode + frame into the write buffer) is sampled on 1 send in 64
_SERIALIZATION_SAMPLE = 63
# the request kinds the core's submit() understands, and its own flags
_SUBMIT_KINDS = core.SUBMIT_TRACK | core.SUBMIT_DURATION | core.SUBMIT_STORE_AFFINITY
_SUBMIT_BEGUN = core.SUBMIT_BEGUN
_SUBMIT_SAMPLE = core.SUBMIT_SAMPLE
_CLOSE_WAIT = 1.0
_DRAIN_POLL = 0.01
_OPEN_CONCURRENCY = 16  # endpoints connecting at once in add_agent / set_endpoints


def is_uds_endpoint(endpoint: str) -> bool:
    """Whether ``endpoint`` names a Unix socket (``unix:`` prefix, absolute path, ``*.sock``)."""
    return endpoint.startswith(("unix:", "/")) or endpoint.endswith(".sock")


@dataclass(slots=True)
class AgentPoolStats:
    """Per-agent statistics, fields as upstream's."""

    agent_id: str
    active_connections: int
    healthy_connections: int
    total_in_flight: int
    total_requests: int
    total_errors: int
    error_rate: float
    is_healthy: bool


class _AgentEntry:
    """One agent: its endpoints (agentpool.endpoints), connections, affinities, capabilities.

    ``conns`` (a core ConnectionSet) holds the connections of every active endpoint, so
    selection spreads over them all; ``endpoint_of`` maps each connection state to its
    endpoint; removed endpoints wait in ``draining`` until their requests are done.
    """

    __slots__ = (
        "affinity",
        "agent_id",
        "breaker",
        "breaker_clean",
        "capabilities",
        "conns",
        "draining",
        "endpoint_of",
        "endpoints",
        "protocol",
        "retired_errors",
        "retired_requests",
        "reverse",
        "ssl",
        "was_healthy",
    )

    def __init__(
        self,
        agent_id: str,
        *,
        protocol: str,
        reverse: bool,
        max_affinities: int,
    ) -> None:
        self.agent_id = agent_id
        self.protocol = protocol
        self.reverse = reverse
        self.conns = core.ConnectionSet(agent_id)
        self.affinity = core.AffinityMap(max_affinities)
        self.capabilities: AgentCapabilities | None = None
        self.endpoints: dict[str, EndpointRecord] = {}
        self.draining: list[EndpointRecord] = []
        self.endpoint_of: dict[ConnState, EndpointRecord] = {}
        # The gate before selection: refuses only when every endpoint's breaker does.
        self.breaker: EndpointsBreaker | None = None
        # True while some endpoint's breaker is closed: the hot path then skips the gate.
        self.breaker_clean = True
        self.retired_requests = 0
        self.retired_errors = 0
        self.was_healthy = True
        self.ssl: Any = None  # an ssl.SSLContext (or a GrpcTLS for grpcs:// endpoints)

    def active(self) -> list[EndpointRecord]:
        return list(self.endpoints.values())

    def add_endpoint(
        self, endpoint: str, breaker_config: CircuitBreakerConfig | None
    ) -> EndpointRecord:
        breaker = None
        if breaker_config is not None:
            breaker = _EndpointBreaker(breaker_config, self.breakers_changed)
            if self.breaker is None:
                self.breaker = EndpointsBreaker(self.active)
        ep = EndpointRecord(endpoint, breaker)
        self.endpoints[endpoint] = ep
        return ep

    def breakers_changed(self) -> None:
        """An endpoint's breaker changed state: recompute the gate flag and selection."""
        eps = self.active()
        self.breaker_clean = any(
            ep.breaker is None or ep.breaker.state is CircuitState.CLOSED for ep in eps
        )
        refresh_selection(eps)

    @property
    def endpoint(self) -> str:
        """The first endpoint (the only one for a single-endpoint agent)."""
        return next(iter(self.endpoints), "")

    @property
    def reconnect_attempts(self) -> int:
        return min((ep.reconnect_attempts for ep in self.endpoints.values()), default=0)

    @property
    def next_reconnect_at(self) -> float:
        return min((ep.next_reconnect_at for ep in self.endpoints.values()), default=0.0)

    def live_count(self) -> int:
        return sum(1 for st in self.conns if not st.closed)

    def is_healthy(self) -> bool:
        return any(ep.is_healthy() for ep in self.endpoints.values())

    def all_states(self) -> list[ConnState]:
        return list(self.endpoint_of)


class _Listener(ConnectionListener):
    """Routes connection callbacks (health, flow control, metrics, config, close) to the pool."""

    __slots__ = ("_pool",)

    def __init__(self, pool: AgentPool) -> None:
        self._pool = pool

    def on_health(self, conn: AgentConnection, status: HealthStatus) -> None:
        self._pool._on_health(conn, status)

    def on_flow_control(self, conn: AgentConnection, paused: bool) -> None:
        self._pool._on_flow_control(conn, paused)

    def on_metrics(self, conn: AgentConnection, report: MetricsReport) -> None:
        self._pool._collector.record(report, conn.agent_id)

    def on_config_update(
        self, conn: AgentConnection, request: ConfigUpdateRequest
    ) -> ConfigUpdateResponse | None:
        return self._pool._update_handler.handle(request)

    def on_closed(self, conn: AgentConnection, exc: BaseException | None) -> None:
        self._pool._on_closed(conn, exc)


def _record_connect_error(entry: _AgentEntry, ep: EndpointRecord, error: BaseException) -> None:
    """Remember the failure for the agent's "No connections available" errors."""
    when = time.strftime("%H:%M:%S UTC", time.gmtime())
    where = f" ({ep.endpoint})" if len(entry.endpoints) > 1 else ""
    ep.last_error = f"last connect error at {when}{where}: {error or type(error).__name__}"
    entry.conns.last_error = ep.last_error


def _abandon(st: ConnState, correlation_id: str, fut: asyncio.Future[AgentResponse]) -> None:
    """Abandon a request :meth:`AgentPool._submit_now` submitted on ``st``."""
    proto = st.conn.protocol_core
    assert proto is not None  # _submit_now submits through the protocol core only
    proto.discard(correlation_id, fut)


class AgentPool:
    """Connections to external processing agents, with load balancing, affinity and recovery.

    Use it as ``async with AgentPool(config) as pool:`` (or ``await pool.start()`` /
    ``await pool.shutdown()``) so the maintenance task runs every ``health_check_interval``.
    All ``send_*`` methods return the agent's :class:`~agentpool.messages.AgentResponse`.
    """

    def __init__(self, config: AgentPoolConfig | None = None) -> None:
        self._config = config if config is not None else AgentPoolConfig()
        cfg = self._config
        self._agents: dict[str, _AgentEntry] = {}
        self._conn_index: dict[AgentConnection, tuple[_AgentEntry, ConnState]] = {}
        self._sessions = core.SessionMap()
        self._metrics = core.ProtocolMetrics()
        self._collector = MetricsCollector(cfg.metrics)
        self._pusher = ConfigPusher(cfg.config_push)
        self._update_handler = ConfigUpdateHandler()
        self._listener = _Listener(self)
        self._strategy = int(cfg.load_balance_strategy)
        self._limit = cfg.max_concurrent_per_connection
        self._flow_mode = cfg.flow_control_mode
        self._sticky_timeout = cfg.sticky_session_timeout
        self._slot_waiters: dict[ConnState, deque[asyncio.Future[bool]]] = {}
        self._resume_events: dict[ConnState, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._push_delivery = ConfigPushDelivery(
            self._pusher,
            self._send_configure,
            self._push_pending,
            closing=lambda: self._closing,
            tasks=self._tasks,
        )
        self._pushes_in_flight = self._push_delivery.in_flight
        self._maintenance_task: asyncio.Task[None] | None = None
        self._maintenance_lock: asyncio.Lock | None = None
        self._maintenance_wakeups: set[asyncio.Future[None]] = set()
        self._affinity_warned = False
        # correlation id -> the agent entry (or tuple of entries) whose affinity map it was
        # stored in: clear_correlation_affinity touches only those. Ids whose binding went
        # away otherwise (connection lost, refused at capacity) are purged by the ttl sweep.
        # While the pool has one agent (``_sole``) its ids are not indexed; ``_unindexed`` is
        # the agent (at most one) whose map may hold such ids, cleared directly.
        # an agent, or a tuple of the agents when several hold the id
        self._affinity_index: dict[str, _AgentEntry | tuple[_AgentEntry, ...]] = {}
        self._sole: _AgentEntry | None = None
        self._unindexed: _AgentEntry | None = None
        self._closing = False
        self._shutdown_task: asyncio.Task[None] | None = None
        self._drained: asyncio.Event | None = None
        self._total_requests = 0
        self._total_errors = 0
        self._failovers = 0
        # agents with several endpoints: their new requests fail over (``_send_failover``)
        self._replicated: set[str] = set()

    # ------------------------------------------------------------------ accessors

    @property
    def config(self) -> AgentPoolConfig:
        """The pool's configuration."""
        return self._config

    @property
    def protocol_metrics(self) -> core.ProtocolMetrics:
        """Proxy-side :class:`ProtocolMetrics` (gauges refreshed on access)."""
        self._refresh_gauges()
        return self._metrics

    @property
    def metrics_collector(self) -> MetricsCollector:
        """Agent-reported metrics (MetricsReport frames)."""
        return self._collector

    @property
    def config_pusher(self) -> ConfigPusher:
        """The config push ledger (control.ConfigPushDelivery sends the pushes)."""
        return self._pusher

    @property
    def config_update_handler(self) -> ConfigUpdateHandler:
        """Handler answering agent-initiated config update requests."""
        return self._update_handler

    @config_update_handler.setter
    def config_update_handler(self, handler: ConfigUpdateHandler) -> None:
        self._update_handler = handler

    @property
    def connection_listener(self) -> _Listener:
        """The listener to pass to connections built outside the pool (reverse connections)."""
        return self._listener

    @property
    def total_requests(self) -> int:
        """Sends attempted through this pool (all kinds)."""
        return self._total_requests

    @property
    def failovers(self) -> int:
        """New requests sent again because a replica's connection was lost before the reply."""
        return self._failovers

    @property
    def total_errors(self) -> int:
        """Sends that failed in the transport (all kinds)."""
        return self._total_errors

    def export_prometheus(self) -> str:
        """Protocol metrics (prefix ``agent_protocol``) followed by agent-reported metrics."""
        self._refresh_gauges()
        return (
            self._metrics.to_prometheus("agent_protocol")
            + _tls.prometheus_text("agent_protocol")
            + self._collector.export_prometheus(reserved_prefix="agent_protocol_")
        )

    def agent_ids(self) -> list[str]:
        """Ids of the registered agents."""
        return list(self._agents)

    async def agent_capabilities(self, agent_id: str) -> AgentCapabilities | None:
        """Capabilities from the agent's handshake (refreshed on reconnect), or None.

        A coroutine, as upstream's; :meth:`agent_capabilities_sync` is the plain call.
        """
        return self.agent_capabilities_sync(agent_id)

    def agent_capabilities_sync(self, agent_id: str) -> AgentCapabilities | None:
        """:meth:`agent_capabilities` without the await (for sync code and collectors)."""
        entry = self._agents.get(agent_id)
        return None if entry is None else entry.capabilities

    def _not_found(self, agent_id: str) -> AgentProtocolError:
        """The error for an unknown agent id: ``Unavailable`` once the pool is shut down."""
        if self._closing:
            return Unavailable(f"pool is shut down (agent {agent_id})")
        return AgentNotFound(agent_id)

    def is_agent_healthy(self, agent_id: str) -> bool:
        """True when the agent has a healthy connection and has not reported itself unhealthy."""
        entry = self._agents.get(agent_id)
        return entry is not None and entry.is_healthy()

    def correlation_affinity_count(self) -> int:
        """Current correlation affinity entries (all agents)."""
        return sum(len(e.affinity) for e in list(self._agents.values()))

    def sticky_session_count(self) -> int:
        """Current sticky sessions (expired ones count until swept)."""
        return len(self._sessions)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> AgentPool:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    async def start(self) -> None:
        """Start the background maintenance task (idempotent)."""
        if self._closing:
            raise Unavailable("pool is shut down")
        if self._maintenance_task is None or self._maintenance_task.done():
            self._maintenance_task = asyncio.get_running_loop().create_task(
                self.run_maintenance(), name="agentpool-maintenance"
            )

    async def shutdown(self) -> None:
        """Drain in-flight requests (up to ``drain_timeout``), cancel the rest, close everything.

        New request headers and guardrail calls are refused with ``Unavailable`` while draining;
        chunks of requests already in progress still go through. The shutdown runs as its
        own task: cancelling a caller does not stop it, and every call (a second one too)
        returns only once it is complete.
        """
        task = self._shutdown_task
        if task is None:
            task = self._shutdown_task = asyncio.get_running_loop().create_task(
                self._shutdown(), name="agentpool-shutdown"
            )
        await asyncio.shield(task)

    async def _shutdown(self) -> None:
        self._closing = True
        self._stop_maintenance()
        if self._in_flight_total() > 0:
            self._drained = asyncio.Event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drained.wait(), self._config.drain_timeout)
            self._drained = None
        remaining = self._in_flight_total()
        if remaining:
            log.warning("drain timeout reached with %d requests still in flight", remaining)
        task = self._maintenance_task
        self._maintenance_task = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        entries = list(self._agents.values())
        cancels = [
            st.conn.cancel_all(CancelReason.PROXY_SHUTDOWN)
            for entry in entries
            for st in entry.all_states()
            if not st.closed
        ]
        if cancels:
            for result in await asyncio.gather(*cancels, return_exceptions=True):
                if isinstance(result, BaseException):
                    log.debug("cancel_all during shutdown failed: %s", result)
        for entry in entries:
            self._pusher.unregister_agent(entry.agent_id)
            if self._agents.get(entry.agent_id) is entry:
                del self._agents[entry.agent_id]
        self._agents_changed()
        await asyncio.gather(*(self._close_entry(e) for e in entries))
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._refresh_gauges()

    def _in_flight_total(self) -> int:
        return sum(st.in_flight for e in self._agents.values() for st in e.endpoint_of)

    # ------------------------------------------------------------------ membership

    async def add_agent(
        self,
        agent_id: str,
        endpoint: str | Sequence[str],
        *,
        protocol: str = "v2",
        ssl: Any = None,
    ) -> None:
        """Open ``connections_per_agent`` connections to each endpoint, concurrently.

        ``endpoint`` is one endpoint or a list of them (replicas of the same agent; see
        :meth:`set_endpoints` and docs/pool.md, "Endpoint sets"). ``ssl`` (an
        :class:`ssl.SSLContext`, e.g. from :func:`agentpool.tls.client_context`) or a
        ``tls://host:port`` endpoint connects over TLS; reconnects and endpoints added later
        by :meth:`set_endpoints` use the same context.
        ``grpc://host:port`` and ``grpcs://host:port`` endpoints speak gRPC (``pip install
        'agentpool[grpc]'``); for ``grpcs://``, ``ssl`` may also be an
        :class:`agentpool.grpc.GrpcTLS` (see docs/protocol.md, "gRPC transport").

        An agent that cannot be reached is still registered (unhealthy) and reconnected by
        maintenance, as upstream 0.6.41 does; an endpoint that can never work (bad syntax,
        unknown scheme, no port) raises :class:`~agentpool.errors.InvalidEndpoint` at once.
        An existing agent of that id is replaced and its connections closed.
        ``protocol="v1"`` drives a legacy v1 agent.
        """
        if self._closing:
            raise Unavailable("pool is shut down")
        if not agent_id:
            raise InvalidMessage("agent id must not be empty", field="agent_id")
        if protocol not in ("v1", "v2"):
            raise InvalidMessage(f"unknown protocol {protocol!r}", field="protocol")
        endpoints = self._endpoint_list(endpoint)
        cfg = self._config
        entry = _AgentEntry(
            agent_id,
            protocol=protocol,
            reverse=False,
            max_affinities=cfg.max_correlation_affinities,
        )
        entry.ssl = ssl
        eps = [entry.add_endpoint(e, cfg.circuit_breaker) for e in endpoints]
        results = await self._open_endpoints(entry, eps)
        if self._closing:
            for res in results:
                for conn in res:
                    if isinstance(conn, AgentConnection):
                        conn.close()
            raise Unavailable("pool is shut down")
        old = self._agents.get(agent_id)
        self._agents[agent_id] = entry
        self._agents_changed()
        self._note_replicas(entry)
        opened = self._join(entry, eps, results, first=True)
        if opened:
            log.info(
                "agent %r added with %d connection(s) to %d endpoint(s)",
                agent_id,
                opened,
                len(eps),
            )
        else:
            self._pusher.unregister_agent(agent_id)
            entry.was_healthy = False
            log.warning(
                "agent %r unreachable at %s; registered unhealthy, will retry",
                agent_id,
                ", ".join(endpoints),
            )
        if old is not None:
            await self._close_entry(old)
        self._refresh_gauges()

    @staticmethod
    def _endpoint_list(endpoint: str | Sequence[str]) -> list[str]:
        endpoints = normalize_endpoints(endpoint)
        if not endpoints:
            raise InvalidMessage("an agent needs at least one endpoint", field="endpoints")
        return endpoints

    def _join(
        self,
        entry: _AgentEntry,
        eps: list[EndpointRecord],
        results: list[list[AgentConnection | BaseException]],
        *,
        first: bool,
    ) -> int:
        """Attach what ``_open_many`` opened for each endpoint; schedule retries for the rest."""
        cfg = self._config
        opened = 0
        for ep, res in zip(eps, results):
            conns = [r for r in res if isinstance(r, AgentConnection)]
            for r in res:
                if not isinstance(r, AgentConnection):
                    _record_connect_error(entry, ep, r)
                    log.warning(
                        "failed to connect to agent %r at %s: %s", entry.agent_id, ep.endpoint, r
                    )
            for conn in conns:
                self._attach(entry, ep, conn)
            if conns:
                opened += len(conns)
                if entry.capabilities is None or not first:
                    self._set_capabilities(entry, conns[0].capabilities)
            else:
                ep.reconnect_attempts = 1
                ep.next_reconnect_at = _monotonic() + cfg.reconnect_delay(1)
                ep.was_healthy = False
        refresh_selection(entry.active())
        return opened

    async def set_endpoints(self, agent_id: str, endpoints: str | Sequence[str]) -> None:
        """Reconcile the agent's endpoints with ``endpoints`` (docs/pool.md, "Endpoint sets").

        New endpoints are connected (``connections_per_agent`` each, with the agent's ``ssl``
        context and protocol); removed ones stop getting new requests at once, drain (their
        in-flight requests finish, bounded by ``drain_timeout``) and close; endpoints in both
        lists keep their connections untouched. An endpoint that cannot be reached is kept
        and reconnected by maintenance. Returns once new endpoints are connected (or have
        failed their first attempt); the drain goes on in the background.
        """
        if self._closing:
            raise Unavailable("pool is shut down")
        wanted = self._endpoint_list(endpoints)
        entry = self._agents.get(agent_id)
        if entry is None:
            raise self._not_found(agent_id)
        if entry.reverse:
            raise InvalidMessage(
                f"agent {agent_id!r} is a reverse agent: it has no endpoints to set",
                field="endpoints",
            )
        cfg = self._config
        removed = [ep for e, ep in entry.endpoints.items() if e not in wanted]
        added = [
            entry.add_endpoint(e, cfg.circuit_breaker) for e in wanted if e not in entry.endpoints
        ]
        # keep the listed order (first endpoint first) for display and stats
        entry.endpoints = {e: entry.endpoints[e] for e in wanted}
        self._note_replicas(entry)
        if removed:
            self._start_drain(entry, removed)
            entry.breakers_changed()
            log.info("agent %r: draining %s", agent_id, ", ".join(ep.endpoint for ep in removed))
        if added:

            def still_wanted(ep: EndpointRecord) -> bool:
                return (
                    not self._closing
                    and self._agents.get(agent_id) is entry
                    and entry.endpoints.get(ep.endpoint) is ep
                )

            for ep in added:
                ep.reconnecting = True
            try:
                opened = await self._open_endpoints(entry, added, join=still_wanted)
            finally:
                for ep in added:
                    ep.reconnecting = False
            log.info(
                "agent %r: added %s (%d connection(s))",
                agent_id,
                ", ".join(ep.endpoint for ep in added),
                sum(1 for res in opened for r in res if isinstance(r, AgentConnection)),
            )
        self._refresh_gauges()

    async def _open_endpoints(
        self,
        entry: _AgentEntry,
        eps: list[EndpointRecord],
        *,
        join: Callable[[EndpointRecord], bool] | None = None,
    ) -> list[list[AgentConnection | BaseException]]:
        """Open each endpoint's connections, at most ``_OPEN_CONCURRENCY`` endpoints at a time
        (so a large set never holds the loop with a burst of connects and handshakes).

        With ``join``, each endpoint joins the agent as soon as its connections are open
        when ``join(ep)`` is still true (else they are closed).
        """
        count = self._config.connections_per_agent
        results: dict[str, list[AgentConnection | BaseException]] = {}
        todo = iter(eps)

        async def opener() -> None:
            for ep in todo:  # shared: each opener takes the next endpoint
                res = results[ep.endpoint] = await self._open_many(entry, ep, count)
                if join is None:
                    continue
                if join(ep):
                    self._join(entry, [ep], [res], first=False)
                else:
                    for conn in res:
                        if isinstance(conn, AgentConnection):
                            conn.close()

        try:
            await asyncio.gather(*(opener() for _ in range(min(_OPEN_CONCURRENCY, len(eps)))))
        except asyncio.CancelledError:
            if join is None:  # nothing joined yet: a cancelled caller leaks no connection
                for res in results.values():
                    for conn in res:
                        if isinstance(conn, AgentConnection):
                            conn.close()
            raise
        return [results[ep.endpoint] for ep in eps]

    def _note_replicas(self, entry: _AgentEntry) -> None:
        if len(entry.endpoints) > 1:
            self._replicated.add(entry.agent_id)
        else:
            self._replicated.discard(entry.agent_id)

    def endpoint_stats(self, agent_id: str) -> list[EndpointStats]:
        """One :class:`~agentpool.endpoints.EndpointStats` per endpoint of the agent
        (active ones in order, then those still draining)."""
        entry = self._agents.get(agent_id)
        if entry is None:
            raise self._not_found(agent_id)
        return [ep.stats(agent_id) for ep in (*entry.active(), *entry.draining)]

    def endpoints(self, agent_id: str) -> list[str]:
        """The agent's active endpoints, in the order they were set."""
        entry = self._agents.get(agent_id)
        if entry is None:
            raise self._not_found(agent_id)
        return list(entry.endpoints)

    def _start_drain(self, entry: _AgentEntry, eps: list[EndpointRecord]) -> None:
        """Take the endpoints out of selection; close each once its requests are done."""
        for ep in eps:
            ep.closing = True
            entry.draining.append(ep)
            for st in ep.states:
                entry.conns.remove(st)
                st.healthy = False
        task = asyncio.get_running_loop().create_task(self._drain_endpoints(entry, eps))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain_endpoints(self, entry: _AgentEntry, eps: list[EndpointRecord]) -> None:
        deadline = _monotonic() + self._config.drain_timeout
        pending = list(eps)
        try:
            while pending:
                timed_out = _monotonic() >= deadline
                for ep in list(pending):
                    busy = sum(st.in_flight for st in ep.states if not st.closed)
                    if busy and not timed_out:
                        continue
                    if busy:
                        log.warning(
                            "agent %r: drain of %s timed out with %d request(s) in flight",
                            entry.agent_id,
                            ep.endpoint,
                            busy,
                        )
                    pending.remove(ep)
                    self._close_drained(entry, ep)
                    await asyncio.sleep(0)  # one endpoint per loop turn
                if pending:
                    await asyncio.sleep(_DRAIN_POLL)
        finally:
            for ep in pending:
                self._close_drained(entry, ep)

    def _close_drained(self, entry: _AgentEntry, ep: EndpointRecord) -> None:
        for st in list(ep.states):
            conn = st.conn
            self._retire(entry, st)
            conn.close()
        with contextlib.suppress(ValueError):
            entry.draining.remove(ep)
        log.info("agent %r: endpoint %s drained and closed", entry.agent_id, ep.endpoint)

    async def remove_agent(self, agent_id: str) -> None:
        """Unregister the agent, close its connections and drop its affinities and sessions."""
        self._pusher.unregister_agent(agent_id)
        entry = self._agents.pop(agent_id, None)
        if entry is None:
            raise self._not_found(agent_id)
        self._agents_changed()
        self._replicated.discard(agent_id)
        await self._close_entry(entry)
        self._refresh_gauges()

    async def add_reverse_connection(
        self, agent_id: str, connection: AgentConnection, capabilities: AgentCapabilities
    ) -> None:
        """Add a connection an agent opened to us (reverse listener, after registration).

        The connection should have been built with :attr:`connection_listener`. Reverse agents
        are never reconnected; their dead connections are dropped and the agent is removed
        when its last connection closes.
        """
        if self._closing:
            connection.close()
            raise Unavailable("pool is shut down")
        if not connection.is_connected:
            raise ConnectionClosed("reverse connection closed before it joined the pool")
        if getattr(connection, "listener", self._listener) is None:
            connection.listener = self._listener
        entry = self._agents.get(agent_id)
        if entry is not None:
            limit = self._config.connections_per_agent
            if entry.live_count() >= limit:
                raise ConnectionFailed(
                    f"Agent {agent_id} already has maximum connections ({limit})"
                )
            self._attach(entry, entry.active()[0], connection)
            if entry.capabilities is None:
                self._set_capabilities(entry, capabilities)
        else:
            entry = _AgentEntry(
                agent_id,
                protocol="v2",
                reverse=True,
                max_affinities=self._config.max_correlation_affinities,
            )
            ep = entry.add_endpoint(f"reverse://{agent_id}", self._config.circuit_breaker)
            self._agents[agent_id] = entry
            self._agents_changed()
            self._attach(entry, ep, connection)
            self._set_capabilities(entry, capabilities)
        task = asyncio.get_running_loop().create_task(self._watch_reverse(connection))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._refresh_gauges()

    async def _watch_reverse(self, conn: AgentConnection) -> None:
        """Drop a reverse connection when it closes, even if it was built without our listener."""
        with contextlib.suppress(Exception):
            await conn.wait_closed()
        self._on_closed(conn, None)

    async def _open_many(
        self, entry: _AgentEntry, ep: EndpointRecord, count: int
    ) -> list[AgentConnection | BaseException]:
        """Open ``count`` connections concurrently; a cancelled caller leaks none of them."""
        tasks = [asyncio.ensure_future(self._open(entry, ep)) for _ in range(count)]
        try:
            return await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:
            for task in tasks:
                if not task.done():
                    task.cancel()
                elif not task.cancelled() and task.exception() is None:
                    task.result().close()
            raise

    async def _open(self, entry: _AgentEntry, ep: EndpointRecord) -> AgentConnection:
        cfg = self._config
        return await asyncio.wait_for(
            AgentConnection.open(
                ep.endpoint,
                agent_id=entry.agent_id,
                encoding=cfg.encoding,
                protocol=entry.protocol,
                connect_timeout=cfg.connect_timeout,
                request_timeout=cfg.request_timeout,
                proxy_id=cfg.proxy_id,
                proxy_version=cfg.proxy_version,
                config=cfg.handshake_config,
                listener=self._listener,
                ssl=entry.ssl,
                max_abandoned=cfg.max_abandoned_replies,
            ),
            cfg.connect_timeout + 1.0,
        )

    def _attach(
        self, entry: _AgentEntry, ep: EndpointRecord, conn: AgentConnection
    ) -> ConnState:
        st = core.ConnState(conn)
        conn.use_accounting(self._metrics, self._affinity_rejected)
        entry.conns.add(st)
        ep.states.append(st)
        entry.endpoint_of[st] = ep
        self._conn_index[conn] = (entry, st)
        if not conn.is_connected:
            st.closed = True
            st.healthy = False
        else:
            # What the agent reported on this connection before it joined (right after the
            # handshake, or while add_agent was opening the others) is carried over.
            st.paused = bool(conn.is_paused)
            if st.paused:
                self._metrics.record_flow_pause()
            status = conn.last_health
            if (
                status is not None
                and status.state != HealthState.UNSPECIFIED
                and conn.last_health_at >= ep.health_at
            ):
                self._apply_health(entry, ep, status, conn.last_health_at)
            st.healthy = ep.reported_ok and ep.selectable
        return st

    def _set_capabilities(self, entry: _AgentEntry, caps: AgentCapabilities | None) -> None:
        if caps is None:
            return
        old = entry.capabilities
        entry.capabilities = caps
        if (
            old is None
            or old.features.config_push != caps.features.config_push
            or old.name != caps.name
        ):
            self._pusher.register_agent(entry.agent_id, caps.name, caps.features.config_push)

    def _retire(self, entry: _AgentEntry, st: ConnState) -> None:
        """Forget a connection: out of its set, index, affinities and sessions."""
        st.closed = True
        st.healthy = False
        entry.conns.remove(st)
        ep = entry.endpoint_of.pop(st, None)
        if ep is not None:
            ep.states.remove(st)
            ep.retired_requests += st.request_count
            ep.retired_errors += st.error_count
            entry.retired_requests += st.request_count
            entry.retired_errors += st.error_count
        self._conn_index.pop(st.conn, None)
        entry.affinity.drop_state(st)
        self._sessions.drop_state(st)
        self._wake_all(st)

    async def _close_entry(self, entry: _AgentEntry) -> None:
        conns = []
        for st in entry.all_states():
            conn = st.conn
            self._sessions.drop_state(st)
            self._conn_index.pop(conn, None)
            st.closed = True
            st.healthy = False
            self._wake_all(st)
            conns.append(conn)
            conn.close()
        entry.affinity = core.AffinityMap(self._config.max_correlation_affinities)
        await self._wait_closed(conns)

    @staticmethod
    async def _wait_closed(conns: list[AgentConnection]) -> None:
        if not conns:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(c.wait_closed() for c in conns), return_exceptions=True),
                _CLOSE_WAIT,
            )

    # ------------------------------------------------------------------ listener callbacks

    def _on_closed(self, conn: AgentConnection, exc: BaseException | None) -> None:
        item = self._conn_index.get(conn)
        if item is None:
            return
        entry, st = item
        if st.closed:
            return
        if exc is not None:
            log.warning("connection to agent %r closed: %s", entry.agent_id, exc)
        else:
            log.info("connection to agent %r closed", entry.agent_id)
        st.closed = True
        st.healthy = False
        entry.affinity.drop_state(st)
        self._sessions.drop_state(st)
        self._wake_all(st)
        if entry.reverse:
            self._retire(entry, st)
            if len(entry.conns) == 0 and self._agents.get(entry.agent_id) is entry:
                del self._agents[entry.agent_id]
                self._agents_changed()
                self._pusher.unregister_agent(entry.agent_id)
                log.info("reverse agent %r disconnected; removed from the pool", entry.agent_id)
        self._refresh_gauges()

    def _on_flow_control(self, conn: AgentConnection, paused: bool) -> None:
        item = self._conn_index.get(conn)
        if item is None:
            return
        st = item[1]
        if st.paused == paused:
            return
        st.paused = paused
        if paused:
            self._metrics.record_flow_pause()
        else:
            self._metrics.record_flow_resume()
            event = self._resume_events.pop(st, None)
            if event is not None:
                event.set()
        self._metrics.set_paused_connections(self._count_paused())

    def _on_health(self, conn: AgentConnection, status: HealthStatus) -> None:
        item = self._conn_index.get(conn)
        if item is None or status.state == HealthState.UNSPECIFIED:
            return
        entry, st = item
        ep = entry.endpoint_of.get(st)
        if ep is not None:
            self._apply_health(entry, ep, status, conn.last_health_at)

    def _apply_health(
        self, entry: _AgentEntry, ep: EndpointRecord, status: HealthStatus, at: float
    ) -> None:
        ep.health_at = at
        ok = status.state not in _UNHEALTHY_REPORTS
        if ok == ep.reported_ok:
            return
        ep.reported_ok = ok
        where = f" at {ep.endpoint}" if len(entry.endpoints) > 1 else ""
        if ok:
            log.info("agent %r%s reports healthy again", entry.agent_id, where)
        else:
            log.warning(
                "agent %r%s reports %s: %s",
                entry.agent_id,
                where,
                status.state.name,
                status.message or "",
            )
        for st in ep.states:
            st.healthy = ok and ep.selectable and self._conn_usable(st)
        refresh_selection(entry.active())
        self._metrics.set_healthy_connections(self._count_healthy())

    @staticmethod
    def _conn_usable(st: ConnState) -> bool:
        return bool(not st.closed and st.conn.is_connected and st.consecutive_errors < 3)

    def _wake_all(self, st: ConnState) -> None:
        waiters = self._slot_waiters.pop(st, None)
        if waiters:
            for fut in waiters:
                if not fut.done():
                    fut.set_result(False)
        event = self._resume_events.pop(st, None)
        if event is not None:
            event.set()

    # ------------------------------------------------------------------ sending

    def send_request_headers(
        self, agent_id: str, correlation_id: str, event: RequestHeadersEvent
    ) -> Coroutine[Any, Any, AgentResponse]:
        """Send request headers; stores the correlation affinity for the body chunks."""
        if agent_id in self._replicated:
            return self._send_failover(agent_id, correlation_id, event, _KIND_HEADERS)
        return self._send(agent_id, correlation_id, event, _KIND_HEADERS, None, None)

    def send_request_body_chunk(
        self, agent_id: str, correlation_id: str, event: RequestBodyChunkEvent
    ) -> Coroutine[Any, Any, AgentResponse]:
        """Send a request body chunk on the connection that got the headers (affinity)."""
        return self._send(agent_id, correlation_id, event, _KIND_BODY, None, None)

    def send_response_headers(
        self, agent_id: str, correlation_id: str, event: ResponseHeadersEvent
    ) -> Coroutine[Any, Any, AgentResponse]:
        """Send response headers (no flow-control check, as upstream)."""
        return self._send(agent_id, correlation_id, event, _KIND_RESPONSE_HEADERS, None, None)

    def send_response_body_chunk(
        self, agent_id: str, correlation_id: str, event: ResponseBodyChunkEvent
    ) -> Coroutine[Any, Any, AgentResponse]:
        """Send a response body chunk, routed by correlation affinity too (docs/pool.md)."""
        return self._send(agent_id, correlation_id, event, _KIND_RESPONSE_BODY, None, None)

    def send_guardrail_inspect(
        self, agent_id: str, correlation_id: str, event: GuardrailInspectEvent
    ) -> Coroutine[Any, Any, AgentResponse]:
        """Send a guardrail inspection event."""
        if agent_id in self._replicated:
            return self._send_failover(agent_id, correlation_id, event, _KIND_GUARDRAIL)
        return self._send(agent_id, correlation_id, event, _KIND_GUARDRAIL, None, None)

    def send_request_complete(
        self, agent_id: str, correlation_id: str, event: RequestCompleteEvent
    ) -> Coroutine[Any, Any, AgentResponse]:
        """Send the end-of-request summary, on the request's connection (affinity).

        An agentpool addition (upstream has no pool method for it); call it before
        :meth:`clear_correlation_affinity`.
        """
        return self._send(agent_id, correlation_id, event, _KIND_COMPLETE, None, None)

    async def send_websocket_frame(
        self,
        agent_id: str,
        correlation_id: str,
        event: WebSocketFrameEvent,
        session_id: str | None = None,
    ) -> AgentResponse:
        """Send a WebSocket frame, on the connection of sticky session ``session_id``.

        An agentpool addition. Falls back to normal selection when the session is unknown,
        expired or bound to another agent, like the sticky request-headers send.
        """
        st = None
        if session_id is not None:
            st = self._sessions.lookup(session_id, _monotonic(), self._sticky_timeout)
            if st is not None and (st.closed or self._sessions.agent(session_id) != agent_id):
                st = None
        return await self._send(agent_id, correlation_id, event, _KIND_WEBSOCKET, st, None)

    async def _send_failover(
        self, agent_id: str, correlation_id: str, event: object, kind: int
    ) -> AgentResponse:
        """A new request to an agent with several endpoints: when the connection it went out
        on is lost before the reply (a replica died), it is sent again on another healthy
        connection, at most once per connection the agent had (docs/pool.md, "Failover")."""
        tries = 0
        while True:
            try:
                return await self._send(agent_id, correlation_id, event, kind, None, None)
            except RequestCancelled:
                raise
            except ConnectionClosed as exc:
                entry = self._agents.get(agent_id)
                if (
                    entry is None
                    or self._closing
                    or tries >= len(entry.conns)
                    or entry.conns.healthy_count() == 0
                ):
                    raise
                tries += 1
                self._failovers += 1
                entry.affinity.remove(correlation_id)
                log.info(
                    "agent %r: request %s lost with its connection (%s); sending it again",
                    agent_id,
                    correlation_id,
                    exc,
                )

    async def send_request_headers_with_sticky_session(
        self,
        session_id: str,
        agent_id: str,
        correlation_id: str,
        event: RequestHeadersEvent,
    ) -> tuple[AgentResponse, bool]:
        """Send request headers on the session's connection; ``(response, used_sticky)``.

        Falls back to normal selection (``used_sticky=False``) when the session is unknown,
        expired, bound to another agent or its connection is gone; no session is created.
        """
        st = self._sessions.lookup(session_id, _monotonic(), self._sticky_timeout)
        if st is not None and (st.closed or self._sessions.agent(session_id) != agent_id):
            st = None
        response = await self._send(agent_id, correlation_id, event, _KIND_HEADERS, st, None)
        return response, st is not None

    def _admit(
        self, agent_id: str, kind: int
    ) -> tuple[_AgentEntry, CircuitBreaker | EndpointsBreaker | None, int]:
        """What every request passes before a connection is chosen (the agent exists, the pool
        is not shutting down, the agent's breaker lets it through): the agent's entry, its
        breaker gate (None for kinds that bypass it) and the core's submit flags."""
        self._total_requests += 1
        entry = self._agents.get(agent_id)
        if entry is None:
            raise self._not_found(agent_id)
        if self._closing and kind & _NEW_REQUEST:
            raise Unavailable("pool is shutting down")
        gate = None if kind & _NO_BREAKER else entry.breaker
        if gate is not None and not entry.breaker_clean and not gate.is_closed():
            raise CircuitBreakerOpen(agent_id)
        flags = kind & _SUBMIT_KINDS
        if kind & _TRACK and not self._total_requests & _SERIALIZATION_SAMPLE:
            flags |= _SUBMIT_SAMPLE
        return entry, gate, flags

    async def _send(
        self,
        agent_id: str,
        correlation_id: str,
        event: object,
        kind: int,
        pinned: ConnState | None,
        timeout: float | None,
    ) -> AgentResponse:
        # The checks, encode, frame and accounting of a request (its success included) are
        # one core call (``submit_request``); what stays here must be Python: the flow-control
        # gate, the wait for a slot, and the accounting of failures.
        entry, gate, flags = self._admit(agent_id, kind)
        # the breaker and its clean flag: the agent's gate until a connection is chosen,
        # then the chosen connection's endpoint (docs/pool.md, "Endpoint sets")
        breaker: CircuitBreaker | EndpointsBreaker | None = gate
        holder: _AgentEntry | EndpointRecord = entry
        started = _monotonic()
        st = pinned
        attempted = local = False
        try:
            if st is None and kind & _USE_AFFINITY:
                st = entry.affinity.get(correlation_id, started)
            if st is None:
                st = entry.conns.select(self._strategy)
                if st.paused and kind & _FLOW:
                    st = self._unpaused_alternative(entry, st)
            if st.paused and kind & _FLOW:
                if not await self._flow_gate(entry, st):
                    if kind & _TRACK:
                        self._metrics.inc_requests()
                    self._after(holder, breaker, False)
                    return AgentResponse(fail_open=True)
                if st.closed:
                    st = entry.conns.select(self._strategy)
            if gate is not None:
                ep = entry.endpoint_of.get(st)
                holder = entry if ep is None else ep
                breaker = None if ep is None else ep.breaker
            if st.in_flight >= self._limit or (self._slot_waiters and st in self._slot_waiters):
                st = await self._acquire_slot(entry, st, correlation_id, timeout)
                flags |= _SUBMIT_BEGUN
            conn = st.conn
            attempted = local = True
            try:
                fut = conn.submit_request(event, correlation_id, timeout, st, entry.affinity, flags)
            except Unavailable:
                # write buffer full: wait (bounded) for the agent to drain it
                if not flags & _SUBMIT_BEGUN:
                    st.begin(started)
                    flags |= _SUBMIT_BEGUN
                local = False
                await conn.wait_writable(timeout, correlation_id)
                local = True
                fut = conn.submit_request(event, correlation_id, timeout, st, entry.affinity, flags)
        except BaseException as exc:
            # the core took nothing: the request is accounted here
            recorded = False
            if kind & _TRACK:
                self._metrics.inc_requests()
            if attempted:
                assert st is not None  # attempted: a connection was chosen
                if (
                    isinstance(exc, asyncio.CancelledError)
                    or (local and not isinstance(exc, ConnectionClosed))
                    or isinstance(exc, _LOCAL_ERRORS)
                ):
                    if flags & _SUBMIT_BEGUN:
                        st.release()
                    if kind & _TRACK and isinstance(exc, Serialization):
                        self._metrics.inc_serialization_errors()
                else:
                    if not flags & _SUBMIT_BEGUN:
                        st.begin(started)
                    recorded = self._failed(holder, st, breaker, kind, exc)
                self._ended(st, kind, started)
            self._after(holder, breaker, recorded)
            raise
        if kind & _STORE_AFFINITY and entry is not self._sole:
            self._index_affinity(correlation_id, entry)
        try:
            response: AgentResponse = await fut
        except asyncio.CancelledError:
            recorded = False
            if not fut.done() or fut.cancelled() or fut.exception() is not None:
                # abandoned before its reply (the core accounted nothing): tombstone + Cancel
                proto = conn.protocol_core
                if proto is not None:
                    proto.discard(correlation_id, fut)
                st.release()
                if kind & _TRACK:
                    self._metrics.dec_in_flight()
                self._ended(st, kind, started)
            else:  # answered as the caller gave up: the core accounted it
                if self._slot_waiters:
                    self._wake_slot(st)
                if not holder.breaker_clean and isinstance(breaker, CircuitBreaker):
                    breaker.record_success()
                    recorded = True
            self._after(holder, breaker, recorded)
            raise
        except BaseException as exc:
            recorded = False
            if kind & _TRACK:
                self._metrics.dec_in_flight()
            if isinstance(exc, _LOCAL_ERRORS):
                st.release()
            else:
                recorded = self._failed(holder, st, breaker, kind, exc)
            self._ended(st, kind, started)
            self._after(holder, breaker, recorded)
            raise
        if self._slot_waiters:
            self._wake_slot(st)
        if self._drained is not None and self._in_flight_total() == 0:
            self._drained.set()
        if not holder.breaker_clean and isinstance(breaker, CircuitBreaker):
            breaker.record_success()
            holder.breaker_clean = (
                breaker.state is CircuitState.CLOSED and breaker.failure_count == 0
            )
        return response

    # ------------------------------------------------------------------ fan-out and batch

    async def fan_out(
        self, agent_ids: Iterable[str], correlation_id: str, event: Event
    ) -> dict[str, AgentResponse | Exception]:
        """Send one request's ``event`` to several agents at once; ``{agent_id: result}``.

        Each agent gets the request exactly as from the matching ``send_*`` method (its
        affinity, flow control, breaker, metrics); a result is the agent's AgentResponse or
        the error that request failed with: one agent's failure never raises for the others.
        All requests are on the wire before the single await.
        """
        ids = list(dict.fromkeys(agent_ids))
        kind = _event_kind(event)
        results = await self._send_all([(a, correlation_id, event, kind) for a in ids])
        return dict(zip(ids, results))

    async def send_batch(
        self, agent_id: str, items: Iterable[tuple[str, Event]]
    ) -> list[AgentResponse | Exception]:
        """Send many ``(correlation_id, event)`` to one agent at once; results in order.

        Each is a separate request (as from the matching ``send_*`` method, each with its
        own correlation id); a result is its AgentResponse or the error it failed with.
        """
        return await self._send_all(
            [(agent_id, cid, event, _event_kind(event)) for cid, event in items]
        )

    async def _send_all(
        self, requests: list[tuple[str, str, Event, int]]
    ) -> list[AgentResponse | Exception]:
        """Submit every request now, then wait once for all of them.

        Requests that must wait (for a slot, flow control, room in the write queue, or on a
        v1 connection) run as :meth:`_send` tasks; the others count down one RequestGroup
        in the core, so a completion costs no callback.
        """
        loop = asyncio.get_running_loop()
        n = len(requests)
        # filled by index: every slot is set before it is returned
        results: list[Any] = [None] * n
        group = core.RequestGroup(loop.create_future())
        fast: list[tuple[int, _Submitted]] = []
        tasks: list[tuple[int, asyncio.Task[AgentResponse]]] = []
        for i, (agent_id, cid, event, kind) in enumerate(requests):
            try:
                item = self._submit_now(agent_id, cid, event, kind, group)
            except Exception as exc:
                results[i] = exc
                continue
            if item is None:
                tasks.append(
                    (i, loop.create_task(self._send(agent_id, cid, event, kind, None, None)))
                )
            else:
                fast.append((i, item))
        if tasks:
            await self._wait_mixed(requests, results, fast, tasks)
            return results
        if group.remaining:
            try:
                await group.future
            except asyncio.CancelledError:
                for i, item in fast:
                    fut, st = item[0], item[2]
                    if not fut.done():
                        _abandon(st, requests[i][1], fut)
                    self._settle(*item)
                raise
        for i, item in fast:
            results[i] = self._settle(*item)
        return results

    async def _wait_mixed(
        self,
        requests: list[tuple[str, str, Event, int]],
        results: list[Any],
        fast: list[tuple[int, _Submitted]],
        tasks: list[tuple[int, asyncio.Task[AgentResponse]]],
    ) -> None:
        """Wait for submitted requests and :meth:`_send` tasks together; each submitted one
        is accounted as it completes (its slot may be what a task waits for)."""
        remaining = len(fast) + len(tasks)
        done = asyncio.get_running_loop().create_future()

        def finished(
            i: int, item: _Submitted | None, fut: asyncio.Future[AgentResponse]
        ) -> None:
            nonlocal remaining
            if item is None:  # a _send task: accounted there
                if fut.cancelled():
                    results[i] = RequestCancelled(f"request {requests[i][1]} abandoned")
                else:
                    results[i] = fut.exception() or fut.result()
            else:
                results[i] = self._settle(*item)
            remaining -= 1
            if not remaining and not done.done():
                done.set_result(None)

        for i, item in fast:
            item[0].add_done_callback(functools.partial(finished, i, item))
        for i, task in tasks:
            task.add_done_callback(functools.partial(finished, i, None))
        try:
            await done
        except asyncio.CancelledError:
            for i, item in fast:
                if not item[0].done():
                    _abandon(item[2], requests[i][1], item[0])
            for _, task in tasks:
                task.cancel()
            raise

    def _settle(
        self,
        fut: asyncio.Future[AgentResponse],
        entry: _AgentEntry | EndpointRecord,
        st: ConnState,
        breaker: CircuitBreaker | EndpointsBreaker | None,
        kind: int,
        started: float,
    ) -> AgentResponse | Exception:
        """Account a completed request of :meth:`_send_all` (its success was accounted by the
        core); its result or error."""
        error: BaseException | None
        if fut.cancelled():
            error = RequestCancelled("request abandoned")
        else:
            error = fut.exception()
        if error is None:
            if not entry.breaker_clean and isinstance(breaker, CircuitBreaker):
                breaker.record_success()
                entry.breaker_clean = (
                    breaker.state is CircuitState.CLOSED and breaker.failure_count == 0
                )
            if self._slot_waiters:
                self._wake_slot(st)
            if self._drained is not None and self._in_flight_total() == 0:
                self._drained.set()
            return fut.result()
        if kind & _TRACK:
            self._metrics.dec_in_flight()
        recorded = False
        if isinstance(error, _LOCAL_ERRORS):
            st.release()
        else:
            recorded = self._failed(entry, st, breaker, kind, error)
        self._ended(st, kind, started)
        self._after(entry, breaker, recorded)
        if isinstance(error, Exception):
            return error
        return RequestCancelled(f"request failed: {error!r}")

    def _submit_now(
        self,
        agent_id: str,
        correlation_id: str,
        event: object,
        kind: int,
        group: core.RequestGroup,
    ) -> _Submitted | None:
        """:meth:`_send` up to its await, when nothing has to be waited for; None when
        something does (the caller then runs :meth:`_send`). Errors raised here are
        accounted as in :meth:`_send`."""
        entry, gate, flags = self._admit(agent_id, kind)
        # the agent's breaker, then the chosen connection's endpoint's, as in _send
        breaker: CircuitBreaker | EndpointsBreaker | None = gate
        holder: _AgentEntry | EndpointRecord = entry
        started = _monotonic()
        st = None
        attempted = False
        try:
            if kind & _USE_AFFINITY:
                st = entry.affinity.get(correlation_id, started)
            if st is None:
                st = entry.conns.select(self._strategy)
            if gate is not None:
                ep = entry.endpoint_of.get(st)
                holder = entry if ep is None else ep
                breaker = None if ep is None else ep.breaker
            if (
                (st.paused and kind & _FLOW)
                or st.in_flight >= self._limit
                or (self._slot_waiters and st in self._slot_waiters)
                or st.conn.protocol_core is None
            ):
                self._total_requests -= 1  # counted again by _send
                self._after(holder, breaker, False)
                return None
            attempted = True
            fut = st.conn.protocol_core.submit(
                event, correlation_id, None, st, entry.affinity, flags, group
            )
        except Unavailable as exc:
            if attempted:  # the write queue is full: _send waits for room
                self._total_requests -= 1
                self._after(holder, breaker, False)
                return None
            self._refused(holder, st, breaker, kind, exc, started, attempted)
            raise
        except BaseException as exc:
            self._refused(holder, st, breaker, kind, exc, started, attempted)
            raise
        if kind & _STORE_AFFINITY and entry is not self._sole:
            self._index_affinity(correlation_id, entry)
        return fut, holder, st, breaker, kind, started

    def _refused(
        self,
        entry: _AgentEntry | EndpointRecord,
        st: ConnState | None,
        breaker: CircuitBreaker | EndpointsBreaker | None,
        kind: int,
        exc: BaseException,
        started: float,
        attempted: bool,
    ) -> None:
        """Account a request the core did not take (nothing was begun for it)."""
        recorded = False
        if kind & _TRACK:
            self._metrics.inc_requests()
        if attempted:
            assert st is not None  # attempted: a connection was chosen
            if isinstance(exc, ConnectionClosed) and not isinstance(exc, _LOCAL_ERRORS):
                st.begin(started)
                recorded = self._failed(entry, st, breaker, kind, exc)
            elif kind & _TRACK and isinstance(exc, Serialization):
                self._metrics.inc_serialization_errors()
            self._ended(st, kind, started)
        self._after(entry, breaker, recorded)

    def _failed(
        self,
        entry: _AgentEntry | EndpointRecord,
        st: ConnState,
        breaker: CircuitBreaker | EndpointsBreaker | None,
        kind: int,
        exc: BaseException,
    ) -> bool:
        """Account a request the agent (or its connection) failed; True if the breaker got it."""
        st.finish(False)
        self._total_errors += 1
        recorded = False
        if isinstance(breaker, CircuitBreaker) and isinstance(exc, AgentProtocolError):
            breaker.record_failure()
            entry.breaker_clean = False
            recorded = True
        if kind & _TRACK:
            pm = self._metrics
            if isinstance(exc, Timeout):
                pm.inc_timeouts()
            elif isinstance(exc, (ConnectionClosed, ConnectionFailed)):
                pm.inc_connection_errors()
            elif isinstance(exc, Serialization):
                pm.inc_serialization_errors()
        return recorded

    def _ended(self, st: ConnState, kind: int, started: float) -> None:
        """A request that held a slot ended without a reply: its duration, its slot."""
        if kind & _DURATION:
            self._metrics.record_request_duration(_monotonic() - started)
        if self._slot_waiters:
            self._wake_slot(st)

    def _after(
        self,
        entry: _AgentEntry | EndpointRecord,
        breaker: CircuitBreaker | EndpointsBreaker | None,
        recorded: bool,
    ) -> None:
        """After a request that did not succeed: the drain event, the breaker's probe slot."""
        if self._drained is not None and self._in_flight_total() == 0:
            self._drained.set()
        if (
            not recorded
            and breaker is not None
            and not entry.breaker_clean
            and breaker.state is CircuitState.HALF_OPEN
        ):
            breaker.release()  # never reached the agent: the probe slot goes back

    def _unpaused_alternative(self, entry: _AgentEntry, chosen: ConnState) -> ConnState:
        for st in entry.conns:
            if st.healthy and not st.closed and not st.paused:
                return st
        return chosen

    async def _flow_gate(self, entry: _AgentEntry, st: ConnState) -> bool:
        """Apply the flow-control mode to a paused connection; False means fail open."""
        mode = self._flow_mode
        if mode == FlowControlMode.WAIT_AND_RETRY:
            deadline = _monotonic() + self._config.flow_control_wait_timeout
            while st.paused and not st.closed:
                remaining = deadline - _monotonic()
                if remaining <= 0:
                    break
                event = self._resume_events.get(st)
                if event is None:
                    event = self._resume_events[st] = asyncio.Event()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(event.wait(), remaining)
            if not st.paused or st.closed:
                return True
        self._metrics.record_flow_rejection()
        if mode == FlowControlMode.FAIL_OPEN:
            return False
        raise FlowControlPaused(entry.agent_id)

    async def _acquire_slot(
        self, entry: _AgentEntry, st: ConnState, correlation_id: str, timeout: float | None
    ) -> ConnState:
        """Wait for a slot below ``max_concurrent_per_connection``; the connection it got.

        Waiters are served first come, first served: a freed slot is taken on behalf of the
        oldest waiter before it wakes (:meth:`_wake_slot`), so later callers cannot take it
        first. The wait is bounded by the request timeout (Timeout, phase ``slot``); a closed
        connection sends its waiters to another one.
        """
        loop = asyncio.get_running_loop()
        t = self._config.request_timeout if timeout is None else timeout
        deadline = loop.time() + t
        while True:
            if st.closed or st.conn.is_closed:
                st = entry.conns.select(self._strategy)
            waiters = self._slot_waiters.get(st)
            if st.in_flight < self._limit and not waiters:
                st.begin(_monotonic())
                return st
            if waiters is None:
                waiters = self._slot_waiters[st] = deque()
            fut: asyncio.Future[bool] = loop.create_future()
            waiters.append(fut)
            try:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                handed = await asyncio.wait_for(fut, remaining)
            except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
                if fut.done() and not fut.cancelled() and fut.result():
                    st.release()  # a slot was handed over as we gave up: pass it on
                    self._wake_slot(st)
                else:
                    with contextlib.suppress(ValueError):
                        waiters.remove(fut)
                    if not waiters and self._slot_waiters.get(st) is waiters:
                        del self._slot_waiters[st]
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise Timeout(
                    t, agent_id=entry.agent_id, phase="slot", correlation_id=correlation_id
                ) from None
            if handed:
                if not st.conn.is_closed:
                    return st
                st.release()  # the connection died as the slot was handed over

    def _wake_slot(self, st: ConnState) -> None:
        """Hand freed slots of ``st`` to its oldest waiters (taken for them before they run)."""
        waiters = self._slot_waiters.get(st)
        if waiters is None:
            return
        if st.closed or st.conn.is_closed:
            self._wake_all(st)  # its waiters go elsewhere
            return
        while waiters and st.in_flight < self._limit:
            fut = waiters.popleft()
            if not fut.done():
                st.begin(_monotonic())
                fut.set_result(True)
        if not waiters:
            del self._slot_waiters[st]

    def _affinity_rejected(self) -> None:
        self._metrics.inc_affinity_rejections()
        if not self._affinity_warned:
            self._affinity_warned = True
            log.warning(
                "correlation affinity map at capacity (%d per agent); body chunks of new "
                "requests fall back to normal selection (zentinel_agent_affinity_rejections_total)",
                self._config.max_correlation_affinities,
            )

    async def cancel_request(
        self, agent_id: str, correlation_id: str, reason: CancelReason = CancelReason.MANUAL
    ) -> None:
        """Send a Cancel for ``correlation_id`` on every connection of the agent.

        The caller awaiting that request fails at once with ``ConnectionClosed``.
        """
        entry = self._agents.get(agent_id)
        if entry is None:
            raise self._not_found(agent_id)
        calls = [
            st.conn.cancel(correlation_id, reason) for st in entry.all_states() if not st.closed
        ]
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                log.debug("cancel of %s on agent %r failed: %s", correlation_id, agent_id, result)

    # ------------------------------------------------------------------ affinity and sessions

    def clear_correlation_affinity(self, correlation_id: str) -> None:
        """Forget the request's affinity (call it when the request ends).

        The ``correlation_affinities`` gauge is refreshed lazily (``protocol_metrics``,
        ``export_prometheus()``, maintenance), keeping this call cheap.
        """
        unindexed = self._unindexed
        if unindexed is not None:
            unindexed.affinity.remove(correlation_id)
        held = self._affinity_index.pop(correlation_id, None)
        if held is None:
            return
        if isinstance(held, tuple):
            for entry in held:
                entry.affinity.remove(correlation_id)
        else:
            held.affinity.remove(correlation_id)

    def _agents_changed(self) -> None:
        """Keep ``_sole``/``_unindexed`` right after an agent joined or left."""
        if len(self._agents) == 1:
            (only,) = self._agents.values()
            self._sole = self._unindexed = only
        else:
            self._sole = None
            u = self._unindexed
            if u is not None and self._agents.get(u.agent_id) is not u:
                self._unindexed = None

    def _index_affinity(self, correlation_id: str, entry: _AgentEntry) -> None:
        """Note that ``entry`` holds ``correlation_id`` in its affinity map (so may others)."""
        index = self._affinity_index
        held = index.get(correlation_id)
        if held is None:
            index[correlation_id] = entry
        elif held is entry:
            return
        elif not isinstance(held, tuple):
            index[correlation_id] = (held, entry)
        elif entry not in held:
            index[correlation_id] = (*held, entry)

    def _purge_affinity_index(self) -> None:
        """Drop index entries of ids no longer stored in any map they point to."""
        index = self._affinity_index
        for cid, held in list(index.items()):
            entries = held if isinstance(held, tuple) else (held,)
            if all(e.affinity.peek(cid) is None for e in entries):
                del index[cid]

    def cleanup_expired_affinities(self) -> int:
        """Remove affinities idle longer than ``correlation_affinity_ttl``; returns the count."""
        now = _monotonic()
        ttl = self._config.correlation_affinity_ttl
        removed = sum(e.affinity.sweep(now, ttl) for e in list(self._agents.values()))
        if removed:
            self._metrics.inc_affinity_evictions(removed)
        count = self.correlation_affinity_count()
        if len(self._affinity_index) > count:  # some indexed bindings are gone
            self._purge_affinity_index()
        self._metrics.set_correlation_affinities(count)
        if self._affinity_warned and count < self._config.max_correlation_affinities:
            self._affinity_warned = False
        return int(removed)

    def create_sticky_session(self, session_id: str, agent_id: str) -> None:
        """Bind ``session_id`` to a connection of ``agent_id`` chosen by normal selection."""
        entry = self._agents.get(agent_id)
        if entry is None:
            raise self._not_found(agent_id)
        st = entry.conns.select(self._strategy)
        self._sessions.create(session_id, st, agent_id, _monotonic())

    def refresh_sticky_session(self, session_id: str) -> bool:
        """True if the session is valid; refreshes its idle timer (expired ones are removed)."""
        return self._sessions.lookup(session_id, _monotonic(), self._sticky_timeout) is not None

    def has_sticky_session(self, session_id: str) -> bool:
        """Whether a valid session exists; a pure query (upstream's also refreshes it)."""
        return bool(self._sessions.has(session_id, _monotonic(), self._sticky_timeout))

    def clear_sticky_session(self, session_id: str) -> None:
        """Remove the session if present."""
        self._sessions.remove(session_id)

    def sticky_session_agent(self, session_id: str) -> str | None:
        """Agent id the session is bound to (no expiry check)."""
        agent: str | None = self._sessions.agent(session_id)
        return agent

    def cleanup_expired_sessions(self) -> int:
        """Remove expired sticky sessions; 0 when sessions never expire."""
        if self._sticky_timeout is None:
            return 0
        return int(self._sessions.sweep(_monotonic(), self._sticky_timeout))

    # ------------------------------------------------------------------ config push

    def push_config_to_agent(self, agent_id: str, update_type: ConfigUpdateType) -> str | None:
        """Push a config update to a push-capable agent as a Configure event; the push id.

        The agent's Allow acknowledges the push, Block rejects it; unanswered pushes are
        retried and expired by maintenance. None when the agent is unknown or cannot take pushes.
        """
        return self._push_delivery.push_to_agent(agent_id, update_type)

    def push_config_to_all(self, update_type: ConfigUpdateType) -> list[str]:
        """Push to every push-capable agent; the push ids."""
        ids: list[str] = []
        for agent_id in list(self._agents):
            push_id = self.push_config_to_agent(agent_id, update_type)
            if push_id is not None:
                ids.append(push_id)
        return ids

    def acknowledge_config_push(
        self, push_id: str, accepted: bool, error: str | None = None
    ) -> None:
        """Record an acknowledgement that arrived out of band."""
        self._pusher.acknowledge(push_id, accepted, error)

    def _push_pending(self, agent_id: str, cid: str) -> bool:
        """Whether a connection of the agent still owes a reply for ``cid`` (push retries)."""
        entry = self._agents.get(agent_id)
        if entry is None:
            return False
        return any(not st.closed and st.conn.is_pending(cid) for st in entry.all_states())

    def _send_configure(
        self, agent_id: str, cid: str, event: ConfigureEvent, timeout: float
    ) -> Coroutine[Any, Any, AgentResponse]:
        """One config push attempt, sent like any event (no circuit breaker accounting)."""
        return self._send(agent_id, cid, event, _KIND_CONFIGURE, None, timeout)

    # ------------------------------------------------------------------ maintenance

    async def run_maintenance(self) -> None:
        """Run :meth:`run_maintenance_once` every ``health_check_interval`` until shutdown.

        As upstream's, meant to be spawned as a background task
        (``asyncio.create_task(pool.run_maintenance())``); ``async with`` and :meth:`start`
        spawn it for you. A pass that fails is logged and the loop goes on.
        """
        interval = self._config.health_check_interval
        loop = asyncio.get_running_loop()
        while not self._closing:
            try:
                await self.run_maintenance_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("agent pool maintenance pass failed")
            if self._closing:
                break
            wakeup: asyncio.Future[None] = loop.create_future()
            self._maintenance_wakeups.add(wakeup)
            try:
                await asyncio.wait((wakeup,), timeout=interval)
            finally:
                self._maintenance_wakeups.discard(wakeup)
                wakeup.cancel()

    def _stop_maintenance(self) -> None:
        for wakeup in self._maintenance_wakeups:
            if not wakeup.done():
                wakeup.set_result(None)

    async def run_maintenance_once(self) -> None:
        """One maintenance pass (:meth:`run_maintenance` runs it every ``health_check_interval``).

        Sweeps sessions, affinities and agent metrics; recomputes connection health; pings
        connections marked unhealthy by errors and (``keepalive``) idle ones, replacing those
        that do not answer; replaces dead connections and reconnects with backoff; retries and
        expires config pushes; refreshes the connection gauges.
        """
        if self._maintenance_lock is None:
            self._maintenance_lock = asyncio.Lock()
        async with self._maintenance_lock:
            self.cleanup_expired_sessions()
            self.cleanup_expired_affinities()
            self._collector.expire_old_metrics()
            entries = list(self._agents.values())
            if entries:
                results = await asyncio.gather(
                    *(self._maintain_agent(e) for e in entries), return_exceptions=True
                )
                for entry, result in zip(entries, results):
                    if isinstance(result, asyncio.CancelledError):
                        raise result
                    if isinstance(result, BaseException):
                        log.error("maintenance of agent %r failed: %r", entry.agent_id, result)
            self._push_delivery.retry_and_expire()
            self._refresh_gauges()

    async def _maintain_agent(self, entry: _AgentEntry) -> None:
        dead: list[ConnState] = []
        probes: list[ConnState] = []
        cfg = self._config
        idle_before = _monotonic() - cfg.health_check_interval
        eps = entry.active()
        several = len(eps) > 1
        refresh_selection(eps)
        for ep in eps:
            breaker = ep.breaker
            keepalive = (
                cfg.keepalive
                and entry.protocol == "v2"
                and (breaker is None or breaker.state is CircuitState.CLOSED)
            )
            for st in list(ep.states):
                if st.closed or not st.conn.is_connected:
                    dead.append(st)
                elif st.consecutive_errors >= 3:
                    probes.append(st)
                else:
                    st.healthy = ep.reported_ok and ep.selectable
                    if keepalive and st.in_flight == 0 and st.last_used <= idle_before:
                        probes.append(st)
        if probes:
            timeout = cfg.ping_timeout
            results = await asyncio.gather(
                *(st.conn.ping(timeout) for st in probes), return_exceptions=True
            )
            for st, result in zip(probes, results):
                owner = entry.endpoint_of.get(st)
                if isinstance(result, BaseException):
                    log.warning(
                        "connection to agent %r%s failed its ping (%s); replacing it",
                        entry.agent_id,
                        f" at {owner.endpoint}" if owner is not None and several else "",
                        result,
                    )
                    st.conn.close()
                    dead.append(st)
                elif owner is not None:
                    st.healthy = owner.reported_ok and owner.selectable and not st.closed
        for st in dead:
            self._retire(entry, st)
        if self._agents.get(entry.agent_id) is not entry:
            return
        if entry.reverse:
            if len(entry.conns) == 0:
                del self._agents[entry.agent_id]
                self._agents_changed()
                self._pusher.unregister_agent(entry.agent_id)
            return
        if several:
            await self._probe_breakers(entry, eps)
        refresh_selection(eps)
        healthy = entry.is_healthy()
        if healthy != entry.was_healthy:
            entry.was_healthy = healthy
            if healthy:
                log.info("agent %r recovered", entry.agent_id)
            else:
                log.warning("agent %r marked unhealthy", entry.agent_id)
        now = _monotonic()
        due = [
            ep
            for ep in eps
            if cfg.connections_per_agent > len(ep.states)
            and not ep.reconnecting
            and now >= ep.next_reconnect_at
        ]
        if due:
            await asyncio.gather(
                *(
                    self._reconnect(entry, ep, cfg.connections_per_agent - len(ep.states))
                    for ep in due
                )
            )

    async def _probe_breakers(self, entry: _AgentEntry, eps: list[EndpointRecord]) -> None:
        """Half-open probes of an endpoint set: pings from maintenance, not live requests.

        With several endpoints, one whose breaker timeout has run out is probed with pings on
        its connections (live requests keep going to the others); ``success_threshold``
        answered pings close its breaker, a failed one re-opens it.
        """
        for ep in eps:
            breaker = ep.breaker
            if breaker is None or breaker.state is CircuitState.CLOSED:
                continue
            if breaker.state is CircuitState.OPEN and breaker.retry_after() > 0:
                continue
            live = [st for st in ep.states if not st.closed and st.conn.is_connected]
            if not live or entry.protocol != "v2":
                continue
            breaker.is_closed()  # open -> half-open
            for i in range(breaker.config.success_threshold):
                try:
                    await live[i % len(live)].conn.ping(self._config.ping_timeout)
                except Exception as exc:  # any failure re-opens it
                    breaker.record_failure()
                    log.info(
                        "agent %r: breaker probe of %s failed: %s", entry.agent_id, ep.endpoint, exc
                    )
                    break
                breaker.record_success()
            ep.breaker_clean = ep.admits() and breaker.failure_count == 0

    async def _reconnect(self, entry: _AgentEntry, ep: EndpointRecord, missing: int) -> None:
        ep.reconnecting = True
        had_live = ep.live_count() > 0
        try:
            results = await self._open_many(entry, ep, missing)
        finally:
            ep.reconnecting = False
        opened = [r for r in results if isinstance(r, AgentConnection)]
        errors = [r for r in results if not isinstance(r, AgentConnection)]
        if (
            self._agents.get(entry.agent_id) is not entry
            or self._closing
            or entry.endpoints.get(ep.endpoint) is not ep
        ):
            for conn in opened:
                conn.close()
            return
        if opened and not had_live:
            ep.reported_ok = True  # a fresh agent process: forget the old health report
        for conn in opened:
            self._attach(entry, ep, conn)
        where = f" at {ep.endpoint}" if len(entry.endpoints) > 1 else ""
        if opened:
            entry.conns.last_error = None
            ep.last_error = None
            ep.reconnect_attempts = 0
            ep.next_reconnect_at = 0.0
            self._set_capabilities(entry, opened[0].capabilities)
            if not had_live and ep.breaker is not None:
                ep.breaker.reset()
                ep.breaker_clean = True
            refresh_selection(entry.active())
            log.info(
                "reconnected %d connection(s) to agent %r%s", len(opened), entry.agent_id, where
            )
            if entry.is_healthy() and not entry.was_healthy:
                entry.was_healthy = True
                log.info("agent %r recovered", entry.agent_id)
        else:
            if errors:
                _record_connect_error(entry, ep, errors[0])
            ep.reconnect_attempts += 1
            delay = self._config.reconnect_delay(ep.reconnect_attempts)
            ep.next_reconnect_at = _monotonic() + delay
            log.warning(
                "reconnect to agent %r%s failed (attempt %d, next in %.1fs): %s",
                entry.agent_id,
                where,
                ep.reconnect_attempts,
                delay,
                errors[0] if errors else "unknown error",
            )

    # ------------------------------------------------------------------ stats

    def _refresh_gauges(self) -> None:
        pm = self._metrics
        with contextlib.suppress(RuntimeError):  # a scrape thread raced a membership change
            pm.set_healthy_connections(self._count_healthy())
            pm.set_paused_connections(self._count_paused())
            pm.set_correlation_affinities(self.correlation_affinity_count())
            pm.set_buffer_utilization(self._buffer_utilization())

    def _buffer_utilization(self) -> int:
        """Fullest connection write buffer, as a percentage of its limit."""
        worst = 0.0
        for st in self._all_states():
            proto = None if st.closed else st.conn.protocol_core
            if proto is not None and proto.max_write_buffer:
                worst = max(worst, 100.0 * proto.write_buffer_size / proto.max_write_buffer)
        return min(100, round(worst))

    def _all_states(self) -> Iterable[ConnState]:
        for entry in list(self._agents.values()):
            yield from list(entry.conns)

    def _count_healthy(self) -> int:
        return sum(1 for st in self._all_states() if st.healthy and not st.closed)

    def _count_paused(self) -> int:
        return sum(1 for st in self._all_states() if st.paused and not st.closed)

    @staticmethod
    def _entry_stats(entry: _AgentEntry) -> AgentPoolStats:
        states = list(entry.endpoint_of)
        requests = entry.retired_requests + sum(st.request_count for st in states)
        errors = entry.retired_errors + sum(st.error_count for st in states)
        return AgentPoolStats(
            agent_id=entry.agent_id,
            active_connections=sum(1 for st in states if not st.closed),
            healthy_connections=sum(1 for st in states if st.healthy and not st.closed),
            total_in_flight=sum(st.in_flight for st in states),
            total_requests=requests,
            total_errors=errors,
            error_rate=errors / requests if requests else 0.0,
            is_healthy=entry.is_healthy(),
        )

    def agent_stats_sync(self) -> list[AgentPoolStats]:
        """Per-agent stats, synchronously (for collectors; safe from another thread)."""
        for _ in range(5):
            try:
                return [self._entry_stats(e) for e in list(self._agents.values())]
            except RuntimeError:
                continue
        return []

    async def stats(self) -> list[AgentPoolStats]:
        """One :class:`AgentPoolStats` per agent."""
        return self.agent_stats_sync()

    async def agent_stats(self, agent_id: str) -> AgentPoolStats | None:
        """Stats of one agent, or None if unknown."""
        entry = self._agents.get(agent_id)
        return None if entry is None else self._entry_stats(entry)

    def __repr__(self) -> str:
        return (
            f"AgentPool(agents={len(self._agents)}, "
            f"strategy={self._config.load_balance_strategy.name}, closing={self._closing})"
        )
