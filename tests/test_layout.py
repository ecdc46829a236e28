"""The shape of ``server/``: rooms without import circles, a registry that knows no method."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_METHODS = {"random", "herding", "kcenter", "dm", "dsv", "dm+dkkt", "dsv-dm-avg", "generator"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _server_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in (ROOT / "server").rglob("*.py")}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``path`` imports anywhere (module level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from pkg import sub`` imports the module pkg.sub when it is one
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [n if n in known else node.module for n in names]
        else:
            continue
        found.update(n for n in names if n in known)
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = _server_modules()
    known = set(modules)
    return {name: _imports(path, known) - {name} for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_real_imports():
    graph = _import_graph()
    assert "server.methods.registry" in graph["server.methods.dm"]
    assert "server.methods.dm" in graph["server.methods"]
    assert "server.federation.strategy" in graph["server.federation.run"]


def test_no_import_circle_in_server():
    assert _find_cycle(_import_graph()) is None, f"import circle: {' -> '.join(_find_cycle(_import_graph()))}"


def test_cycle_finder_finds_a_circle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_registry_imports_no_method_module():
    graph = _import_graph()
    assert not {m for m in graph["server.methods.registry"] if m.startswith("server.")}


def test_importing_the_package_registers_every_builtin_method():
    code = "import server.methods.registry as r; print(','.join(r.METHODS.names()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert set(out.stdout.strip().split(",")) == BUILTIN_METHODS


def test_rounds_and_methods_do_not_import_flower():
    code = "import sys, server.federation.rounds, server.methods; print('flwr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
