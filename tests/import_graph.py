"""The import graph of the project's packages, read from the source with `ast` (nothing is imported)."""

from __future__ import annotations

__all__ = ["PACKAGES", "import_graph", "import_cycles", "module_name"]

import ast
from pathlib import Path

from workflow.core.config import PROJECT_ROOT

PACKAGES = ("workflow", "stream_shim")


def module_name(path: Path) -> str:
    """Dotted name of a module file under the checkout (``__init__`` names its package)."""
    parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(tree: ast.AST, current: str, is_package: bool) -> set[str]:
    """Every module of our packages that ``tree`` imports, at any depth (function bodies too)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = current.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {name for name in found if name.split(".")[0] in PACKAGES}


def import_graph() -> dict[str, set[str]]:
    """Return module -> the project modules it imports (only names that are modules)."""
    files = [p for package in PACKAGES for p in sorted((PROJECT_ROOT / package).rglob("*.py"))]
    modules = {module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        raw = _imported(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py")
        graph[name] = {m for m in raw if m in modules and m != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return the strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles
