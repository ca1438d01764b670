"""The import layering of the packages, read from the source with `ast` (nothing is imported):

    models (tokenizer/, generators/)   never import the engine, the tracking or MLflow
    study.metrics, study.data          import nothing from the engine, the training loop or the models
    analysis/                          imports no models and no torch
    every module                       no import cycle through module-level imports
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("study", "tokenizer", "generators", "analysis")
ENGINE = ("study.stages", "study.spec", "study.dryrun", "study.worker", "study.backends", "study.controller",
          "study.sweep", "study.search", "study.tracking", "study.ledger", "study.pipeline", "study.cluster")
RUNNERS = ("mlflow", "optuna", "submitit")
MODELS = ("tokenizer", "generators")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    """Modules `name` imports (resolved: relative imports, `from pkg import submodule`)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            submodules = {f"{base}.{a.name}" for a in node.names} & set(MODULES)
            # `from pkg import submodule` runs the submodule, not pkg/__init__ (already importing)
            found.update(submodules if len(submodules) == len(node.names) else submodules | {base})
    return found


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _violations(sources: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for name, path in MODULES.items():
        # benchmarks are command-line entry points that wire parts together
        if _within(name, sources) and not name.endswith("bench"):
            out += [f"{name} imports {m}" for m in sorted(_imports(name, path, False)) if _within(m, forbidden)]
    return out


def test_the_module_list_is_read_from_the_source():
    assert {"study.pipeline.stages", "study.schema", "tokenizer.vfm", "analysis.report"} <= set(MODULES)
    assert "study.training" in _imports("study.pipeline.reference", MODULES["study.pipeline.reference"], True)


@pytest.mark.parametrize("sources, forbidden", [
    (MODELS, ENGINE + RUNNERS),
    (("study.metrics", "study.data"), ENGINE + RUNNERS + MODELS + ("study.training",)),
    (("analysis",), MODELS + ("torch", "study.training", "study.pipeline.stages", "study.pipeline.configs")),
], ids=["models", "leaves", "analysis"])
def test_layers_import_only_downwards(sources, forbidden):
    assert _violations(sources, forbidden) == []


def test_no_import_cycles_between_modules():
    graph = {name: {m for m in _imports(name, path, True) if m in MODULES and m != name}
             for name, path in MODULES.items()}
    # Tarjan's strongly connected components: a component of more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert cycles == []
