"""`agentpool demo` (what the README's first command runs) runs cleanly end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import agentpool

ROOT = str(Path(agentpool.__file__).resolve().parent.parent)


def test_demo_runs_and_reports() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "agentpool", "demo", "--requests", "400", "--concurrency", "16"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "== 400 requests" in out
    assert "allow" in out and "block 403" in out
    assert "sticky session frames:" in out and "errors" not in out.split("-- stats()")[0]
    assert "p99" in out
    assert "waf   connections=4 healthy=4 in_flight=0" in out
    assert "echo  connections=4 healthy=4 in_flight=0" in out
    assert "agent_protocol_requests_total " in out
    assert "agent_protocol_in_flight_requests 0" in out
    assert "[########################################] 400/400" in proc.stderr
    assert "pool shut down; stopping agents" in proc.stderr
