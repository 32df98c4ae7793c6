"""Benchmark fixtures: run each micro benchmark on the compiled core and the pure twin.

Benchmarks are the one place that imports ``agentpool._core`` and ``agentpool._core_py``
directly, so both cores are measured side by side in one run (``--benchmark-group-by=func``
puts each pair next to each other).
"""

from __future__ import annotations

import importlib
import types

import pytest

from agentpool import _core_py

_core: types.ModuleType | None
try:
    _core = importlib.import_module("agentpool._core")
except ImportError:  # pragma: no cover - pure-Python install
    _core = None

CORES: dict[str, types.ModuleType] = {"pure": _core_py}
if _core is not None:
    CORES["compiled"] = _core


@pytest.fixture(params=sorted(CORES, key=lambda name: name != "compiled"))
def core_impl(request: pytest.FixtureRequest) -> types.ModuleType:
    """The core module under test: ``compiled`` (agentpool._core) or ``pure`` (_core_py)."""
    return CORES[request.param]
