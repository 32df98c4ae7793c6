"""One proxy worker of the worked deployment in docs/deployment.md (run by test_deployment).

A pool whose agent ``waf`` is found by DNS SRV and reached over mutual TLS, a
MultiprocessExporter, and a small front end on a SO_REUSEPORT port shared with the other
workers: each line ``<id>`` sent to it is one request to the agent, answered
``ok <worker pid> <agent pid>`` or ``err <error type>: <message>``.

argv: front port, DNS port, certificate directory, loop ("asyncio" or "uvloop").
PROMETHEUS_MULTIPROC_DIR comes from the environment. Prints ``ready`` once both replicas
are connected; on stdin EOF it stops, prints ``in_flight <n> failovers <n>`` and exits.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys

from agentpool import tls
from agentpool.config import AgentPoolConfig
from agentpool.discovery import Discovery, DnsSource, endpoints_updater
from agentpool.messages import RequestHeadersEvent, RequestMetadata
from agentpool.multiproc import MultiprocessExporter
from agentpool.pool import AgentPool

SRV_NAME = "_waf._tcp.agents.test"


def reuseport_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    return sock


async def main(port: int, dns_port: int, certs: str) -> None:
    ctx = tls.client_context(
        ca=os.path.join(certs, "ca.pem"),
        cert=os.path.join(certs, "proxy.pem"),
        server_name="waf.internal",
    )
    config = AgentPoolConfig(
        connections_per_agent=2,
        request_timeout=5.0,
        connect_timeout=2.0,
        health_check_interval=0.1,
        reconnect_interval=0.1,
        max_reconnect_backoff=1.0,
        drain_timeout=2.0,
    )
    me = os.getpid()
    async with AgentPool(config) as pool:

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while line := await reader.readline():
                cid = f"{me}-{line.decode().strip()}"
                meta = RequestMetadata(
                    correlation_id=cid, request_id=cid, client_ip="127.0.0.1", client_port=1
                )
                event = RequestHeadersEvent(metadata=meta, method="GET", uri="/", headers={})
                try:
                    reply = await pool.send_request_headers("waf", cid, event)
                    out = f"ok {me} {reply.routing_metadata['pid']}\n"
                except Exception as exc:
                    out = f"err {type(exc).__name__}: {exc}\n"
                finally:
                    pool.clear_correlation_affinity(cid)
                writer.write(out.encode())
            writer.close()

        source = DnsSource(
            SRV_NAME,
            record="SRV",
            scheme="tls",
            resolve_targets=True,
            nameservers=["127.0.0.1"],
            dns_port=dns_port,
            min_ttl=0.2,
            retry_interval=0.2,
        )
        exporter = MultiprocessExporter(pool, interval=0.1)
        exporter.start()
        async with Discovery("waf", source, endpoints_updater(pool, ssl=ctx)):
            server = await asyncio.start_server(handle, sock=reuseport_socket(port))
            for _ in range(500):
                stats = pool.endpoint_stats("waf") if "waf" in pool.agent_ids() else []
                if len(stats) == 2 and all(s.healthy_connections == 2 for s in stats):
                    break
                await asyncio.sleep(0.02)
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
            server.close()
        await exporter.stop()
        in_flight = sum(s.total_in_flight for s in pool.agent_stats_sync())
        print(f"in_flight {in_flight} failovers {pool.failovers}", flush=True)


if __name__ == "__main__":
    front, dns_port, certs, loop = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if loop == "uvloop":
        import uvloop

        uvloop.run(main(front, dns_port, certs))
    else:
        asyncio.run(main(front, dns_port, certs))
