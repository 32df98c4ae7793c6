"""Every Python block in README.md and docs/*.md runs as pasted, and the docs stand alone.

A block fenced ```` ```python ```` is run in a fresh interpreter (against the installed
package, from an empty directory, with a timeout) and must exit 0; blocks start the agents
they need themselves. A block fenced ```` ```python fragment ```` is an excerpt and is not
run. Nothing in the package or its docs may cite files that are not in the repository.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^([ \t]*)```([^\n`]*)\n(.*?)^[ \t]*```[ \t]*$", re.S | re.M)
TIMEOUT = 90.0


def _blocks() -> list[tuple[str, str, str]]:
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            info = m.group(2).strip()
            if info.split()[:1] not in (["python"], ["py"]):
                continue
            line = text.count("\n", 0, m.start()) + 1
            code = textwrap.dedent(m.group(3)) if m.group(1) else m.group(3)
            out.append((f"{page.relative_to(ROOT)}:{line}", info, code))
    return out


BLOCKS = _blocks()
RUNNABLE = [(where, code) for where, info, code in BLOCKS if "fragment" not in info.split()]


def test_blocks_are_found() -> None:
    assert len(RUNNABLE) >= 5
    for where, info, _ in BLOCKS:
        assert info in ("python", "python fragment"), f"{where}: unknown info string {info!r}"


@pytest.mark.parametrize(("where", "code"), RUNNABLE, ids=[w for w, _ in RUNNABLE])
def test_block_runs_as_pasted(where: str, code: str, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"{where} failed:\n{proc.stderr[-3000:]}"


FOREIGN = re.compile(r"POOL\.md|PROTOCOL\.md|DECISIONS\.md|STYLE-MODELS\.md|LAYOUT\.md|shared/spec")


def test_no_references_outside_the_repository() -> None:
    files = [*PAGES, *sorted((ROOT / "agentpool").glob("*.py"))]
    for pattern in ("*.pyx", "*.pxi", "*.pxd", "*.pyi"):
        files += sorted((ROOT / "agentpool").glob(pattern))
    offenders = []
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if FOREIGN.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_relative_links_resolve() -> None:
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links {target}"


@pytest.mark.parametrize(
    ("where", "code"),
    [(w, c) for w, i, c in BLOCKS if "fragment" in i.split()],
    ids=[w for w, i, _ in BLOCKS if "fragment" in i.split()],
)
def test_fragment_is_valid_python(where: str, code: str) -> None:
    """Fragments are not run, but they are Python (top-level ``await`` allowed)."""
    compile(code, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_readme_starts_with_the_two_commands() -> None:
    """The README opens with install-and-demo in a venv (no pip into the system Python), then
    the test command; tests/test_cli.py runs that demo from the checkout."""
    first = FENCE.search((ROOT / "README.md").read_text(encoding="utf-8"))
    assert first is not None and first.group(2).strip() == "bash"
    lines = [ln.split("#")[0].strip() for ln in first.group(3).splitlines()]
    assert lines[0] == (
        "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/agentpool demo"
    )
    assert lines[1] == "bash ci/test.sh"
    assert (ROOT / "ci" / "test.sh").exists()
