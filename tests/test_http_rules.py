"""agentpool.http: routes, rules, guard, decisions, config (in process), fan-out against agents."""

from __future__ import annotations

import asyncio
import base64
import os
import tempfile

import pytest

from agentpool import AgentServer
from agentpool.agent import Agent
from agentpool.errors import AgentProtocolError
from agentpool.http import (
    AgentRule,
    Glue,
    HeaderGuard,
    Route,
    Stop,
    apply_header_ops,
    decision_reply,
    load_config,
)
from agentpool.http.guard import _mutated
from agentpool.messages import (
    AgentResponse,
    Block,
    BodyMutation,
    HeaderOp,
    RequestBodyChunkEvent,
    RequestHeadersEvent,
)


def test_route_matching() -> None:
    r = Route("/api/*", ["a"], methods=["post"], hosts=["*.example.com"])
    assert r.matches("POST", "x.example.com:443", "/api/v1")
    assert not r.matches("GET", "x.example.com", "/api/v1")
    assert not r.matches("POST", "example.org", "/api/v1")
    assert not r.matches("POST", "x.example.com", "/other")
    assert Route("*").matches("GET", "", "/anything")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"failure": "maybe"}, "failure must be 'open', 'closed' or an HTTP status"),
        ({"failure": 42}, "failure must be"),
        ({"request_body": "all"}, "request_body must be one of"),
        ({"events": ["request_headers", "nope"]}, "unknown events ['nope']"),
        ({"timeout": 0}, "timeout must be a positive number"),
        ({"max_body_size": -1}, "max_body_size must be an integer >= 0"),
    ],
)
def test_rule_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(
        ValueError, match=r"agent 'waf': " + message.replace("[", r"\[").replace("(", r"\(")
    ):
        AgentRule("waf", **kwargs)  # type: ignore[arg-type]


def test_rule_inheritance() -> None:
    route = Route("/x", [AgentRule("waf", timeout=1.0)], failure="open", timeout=5.0)
    rule = route.agents[0]
    assert isinstance(rule, AgentRule)
    merged = rule.merged(route._defaults).merged(AgentRule("waf", failure=503, retry_after=3))
    assert (merged.timeout, merged.failure, merged.retry_after) == (1.0, "open", 3)


def test_guard() -> None:
    guard = HeaderGuard(deny=["x-internal-*", "cookie"])
    for name in ("host", "content-length", "transfer-encoding", "connection", "upgrade", "te"):
        assert not guard.permits(name)
    assert not guard.permits("x-internal-user")
    assert not guard.permits("cookie")
    assert not guard.permits("x-hop", frozenset({"x-hop"}))
    assert guard.permits("x-user")
    only = HeaderGuard(allow=["x-agent-*", "x-user"])
    assert only.permits("x-agent-score") and only.permits("x-user")
    assert not only.permits("authorization")
    assert not HeaderGuard(allow=["host"]).permits("host")


def test_apply_header_ops() -> None:
    headers = [("host", "a"), ("x-a", "1"), ("x-a", "2"), ("x-b", "3")]
    refused = apply_header_ops(
        headers,
        [
            HeaderOp.set("x-a", "9"),
            HeaderOp.add("x-b", "4"),
            HeaderOp.remove("host"),
            HeaderOp.set("x-c", "bad\r\nx-injected: 1"),
            HeaderOp.set("Content-Length", "0"),
        ],
        HeaderGuard(),
        "test",
    )
    assert refused == 3
    assert headers == [("host", "a"), ("x-b", "3"), ("x-a", "9"), ("x-b", "4")]


