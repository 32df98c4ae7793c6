"""TLS and mutual TLS between the pool and agents, over real loopback sockets.

Certificates are made at test time with trustme (never committed): success (CLI agent and
in-process AgentServer), each handshake failure with its typed reason and counter, and
certificate reload that keeps established connections.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import shutil
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _helpers import hdrs
from agents import spawn_agent

from agentpool import tls
from agentpool.agent import AgentServer, connect_reverse
from agentpool.agent.examples import WafAgent, make_agent
from agentpool.config import AgentPoolConfig
from agentpool.connection import AgentConnection, parse_endpoint
from agentpool.errors import AgentProtocolError, ConnectionFailed, InvalidMessage
from agentpool.messages import Allow, Block
from agentpool.pool import AgentPool
from agentpool.reverse import (
    ReverseConnectionConfig,
    ReverseConnectionListener,
)
from agentpool.tls import TLSHandshakeFailed

trustme = pytest.importorskip("trustme")

NAME = "agent.test"


class Pki:
    """A CA, an agent (server) certificate for ``agent.test`` and a proxy client certificate."""

    def __init__(self, root: Path, tag: str) -> None:
        self.dir = root / tag
        self.dir.mkdir()
        self.ca = trustme.CA()
        self.ca_pem = self._write("ca.pem", self.ca.cert_pem.bytes())
        self.server_pem, self.server_key = self.issue("server", NAME)
        self.client_pem, self.client_key = self.issue("client", "proxy.test")

    def _write(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)

    def issue(
        self, name: str, *identities: str, not_after: datetime.datetime | None = None
    ) -> tuple[str, str]:
        cert = self.ca.issue_cert(*identities, not_after=not_after)
        chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
        return (
            self._write(f"{name}.pem", chain),
            self._write(f"{name}.key", cert.private_key_pem.bytes()),
        )

    def client(self, **kw: object) -> tls.ReloadableContext:
        args: dict[str, object] = {
            "ca": self.ca_pem,
            "cert": self.client_pem,
            "key": self.client_key,
            "server_name": NAME,
        }
        args.update(kw)
        return tls.client_context(**args)  # type: ignore[arg-type]

    def server(self, **kw: object) -> tls.ReloadableContext:
        args: dict[str, object] = {
            "cert": self.server_pem,
            "key": self.server_key,
            "ca": self.ca_pem,
        }
        args.update(kw)
        return tls.server_context(**args)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pki_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("pki")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def pki(pki_root: Path) -> Pki:
    return Pki(pki_root, "main")


@pytest.fixture(scope="module")
def other(pki_root: Path) -> Pki:
    return Pki(pki_root, "other")


async def _open(endpoint: str, ctx: ssl.SSLContext | None) -> AgentConnection:
    return await AgentConnection.open(endpoint, agent_id="waf", ssl=ctx, connect_timeout=5.0)


async def _serve(ctx: ssl.SSLContext) -> AgentServer:
    server = AgentServer(WafAgent(), host="127.0.0.1", port=0, ssl=ctx)
    await server.start()
    return server


def test_parse_tls_endpoint() -> None:
    assert parse_endpoint("tls://agent.test:8443") == ("tls", "agent.test", 8443)
    assert parse_endpoint("tcp://127.0.0.1:1") == ("tcp", "127.0.0.1", 1)


def test_classify_messages() -> None:
    assert tls.classify("[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca") == (
        "unknown_ca",
        True,
    )
    assert tls.classify("[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] x") == (
        "no_client_certificate",
        True,
    )
    assert tls.classify("Connection reset by peer") is None


async def test_mtls_pool_against_cli_agent(pki: Pki) -> None:
    """The CLI agent with --tls-cert/--tls-key/--tls-ca; the pool connects with mTLS."""
    args = ["--tls-cert", pki.server_pem, "--tls-key", pki.server_key, "--tls-ca", pki.ca_pem]
    with spawn_agent("waf", tcp=True, extra_args=args) as agent:
        assert agent.endpoint.startswith("tls://")
        config = AgentPoolConfig(
            connections_per_agent=2,
            connect_timeout=5.0,
            reconnect_interval=0.05,
            health_check_interval=0.1,
        )
        async with AgentPool(config) as pool:
            await pool.add_agent("waf", f"tls://127.0.0.1:{agent.port}", ssl=pki.client())
            assert pool.is_agent_healthy("waf")
            replies = await asyncio.gather(
                *(pool.send_request_headers("waf", f"c{i}", hdrs(f"c{i}")) for i in range(64))
            )
            assert all(isinstance(r.decision, Allow) for r in replies)
            blocked = await pool.send_request_headers("waf", "adm", hdrs("adm", "/admin"))
            assert isinstance(blocked.decision, Block)
            assert 'tls_handshake_failures_total{reason="unknown_ca"}' in pool.export_prometheus()

            # the agent restarts: maintenance reconnects over TLS with the same context
            await agent.arestart()
            for attempt in range(200):
                if pool.is_agent_healthy("waf") and pool.agent_stats_sync()[0].active_connections:
                    cid = f"again-{attempt}"
                    try:
                        reply = await pool.send_request_headers("waf", cid, hdrs(cid))
                    except AgentProtocolError:
                        pass
                    else:
                        assert isinstance(reply.decision, Allow)
                        break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the pool did not reconnect to the restarted TLS agent")


async def test_plaintext_and_tls_mixed_up_fail_cleanly(pki: Pki) -> None:
    server = await _serve(pki.server())
    try:
        with pytest.raises(AgentProtocolError) as info:
            await AgentConnection.open(
                f"tcp://127.0.0.1:{server.port}", agent_id="waf", connect_timeout=2.0
            )
        assert not isinstance(info.value, TLSHandshakeFailed)
    finally:
        await server.close()
    with pytest.raises(ConnectionFailed) as refused:
        await _open(f"tls://127.0.0.1:{server.port}", pki.client())
    assert not isinstance(refused.value, TLSHandshakeFailed)
    plain = AgentServer(WafAgent(), host="127.0.0.1", port=0)
    await plain.start()
    try:
        await _expect(f"tls://127.0.0.1:{plain.port}", pki.client(), "other", True)
    finally:
        await plain.close()


async def _expect(endpoint: str, ctx: ssl.SSLContext | None, reason: str, by_peer: bool) -> None:
    before = tls.handshake_failures()[reason]
    with pytest.raises(TLSHandshakeFailed) as info:
        await _open(endpoint, ctx)
    err = info.value
    assert err.tls_reason == reason, err
    assert err.by_peer is by_peer, err
    assert endpoint in str(err)
    assert tls.handshake_failures()[reason] == before + 1


async def test_unknown_ca(pki: Pki, other: Pki) -> None:
    server = await _serve(pki.server())
    try:
        ep = f"tls://127.0.0.1:{server.port}"
        # we do not trust the agent's CA
        await _expect(ep, pki.client(ca=other.ca_pem), "unknown_ca", False)
        # tls:// without ssl=: the system CAs, which do not know the test CA either
        await _expect(ep, None, "unknown_ca", False)
        assert tls.default_client_context() is tls.default_client_context()
        # the agent does not trust our client certificate's CA
        ctx = pki.client(cert=other.client_pem, key=other.client_key)
        await _expect(ep, ctx, "unknown_ca", True)
    finally:
        await server.close()


async def test_hostname_mismatch(pki: Pki) -> None:
    server = await _serve(pki.server())
    try:
        ep = f"tls://127.0.0.1:{server.port}"
        await _expect(ep, pki.client(server_name="evil.test"), "hostname_mismatch", False)
        # without server_name the endpoint's host (127.0.0.1) is checked
        await _expect(ep, pki.client(server_name=None), "hostname_mismatch", False)
    finally:
        await server.close()


async def test_no_client_certificate(pki: Pki) -> None:
    server = await _serve(pki.server())
    try:
        ep = f"tls://127.0.0.1:{server.port}"
        await _expect(ep, pki.client(cert=None, key=None), "no_client_certificate", True)
    finally:
        await server.close()


async def test_expired_certificates(pki: Pki) -> None:
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
    cert, key = pki.issue("expired-server", NAME, not_after=past)
    server = await _serve(pki.server(cert=cert, key=key))
    try:
        await _expect(f"tls://127.0.0.1:{server.port}", pki.client(), "expired", False)
    finally:
        await server.close()
    ccert, ckey = pki.issue("expired-client", "proxy.test", not_after=past)
    server = await _serve(pki.server())
    try:
        ep = f"tls://127.0.0.1:{server.port}"
        await _expect(ep, pki.client(cert=ccert, key=ckey), "expired", True)
    finally:
        await server.close()


async def test_tls_without_client_auth(pki: Pki) -> None:
    """One-way TLS: the agent does not ask for a client certificate."""
    server = await _serve(tls.server_context(cert=pki.server_pem, key=pki.server_key))
    try:
        conn = await _open(f"tls://127.0.0.1:{server.port}", pki.client(cert=None, key=None))
        try:
            reply = await conn.request(hdrs("one"), "one")
            assert isinstance(reply.decision, Allow)
        finally:
            conn.close()
    finally:
        await server.close()


async def test_pool_counts_failures_and_keeps_agent_unhealthy(pki: Pki, other: Pki) -> None:
    server = await _serve(pki.server())
    try:
        config = AgentPoolConfig(connections_per_agent=2, connect_timeout=5.0)
        async with AgentPool(config) as pool:
            before = tls.handshake_failures()["unknown_ca"]
            ep = f"tls://127.0.0.1:{server.port}"
            await pool.add_agent("waf", ep, ssl=pki.client(ca=other.ca_pem))
            assert not pool.is_agent_healthy("waf")
            assert tls.handshake_failures()["unknown_ca"] == before + 2
            text = pool.export_prometheus()
            name = "agent_protocol_tls_handshake_failures_total"
            assert f'{name}{{reason="unknown_ca"}} {before + 2}' in text
    finally:
        await server.close()


def _copy(src: Pki, dst_dir: Path) -> None:
    for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key"):
        tmp = dst_dir / (name + ".tmp")
        shutil.copyfile(src.dir / name, tmp)
        os.replace(tmp, dst_dir / name)


async def test_reload_keeps_established_connections(pki: Pki, other: Pki, tmp_path: Path) -> None:
    """Rotate the agent's and the proxy's certificates to a new CA: established connections
    keep working, new connections use the new files."""
    live = tmp_path / "live"
    live.mkdir()
    _copy(pki, live)
    server_ctx = tls.server_context(
        cert=str(live / "server.pem"), key=str(live / "server.key"), ca=str(live / "ca.pem")
    )
    client_ctx = tls.client_context(
        ca=str(live / "ca.pem"),
        cert=str(live / "client.pem"),
        key=str(live / "client.key"),
        server_name=NAME,
    )
    server = await _serve(server_ctx)
    ep = f"tls://127.0.0.1:{server.port}"
    try:
        config = AgentPoolConfig(connections_per_agent=2, connect_timeout=5.0)
        async with AgentPool(config) as pool:
            await pool.add_agent("waf", ep, ssl=client_ctx)
            assert (await pool.send_request_headers("waf", "a", hdrs("a"))).decision == Allow()
            old_conns = [st.conn for st in pool._agents["waf"].conns]

            # the agent rotates to the other CA; the proxy has not yet
            _copy(other, live)
            os.utime(live / "server.pem", None)
            assert server_ctx.reload_if_changed()
            assert not server_ctx.reload_if_changed()
            replies = await asyncio.gather(
                *(pool.send_request_headers("waf", f"b{i}", hdrs(f"b{i}")) for i in range(16))
            )
            assert all(isinstance(r.decision, Allow) for r in replies)
            assert all(c.is_connected for c in old_conns)
            with pytest.raises(TLSHandshakeFailed) as info:
                await _open(ep, client_ctx)
            assert info.value.tls_reason == "unknown_ca"

            # the proxy reloads too: new connections succeed, old ones still serve
            client_ctx.reload()
            assert client_ctx.generation == 1
            fresh = await _open(ep, client_ctx)
            try:
                assert isinstance((await fresh.request(hdrs("n"), "n")).decision, Allow)
            finally:
                fresh.close()
            assert (await pool.send_request_headers("waf", "c", hdrs("c"))).decision == Allow()
            assert all(c.is_connected for c in old_conns)
    finally:
        await server.close()


def test_failed_reload_keeps_the_old_context(pki: Pki, tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    _copy(pki, live)
    ctx = tls.client_context(ca=str(live / "ca.pem"), server_name=NAME)
    current = ctx.current
    (live / "ca.pem").write_bytes(b"not a certificate")
    with pytest.raises(ssl.SSLError):
        ctx.reload()
    assert ctx.current is current
    assert ctx.generation == 0


def test_peer_identity() -> None:
    cert = {
        "subject": ((("commonName", "cn-agent"),),),
        "subjectAltName": (("DNS", "dns-agent"), ("URI", "spiffe://x/agent")),
    }
    assert tls.peer_identity(cert) == "spiffe://x/agent"
    assert tls.peer_identity({"subject": cert["subject"]}) == "cn-agent"
    assert tls.peer_identity(None) is None


# -- reverse connections over TLS ---------------------------------------------------------------


@pytest.fixture(scope="module")
def listener_certs(pki: Pki) -> tuple[str, str]:
    """The proxy's listener certificate, for the address agents dial (127.0.0.1)."""
    return pki.issue("listener", "127.0.0.1", "localhost")


