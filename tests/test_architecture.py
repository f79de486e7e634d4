"""Imports go one way: flows -> tasks -> (finetune, llama4tune, tunerecipes, embedded), with no cycle anywhere,
counting imports inside functions. Read from the source (AST), so a new import that breaks the rule fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "finetune", "llama4tune", "tunerecipes", "embedded")
# The CLI is the entry point: it starts the flow and renders launch specs, so it may import any layer.
ENTRY_POINTS = {"finetune.cli"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in (REPO / package).rglob("*.py")}


def _imports(source: str, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports anywhere in it (``from a.b import c`` counts a.b.c when it is a module,
    else a.b)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] in PACKAGES)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path.read_text(), modules) for name, path in modules.items()}


def _layer_violations(graph: dict[str, set[str]]) -> list[str]:
    forbidden = {"tasks": {"flows"}, "finetune": {"flows", "tasks"}, "llama4tune": {"flows", "tasks"},
                 "tunerecipes": {"flows", "tasks"}, "embedded": {"flows", "tasks"}}
    return sorted(f"{module} imports {target}" for module, targets in graph.items() if module not in ENTRY_POINTS
                  for target in targets if target.split(".")[0] in forbidden.get(module.split(".")[0], ()))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_lower_layers_never_import_higher_ones() -> None:
    assert _layer_violations(_graph()) == []


def test_no_module_imports_itself_through_others() -> None:
    assert _cycles(_graph()) == []


@pytest.mark.parametrize("source, complaint", [
    ("def f():\n    from flows.finetune import finetune\n", "imports flows.finetune"),
    ("from tasks.train import launch\n", "imports tasks.train.launch"),
])
def test_the_check_sees_imports_inside_functions_too(source: str, complaint: str) -> None:
    graph = {"finetune._probe": _imports(source, _modules()), **_graph()}
    assert any(complaint in violation for violation in _layer_violations(graph))
