"""The names shared by the pipeline, the engine's tracking and the analysis live only in
study.schema: none of those modules writes a stage kind, metric key, tag or artifact path as a
string literal of its own (docstrings aside)."""

from __future__ import annotations

import ast
from pathlib import Path

from study import schema

REPO = Path(__file__).resolve().parents[1]
USERS = [*sorted((REPO / "study" / "pipeline").glob("*.py")), *sorted((REPO / "analysis").glob("*.py")),
         *(REPO / "study" / f"{m}.py" for m in ("tracking", "sweep", "search", "controller", "worker", "stages"))]
# metric keys, artifact files and the design tags (generic words such as "cell" or "seed" left out)
NAMES = {*schema.METRIC_KEYS, *(k for k in schema.DESIGN if k != schema.SEED), schema.GUIDANCE,
         schema.RECONSTRUCTIONS_PNG, schema.SAMPLES_PNG, schema.RECONSTRUCTIONS_GRID, schema.SAMPLES_GRID,
         schema.CLASSIFIER_FILE, schema.CODES_FILE}
METRICS = {f"{stage}/" for stage in schema.CHAIN}  # "<stage>/<key>": an MLflow metric name


def _literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_schema_names_are_written_only_in_the_schema():
    assert {"rfd_ref", "fd_ref", "backbone", "grids/samples.png"} <= NAMES
    found = [f"{path.relative_to(REPO)}:{line}: {text!r}" for path in USERS for line, text in _literals(path)
             if text in NAMES or any(prefix in text for prefix in METRICS)]
    assert found == []