async def _reverse_pool_and_listener(
    pki: Pki, listener_certs: tuple[str, str], **kw: bool
) -> tuple[AgentPool, ReverseConnectionListener]:
    cert, key = listener_certs
    ctx = tls.server_context(cert=cert, key=key, ca=pki.ca_pem)
    config = ReverseConnectionConfig(handshake_timeout=5.0)
    listener = await ReverseConnectionListener.bind_tcp("127.0.0.1", 0, config, ssl=ctx, **kw)
    pool = AgentPool(AgentPoolConfig(connections_per_agent=2))
    return pool, listener


async def test_reverse_mtls_with_certificate_identity(
    pki: Pki, listener_certs: tuple[str, str]
) -> None:
    agent_cert, agent_key = pki.issue("waf-agent", "waf-agent")
    pool, listener = await _reverse_pool_and_listener(
        pki, listener_certs, agent_id_from_certificate=True
    )
    target = f"tls://127.0.0.1:{listener.port}"
    agent_ctx = tls.client_context(ca=pki.ca_pem, cert=agent_cert, key=agent_key)
    async with pool, listener:
        accept = asyncio.ensure_future(listener.accept_one(pool))
        async with await connect_reverse(
            make_agent("waf"), target, agent_id="waf-agent", ssl=agent_ctx
        ) as conn:
            assert await asyncio.wait_for(accept, 5) == "waf-agent"
            assert conn.agent_id == "waf-agent"
            replies = await asyncio.gather(
                *(pool.send_request_headers("waf-agent", f"r{i}", hdrs(f"r{i}")) for i in range(20))
            )
            assert all(isinstance(r.decision, Allow) for r in replies)
            blocked = await pool.send_request_headers("waf-agent", "adm", hdrs("adm", "/admin"))
            assert isinstance(blocked.decision, Block)

        # a valid certificate for another identity cannot register as "waf-agent"
        impostor = asyncio.ensure_future(listener.accept_one(pool))
        with pytest.raises(ConnectionFailed, match="does not match its client certificate"):
            await connect_reverse(make_agent("waf"), target, agent_id="other", ssl=agent_ctx)
        with pytest.raises(InvalidMessage, match="identity 'waf-agent'"):
            await asyncio.wait_for(impostor, 5)


