"""Config push ledger and delivery, and agent config-request handling (docs/pool.md, "Config push").

:class:`ConfigPusher` tracks proxy→agent config pushes: ids, attempts, acknowledgements,
retries and expiry. It sends nothing itself (upstream's ledger); :class:`ConfigPushDelivery`
transmits each push through the pool as a Configure (0x17) event whose correlation id is the
push id, re-sends what :meth:`ConfigPusher.get_retryable` returns, and reports the agent's
answer through :meth:`ConfigPusher.acknowledge`.

:class:`ConfigUpdateHandler` answers ConfigUpdateRequest frames that agents send to the proxy,
delegating rule and list updates to application callbacks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeAlias

from .errors import AgentProtocolError
from .messages import (
    AgentResponse,
    Allow,
    Block,
    ConfigError,
    ConfigUpdateRequest,
    ConfigUpdateResponse,
    ConfigUpdateType,
    ConfigureEvent,
    ListUpdate,
    RequestReload,
    RestartRequired,
    RuleUpdate,
    now_ms,
)

__all__ = [
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_PENDING_AGE",
    "DEFAULT_MAX_REQUEST_ID_LENGTH",
    "RESULT_RETENTION",
    "ConfigPushDelivery",
    "ConfigPusher",
    "ConfigPusherConfig",
    "ConfigUpdateHandler",
    "ListUpdateCallback",
    "PendingPush",
    "PushResult",
    "PushStatus",
    "PushTarget",
    "RuleUpdateCallback",
    "SendConfigure",
    "config_update_payload",
]

log = logging.getLogger(__name__)

RuleUpdateCallback: TypeAlias = Callable[[str, list[Any], list[str]], bool]
ListUpdateCallback: TypeAlias = Callable[[str, list[str], list[str]], bool]

RESULT_RETENTION = 60.0
"""Seconds a finished push (acknowledged, failed, expired) stays in the results."""

DEFAULT_MAX_PENDING = 256
"""Reload requests a :class:`ConfigUpdateHandler` remembers at most."""

DEFAULT_MAX_PENDING_AGE = 300.0
"""Seconds a :class:`ConfigUpdateHandler` remembers a reload request."""

DEFAULT_MAX_REQUEST_ID_LENGTH = 256
"""Longest reload request id a :class:`ConfigUpdateHandler` accepts."""


@dataclass(slots=True)
class ConfigPusherConfig:
    """Push policy (upstream defaults); durations in seconds.

    ``max_pending_per_agent`` is enforced (upstream declares it but never uses it): a push
    to an agent that already has that many pushes awaiting an answer is refused.
    """

    ack_timeout: float = 10.0
    max_retries: int = 3
    retry_interval: float = 2.0
    max_pending_per_agent: int = 100


class PushStatus(enum.Enum):
    """Push state; a ``FAILED`` push carries its reason in the record's ``reason`` field."""

    PENDING = "pending"
    SENT = "sent"
    ACKNOWLEDGED = "acknowledged"
    FAILED = "failed"
    EXPIRED = "expired"

    @property
    def is_outstanding(self) -> bool:
        """Still waiting for an answer (``PENDING`` or ``SENT``)."""
        return self is PushStatus.PENDING or self is PushStatus.SENT


@dataclass(frozen=True, slots=True)
class PushResult:
    """Public view of one tracked push."""

    push_id: str
    agent_id: str
    status: PushStatus
    attempts: int
    reason: str | None = None


@dataclass(slots=True)
class PushTarget:
    """A registered agent (upstream's ``AgentConnection`` record); times are clock seconds."""

    agent_id: str
    name: str
    connected_at: float
    last_seen: float
    successful_pushes: int = 0
    failed_pushes: int = 0
    supports_push: bool = False


@dataclass(slots=True)
class PendingPush:
    """One tracked push; ``update.request_id`` equals ``push_id``."""

    push_id: str
    agent_id: str
    update: ConfigUpdateRequest
    created_at: float
    last_attempt: float
    attempts: int = 1
    status: PushStatus = PushStatus.SENT
    reason: str | None = None


