"""A proxy worker for test_multiproc: a pool, traffic, a MultiprocessExporter, then wait.

argv: agent endpoint, request count, loop ("asyncio" or "uvloop"). PROMETHEUS_MULTIPROC_DIR
comes from the environment. Prints ``done`` after the last copy and exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import sys

from agentpool.config import AgentPoolConfig
from agentpool.messages import RequestHeadersEvent, RequestMetadata
from agentpool.multiproc import MultiprocessExporter
from agentpool.pool import AgentPool


def hdrs(cid: str) -> RequestHeadersEvent:
    meta = RequestMetadata(correlation_id=cid, request_id=cid, client_ip="127.0.0.1", client_port=1)
    return RequestHeadersEvent(metadata=meta, method="GET", uri="/", headers={})


async def main(endpoint: str, count: int) -> None:
    config = AgentPoolConfig(connections_per_agent=2, connect_timeout=5.0, request_timeout=5.0)
    async with AgentPool(config) as pool:
        await pool.add_agent("waf", endpoint)
        exporter = MultiprocessExporter(pool, interval=0.05)
        exporter.start()
        await asyncio.gather(
            *(pool.send_request_headers("waf", f"c{i}", hdrs(f"c{i}")) for i in range(count))
        )
        await asyncio.sleep(0.15)  # a few periodic copies run while traffic has stopped
        await exporter.stop()
        print("done", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    endpoint, count, loop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if loop == "uvloop":
        import uvloop

        uvloop.run(main(endpoint, count))
    else:
        asyncio.run(main(endpoint, count))
