"""The compiled core, its pure-Python twin and ``_core.pyi`` describe one API."""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib

import pytest

from agentpool import _impl

STUB = pathlib.Path(_impl.__file__).with_name("_core.pyi")


def _stub_api() -> dict[str, set[str]]:
    tree = ast.parse(STUB.read_text())
    api: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
            api[node.name] = {m for m in members if not m.startswith("_") or m == "__init__"}
        elif isinstance(node, ast.FunctionDef):
            api[node.name] = set()
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            api[node.target.id] = set()
        elif isinstance(node, ast.ImportFrom) and node.module == "agentpool._metrics_py":
            for alias in node.names:
                api[alias.asname or alias.name] = set()
    return api


def _public(obj: type) -> set[str]:
    names = {n for n in dir(obj) if not n.startswith("_")}
    for klass in obj.__mro__:
        names.update(n for n in getattr(klass, "__slots__", ()) if not n.startswith("_"))
        names.update(n for n in getattr(klass, "__annotations__", {}) if not n.startswith("_"))
    return names


@pytest.mark.parametrize("name", ["agentpool._core_py", "agentpool._core"])
def test_core_matches_stub(name: str) -> None:
    if name == "agentpool._core" and not _impl.HAS_EXTENSIONS:
        pytest.skip("compiled core not in use")
    module = importlib.import_module(name)
    api = _stub_api()
    missing = [n for n in api if not hasattr(module, n)]
    assert not missing, f"{name} lacks {missing}"
    for cls_name, members in api.items():
        obj = getattr(module, cls_name)
        if inspect.isclass(obj) and members:
            absent = sorted(members - {"__init__"} - _public(obj))
            assert not absent, f"{name}.{cls_name} lacks {absent}"
            extra = sorted(_public(obj) - members - {"__init__"})
            assert not extra, f"{name}.{cls_name} has members the stub does not describe: {extra}"
