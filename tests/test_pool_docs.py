"""The runnable proxy-handler example in docs/pool.md runs and prints what the page says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "pool.md"


def _example() -> str:
    text = DOC.read_text()
    section = text.split("## A proxy handler using the pool (runnable)", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def test_proxy_handler_example_runs(tmp_path: Path) -> None:
    script = tmp_path / "handler.py"
    script.write_text(_example())
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "/index.html -> HTTP/1.1 200 X"
    assert lines[1] == "/admin/users -> HTTP/1.1 403 X"
    assert "AgentPoolStats(agent_id='waf', active_connections=2" in lines[2]
    assert "total_requests=2, total_errors=0" in lines[2]
