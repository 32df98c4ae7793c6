"""Control plane and observability end to end, against a real agent process (issue 5).

The agent is ``tests/agents/obs_agent.py`` in a subprocess; request headers make it send metrics
reports, config update requests, health reports and flow control signals over the wire.
Prometheus output is always parsed back with ``prometheus_client.parser``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from _helpers import hdrs as make_hdrs
from _helpers import until
from agents import AgentProc, running
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agentpool.config import AgentPoolConfig
from agentpool.control import ConfigUpdateHandler, PushStatus
from agentpool.errors import ConnectionFailed
from agentpool.messages import (
    AgentResponse,
    Allow,
    ListUpdate,
    RequestHeadersEvent,
    RuleDefinition,
    RuleUpdate,
)
from agentpool.metrics import AgentPoolCollector
from agentpool.pool import AgentPool

OBS_AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "agents", "obs_agent.py")
AGENT_ID = "obs"
P = "agent_protocol"

Key = tuple[str, tuple[tuple[str, str], ...]]


# --------------------------------------------------------------------------- helpers


class ObsAgentProc(AgentProc):
    """``tests/agents/obs_agent.py`` in a subprocess (msgpack + JSON, so the pool picks)."""

    def __init__(self) -> None:
        super().__init__("obs", encoding="msgpack")

    def argv(self) -> list[str]:
        assert self.path is not None
        return [sys.executable, OBS_AGENT, "--socket", self.path, "--encoding", "msgpack"]


@pytest.fixture(scope="module")
def obs() -> Iterator[ObsAgentProc]:
    with running(ObsAgentProc()) as agent:
        yield agent


@pytest.fixture(params=["json", "msgpack"])
def encoding(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def cfg(connections: int = 2, encoding: str = "json", **kw: Any) -> AgentPoolConfig:
    return AgentPoolConfig(
        connections_per_agent=connections,
        request_timeout=5.0,
        health_check_interval=60.0,  # maintenance passes are run by the tests
        encoding=encoding,
        **kw,
    )


def hdrs(cid: str, **headers: str) -> RequestHeadersEvent:
    """Request headers; keyword ``x_obs_metrics=...`` becomes header ``x-obs-metrics``."""
    extra = {k.replace("_", "-"): [v] for k, v in headers.items()}
    return make_hdrs(cid, headers=extra, client_port=40000)


async def send(pool: AgentPool, cid: str, **headers: str) -> AgentResponse:
    return await asyncio.wait_for(
        pool.send_request_headers(AGENT_ID, cid, hdrs(cid, **headers)), 10.0
    )


def families(text: str) -> dict[str, Any]:
    """Parsed metric families by name (the parser strips ``_total`` from counters)."""
    out: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name not in out, f"family {fam.name} appears twice"
        out[fam.name] = fam
    return out


def series(text: str) -> dict[Key, float]:
    """Every sample as ``(sample name, sorted labels) -> value``; ``le`` normalised to float."""
    out: dict[Key, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = dict(s.labels)
            if "le" in labels:
                labels["le"] = repr(float(labels["le"]))
            key = (s.name, tuple(sorted(labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = float(s.value)
    return out


def value(text: str, name: str, **labels: str) -> float:
    return series(text)[(name, tuple(sorted(labels.items())))]


def scrape(pool: AgentPool) -> str:
    """Register an AgentPoolCollector in a fresh registry and render it."""
    registry = CollectorRegistry()
    registry.register(AgentPoolCollector(pool))
    return generate_latest(registry).decode()


def agent_part(text: str) -> dict[Key, float]:
    """The samples that do not belong to the protocol metrics."""
    return {k: v for k, v in series(text).items() if not k[0].startswith(P + "_")}


# --------------------------------------------------------------------------- (a) agent metrics

REPORT: dict[str, Any] = {
    "counters": [
        {
            "name": "obs_requests_total",
            "value": 42,
            "help": "Requests seen by the agent",
            "labels": {"route": "/api"},
        },
        {
            "name": "obs_requests_total",
            "value": 3,
            "help": "Requests seen by the agent",
            # the pool's agent_id label wins over the agent's own
            "labels": {"route": "/admin", "agent_id": "spoofed"},
        },
        {"name": "obs_restarts", "value": 1},
    ],
    "gauges": [
        {
            "name": "obs_queue_depth",
            "value": 2.5,
            "help": "Items waiting in the queue",
            "labels": {"queue": "main"},
        },
        {
            "name": "obs_queue_depth",
            "value": 0.1,
            "help": "Items waiting in the queue",
            "labels": {"queue": 'we"ird\\name\nx'},
        },
        {"name": "obs_ratio", "value": 1e-7},
    ],
    "histograms": [
        {
            "name": "obs_latency_seconds",
            "sum": 1.25,
            "count": 5,
            "help": "Time to decide",
            "labels": {"route": "/api"},
            "buckets": [[0.1, 1], [0.5, 4], ["+Inf", 5]],
        }
    ],
}

# upstream text format (POOL.md §11.3); series order inside one name is unspecified upstream
EXPECTED_AGENT_TEXT = """\
# HELP obs_requests_total Requests seen by the agent
# TYPE obs_requests_total counter
obs_requests_total{agent_id="obs",route="/api"} 42
obs_requests_total{agent_id="obs",route="/admin"} 3
# TYPE obs_restarts counter
obs_restarts{agent_id="obs"} 1
# HELP obs_queue_depth Items waiting in the queue
# TYPE obs_queue_depth gauge
obs_queue_depth{agent_id="obs",queue="main"} 2.5
obs_queue_depth{agent_id="obs",queue="we\\"ird\\\\name\\nx"} 0.1
# TYPE obs_ratio gauge
obs_ratio{agent_id="obs"} 0.0000001
# HELP obs_latency_seconds Time to decide
# TYPE obs_latency_seconds histogram
obs_latency_seconds_bucket{agent_id="obs",le="0.1",route="/api"} 1
obs_latency_seconds_bucket{agent_id="obs",le="0.5",route="/api"} 4
obs_latency_seconds_bucket{agent_id="obs",le="+Inf",route="/api"} 5
obs_latency_seconds_sum{agent_id="obs",route="/api"} 1.25
obs_latency_seconds_count{agent_id="obs",route="/api"} 5
"""


def _lf(le: float) -> str:
    return repr(float(le))


EXPECTED_AGENT_SERIES: dict[Key, float] = {
    ("obs_requests_total", (("agent_id", "obs"), ("route", "/api"))): 42.0,
    ("obs_requests_total", (("agent_id", "obs"), ("route", "/admin"))): 3.0,
    # a counter reported without `_total`: the text keeps the name, the parser appends it
    ("obs_restarts_total", (("agent_id", "obs"),)): 1.0,
    ("obs_queue_depth", (("agent_id", "obs"), ("queue", "main"))): 2.5,
    ("obs_queue_depth", (("agent_id", "obs"), ("queue", 'we"ird\\name\nx'))): 0.1,
    ("obs_ratio", (("agent_id", "obs"),)): 1e-7,
    ("obs_latency_seconds_bucket", (("agent_id", "obs"), ("le", _lf(0.1)), ("route", "/api"))): 1,
    ("obs_latency_seconds_bucket", (("agent_id", "obs"), ("le", _lf(0.5)), ("route", "/api"))): 4,
    (
        "obs_latency_seconds_bucket",
        (("agent_id", "obs"), ("le", _lf(math.inf)), ("route", "/api")),
    ): 5,
    ("obs_latency_seconds_sum", (("agent_id", "obs"), ("route", "/api"))): 1.25,
    ("obs_latency_seconds_count", (("agent_id", "obs"), ("route", "/api"))): 5,
}


async def test_agent_metrics_report_in_export_prometheus(obs: ObsAgentProc, encoding: str) -> None:
    async with AgentPool(cfg(2, encoding)) as pool:
        await pool.add_agent(AGENT_ID, obs.endpoint)
        await send(pool, "m1", x_obs_metrics=json.dumps(REPORT))
        await until(lambda: pool.metrics_collector.series_count() == 7)
        assert pool.metrics_collector.active_agents() == [AGENT_ID]

        text = pool.export_prometheus()
        protocol_text = pool.protocol_metrics.to_prometheus("agent_protocol")
        assert text == protocol_text + pool.metrics_collector.export_prometheus()
        assert text.startswith("# HELP agent_protocol_requests_total ")
        agent_text = text[len(protocol_text) :]
        assert sorted(agent_text.splitlines()) == sorted(EXPECTED_AGENT_TEXT.splitlines())
        types_in_order = [line for line in agent_text.splitlines() if line.startswith("# TYPE")]
        assert types_in_order == [
            line for line in EXPECTED_AGENT_TEXT.splitlines() if line.startswith("# TYPE")
        ]

        fams = families(text)
        assert fams["obs_requests"].type == "counter"
        assert fams["obs_requests"].documentation == "Requests seen by the agent"
        assert fams["obs_queue_depth"].type == "gauge"
        assert fams["obs_latency_seconds"].type == "histogram"
        assert fams["obs_latency_seconds"].documentation == "Time to decide"
        assert agent_part(text) == EXPECTED_AGENT_SERIES

        # protocol metrics come first and count the one request sent
        assert list(fams)[:15] == [
            f"{P}_{n}"
            for n in (
                "requests",
                "responses",
                "timeouts",
                "connection_errors",
                "flow_control_pauses",
                "flow_control_rejections",
                "affinity_evictions",
                "affinity_rejections",
                "in_flight_requests",
                "correlation_affinities",
                "buffer_utilization_percent",
                "healthy_connections",
                "paused_connections",
                "serialization_seconds",
                "request_duration_seconds",
            )
        ]
        assert value(text, f"{P}_requests_total") == 1
        assert value(text, f"{P}_responses_total") == 1
        assert value(text, f"{P}_in_flight_requests") == 0
        assert value(text, f"{P}_healthy_connections") == 2
        assert value(text, f"{P}_request_duration_seconds_count") == 1
        assert value(text, f"{P}_request_duration_seconds_bucket", le=_lf(math.inf)) == 1

        # a later report replaces values (no accumulation) and keeps the other series
        update = {"counters": [{**REPORT["counters"][0], "value": 50}]}
        await send(pool, "m2", x_obs_metrics=json.dumps(update))
        key = ("obs_requests_total", (("agent_id", "obs"), ("route", "/api")))
        await until(lambda: agent_part(pool.export_prometheus())[key] == 50)
        text = pool.export_prometheus()
        assert agent_part(text) == {**EXPECTED_AGENT_SERIES, key: 50.0}
        assert value(text, f"{P}_requests_total") == 2


async def test_agent_metrics_expire_in_maintenance(obs: ObsAgentProc) -> None:
    config = cfg(1)
    config.metrics.max_age = 0.2
    async with AgentPool(config) as pool:
        await pool.add_agent(AGENT_ID, obs.endpoint)
        await send(pool, "x1", x_obs_metrics=json.dumps(REPORT))
        await until(lambda: pool.metrics_collector.series_count() == 7)
        await asyncio.sleep(0.25)
        await pool.run_maintenance_once()
        assert pool.metrics_collector.series_count() == 0
        text = pool.export_prometheus()
        assert agent_part(text) == {}
        assert text == pool.protocol_metrics.to_prometheus()


async def test_metrics_series_cap_over_the_wire(obs: ObsAgentProc) -> None:
    config = cfg(1)
    config.metrics.max_series = 4
    async with AgentPool(config) as pool:
        await pool.add_agent(AGENT_ID, obs.endpoint)
        await send(pool, "c1", x_obs_metrics=json.dumps(REPORT))
        await until(lambda: pool.metrics_collector.dropped_series() == 3)
        assert pool.metrics_collector.series_count() == 4
        kept = agent_part(pool.export_prometheus())
        # counters are recorded first, then gauges: the first four series survive
        assert set(kept) == set(list(EXPECTED_AGENT_SERIES)[:4])


# A misbehaving agent must not break the proxy's metrics endpoint: series that cannot be
# exposed are skipped by both exporters, and the rest of the scrape stays valid.
INVALID_EXPORT_CASES: dict[str, dict[str, Any]] = {
    "space-in-name": {"name": "obs bad name", "value": 2.0},
    "dash-in-label-name": {"name": "obs_bad_label", "value": 2.0, "labels": {"bad-key": "v"}},
    "protocol-name-clash": {"name": "agent_protocol_in_flight_requests", "value": 99.0},
}


@pytest.mark.parametrize("bad", list(INVALID_EXPORT_CASES), ids=list(INVALID_EXPORT_CASES))
async def test_export_survives_invalid_agent_series(obs: ObsAgentProc, bad: str) -> None:
    async with AgentPool(cfg(1)) as pool:
        await pool.add_agent(AGENT_ID, obs.endpoint)
        report = {"gauges": [{"name": "obs_good", "value": 1.0}, INVALID_EXPORT_CASES[bad]]}
        await send(pool, "bad", x_obs_metrics=json.dumps(report))
        await until(lambda: pool.metrics_collector.series_count() == 2)
        text = pool.export_prometheus()
        assert value(text, "obs_good", agent_id=AGENT_ID) == 1
        assert value(text, f"{P}_in_flight_requests") == 0
        assert len(families(text)) == 16


INVALID_LABEL_CASES: dict[str, dict[str, str]] = {
    "reserved-__name__": {"__name__": "x"},
    "reserved-prefix": {"__meta": "x"},
    "empty-label-name": {"": "x"},
}


@pytest.mark.parametrize("bad", list(INVALID_LABEL_CASES), ids=list(INVALID_LABEL_CASES))
async def test_collector_scrape_survives_invalid_agent_labels(obs: ObsAgentProc, bad: str) -> None:
    async with AgentPool(cfg(1)) as pool:
        await pool.add_agent(AGENT_ID, obs.endpoint)
        report = {
            "gauges": [
                {"name": "obs_good", "value": 1.0},
                {"name": "obs_bad_label", "value": 2.0, "labels": INVALID_LABEL_CASES[bad]},
            ]
        }
        await send(pool, "bad", x_obs_metrics=json.dumps(report))
        await until(lambda: pool.metrics_collector.series_count() == 2)
        text = scrape(pool)
        assert value(text, "obs_good", agent_id=AGENT_ID) == 1
        assert value(text, f"{P}_requests_total") == 1


# --------------------------------------------------------------------------- (b) collector


async def test_collector_on_live_pool(obs: ObsAgentProc) -> None:
    n = 24
    async with AgentPool(cfg(2)) as pool:
        await pool.add_agent(AGENT_ID, obs.endpoint)
        registry = CollectorRegistry()
        collector = AgentPoolCollector(pool)
        registry.register(collector)

        results = await asyncio.gather(
            send(pool, "metrics", x_obs_metrics=json.dumps(REPORT)),
            *(send(pool, f"r{i}") for i in range(n - 1)),
        )
        assert all(isinstance(r.decision, Allow) for r in results)
        await until(lambda: pool.metrics_collector.series_count() == 7)

        text = generate_latest(registry).decode()
        fams = families(text)
        for name, typ in (
            ("requests", "counter"),
            ("responses", "counter"),
            ("timeouts", "counter"),
            ("connection_errors", "counter"),
            ("flow_control_pauses", "counter"),
            ("flow_control_rejections", "counter"),
            ("affinity_evictions", "counter"),
            ("affinity_rejections", "counter"),
            ("in_flight_requests", "gauge"),
            ("correlation_affinities", "gauge"),
            ("buffer_utilization_percent", "gauge"),
            ("healthy_connections", "gauge"),
            ("paused_connections", "gauge"),
            ("serialization_seconds", "histogram"),
            ("request_duration_seconds", "histogram"),
            ("agent_connections", "gauge"),
            ("agent_healthy_connections", "gauge"),
            ("agent_in_flight_requests", "gauge"),
            ("agent_requests", "gauge"),
            ("agent_errors", "gauge"),
            ("agent_error_rate", "gauge"),
            ("agent_healthy", "gauge"),
        ):
            assert fams[f"{P}_{name}"].type == typ, name
        assert fams[f"{P}_requests"].documentation == "Total requests sent to agents"

        assert value(text, f"{P}_requests_total") == n
        assert value(text, f"{P}_responses_total") == n
        assert value(text, f"{P}_timeouts_total") == 0
        assert value(text, f"{P}_connection_errors_total") == 0
        assert value(text, f"{P}_in_flight_requests") == 0
        assert value(text, f"{P}_healthy_connections") == 2
        assert value(text, f"{P}_paused_connections") == 0
        assert value(text, f"{P}_correlation_affinities") == n  # one per request, not cleared
        assert value(text, f"{P}_request_duration_seconds_count") == n
        assert value(text, f"{P}_request_duration_seconds_bucket", le=_lf(math.inf)) == n
        snap = pool.protocol_metrics.snapshot()
        assert value(text, f"{P}_request_duration_seconds_sum") == pytest.approx(
            snap.request_duration.sum / 1e6
        )
        buckets = [
            value(text, f"{P}_request_duration_seconds_bucket", le=_lf(b / 1e6))
            for b in snap.request_duration.buckets
        ]
        assert buckets == sorted(buckets)  # cumulative
        assert buckets[-1] <= n

        per_agent = {
            "agent_connections": 2,
            "agent_healthy_connections": 2,
            "agent_in_flight_requests": 0,
            "agent_requests": n,
            "agent_errors": 0,
            "agent_error_rate": 0,
            "agent_healthy": 1,
        }
        for name, want in per_agent.items():
            assert value(text, f"{P}_{name}", agent_id=AGENT_ID) == want, name

        # the agent-reported series, same values as export_prometheus() shows; a counter
        # without `_total` is exposed untyped under its own name (no `_total` appended)
        restarts: Key = ("obs_restarts_total", (("agent_id", "obs"),))
        expected = dict(EXPECTED_AGENT_SERIES)
        expected[("obs_restarts", restarts[1])] = expected.pop(restarts)
        assert agent_part(text) == expected
        assert fams["obs_requests"].type == "counter"
        assert fams["obs_restarts"].type == "unknown"

        # protocol series agree with the pool's own text exporter
        own = series(pool.export_prometheus())
        for key, v in series(text).items():
            if key[0].startswith(P + "_") and not key[0].startswith(P + "_agent_"):
                assert own[key] == pytest.approx(v), key

        # built fresh on every scrape
        await asyncio.gather(*(send(pool, f"s{i}") for i in range(5)))
        again = generate_latest(registry).decode()
        assert value(again, f"{P}_requests_total") == n + 5
        assert value(again, f"{P}_agent_requests", agent_id=AGENT_ID) == n + 5
        assert value(again, f"{P}_correlation_affinities") == n + 5
        for i in range(n - 1):
            pool.clear_correlation_affinity(f"r{i}")
        assert value(generate_latest(registry).decode(), f"{P}_correlation_affinities") == 6


async def test_collector_describe_and_registration(obs: ObsAgentProc) -> None:
    async with AgentPool(cfg(1)) as pool:
        await pool.add_agent(AGENT_ID, obs.endpoint)
        collector = AgentPoolCollector(pool)
        described = {m.name for m in collector.describe()}
        collected = {m.name for m in collector.collect()}
        assert described and described <= collected
        assert f"{P}_requests" in described and f"{P}_agent_requests" in described

        registry = CollectorRegistry()
        registry.register(collector)
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            registry.register(AgentPoolCollector(pool))  # describe() feeds the name check
        registry.unregister(collector)
        registry.register(AgentPoolCollector(pool, prefix="edge"))
        text = generate_latest(registry).decode()
        assert value(text, "edge_healthy_connections") == 1
        assert value(text, "edge_agent_connections", agent_id=AGENT_ID) == 1
        assert not any(k[0].startswith(P) for k in series(text))


def test_nothing_registered_at_import() -> None:
    code = (
        "import prometheus_client\n"
        "before = sorted(m.name for m in prometheus_client.REGISTRY.collect())\n"
        "import agentpool, agentpool.metrics, agentpool.pool, agentpool.control\n"
        "import agentpool.connection, agentpool.agent, agentpool.reverse, agentpool.demo\n"
        "after = sorted(m.name for m in prometheus_client.REGISTRY.collect())\n"
        "assert before == after, (before, after)\n"
        "assert not any(n.startswith('agent_protocol') for n in after)\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --------------------------------------------------------------------------- (c) config requests

RULE: dict[str, Any] = {
    "id": "r1",
    "priority": 10,
    "definition": {"match": "path", "pattern": "^/admin"},
    "enabled": True,
    "description": "block admin",
    "tags": ["waf", "admin"],
}

CONFIG_CASES: list[tuple[str, dict[str, Any], bool, str | None]] = [
    (
        "rule-accepted",
        {"type": "rule_update", "rule_set": "waf", "rules": [RULE], "remove_rules": ["r0"]},
        True,
        None,
    ),
    ("rule-rejected", {"type": "rule_update", "rule_set": "deny"}, False, "Rule update rejected"),
    ("rule-raises", {"type": "rule_update", "rule_set": "boom"}, False, "Rule update rejected"),
    (
        "list-accepted",
        {
            "type": "list_update",
            "list_id": "blocklist",
            "add": ["10.0.0.1"],
            "remove": ["10.0.0.2"],
        },
        True,
        None,
    ),
    ("list-rejected", {"type": "list_update", "list_id": "deny"}, False, "List update rejected"),
    ("reload", {"type": "request_reload"}, True, None),
    (
        "restart-required",
        {"type": "restart_required", "reason": "new binary", "grace_period_ms": 5000},
        True,
        None,
    ),
    (
        "config-error",
        {"type": "config_error", "error": "bad regex", "field": "rules[0].pattern"},
        True,
        None,
    ),
]


class Callbacks:
    def __init__(self) -> None:
        self.rules: list[tuple[str, list[Any], list[str]]] = []
        self.lists: list[tuple[str, list[str], list[str]]] = []

    def on_rule_update(self, rule_set: str, rules: list[Any], remove: list[str]) -> bool:
        self.rules.append((rule_set, rules, remove))
        if rule_set == "boom":
            raise RuntimeError("callback failed")
        return rule_set != "deny"

    def on_list_update(self, list_id: str, add: list[str], remove: list[str]) -> bool:
        self.lists.append((list_id, add, remove))
        return list_id != "deny"


async def config_request(pool: AgentPool, cid: str, update: dict[str, Any]) -> dict[str, Any]:
    """Have the agent send ``update``; what the agent got back on the wire."""
    resp = await send(pool, cid, x_obs_config=json.dumps(update))
    got: dict[str, Any] = json.loads(resp.routing_metadata["config"])
    return got


@pytest.mark.parametrize(
    ("update", "accepted", "error"),
    [case[1:] for case in CONFIG_CASES],
    ids=[case[0] for case in CONFIG_CASES],
)
async def test_agent_config_request_answered_on_the_wire(
    obs: ObsAgentProc, encoding: str, update: dict[str, Any], accepted: bool, error: str | None
) -> None:
    calls = Callbacks()
    async with AgentPool(cfg(1, encoding)) as pool:
        pool.config_update_handler = ConfigUpdateHandler(
            on_rule_update=calls.on_rule_update, on_list_update=calls.on_list_update
        )
        await pool.add_agent(AGENT_ID, obs.endpoint)
        got = await config_request(pool, "cfg", update)
        assert got["accepted"] is accepted
        assert got["error"] == error
        assert got["request_id"].startswith(f"{AGENT_ID}-cfg-")

        kind = update["type"]
        if kind == "rule_update":
            assert len(calls.rules) == 1 and not calls.lists
            rule_set, rules, remove = calls.rules[0]
            assert rule_set == update["rule_set"]
            assert remove == update.get("remove_rules", [])
            assert [
                RuleDefinition(**r) for r in update.get("rules", [])
            ] == rules  # decoded into RuleDefinition with every field
        elif kind == "list_update":
            assert calls.lists == [
                (update["list_id"], update.get("add", []), update.get("remove", []))
            ]
            assert not calls.rules
        else:
            assert not calls.rules and not calls.lists
        pending = pool.config_update_handler.pending_requests()
        if kind == "request_reload":
            assert [r.request_id for r in pending] == [got["request_id"]]
        else:
            assert pending == []
        # the config request is not a proxied request
        assert pool.protocol_metrics.snapshot().requests_total == 1


async def test_agent_config_request_without_callbacks(obs: ObsAgentProc) -> None:
    async with AgentPool(cfg(1)) as pool:
        await pool.add_agent(AGENT_ID, obs.endpoint)
        rule = await config_request(pool, "c1", {"type": "rule_update", "rule_set": "waf"})
        assert (rule["accepted"], rule["error"]) == (False, "Rule updates not supported")
        lst = await config_request(pool, "c2", {"type": "list_update", "list_id": "l"})
        assert (lst["accepted"], lst["error"]) == (False, "List updates not supported")
        reload = await config_request(pool, "c3", {"type": "request_reload"})
        assert (reload["accepted"], reload["error"]) == (True, None)
        assert pool.config_update_handler.pending_count() == 1
        # callbacks installed later on the pool's own handler take effect at once
        pool.config_update_handler.set_rule_update_callback(lambda *_: True)
        rule = await config_request(pool, "c4", {"type": "rule_update", "rule_set": "waf"})
        assert (rule["accepted"], rule["error"]) == (True, None)


# --------------------------------------------------------------------------- (d) config push


def push_status(pool: AgentPool, push_id: str) -> PushStatus | None:
    result = pool.config_pusher.get_result(push_id)
    return None if result is None else result.status


async def test_config_push_over_both_encodings(obs: ObsAgentProc, encoding: str) -> None:
    """test_pool_push.py covers the push life cycle on JSON; this adds MessagePack and the
    exact RuleUpdate payload the agent receives."""
    async with AgentPool(cfg(1, encoding)) as pool:
        await pool.add_agent(AGENT_ID, obs.endpoint)
        rule = RuleDefinition(**RULE)
        ok = pool.push_config_to_agent(AGENT_ID, RuleUpdate("waf", [rule], ["r0"]))
        bad = pool.push_config_to_agent(AGENT_ID, ListUpdate("reject", ["10.0.0.9"], []))
        assert ok is not None and bad is not None and ok != bad
        await until(lambda: push_status(pool, ok) is PushStatus.ACKNOWLEDGED)
        await until(lambda: push_status(pool, bad) is PushStatus.FAILED)
        failed = pool.config_pusher.get_result(bad)
        assert failed is not None and failed.reason == "Configuration rejected"
        target = pool.config_pusher.get_agent(AGENT_ID)
        assert target is not None
        assert (target.successful_pushes, target.failed_pushes) == (1, 1)
        assert pool.config_pusher.pending_count() == 0

        resp = await send(pool, "q", x_obs_action="configs")
        received = {c["version"]: c["config"] for c in json.loads(resp.routing_metadata["configs"])}
        assert received[ok]["request_id"] == ok
        assert received[ok]["update_type"] == {
            "type": "rule_update",
            "rule_set": "waf",
            "rules": [RULE],
            "remove_rules": ["r0"],
        }
        assert received[bad]["update_type"] == {
            "type": "list_update",
            "list_id": "reject",
            "add": ["10.0.0.9"],
            "remove": [],
        }
        # pushes are not proxied requests
        assert value(pool.export_prometheus(), f"{P}_requests_total") == 1


# --------------------------------------------------------------------------- (e) health, flow


async def test_flow_control_reflected_in_gauges(obs: ObsAgentProc) -> None:
    async with AgentPool(cfg(2)) as pool:
        await pool.add_agent(AGENT_ID, obs.endpoint)
        # the pause frame precedes the reply on the wire; the resume follows 0.8 s later
        await send(pool, "p", x_obs_action="pause,after:0.8:resume")
        assert pool.protocol_metrics.snapshot().paused_connections == 1
        await pool.run_maintenance_once()
        text = pool.export_prometheus()
        assert value(text, f"{P}_paused_connections") == 1
        assert value(text, f"{P}_flow_control_pauses_total") == 1
        assert value(text, f"{P}_healthy_connections") == 2  # paused is not unhealthy
        scraped = scrape(pool)
        assert value(scraped, f"{P}_paused_connections") == 1
        assert value(scraped, f"{P}_flow_control_pauses_total") == 1

        # requests still flow through the other connection
        for i in range(3):
            r = await send(pool, f"u{i}")
            assert isinstance(r.decision, Allow) and not r.fail_open
        assert value(pool.export_prometheus(), f"{P}_flow_control_rejections_total") == 0

        await until(lambda: pool.protocol_metrics.snapshot().paused_connections == 0)
        await pool.run_maintenance_once()
        text = pool.export_prometheus()
        assert value(text, f"{P}_paused_connections") == 0
        assert value(text, f"{P}_flow_control_pauses_total") == 1
        snap = pool.protocol_metrics.snapshot()
        assert snap.flow_control_resumes_total == 1
        assert snap.in_flight_requests == 0


async def test_health_reports_reflected_in_gauges(obs: ObsAgentProc) -> None:
    async with AgentPool(cfg(2)) as pool:
        await pool.add_agent(AGENT_ID, obs.endpoint)
        await send(pool, "d", x_obs_action="health:2")  # degraded still serves
        await pool.run_maintenance_once()
        assert value(pool.export_prometheus(), f"{P}_healthy_connections") == 2

        # unhealthy now, healthy again 0.8 s later (same connection)
        await send(pool, "h", x_obs_action="health:4,after:0.8:health:1")
        assert not pool.is_agent_healthy(AGENT_ID)
        await pool.run_maintenance_once()
        text = pool.export_prometheus()
        assert value(text, f"{P}_healthy_connections") == 0
        scraped = scrape(pool)
        assert value(scraped, f"{P}_healthy_connections") == 0
        assert value(scraped, f"{P}_agent_healthy", agent_id=AGENT_ID) == 0
        assert value(scraped, f"{P}_agent_healthy_connections", agent_id=AGENT_ID) == 0
        assert value(scraped, f"{P}_agent_connections", agent_id=AGENT_ID) == 2
        stats = await pool.agent_stats(AGENT_ID)
        assert stats is not None and not stats.is_healthy
        assert (stats.active_connections, stats.healthy_connections) == (2, 0)
        with pytest.raises(ConnectionFailed, match="No healthy connections"):
            await send(pool, "refused")

        await until(lambda: pool.is_agent_healthy(AGENT_ID))
        await pool.run_maintenance_once()
        text = pool.export_prometheus()
        assert value(text, f"{P}_healthy_connections") == 2
        scraped = scrape(pool)
        assert value(scraped, f"{P}_agent_healthy", agent_id=AGENT_ID) == 1
        assert value(scraped, f"{P}_agent_healthy_connections", agent_id=AGENT_ID) == 2
        stats = await pool.agent_stats(AGENT_ID)
        assert stats is not None and stats.is_healthy and stats.healthy_connections == 2
        r = await send(pool, "after")
        assert isinstance(r.decision, Allow)
        assert value(pool.export_prometheus(), f"{P}_in_flight_requests") == 0


async def test_unspecified_health_report_changes_nothing(obs: ObsAgentProc) -> None:
    """State 0 / no state means "nothing to store" (PROTOCOL.md 5.10): no revival."""
    async with AgentPool(cfg(1)) as pool:
        await pool.add_agent(AGENT_ID, obs.endpoint)
        conn: Any = next(iter(pool._agents[AGENT_ID].conns)).conn
        await send(pool, "h", x_obs_action="health:4,after:0.1:health:0")
        assert not pool.is_agent_healthy(AGENT_ID)
        await until(lambda: conn.last_health is not None and conn.last_health.state == 0)
        await pool.run_maintenance_once()
        assert not pool.is_agent_healthy(AGENT_ID)
        assert value(pool.export_prometheus(), f"{P}_healthy_connections") == 0