def test_decisions() -> None:
    assert decision_reply(AgentResponse()) is None
    block = decision_reply(AgentResponse.block(429, "slow down"))
    assert block is not None
    assert (block.status, block.body) == (429, b"slow down")
    assert ("content-type", "text/plain; charset=utf-8") in block.headers
    framing = decision_reply(
        AgentResponse(
            decision=Block(
                403,
                "x",
                {"Transfer-Encoding": "chunked", "X-Ok": "1", "X-Bad": "a\r\nb", "Connection": "x"},
            )
        )
    )
    assert framing is not None and framing.headers[0] == ("x-ok", "1")
    assert len(framing.headers) == 2  # x-ok and the content type
    redirect = decision_reply(AgentResponse.redirect("/login", 307))
    assert redirect is not None and (redirect.status, redirect.headers) == (
        307,
        [("location", "/login")],
    )
    for bad in (AgentResponse.redirect("/x\r\nset-cookie: a=b"), AgentResponse.redirect("/x", 200)):
        invalid = decision_reply(bad)
        assert invalid is not None and invalid.status == 502
    challenge = decision_reply(AgentResponse.challenge("captcha", {"url": "/captcha", "b": "2"}))
    assert challenge is not None and challenge.status == 302
    assert ("location", "/captcha") in challenge.headers
    assert ("x-agentpool-challenge", "captcha") in challenge.headers
    basic = decision_reply(AgentResponse.challenge("Basic", {"realm": "x"}))
    assert basic is not None and basic.status == 401
    assert ("www-authenticate", 'Basic realm="x"') in basic.headers


def test_body_mutation_data_is_base64() -> None:
    assert _mutated(b"abc", None) is None
    assert _mutated(b"abc", BodyMutation.pass_through()) is None
    assert _mutated(b"abc", BodyMutation.drop_chunk()) == b""
    assert _mutated(b"abc", BodyMutation.replace(0, base64.b64encode(b"xyz").decode())) == b"xyz"
    with pytest.raises(AgentProtocolError, match="not base64"):
        _mutated(b"abc", BodyMutation.replace(3, "not base64!"))


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config({"agent": {}})
    with pytest.raises(ValueError, match="missing 'endpoint'"):
        Glue({"waf": {"timeout": 1.0}})
    with pytest.raises(ValueError, match="names unknown agent 'auth'"):
        Glue({"waf": "unix:/x"}, [Route("*", ["auth"])])
    with pytest.raises(ValueError, match="agent entry without 'agent'"):
        load_config({"routes": [{"path": "*", "agents": [{"timeout": 1}]}]})
    with pytest.raises(ValueError, match="route '/x'"):
        load_config({"routes": [{"path": "/x", "bogus": 1}]})


def test_correlation_ids_unique_in_flight() -> None:
    glue = Glue({"waf": "unix:/nonexistent"})
    ids = {glue.correlation_id() for _ in range(1000)}
    assert len(ids) == 1000
    shared = Glue({"waf": "unix:/nonexistent"}, pool=glue.pool)  # one pool, one id space
    assert shared.correlation_id() not in ids  # another Glue on the same pool


class _Edits(Agent):
    agent_id = "edits"

    async def on_request_headers(self, event: RequestHeadersEvent) -> AgentResponse:
        await asyncio.sleep(0.05)
        if "stall" in event.uri:
            await asyncio.Event().wait()
        return AgentResponse(request_headers=[HeaderOp.set("x-edit", "1")])


class _Blocks(Agent):
    agent_id = "blocks"

    async def on_request_headers(self, event: RequestHeadersEvent) -> AgentResponse:
        if "deny" in event.uri:
            return AgentResponse.block(403, "no")
        return AgentResponse(
            request_headers=[HeaderOp.set("x-seen-edit", ",".join(event.headers.get("x-edit", [])))]
        )


async def test_fan_out_order_and_sequential() -> None:
    tmp = tempfile.mkdtemp()
    a, b = os.path.join(tmp, "a.sock"), os.path.join(tmp, "b.sock")
    async with AgentServer(_Edits(), path=a), AgentServer(_Blocks(), path=b):
        glue = Glue(
            {"edits": f"unix:{a}", "blocks": f"unix:{b}"},
            [
                Route("/seq/*", ["edits", "blocks"], sequential=True),
                Route("/first/*", ["blocks", "edits"]),
                Route("*", ["edits", "blocks"]),
            ],
        )
        await glue.start()
        try:
            for uri, expect_status in (("/deny", 403), ("/ok", None)):
                plan = glue.plan("GET", "h", uri)
                assert plan is not None
                ex = glue.exchange(plan, method="GET", uri=uri, headers=[("host", "h")])
                t0 = asyncio.get_running_loop().time()
                reply = await ex.request_headers()
                elapsed = asyncio.get_running_loop().time() - t0
                assert elapsed >= 0.04  # both agents were asked (the slow one too)
                assert (reply.status if reply else None) == expect_status
                if reply is None:  # fan-out: blocks saw the original headers
                    assert ("x-edit", "1") in ex.headers and ("x-seen-edit", "") in ex.headers
                else:  # edits of agents before a block are not applied to the reply
                    assert ("x-edit", "1") not in reply.headers
                ex.finish()
            plan = glue.plan("GET", "h", "/seq/ok")
            assert plan is not None
            ex = glue.exchange(plan, method="GET", uri="/seq/ok", headers=[("host", "h")])
            assert await ex.request_headers() is None
            assert ("x-seen-edit", "1") in ex.headers  # sequential: blocks saw the edit
            ex.finish()
            # a block from an earlier agent answers at once: later agents are not waited for
            plan = glue.plan("GET", "h", "/first/deny-stall")
            assert plan is not None
            ex = glue.exchange(plan, method="GET", uri="/first/deny-stall", headers=[])
            reply = await asyncio.wait_for(ex.request_headers(), 10)
            assert reply is not None and reply.status == 403
            ex.finish()
        finally:
            await glue.shutdown()