@pytest.mark.parametrize(
    ("case", "reason"), [("no_cert", "no_client_certificate"), ("other_ca", "unknown_ca")]
)
async def test_reverse_listener_rejects_bad_client_certificates(
    pki: Pki, other: Pki, listener_certs: tuple[str, str], case: str, reason: str
) -> None:
    pool, listener = await _reverse_pool_and_listener(pki, listener_certs)
    target = f"tls://127.0.0.1:{listener.port}"
    if case == "no_cert":
        agent_ctx = tls.client_context(ca=pki.ca_pem)
    else:
        agent_ctx = tls.client_context(ca=pki.ca_pem, cert=other.client_pem, key=other.client_key)
    async with pool, listener:
        before = tls.handshake_failures()[reason]
        accept = asyncio.ensure_future(listener.accept_one(pool))
        with pytest.raises(TLSHandshakeFailed) as agent_side:
            await connect_reverse(make_agent("waf"), target, agent_id="waf", ssl=agent_ctx)
        assert agent_side.value.tls_reason == reason and agent_side.value.by_peer
        with pytest.raises(TLSHandshakeFailed) as proxy_side:
            await asyncio.wait_for(accept, 5)
        assert proxy_side.value.tls_reason == reason and not proxy_side.value.by_peer
        assert tls.handshake_failures()[reason] == before + 1
        assert pool.agent_ids() == []
        assert listener.rejected == 1


