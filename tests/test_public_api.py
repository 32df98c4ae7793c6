"""The curated top level: ``__all__`` is what the docs import from ``agentpool``, every name
resolves, the agent side loads only when asked for, and names that moved still resolve with
a DeprecationWarning naming their module."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import agentpool

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^[ \t]*```python[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
SUBMODULES = {"codec", "control", "enums", "errors", "framing", "messages", "metrics", "tls"}


def _top_level_imports() -> dict[str, str]:
    """Every name the docs' Python blocks (fragments too) import from ``agentpool``."""
    found: dict[str, str] = {}
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            code = "\n".join(line.strip() for line in m.group(1).splitlines())
            where = f"{page.name}:{text.count(chr(10), 0, m.start()) + 1}"
            for stmt in re.finditer(r"^from agentpool import (\([^)]*\)|[^\n]+)", code, re.M):
                tree = ast.parse(stmt.group(0))
                for node in ast.walk(tree):
                    if isinstance(node, ast.ImportFrom):
                        for alias in node.names:
                            found[alias.name] = where
    return found


DOC_NAMES = _top_level_imports()


def test_docs_import_only_the_curated_top_level() -> None:
    assert {"AgentPool", "AgentServer", "AgentPoolConfig"} <= set(DOC_NAMES)
    stray = {n: w for n, w in DOC_NAMES.items() if n not in agentpool.__all__}
    assert set(stray) <= SUBMODULES, stray


def test_every_exported_name_resolves_without_warning() -> None:
    assert len(set(agentpool.__all__)) == len(agentpool.__all__)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in agentpool.__all__:
            assert getattr(agentpool, name) is not None, name
    assert set(agentpool.__all__) <= set(dir(agentpool))


def test_top_level_is_what_users_write() -> None:
    internals = {"HAS_EXTENSIONS", "FrameDecoder", "encode_frame", "JSON_CODEC", "Codec"}
    assert not internals & set(agentpool.__all__)
    assert not set(agentpool._MOVED) & set(agentpool.__all__)
    assert len(agentpool.__all__) <= 60


@pytest.mark.parametrize("module", sorted(SUBMODULES))
def test_submodule_exports_resolve(module: str) -> None:
    mod = importlib.import_module(f"agentpool.{module}")
    for name in mod.__all__:
        assert hasattr(mod, name), f"agentpool.{module}.{name}"


@pytest.mark.parametrize("name", sorted(agentpool._MOVED))
def test_moved_names_warn_and_resolve(name: str) -> None:
    home = importlib.import_module(f"agentpool.{agentpool._MOVED[name]}")
    with pytest.warns(DeprecationWarning, match=f"agentpool.{agentpool._MOVED[name]}"):
        value = getattr(agentpool, name)
    assert value is getattr(home, name)


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        agentpool.no_such_name  # noqa: B018


def test_proxy_import_does_not_load_the_agent_side() -> None:
    code = (
        "import sys, agentpool\n"
        "before = set(sys.modules)\n"
        "home = agentpool.AgentServer.__module__\n"
        "print(home in before, home in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert out == ["False", "True"]
