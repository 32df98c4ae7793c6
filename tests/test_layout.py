"""The package's import graph: no import circles, and the proxy side never imports the agent side.

The graph is read from the installed modules' sources (every ``import`` and ``from ... import``,
also the ones inside functions; only ``if TYPE_CHECKING:`` blocks are left out, since they never
run), and the proxy side is also imported for real in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import agentpool

PKG = Path(agentpool.__file__).resolve().parent

# Modules that are not the proxy side: the top-level API (it exports both sides), the command
# line and the tools behind it that drive agents, and the agent side itself. Every other module
# is the proxy side (a new module is, unless added here).
NOT_PROXY_SIDE = {"agentpool", "agentpool.__main__", "agentpool.cli", "agentpool.bench"}
NOT_PROXY_PREFIXES = ("agentpool.agent.", "agentpool._bench.")
AGENT_SIDE = "agentpool.agent"

# Imports made inside a function that may close a circle, each with its reason. Only a
# function-level import qualifies: the same edge at module level is a circle again.
LAZY_BACK_EDGES = {
    ("agentpool.connection", "agentpool.grpc"): (
        "AgentConnection.open hands grpc:// endpoints to the optional gRPC transport, a"
        " subclass of AgentConnection imported on first use (with grpcio)"
    ),
}


def _modules() -> dict[str, Path | None]:
    """Every module of the package: name -> source (None for compiled-only modules)."""
    found: dict[str, Path | None] = {}
    for path in PKG.rglob("*"):
        if path.suffix not in (".py", ".pyi", ".pyx", ".so", ".pyd") or "__pycache__" in path.parts:
            continue
        parts = [PKG.name, *path.relative_to(PKG).parts]
        parts[-1] = parts[-1].split(".", 1)[0]
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if path.suffix == ".py":
            found[name] = path
        else:
            found.setdefault(name, None)
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str) -> tuple[set[str], set[str]]:
    """The package's modules that ``name`` imports when it runs (anywhere in its code), and
    those of them it imports at module level."""
    path = MODULES[name]
    if path is None:
        return set(), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    eager: set[str] = set()

    def nearest(target: str) -> str | None:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child, lazy)
            return
        lazy = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        hits: set[str] = set()
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PKG.name and (hit := nearest(alias.name)):
                    hits.add(hit)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if base.split(".")[0] == PKG.name:
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    hit = full if full in MODULES else nearest(base)
                    if hit:
                        hits.add(hit)
        out.update(hits)
        if not lazy:
            eager.update(hits)
        for child in ast.iter_child_nodes(node):
            visit(child, lazy)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    out.discard(name)
    eager.discard(name)
    return out, eager


_READ = {name: _imports(name) for name in MODULES}
GRAPH = {name: found for name, (found, _) in _READ.items()}
EAGER = {name: eager for name, (_, eager) in _READ.items()}


def _is_agent_side(name: str) -> bool:
    return name == AGENT_SIDE or name.startswith(AGENT_SIDE + ".")


def _proxy_side() -> list[str]:
    return sorted(
        m
        for m in MODULES
        if m not in NOT_PROXY_SIDE
        and not _is_agent_side(m)
        and not m.startswith(NOT_PROXY_PREFIXES)
    )


def test_the_graph_sees_the_package() -> None:
    """The reader finds the modules and their imports (so the checks below can fail)."""
    assert {"agentpool.pool", "agentpool.connection", "agentpool.agent.server"} <= set(MODULES)
    assert "agentpool.connection" in GRAPH["agentpool.pool"]
    assert "agentpool.agent.session" in GRAPH["agentpool.agent.server"]
    assert "agentpool.agent.base" in GRAPH[AGENT_SIDE]
    # lazy imports count; TYPE_CHECKING ones do not
    assert "agentpool.agent.examples" in GRAPH["agentpool.cli"]
    assert "agentpool.agent.examples" not in EAGER["agentpool.cli"]
    assert "agentpool.agent.server" not in GRAPH["agentpool.agent._flusher"]


def test_no_import_circles() -> None:
    graph = {name: set(deps) for name, deps in GRAPH.items()}
    for (importer, imported), _reason in LAZY_BACK_EDGES.items():
        assert imported in graph[importer], f"{importer} no longer imports {imported}: drop it"
        assert imported not in EAGER[importer], f"{importer} imports {imported} at module level"
        graph[importer].discard(imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    assert circles == []


def test_proxy_side_never_imports_the_agent_side() -> None:
    offenders: dict[str, list[str]] = {}
    for start in _proxy_side():
        seen = {start}
        todo = [(start, [start])]
        while todo:
            mod, path = todo.pop()
            for dep in sorted(GRAPH[mod]):
                if _is_agent_side(dep):
                    offenders.setdefault(start, [*path, dep])
                elif dep not in seen:
                    seen.add(dep)
                    todo.append((dep, [*path, dep]))
    assert offenders == {}


def test_proxy_side_imported_for_real_loads_no_agent_module() -> None:
    """Import every proxy-side module in a fresh interpreter, the top-level package's
    ``__init__`` (which exports both sides) bypassed; no ``agentpool.agent`` module loads."""
    names = [m for m in _proxy_side() if MODULES[m] is not None]
    code = (
        "import importlib, sys, types\n"
        f"pkg = types.ModuleType({PKG.name!r})\n"
        f"pkg.__path__ = [{str(PKG)!r}]\n"
        f"sys.modules[{PKG.name!r}] = pkg\n"
        f"names = {names!r}\n"
        "imported = 0\n"
        "for name in names:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        imported += 1\n"
        "    except ImportError as exc:  # an optional extra that is not installed\n"
        f"        if (exc.name or '').split('.')[0] == {PKG.name!r}:\n"
        "            raise\n"
        f"loaded = sorted(m for m in sys.modules if m == {AGENT_SIDE!r} "
        f"or m.startswith({AGENT_SIDE + '.'!r}))\n"
        "print(imported, loaded)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    imported, loaded = out.stdout.split(maxsplit=1)
    assert loaded.strip() == "[]"
    assert int(imported) > 20
