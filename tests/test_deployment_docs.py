"""The runnable example in docs/deployment.md runs and prints what the page says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"


def _blocks() -> list[tuple[str, str]]:
    return re.findall(r"```(python[^\n]*)\n(.*?)```", DOC.read_text(), re.S)


def test_every_python_block_is_runnable_or_a_fragment() -> None:
    kinds = {info for info, _ in _blocks()}
    assert kinds <= {"python", "python fragment"}
    assert sum(1 for info, _ in _blocks() if info == "python") == 1


def test_example_runs(tmp_path: Path) -> None:
    pytest.importorskip("trustme")
    code = next(body for info, body in _blocks() if info == "python")
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["tls Block", "2 TLS connections"]
