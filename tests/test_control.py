"""ConfigPusher and ConfigUpdateHandler (POOL.md §9, §16.3, DECISIONS 7) with a fake clock."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from _helpers import FakeClock

from agentpool.control import (
    RESULT_RETENTION,
    ConfigPusher,
    ConfigPusherConfig,
    ConfigUpdateHandler,
    PushResult,
    PushStatus,
    PushTarget,
)
from agentpool.messages import (
    ConfigError,
    ConfigUpdateRequest,
    ConfigUpdateResponse,
    ListUpdate,
    RequestReload,
    RestartRequired,
    RuleDefinition,
    RuleUpdate,
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(100.0)


@pytest.fixture
def pusher(clock: FakeClock) -> ConfigPusher:
    p = ConfigPusher(clock=clock)
    p.register_agent("waf", "WAF agent", True)
    return p


def statuses(p: ConfigPusher) -> dict[str, PushStatus]:
    return {r.push_id: r.status for r in p.get_results()}


# ---------------------------------------------------------------- ConfigPusher


def test_config_defaults() -> None:
    cfg = ConfigPusherConfig()
    assert cfg.ack_timeout == 10.0
    assert cfg.max_retries == 3
    assert cfg.retry_interval == 2.0
    assert cfg.max_pending_per_agent == 100


def test_registration_visible(clock: FakeClock) -> None:
    p = ConfigPusher(clock=clock)
    p.register_agent("agent-1", "Agent One", True)
    (a,) = p.connected_agents()
    assert a == PushTarget("agent-1", "Agent One", 100.0, 100.0, 0, 0, True)
    assert p.pushable_agents() == [a]
    assert p.get_agent("agent-1") is a
    assert p.get_agent("nope") is None


def test_push_ack_flow(pusher: ConfigPusher) -> None:
    push_id = pusher.push_to_agent("waf", RequestReload())
    assert push_id is not None and push_id.startswith("push-")
    assert pusher.pending_count() == 1
    assert pusher.acknowledge(push_id, True)
    assert pusher.get_results() == [PushResult(push_id, "waf", PushStatus.ACKNOWLEDGED, 1)]
    assert pusher.pending_count() == 0
    agent = pusher.get_agent("waf")
    assert agent is not None and agent.successful_pushes == 1 and agent.failed_pushes == 0


def test_push_request_carries_update_and_push_id(pusher: ConfigPusher) -> None:
    update = ListUpdate(list_id="ips", add=["1.2.3.4"], remove=[])
    push_id = pusher.push_to_agent("waf", update)
    (pending,) = pusher.pending_pushes()
    assert pending.push_id == push_id
    assert pending.agent_id == "waf"
    assert pending.update.request_id == push_id
    assert pending.update.update_type is update
    assert pending.update.timestamp_ms > 1_600_000_000_000
    assert pending.attempts == 1
    assert pending.status is PushStatus.SENT
    assert pending.created_at == pending.last_attempt == 100.0


def test_push_ids_sequential_across_agents(clock: FakeClock) -> None:
    p = ConfigPusher(clock=clock)
    p.register_agent("a", "A", True)
    p.register_agent("b", "B", True)
    assert p.push_to_agent("a", RequestReload()) == "push-1"
    assert p.push_to_agent("b", RequestReload()) == "push-2"
    assert p.push_to_agent("a", RequestReload()) == "push-3"


def test_push_to_unknown_or_incapable_agent(pusher: ConfigPusher) -> None:
    pusher.register_agent("legacy", "Legacy", False)
    assert pusher.push_to_agent("legacy", RequestReload()) is None
    assert pusher.push_to_agent("missing", RequestReload()) is None
    assert pusher.pending_count() == 0
    assert pusher.get_results() == []
    # refused pushes do not consume ids
    assert pusher.push_to_agent("waf", RequestReload()) == "push-1"


def test_push_to_all_only_capable(clock: FakeClock) -> None:
    p = ConfigPusher(clock=clock)
    p.register_agent("a", "A", True)
    p.register_agent("b", "B", False)
    p.register_agent("c", "C", True)
    ids = p.push_to_all(RequestReload())
    assert ids == ["push-1", "push-2"]
    assert p.pending_count() == 2
    assert {r.agent_id for r in p.get_results()} == {"a", "c"}
    assert [a.agent_id for a in p.pushable_agents()] == ["a", "c"]


def test_unregister_removes_agent_and_its_pushes(clock: FakeClock) -> None:
    p = ConfigPusher(clock=clock)
    p.register_agent("a", "A", True)
    p.register_agent("b", "B", True)
    p.push_to_all(RequestReload())
    p.unregister_agent("a")
    assert [a.agent_id for a in p.connected_agents()] == ["b"]
    assert [r.agent_id for r in p.get_results()] == ["b"]
    assert p.pending_count() == 1
    p.unregister_agent("missing")  # no-op


def test_reject_with_reason_and_default_reason(pusher: ConfigPusher) -> None:
    p1 = pusher.push_to_agent("waf", RequestReload())
    p2 = pusher.push_to_agent("waf", RequestReload())
    assert p1 and p2
    pusher.acknowledge(p1, False, "Configuration rejected")
    pusher.acknowledge(p2, False)
    r1, r2 = pusher.get_results()
    assert (r1.status, r1.reason) == (PushStatus.FAILED, "Configuration rejected")
    assert (r2.status, r2.reason) == (PushStatus.FAILED, "Unknown error")
    agent = pusher.get_agent("waf")
    assert agent is not None and agent.failed_pushes == 2 and agent.successful_pushes == 0


def test_ack_unknown_id_is_noop(pusher: ConfigPusher) -> None:
    assert pusher.acknowledge("push-999", True) is False
    agent = pusher.get_agent("waf")
    assert agent is not None and agent.successful_pushes == 0


def test_later_ack_overwrites_status(pusher: ConfigPusher) -> None:
    push_id = pusher.push_to_agent("waf", RequestReload())
    assert push_id
    pusher.acknowledge(push_id, False, "nope")
    pusher.acknowledge(push_id, True)
    result = pusher.get_result(push_id)
    assert result is not None
    assert (result.status, result.reason) == (PushStatus.ACKNOWLEDGED, None)
    agent = pusher.get_agent("waf")
    assert agent is not None and agent.failed_pushes == 1 and agent.successful_pushes == 1


def test_retry_schedule(pusher: ConfigPusher, clock: FakeClock) -> None:
    push_id = pusher.push_to_agent("waf", RequestReload())
    assert pusher.get_retryable() == []
    clock.now += 1.999
    assert pusher.get_retryable() == []
    clock.now += 0.001
    retry = pusher.get_retryable()
    assert len(retry) == 1
    agent_id, request = retry[0]
    assert agent_id == "waf" and request.request_id == push_id
    assert pusher.get_retryable() == []  # last_attempt moved to now
    clock.now += 2.0
    assert len(pusher.get_retryable()) == 1
    (result,) = pusher.get_results()
    assert result.attempts == 3
    clock.now += 5.0
    assert pusher.get_retryable() == []  # max_retries attempts reached


def test_acknowledged_push_not_retried(pusher: ConfigPusher, clock: FakeClock) -> None:
    push_id = pusher.push_to_agent("waf", RequestReload())
    assert push_id
    pusher.acknowledge(push_id, True)
    clock.now += 5
    assert pusher.get_retryable() == []
    assert pusher.expire_old() == []
    assert statuses(pusher) == {push_id: PushStatus.ACKNOWLEDGED}


def test_expire_on_ack_timeout(clock: FakeClock) -> None:
    p = ConfigPusher(ConfigPusherConfig(max_retries=100), clock=clock)
    p.register_agent("waf", "WAF", True)
    push_id = p.push_to_agent("waf", RequestReload())
    clock.now += 9.999
    assert p.expire_old() == []
    clock.now += 0.001
    assert p.expire_old() == [push_id]
    assert statuses(p) == {push_id: PushStatus.EXPIRED}
    assert p.pending_count() == 0
    agent = p.get_agent("waf")
    assert agent is not None and agent.failed_pushes == 1
    assert p.expire_old() == []  # counted once
    assert agent.failed_pushes == 1


def test_expire_when_out_of_attempts(pusher: ConfigPusher, clock: FakeClock) -> None:
    push_id = pusher.push_to_agent("waf", RequestReload())
    for _ in range(2):
        clock.now += 2
        assert pusher.expire_old() == []
        assert len(pusher.get_retryable()) == 1
    # three attempts made: the next expiry pass gives up, before ack_timeout
    assert pusher.expire_old() == [push_id]
    assert statuses(pusher) == {push_id: PushStatus.EXPIRED}


def test_max_retries_one_expires_on_first_pass(clock: FakeClock) -> None:
    p = ConfigPusher(ConfigPusherConfig(max_retries=1), clock=clock)
    p.register_agent("waf", "WAF", True)
    push_id = p.push_to_agent("waf", RequestReload())
    clock.now += 5
    assert p.get_retryable() == []
    assert p.expire_old() == [push_id]


def test_late_ack_after_expiry_still_recorded(pusher: ConfigPusher, clock: FakeClock) -> None:
    push_id = pusher.push_to_agent("waf", RequestReload())
    assert push_id
    clock.now += 10
    assert pusher.expire_old() == [push_id]
    assert pusher.acknowledge(push_id, True)
    assert statuses(pusher) == {push_id: PushStatus.ACKNOWLEDGED}


def test_finished_pushes_dropped_after_retention(pusher: ConfigPusher, clock: FakeClock) -> None:
    done = pusher.push_to_agent("waf", RequestReload())
    assert done
    pusher.acknowledge(done, True)
    clock.now += 30
    fresh = pusher.push_to_agent("waf", RequestReload())
    assert fresh
    pusher.acknowledge(fresh, False, "bad")
    clock.now += RESULT_RETENTION - 30 - 0.001
    pusher.expire_old()
    assert set(statuses(pusher)) == {done, fresh}
    clock.now += 0.001
    pusher.expire_old()
    assert set(statuses(pusher)) == {fresh}
    clock.now += 30
    pusher.expire_old()
    assert pusher.get_results() == []
    assert pusher.acknowledge(done, True) is False


def test_outstanding_pushes_never_dropped(clock: FakeClock) -> None:
    # a Sent push that cannot expire (huge limits) stays tracked past the retention window
    p = ConfigPusher(ConfigPusherConfig(ack_timeout=1e9, max_retries=10**9), clock=clock)
    p.register_agent("waf", "WAF", True)
    push_id = p.push_to_agent("waf", RequestReload())
    clock.now += 10 * RESULT_RETENTION
    p.expire_old()
    assert statuses(p) == {push_id: PushStatus.SENT}


def test_max_pending_per_agent_enforced(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    p = ConfigPusher(ConfigPusherConfig(max_pending_per_agent=2), clock=clock)
    p.register_agent("a", "A", True)
    p.register_agent("b", "B", True)
    first = p.push_to_agent("a", RequestReload())
    assert first and p.push_to_agent("a", RequestReload())
    with caplog.at_level(logging.WARNING, logger="agentpool.control"):
        assert p.push_to_agent("a", RequestReload()) is None
    assert "max_pending_per_agent=2" in caplog.text
    assert p.push_to_agent("b", RequestReload()) == "push-3"  # per agent
    assert p.push_to_all(RequestReload()) == ["push-4"]  # only b had room
    p.acknowledge(first, True)
    assert p.push_to_agent("a", RequestReload()) == "push-5"


def test_pending_pushes_are_copies_and_filterable(clock: FakeClock) -> None:
    p = ConfigPusher(clock=clock)
    p.register_agent("a", "A", True)
    p.register_agent("b", "B", True)
    pa = p.push_to_agent("a", RequestReload())
    pb = p.push_to_agent("b", RequestReload())
    assert [x.push_id for x in p.pending_pushes()] == [pa, pb]
    assert [x.push_id for x in p.pending_pushes("b")] == [pb]
    copy = p.pending_pushes("a")[0]
    copy.attempts = 99
    assert p.pending_pushes("a")[0].attempts == 1
    assert pb
    p.acknowledge(pb, True)
    assert [x.push_id for x in p.pending_pushes()] == [pa]


def test_register_replaces_record_and_touch(pusher: ConfigPusher, clock: FakeClock) -> None:
    push_id = pusher.push_to_agent("waf", RequestReload())
    assert push_id
    pusher.acknowledge(push_id, True)
    clock.now += 5
    assert pusher.touch_agent("waf")
    agent = pusher.get_agent("waf")
    assert agent is not None and agent.last_seen == 105.0 and agent.connected_at == 100.0
    assert not pusher.touch_agent("missing")
    pusher.register_agent("waf", "WAF v2", False)
    agent = pusher.get_agent("waf")
    assert agent == PushTarget("waf", "WAF v2", 105.0, 105.0, 0, 0, False)
    assert pusher.push_to_agent("waf", RequestReload()) is None


def test_push_status_outstanding() -> None:
    assert PushStatus.PENDING.is_outstanding
    assert PushStatus.SENT.is_outstanding
    assert not PushStatus.ACKNOWLEDGED.is_outstanding
    assert not PushStatus.FAILED.is_outstanding
    assert not PushStatus.EXPIRED.is_outstanding
    assert "pending=0" in repr(ConfigPusher())


# ---------------------------------------------------------------- ConfigUpdateHandler


def request(update: Any, request_id: str = "req-1") -> ConfigUpdateRequest:
    return ConfigUpdateRequest(update_type=update, request_id=request_id, timestamp_ms=1)


def assert_response(
    resp: ConfigUpdateResponse, rid: str, accepted: bool, error: str | None
) -> None:
    assert isinstance(resp, ConfigUpdateResponse)
    assert (resp.request_id, resp.accepted, resp.error) == (rid, accepted, error)
    assert resp.timestamp_ms > 1_600_000_000_000


def test_reload_accepted_and_pending() -> None:
    h = ConfigUpdateHandler()
    assert_response(h.handle(request(RequestReload())), "req-1", True, None)
    assert h.pending_count() == 1
    assert [r.request_id for r in h.pending_requests()] == ["req-1"]


def test_rule_update_without_callback() -> None:
    h = ConfigUpdateHandler()
    resp = h.handle(request(RuleUpdate(rule_set="crs", rules=[], remove_rules=[])))
    assert_response(resp, "req-1", False, "Rule updates not supported")
    assert h.pending_count() == 0


def test_list_update_without_callback() -> None:
    h = ConfigUpdateHandler()
    resp = h.handle(request(ListUpdate(list_id="ips", add=["1.2.3.4"], remove=[])))
    assert_response(resp, "req-1", False, "List updates not supported")


def test_rule_update_callback_accepts_and_rejects() -> None:
    calls: list[tuple[str, list[RuleDefinition], list[str]]] = []
    verdict = True

    def on_rule(rule_set: str, rules: list[Any], remove: list[str]) -> bool:
        calls.append((rule_set, rules, remove))
        return verdict

    h = ConfigUpdateHandler(on_rule_update=on_rule)
    rule = RuleDefinition(id="r1", priority=10, definition={"match": "x"}, enabled=True)
    update = RuleUpdate(rule_set="crs", rules=[rule], remove_rules=["r0"])
    assert_response(h.handle(request(update, "a")), "a", True, None)
    assert calls == [("crs", [rule], ["r0"])]
    verdict = False
    assert_response(h.handle(request(update, "b")), "b", False, "Rule update rejected")


def test_list_update_callback_accepts_and_rejects() -> None:
    seen: list[tuple[str, list[str], list[str]]] = []

    def on_list(list_id: str, add: list[str], remove: list[str]) -> bool:
        seen.append((list_id, add, remove))
        return list_id == "ips"

    h = ConfigUpdateHandler(on_list_update=on_list)
    ok = h.handle(request(ListUpdate(list_id="ips", add=["1.2.3.4"], remove=["5.6.7.8"])))
    assert_response(ok, "req-1", True, None)
    bad = h.handle(request(ListUpdate(list_id="other", add=[], remove=[]), "req-2"))
    assert_response(bad, "req-2", False, "List update rejected")
    assert seen[0] == ("ips", ["1.2.3.4"], ["5.6.7.8"])


def test_callbacks_settable_after_construction() -> None:
    h = ConfigUpdateHandler()
    h.set_rule_update_callback(lambda rs, rules, rm: True)
    h.set_list_update_callback(lambda lid, add, rm: False)
    assert h.handle(request(RuleUpdate(rule_set="s", rules=[], remove_rules=[]))).accepted
    resp = h.handle(request(ListUpdate(list_id="l", add=[], remove=[])))
    assert resp.error == "List update rejected"
    h.on_list_update = None
    resp = h.handle(request(ListUpdate(list_id="l", add=[], remove=[])))
    assert resp.error == "List updates not supported"


def test_raising_callback_rejects(caplog: pytest.LogCaptureFixture) -> None:
    def boom(rule_set: str, rules: list[Any], remove: list[str]) -> bool:
        raise RuntimeError("kaput")

    h = ConfigUpdateHandler(on_rule_update=boom)
    with caplog.at_level(logging.ERROR, logger="agentpool.control"):
        resp = h.handle(request(RuleUpdate(rule_set="s", rules=[], remove_rules=[])))
    assert_response(resp, "req-1", False, "Rule update rejected")
    assert "kaput" in caplog.text


def test_restart_required_and_config_error_accepted(caplog: pytest.LogCaptureFixture) -> None:
    h = ConfigUpdateHandler()
    with caplog.at_level(logging.WARNING, logger="agentpool.control"):
        r1 = h.handle(request(RestartRequired(reason="new binary", grace_period_ms=5000), "r1"))
        r2 = h.handle(request(ConfigError(error="bad regex", field="rules[3]"), "r2"))
        r3 = h.handle(request(ConfigError(error="oops"), "r3"))
    assert_response(r1, "r1", True, None)
    assert_response(r2, "r2", True, None)
    assert_response(r3, "r3", True, None)
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert levels[0][0] == logging.WARNING and "new binary" in levels[0][1]
    assert levels[1][0] == logging.ERROR and "rules[3]" in levels[1][1]
    assert levels[2][0] == logging.ERROR and "oops" in levels[2][1]
    assert h.pending_count() == 0


def test_clear_old_pending(clock: FakeClock) -> None:
    h = ConfigUpdateHandler(clock=clock)
    h.handle(request(RequestReload(), "old"))
    clock.now += 10
    h.handle(request(RequestReload(), "new"))
    assert h.pending_count() == 2
    assert h.clear_old_pending(10.0) == 1
    assert [r.request_id for r in h.pending_requests()] == ["new"]
    assert h.clear_old_pending(0.0) == 1
    assert h.pending_count() == 0


def test_reload_same_request_id_replaces() -> None:
    h = ConfigUpdateHandler()
    h.handle(request(RequestReload(), "x"))
    h.handle(request(RequestReload(), "x"))
    assert h.pending_count() == 1
