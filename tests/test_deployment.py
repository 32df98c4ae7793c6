"""The worked deployment of docs/deployment.md, on loopback addresses.

Two proxy workers share one SO_REUSEPORT port; the agent ``waf`` runs as replicas on
127.0.0.2 and 127.0.0.3 (then 127.0.0.4), served over mutual TLS with certificates made by
trustme, found through a stub DNS server's SRV records; one replica is killed (SIGKILL)
under load and no request fails; one scrape of PROMETHEUS_MULTIPROC_DIR shows both workers.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from agents import AgentProc

trustme = pytest.importorskip("trustme")
pytest.importorskip("dns.message")
from _dns import StubDns  # noqa: E402
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

WORKER = str(Path(__file__).with_name("deploy_worker.py"))
SRV_NAME = "_waf._tcp.agents.test"
REQUESTS = 600
CLIENTS = 16


def make_certs(d: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    ca.issue_cert("waf.internal").private_key_and_cert_chain_pem.write_to_path(str(d / "agent.pem"))
    ca.issue_cert("proxy.internal").private_key_and_cert_chain_pem.write_to_path(
        str(d / "proxy.pem")
    )


def replica(host: str, certs: Path) -> AgentProc:
    tls_args = ["--tls-cert", str(certs / "agent.pem"), "--tls-ca", str(certs / "ca.pem")]
    agent = AgentProc("control", tcp=True, extra_args=tls_args)
    agent.host = host
    return agent


def publish(dns: StubDns, agents: list[AgentProc]) -> None:
    """SRV records naming one host per replica, and the hosts' A records."""
    names = [f"r{i}.agents.test" for i in range(len(agents))]
    dns.records[(SRV_NAME, "SRV")] = (1, [f"10 5 {a.port} {n}." for a, n in zip(agents, names)])
    for a, n in zip(agents, names):
        dns.records[(n, "A")] = (1, [a.host])


def reserve_port() -> socket.socket:
    """A bound, never listening SO_REUSEPORT socket: the workers can join its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def scrape(path: str) -> dict[str, float]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            if not s.labels:
                out[s.name] = s.value
    return out


def start_worker(
    port: int, dns_port: int, certs: Path, loop_name: str, env: dict[str, str]
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, WORKER, str(port), str(dns_port), str(certs), loop_name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


async def client(port: int, ids: list[int], replies: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i in ids:
            writer.write(f"{i}\n".encode())
            line = await asyncio.wait_for(reader.readline(), 10.0)
            replies.append(line.decode().strip())
    finally:
        writer.close()


async def test_workers_replicas_mtls_srv_and_a_killed_replica(
    stub_dns: tuple[StubDns, int], tmp_path: Path
) -> None:
    dns, dns_port = stub_dns
    certs = tmp_path / "certs"
    certs.mkdir()
    make_certs(certs)
    mp_dir = tmp_path / "metrics"
    mp_dir.mkdir()
    loop_name = "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"
    agents = [replica("127.0.0.2", certs), replica("127.0.0.3", certs)]
    spare = replica("127.0.0.4", certs)
    workers: list[subprocess.Popen[str]] = []
    after: list[str] = []
    reserved = reserve_port()
    port = reserved.getsockname()[1]
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(mp_dir))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(WORKER).parent), env.get("PYTHONPATH", "")])
    try:
        for a in (*agents, spare):
            a.start()
        for a in (*agents, spare):
            await a.await_ready()
            assert a.endpoint.startswith(f"tls://{a.host}:")
        publish(dns, agents)
        workers = [start_worker(port, dns_port, certs, loop_name, env) for _ in range(2)]
        for w in workers:
            assert w.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(w.stdout.readline), 30.0)
            assert line.strip() == "ready"

        replies: list[str] = []
        ids = list(range(REQUESTS))
        load = [
            asyncio.ensure_future(client(port, ids[k::CLIENTS], replies)) for k in range(CLIENTS)
        ]
        for _ in range(2000):
            if len(replies) >= REQUESTS // 3:
                break
            await asyncio.sleep(0.005)
        victim = agents[0]
        victim.kill()  # SIGKILL under load, requests in flight on it
        killed_at = len(replies)
        await asyncio.wait_for(asyncio.gather(*load), 60.0)

        assert [r for r in replies if not r.startswith("ok ")] == []
        worker_pids = Counter(r.split()[1] for r in replies)
        agent_pids = Counter(r.split()[2] for r in replies)
        assert set(worker_pids) == {str(w.pid) for w in workers}  # SO_REUSEPORT spread
        assert set(agent_pids) == {str(a.pid) for a in agents}
        late = Counter(r.split()[2] for r in replies[killed_at + 2 * CLIENTS :])
        assert set(late) == {str(agents[1].pid)}  # the dead replica gets no new request

        # discovery: the dead replica leaves the records, a new one joins
        publish(dns, [agents[1], spare])
        for _ in range(100):
            await client(port, list(range(10_000, 10_010)), after)
            if str(spare.pid) in {r.split()[2] for r in after[-10:] if r.startswith("ok ")}:
                break
            await asyncio.sleep(0.05)
        assert [r for r in after if not r.startswith("ok ")] == []
        assert str(spare.pid) in {r.split()[2] for r in after}
    finally:
        failovers = 0
        exits: list[str] = []
        for w in workers:
            assert w.stdin is not None and w.stdout is not None
            w.stdin.close()
            try:
                out = await asyncio.wait_for(asyncio.to_thread(w.stdout.read), 30.0)
                exits.append(out.strip())
                failovers += int(out.split()[-1]) if out.startswith("in_flight") else 0
            finally:
                if w.poll() is None:
                    w.kill()
                w.wait()
        reserved.close()
        for a in (*agents, spare):
            a.cleanup()
    # nothing left in flight in either worker
    assert [e.split()[:2] for e in exits] == [["in_flight", "0"]] * 2, exits
    # one scrape for both workers: every client request is one response
    s = scrape(str(mp_dir))
    total = REQUESTS + len(after)
    assert s["agent_protocol_responses_total"] == total
    assert s["agent_protocol_requests_total"] == total + failovers
    print(f"\ndeployment: {total} requests, {failovers} failover(s), 0 failed")