async def test_reverse_plaintext_agent_against_tls_listener(
    pki: Pki, listener_certs: tuple[str, str]
) -> None:
    pool, listener = await _reverse_pool_and_listener(pki, listener_certs)
    async with pool, listener:
        accept = asyncio.ensure_future(listener.accept_one(pool))
        with pytest.raises(AgentProtocolError):
            await connect_reverse(
                make_agent("waf"), f"tcp://127.0.0.1:{listener.port}", agent_id="w", timeout=2.0
            )
        with pytest.raises(TLSHandshakeFailed) as proxy_side:
            await asyncio.wait_for(accept, 5)
        assert proxy_side.value.tls_reason == "not_tls"


async def test_cli_agent_dials_in_over_mtls(pki: Pki, listener_certs: tuple[str, str]) -> None:
    """``python -m agentpool agent --reverse tls://... --tls-*`` registers under its cert id."""
    agent_cert, agent_key = pki.issue("cli-agent", "cli-agent")
    pool, listener = await _reverse_pool_and_listener(
        pki, listener_certs, agent_id_from_certificate=True
    )
    async with pool, listener:
        accept = asyncio.ensure_future(listener.accept_one(pool))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentpool", "agent", "--example", "waf",
            "--reverse", f"tls://127.0.0.1:{listener.port}", "--agent-id", "cli-agent",
            "--tls-cert", agent_cert, "--tls-key", agent_key, "--tls-ca", pki.ca_pem,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert await asyncio.wait_for(accept, 10) == "cli-agent"
            reply = await pool.send_request_headers("cli-agent", "x", hdrs("x", "/admin"))
            assert isinstance(reply.decision, Block)
        finally:
            proc.kill()
            await proc.wait()


def test_failure_collector_in_a_registry() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(tls.TLSFailureCollector())
    text = generate_latest(registry).decode()
    expired = float(tls.handshake_failures()["expired"])
    assert f'agent_protocol_tls_handshake_failures_total{{reason="expired"}} {expired}' in text
    assert text.count("agent_protocol_tls_handshake_failures_total{") == len(tls.REASONS)