async def test_unreachable_agent_fails_closed_then_recovers() -> None:
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "late.sock")
    from agentpool import AgentPoolConfig

    glue = Glue(
        {"blocks": f"unix:{path}"},
        config=AgentPoolConfig(reconnect_interval=0.05, health_check_interval=0.05),
    )
    await glue.start()
    try:
        plan = glue.plan("GET", "h", "/deny")
        assert plan is not None and not plan.final
        ex = glue.exchange(plan, method="GET", uri="/deny", headers=[])
        reply = await ex.request_headers()
        assert reply is not None and reply.status == 503
        ex.finish()
        async with AgentServer(_Blocks(), path=path):
            for _ in range(100):
                await asyncio.sleep(0.05)
                if glue.pool.agent_capabilities_sync("blocks") is not None:
                    break
            plan = glue.plan("GET", "h", "/deny")
            assert plan is not None and plan.final and plan.complete  # full capabilities now
            ex = glue.exchange(plan, method="GET", uri="/deny", headers=[])
            reply = await ex.request_headers()
            assert reply is not None and reply.status == 403
            ex.finish()
    finally:
        await glue.shutdown()


class _NeedsMore(Agent):
    agent_id = "needs-more"

    async def on_request_headers(self, event: RequestHeadersEvent) -> AgentResponse:
        return AgentResponse().set_needs_more()

    async def on_request_body_chunk(self, event: RequestBodyChunkEvent) -> AgentResponse:
        if b"bad" in event.data:
            return AgentResponse.block(403, "bad body")
        return AgentResponse()


async def test_needs_more_on_headers_streams_the_body() -> None:
    path = os.path.join(tempfile.mkdtemp(), "nm.sock")
    async with AgentServer(_NeedsMore(), path=path):
        glue = Glue({"nm": f"unix:{path}"})  # no body mode configured
        await glue.start()
        try:
            plan = glue.plan("POST", "h", "/upload")
            assert plan is not None and plan.request_body == []
            ex = glue.exchange(plan, method="POST", uri="/upload", headers=[])
            assert not ex.inspects_request_body
            assert await ex.request_headers() is None
            assert ex.inspects_request_body  # the agent asked for the body
            assert await ex.request_body(b"fine ", False) == b"fine "
            with pytest.raises(Stop) as stop:
                await ex.request_body(b"bad", True)
            assert stop.value.reply.status == 403
            ex.finish()
        finally:
            await glue.shutdown()


def test_asgi_header_names_lower_cased_and_cache_bounded() -> None:
    from agentpool import asgi

    raw = [(b"X-Mixed-Case", b"caf\xe9"), (b"x-mixed-case", b"two"), (b"N" * 65, b"v")]
    for _ in range(2):  # the second time through the cache
        assert asgi._latin1(raw) == [
            ("x-mixed-case", "café"),
            ("x-mixed-case", "two"),
            ("n" * 65, "v"),
        ]
    assert b"X-Mixed-Case" in asgi._NAMES and b"N" * 65 not in asgi._NAMES
    for i in range(2 * asgi._NAMES_MAX):
        asgi._latin1([(f"x-junk-{i}".encode(), b"")])
    assert len(asgi._NAMES) <= asgi._NAMES_MAX


def test_timestamp_is_rfc3339_with_nanoseconds() -> None:
    import re

    from agentpool.http.exchange import _timestamp

    stamp = _timestamp()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}\+00:00", stamp), stamp