class ConfigPusher:
    """Ledger of config pushes with upstream's semantics (docs/pool.md, "Config push").

    Push ids are ``"push-<n>"``, n counting from 1 across all agents. Pushes go only to
    registered agents that support push. Acknowledgements may overwrite any status.
    """

    def __init__(
        self,
        config: ConfigPusherConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config if config is not None else ConfigPusherConfig()
        self._clock = clock
        self._agents: dict[str, PushTarget] = {}
        self._pushes: dict[str, PendingPush] = {}
        self._seq = 0

    # -- agents

    def register_agent(self, agent_id: str, name: str, supports_push: bool) -> None:
        """Insert or replace the agent's record (counters reset, times = now)."""
        now = self._clock()
        self._agents[agent_id] = PushTarget(agent_id, name, now, now, 0, 0, supports_push)

    def unregister_agent(self, agent_id: str) -> None:
        """Forget the agent and every push tracked for it."""
        self._agents.pop(agent_id, None)
        for pid in [pid for pid, p in self._pushes.items() if p.agent_id == agent_id]:
            del self._pushes[pid]

    def touch_agent(self, agent_id: str) -> bool:
        """Mark the agent as seen now; False if it is not registered."""
        target = self._agents.get(agent_id)
        if target is None:
            return False
        target.last_seen = self._clock()
        return True

    def get_agent(self, agent_id: str) -> PushTarget | None:
        """The agent's record, if registered."""
        return self._agents.get(agent_id)

    def connected_agents(self) -> list[PushTarget]:
        """Every registered agent."""
        return list(self._agents.values())

    def pushable_agents(self) -> list[PushTarget]:
        """Registered agents that support config push."""
        return [a for a in self._agents.values() if a.supports_push]

    # -- pushes

    def push_to_agent(self, agent_id: str, update_type: ConfigUpdateType) -> str | None:
        """Track a new push and return its id.

        None if the agent is unknown, does not support push, or already has
        ``max_pending_per_agent`` pushes awaiting an answer.
        """
        target = self._agents.get(agent_id)
        if target is None or not target.supports_push:
            return None
        outstanding = sum(
            1 for p in self._pushes.values() if p.agent_id == agent_id and p.status.is_outstanding
        )
        if outstanding >= self.config.max_pending_per_agent:
            log.warning(
                "config push to agent %r refused: %d pushes pending (max_pending_per_agent=%d)",
                agent_id,
                outstanding,
                self.config.max_pending_per_agent,
            )
            return None
        self._seq += 1
        push_id = f"push-{self._seq}"
        now = self._clock()
        update = ConfigUpdateRequest(
            update_type=update_type, request_id=push_id, timestamp_ms=now_ms()
        )
        self._pushes[push_id] = PendingPush(push_id, agent_id, update, now, now)
        return push_id

    def push_to_all(self, update_type: ConfigUpdateType) -> list[str]:
        """Push to every push-capable agent; one id per accepted push."""
        ids: list[str] = []
        for target in self.pushable_agents():
            push_id = self.push_to_agent(target.agent_id, update_type)
            if push_id is not None:
                ids.append(push_id)
        return ids

    def acknowledge(self, push_id: str, accepted: bool, error: str | None = None) -> bool:
        """Record the agent's answer; False (and nothing changes) for an unknown id."""
        push = self._pushes.get(push_id)
        if push is None:
            return False
        target = self._agents.get(push.agent_id)
        if accepted:
            push.status = PushStatus.ACKNOWLEDGED
            push.reason = None
            if target is not None:
                target.successful_pushes += 1
        else:
            push.status = PushStatus.FAILED
            push.reason = error if error is not None else "Unknown error"
            if target is not None:
                target.failed_pushes += 1
        return True

    def get_retryable(self) -> list[tuple[str, ConfigUpdateRequest]]:
        """Sent pushes due for another attempt, as ``(agent_id, request)``.

        Due means ``retry_interval`` elapsed since the last attempt and fewer than
        ``max_retries`` attempts so far; each returned push counts one more attempt.
        """
        now = self._clock()
        cfg = self.config
        out: list[tuple[str, ConfigUpdateRequest]] = []
        for p in self._pushes.values():
            if (
                p.status is PushStatus.SENT
                and now - p.last_attempt >= cfg.retry_interval
                and p.attempts < cfg.max_retries
            ):
                p.attempts += 1
                p.last_attempt = now
                out.append((p.agent_id, p.update))
        return out

    def expire_old(self) -> list[str]:
        """Expire sent pushes past ``ack_timeout`` or out of attempts; returns their ids.

        Finished pushes older than :data:`RESULT_RETENTION` seconds are then forgotten.
        """
        now = self._clock()
        cfg = self.config
        expired: list[str] = []
        for p in self._pushes.values():
            if p.status is PushStatus.SENT and (
                now - p.created_at >= cfg.ack_timeout or p.attempts >= cfg.max_retries
            ):
                p.status = PushStatus.EXPIRED
                expired.append(p.push_id)
                target = self._agents.get(p.agent_id)
                if target is not None:
                    target.failed_pushes += 1
        for pid in [
            pid
            for pid, p in self._pushes.items()
            if not p.status.is_outstanding and now - p.created_at >= RESULT_RETENTION
        ]:
            del self._pushes[pid]
        return expired

    def get_results(self) -> list[PushResult]:
        """Every tracked push, oldest first."""
        return [
            PushResult(p.push_id, p.agent_id, p.status, p.attempts, p.reason)
            for p in self._pushes.values()
        ]

    def get_result(self, push_id: str) -> PushResult | None:
        """One push's status, if still tracked."""
        p = self._pushes.get(push_id)
        if p is None:
            return None
        return PushResult(p.push_id, p.agent_id, p.status, p.attempts, p.reason)

    def pending_pushes(self, agent_id: str | None = None) -> list[PendingPush]:
        """Copies of the pushes still awaiting an answer (optionally for one agent),
        for the pool to (re)send."""
        return [
            replace(p)
            for p in self._pushes.values()
            if p.status.is_outstanding and (agent_id is None or p.agent_id == agent_id)
        ]

    def pending_count(self) -> int:
        """Pushes still awaiting an answer."""
        return sum(1 for p in self._pushes.values() if p.status.is_outstanding)

    def __repr__(self) -> str:
        return f"ConfigPusher(agents={len(self._agents)}, pending={self.pending_count()})"


def _wire_value(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _wire_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_wire_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _wire_value(v) for k, v in value.items()}
    return value


def config_update_payload(request: ConfigUpdateRequest) -> dict[str, Any]:
    """The ``config`` value of a push's Configure event: the update as serde writes it."""
    update = request.update_type
    body = {"type": update.TYPE}
    body.update(_wire_value(update))
    return {
        "update_type": body,
        "request_id": request.request_id,
        "timestamp_ms": request.timestamp_ms,
    }


#: ``send(agent_id, correlation_id, event, timeout)``: the pool's send of one Configure event.
SendConfigure: TypeAlias = Callable[[str, str, ConfigureEvent, float], Awaitable[AgentResponse]]


class ConfigPushDelivery:
    """Delivers the pushes of a :class:`ConfigPusher` (the wire part the ledger leaves out).

    Each attempt is a Configure event (correlation id: the push id) sent with ``send``; the
    agent's Allow acknowledges the push, Block rejects it with its body as the reason. An
    attempt waits at most ``retry_interval`` (bounded by ``ack_timeout``); unanswered pushes
    stay ``Sent`` for :meth:`retry_and_expire` (run by the pool's maintenance). ``is_pending``
    tells whether a connection of the agent still owes a reply for a correlation id (a retry
    then uses ``<push id>/retry-<n>``, as a reused id would be refused). Attempts run as tasks
    added to ``tasks`` (the pool's, awaited on shutdown), none once ``closing()``.
    """

    def __init__(
        self,
        pusher: ConfigPusher,
        send: SendConfigure,
        is_pending: Callable[[str, str], bool],
        *,
        closing: Callable[[], bool],
        tasks: set[asyncio.Task[Any]],
    ) -> None:
        self.pusher = pusher
        self._send = send
        self._is_pending = is_pending
        self._closing = closing
        self._tasks = tasks
        #: Push ids with an attempt under way.
        self.in_flight: set[str] = set()

    def push_to_agent(self, agent_id: str, update_type: ConfigUpdateType) -> str | None:
        """Track a push in the ledger and start its first attempt; the push id or None."""
        push_id = self.pusher.push_to_agent(agent_id, update_type)
        if push_id is not None:
            self._spawn(agent_id, ConfigUpdateRequest(update_type, push_id, now_ms()))
        return push_id

    def retry_and_expire(self) -> None:
        """Start the attempts the ledger says are due, then expire what is out of time."""
        for agent_id, request in self.pusher.get_retryable():
            self._spawn(agent_id, request)
        self.pusher.expire_old()

    def _spawn(self, agent_id: str, request: ConfigUpdateRequest) -> None:
        if request.request_id in self.in_flight or self._closing():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.in_flight.add(request.request_id)
        task = loop.create_task(self._deliver(agent_id, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _correlation_id(self, agent_id: str, push_id: str) -> str:
        cid, n = push_id, 0
        while self._is_pending(agent_id, cid):
            n += 1
            cid = f"{push_id}/retry-{n}"
        return cid

    async def _deliver(self, agent_id: str, request: ConfigUpdateRequest) -> None:
        push_id = request.request_id
        cid = self._correlation_id(agent_id, push_id)
        event = ConfigureEvent(
            config=config_update_payload(request), config_version=push_id, correlation_id=cid
        )
        policy = self.pusher.config
        attempt_timeout = policy.ack_timeout
        if 0 < policy.retry_interval < attempt_timeout:
            attempt_timeout = policy.retry_interval
        try:
            response = await self._send(agent_id, cid, event, max(attempt_timeout, 0.001))
        except AgentProtocolError as exc:
            log.info("config push %s to agent %r not delivered: %s", push_id, agent_id, exc)
            return
        finally:
            self.in_flight.discard(push_id)
        decision = response.decision
        if isinstance(decision, Allow):
            self.pusher.acknowledge(push_id, True, None)
        elif isinstance(decision, Block):
            self.pusher.acknowledge(push_id, False, decision.body or "Configuration rejected")
        else:
            self.pusher.acknowledge(
                push_id, False, f"unexpected decision {type(decision).__name__}"
            )


class ConfigUpdateHandler:
    """Answers agent-initiated config update requests (docs/observability.md).

    Reload requests are remembered (see :meth:`pending_requests`) and accepted, within
    bounds an agent cannot grow: at most ``max_pending`` (default
    :data:`DEFAULT_MAX_PENDING`), each for ``max_pending_age`` seconds (default
    :data:`DEFAULT_MAX_PENDING_AGE`); the oldest is forgotten first, counted in
    :meth:`dropped_count` with one warning. A reload whose request id is longer than
    ``max_request_id_length`` is rejected and not remembered. Rule and list
    updates go to ``on_rule_update(rule_set, rules, remove_rules)`` /
    ``on_list_update(list_id, add, remove)`` and are accepted when the callback returns
    True (a callback that raises rejects); without a callback they are refused as not
    supported. Restart-required and config-error notices are logged and accepted. The
    callbacks may be passed here or assigned to the attributes of the same names later.
    """

    def __init__(
        self,
        on_rule_update: RuleUpdateCallback | None = None,
        on_list_update: ListUpdateCallback | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_pending_age: float = DEFAULT_MAX_PENDING_AGE,
        max_request_id_length: int = DEFAULT_MAX_REQUEST_ID_LENGTH,
    ) -> None:
        if max_pending < 0 or not max_pending_age >= 0 or max_request_id_length < 1:
            raise ValueError(
                "max_pending and max_pending_age must be >= 0, max_request_id_length >= 1"
            )
        self.on_rule_update = on_rule_update
        self.on_list_update = on_list_update
        self._clock = clock
        self.max_pending = max_pending
        self.max_pending_age = max_pending_age
        self.max_request_id_length = max_request_id_length
        self._pending: dict[str, tuple[ConfigUpdateRequest, float]] = {}
        self._dropped = 0
        self._drop_warned = False

    def set_rule_update_callback(self, callback: RuleUpdateCallback | None) -> None:
        """Install (or remove, with None) the rule update callback."""
        self.on_rule_update = callback

    def set_list_update_callback(self, callback: ListUpdateCallback | None) -> None:
        """Install (or remove, with None) the list update callback."""
        self.on_list_update = callback

    def handle(self, request: ConfigUpdateRequest) -> ConfigUpdateResponse:
        """Decide on one request and build the response to send back."""
        rid = request.request_id
        update = request.update_type
        if isinstance(update, RequestReload):
            if len(rid) > self.max_request_id_length:
                log.warning(
                    "reload request with a %d-character id rejected (max_request_id_length=%d)",
                    len(rid),
                    self.max_request_id_length,
                )
                return self._reject(rid, "Request id too long")
            self._remember(rid, request)
            return self._accept(rid)
        if isinstance(update, RuleUpdate):
            if self.on_rule_update is None:
                return self._reject(rid, "Rule updates not supported")
            ok = self._call(
                self.on_rule_update, "rule", update.rule_set, update.rules, update.remove_rules
            )
            return self._accept(rid) if ok else self._reject(rid, "Rule update rejected")
        if isinstance(update, ListUpdate):
            if self.on_list_update is None:
                return self._reject(rid, "List updates not supported")
            ok = self._call(self.on_list_update, "list", update.list_id, update.add, update.remove)
            return self._accept(rid) if ok else self._reject(rid, "List update rejected")
        if isinstance(update, RestartRequired):
            log.warning(
                "agent requests a restart (request %r): %r (grace period %s ms)",
                rid,
                update.reason,
                update.grace_period_ms,
            )
            return self._accept(rid)
        if isinstance(update, ConfigError):
            if update.field is not None:
                log.error(
                    "agent reports a config error (request %r) in field %r: %r",
                    rid,
                    update.field,
                    update.error,
                )
            else:
                log.error("agent reports a config error (request %r): %r", rid, update.error)
            return self._accept(rid)
        return self._reject(rid, f"Unsupported config update type: {type(update).__name__}")

    @staticmethod
    def _call(callback: Callable[..., bool], kind: str, *args: Sequence[Any] | str) -> bool:
        try:
            return bool(callback(*args))
        except Exception:
            log.exception("%s update callback raised; rejecting the update", kind)
            return False

    @staticmethod
    def _accept(request_id: str) -> ConfigUpdateResponse:
        return ConfigUpdateResponse(
            request_id=request_id, accepted=True, error=None, timestamp_ms=now_ms()
        )

    @staticmethod
    def _reject(request_id: str, error: str) -> ConfigUpdateResponse:
        return ConfigUpdateResponse(
            request_id=request_id, accepted=False, error=error, timestamp_ms=now_ms()
        )

    def _remember(self, rid: str, request: ConfigUpdateRequest) -> None:
        now = self._clock()
        self._pending.pop(rid, None)  # a repeated id counts from now, at the end
        self._expire(now)
        while self._pending and len(self._pending) >= self.max_pending:
            del self._pending[next(iter(self._pending))]
            self._count_drop()
        if self.max_pending == 0:
            self._count_drop()
            return
        self._pending[rid] = (request, now)

    def _count_drop(self) -> None:
        self._dropped += 1
        if not self._drop_warned:
            self._drop_warned = True
            log.warning(
                "pending reload requests at max_pending=%d; forgetting the oldest",
                self.max_pending,
            )

    def _expire(self, now: float) -> None:
        pending = self._pending
        while pending:
            rid = next(iter(pending))
            if now - pending[rid][1] < self.max_pending_age:
                break
            del pending[rid]

    def pending_count(self) -> int:
        """Reload requests remembered and not yet cleared (nor older than the age bound)."""
        self._expire(self._clock())
        return len(self._pending)

    def pending_requests(self) -> list[ConfigUpdateRequest]:
        """The remembered reload requests, oldest first."""
        self._expire(self._clock())
        return [req for req, _ in self._pending.values()]

    def dropped_count(self) -> int:
        """Reload requests forgotten because ``max_pending`` were remembered already."""
        return self._dropped

    def clear_old_pending(self, max_age: float) -> int:
        """Forget remembered requests at least ``max_age`` seconds old; returns how many."""
        now = self._clock()
        old = [rid for rid, (_, at) in self._pending.items() if now - at >= max_age]
        for rid in old:
            del self._pending[rid]
        return len(old)
