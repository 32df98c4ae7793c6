"""docs/integrations.md: every runnable Python block runs as pasted; the config example loads."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
pytest.importorskip("httpx")

from http_procs import env

DOC = Path(__file__).resolve().parent.parent / "docs" / "integrations.md"
TEXT = DOC.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)


def test_doc_has_runnable_blocks() -> None:
    assert len(BLOCKS) == 2
    assert "```python fragment" in TEXT


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs(index: int, tmp_path: Path) -> None:
    script = tmp_path / f"block{index}.py"
    script.write_text(BLOCKS[index])
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["/hello 200 checked=1", "/admin 403 Forbidden"]


def test_config_example_loads() -> None:
    from agentpool.http import Glue, load_config

    block = re.search(r"```json\n(.*?)```", TEXT, re.S)
    assert block is not None
    kwargs = load_config(json.loads(block.group(1)))
    glue = Glue(**kwargs)
    assert [r.path for r in glue.routes or []] == ["/health", "/upload/*", "/api/*", "*"]
    assert glue.rules["auth"].failure == 503
