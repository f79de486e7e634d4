"""Layers, bottom up, each importing only those below it (README "Architecture"):

    llama4tune (models) < embedded, tunerecipes (the embedded default; training) < finetune (core)
    < tasks (stages) < flows (orchestration) < entrypoints (the CLI)

Read from the source (AST), imports inside functions included, so a new import that breaks a rule fails here. An
import ``from P import n`` counts P itself (its ``__init__`` runs) and P.n when n is a module: a package whose
``__init__`` imports a submodule that imports the package back is a cycle. Prefect is imported only by orchestration
and the entry points."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS: tuple[tuple[str, ...], ...] = (
    ("llama4tune",), ("embedded", "tunerecipes"), ("finetune",), ("tasks",), ("flows",), ("entrypoints",))
LEVEL = {package: level for level, packages in enumerate(LAYERS) for package in packages}
ORCHESTRATION = {"flows", "entrypoints"}  # the only packages that may import Prefect


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in LEVEL for path in (REPO / package).rglob("*.py")}


def _imported_names(source: str, modules: dict[str, Path]) -> set[str]:
    """Every module a file imports anywhere in it: ``import a.b``: a.b; ``from a.b import c``: a.b, and a.b.c when
    that is one of ours."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in modules)
    return found


def _imports(source: str, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports."""
    return {name for name in _imported_names(source, modules) if name.split(".")[0] in LEVEL}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path.read_text(), modules) for name, path in modules.items()}


def _layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} imports {target}" for module, targets in graph.items() for target in targets
                  if LEVEL[target.split(".")[0]] > LEVEL[module.split(".")[0]])


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
            if target not in graph or target == node:
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


@pytest.mark.parametrize("module, source, complaint", [
    ("finetune._probe", "def f():\n    from flows.finetune import finetune\n", "imports flows.finetune"),
    ("finetune._probe", "from tasks.train import launch\n", "imports tasks.train.launch"),
    ("tunerecipes._probe", "import finetune.store\n", "imports finetune.store"),
    ("llama4tune._probe", "from embedded import tokenizer\n", "imports embedded.tokenizer"),
])
def test_the_check_sees_imports_inside_functions_too(module: str, source: str, complaint: str) -> None:
    graph = {module: _imports(source, _modules()), **_graph()}
    assert any(complaint in violation for violation in _layer_violations(graph))


def test_a_package_init_importing_a_module_that_imports_the_package_is_a_cycle() -> None:
    modules = _modules()
    graph = {**_graph(), "finetune.plan": {"finetune.plan._probe"},
             "finetune.plan._probe": _imports("def f():\n    from finetune.plan import catalog\n", modules)}
    assert ["finetune.plan", "finetune.plan._probe"] in _cycles(graph)


def test_prefect_is_imported_only_by_orchestration_and_entry_points() -> None:
    modules = _modules()
    found = sorted(f"{name} imports {imported}" for name, path in modules.items()
                   if name.split(".")[0] not in ORCHESTRATION
                   for imported in _imported_names(path.read_text(), modules)
                   if imported.split(".")[0] in {"prefect", "prefect_kubernetes"})
    assert found == []


def test_the_core_and_every_stage_load_without_prefect() -> None:
    from flows.pipeline import STAGE_SPECS

    modules = ["finetune.stage", "finetune.profile", "finetune.store", "finetune.plan",
               *sorted({f"tasks.{name}" for name in STAGE_SPECS})]
    code = f"import sys, {', '.join(modules)}; assert 'prefect' not in sys.modules, 'prefect was imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
