"""A sweep's MLflow runs as one tidy pandas DataFrame (one row per cell run), plus metric
histories and PNG artifacts.  Reads results only: no models, no torch.

    runs = load_sweep("sweeps/backbones.yaml")        # or "sqlite:///…/mlflow.db", experiment="…"
    runs[["backbone", "seed", "tok_eval/rfd_ref", "best.generator/fd_ref"]]
    curves = histories(runs, "generator/fd_ref")       # long: run_id, step, value + design columns

Columns: `run_id run_name status cell` and the design tags (`backbone family seed
tokenizer_kind generator_kind num_queries sampler semantic`, typed; absent ones are left out),
`pipeline` ("vfmtok+gpt"), `stage.<kind>` ids, `params.<key>` typed back from MLflow's strings,
every final metric under its own name, and `best.<metric>` for metrics with a direction rule.
`runs.attrs` keeps `tracking_uri`, `experiment`, `experiment_id` for histories and artifacts,
and `provenance`: the runs of the sweep recorded in its manifest (study.provenance.Provenance,
oldest first; empty when the source is a tracking URI or the manifest predates the record).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from study import ledger, provenance, schema as S
from study.spec import load_spec

# design tags -> how to type them; `seed` falls back to the param the spec writes seeds to
DESIGN = S.DESIGN
# (pattern on the metric key after its stage prefix, direction): first match wins; no match -> no best column
BEST_RULES = [
    (r"fd|fid|loss|lpips|uniformity", "min"),
    (r"acc|psnr|ssim|usage|perplexity|precision|recall|consistency|rank", "max"),
]
GRIDS = (S.RECONSTRUCTIONS_GRID, S.SAMPLES_GRID)


def direction(metric: str) -> Optional[str]:
    """'min' or 'max' for a metric key by the rule table, None when no rule applies."""
    name = metric.split("/", 1)[-1]  # without the stage prefix: "loss/model", "fd_ref"
    for pattern, how in BEST_RULES:
        if re.search(pattern, name):
            return how
    return None


# --------------------------------------------------------------------------- where the runs are
def resolve_source(source: str | Path, experiment: Optional[str] = None) -> tuple[str, str]:
    """(tracking URI, experiment name) from a spec file, a study folder or a tracking URI."""
    text = str(source)
    if "://" in text:
        if not experiment:
            raise ValueError(f"{text}: a tracking URI needs experiment=<sweep name>")
        return text, experiment
    path = _spec_path(source)
    spec = load_spec(path)
    name = experiment or spec.tracking.experiment or spec.name
    return spec.tracking.uri or _study_uri(spec, path), name


def _spec_path(source: str | Path) -> Path:
    path = Path(source)
    return path / "sweep.yaml" if path.is_dir() else path  # a study folder holds a copy of its spec


def _roots(spec, spec_path: Path) -> tuple[Path, Path]:
    """Where the study folder may be: spec.root is relative to where the sweep was launched, so
    also the spec's own folder."""
    return spec.root, spec_path.resolve().parent


def _study_uri(spec, spec_path: Path) -> str:
    """The URI the engine used: the manifest records it; else the sqlite file in the study folder."""
    for root in _roots(spec, spec_path):
        recorded = ledger.read_manifest(root, spec.name).get("tracking", {})
        if recorded.get("uri"):
            return recorded["uri"]
        if (root / "mlflow.db").is_file():
            return f"sqlite:///{(root / 'mlflow.db').resolve()}"
    raise FileNotFoundError(f"{spec_path}: no MLflow store found for sweep '{spec.name}' "
                            f"(looked in {spec.root}/ and {spec_path.parent}/; set tracking.uri)")


def recorded_runs(source: str | Path) -> list[provenance.Provenance]:
    """The sweep runs the study's manifest records (command, commit, start, CPUs), oldest first."""
    if "://" in str(source):
        return []
    path = _spec_path(source)
    spec = load_spec(path)
    for root in _roots(spec, path):
        manifest = ledger.read_manifest(root, spec.name)
        if manifest:
            return provenance.recorded(manifest)
    return []


def client_for(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(uri)


# --------------------------------------------------------------------------- loading
def load_sweep(source: str | Path, experiment: Optional[str] = None) -> pd.DataFrame:
    """One row per cell run of the sweep found at `source` (spec path, study folder or URI)."""
    uri, name = resolve_source(source, experiment)
    client = client_for(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise LookupError(f"{uri}: no experiment named '{name}'")
    runs = [r for r in _all_runs(client, exp.experiment_id) if _is_cell(r)]
    frame = pd.DataFrame([_row(client, r) for r in runs])
    frame = _typed(frame) if len(frame) else pd.DataFrame(columns=["run_id", "run_name", "status", "cell"])
    frame.attrs.update(tracking_uri=uri, experiment=name, experiment_id=exp.experiment_id,
                       provenance=recorded_runs(source))
    return frame


def _all_runs(client, experiment_id: str) -> list:
    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _is_cell(run) -> bool:
    """Contract: tag vfmstudy.role=cell; runs from before that tag: any child of a sweep run."""
    role = run.data.tags.get(S.ROLE)
    return role == S.ROLE_CELL if role else S.PARENT_RUN in run.data.tags


def _row(client, run) -> dict[str, Any]:
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    row: dict[str, Any] = {"run_id": run.info.run_id, "run_name": run.info.run_name,
                           "status": run.info.status,
                           "cell": tags.get(S.CELL, tags.get(S.CELL_ID))}
    for key in DESIGN:
        value = tags.get(key, params.get(key) if key == S.SEED else None)
        if value is not None:
            row[key] = value
    row.update({k: v for k, v in tags.items() if k.startswith(S.STAGE_TAG_PREFIX)})
    row.update({f"params.{k}": v for k, v in params.items()})
    row.update(metrics)
    for key in metrics:
        how = direction(key)
        if how:
            values = [m.value for m in client.get_metric_history(run.info.run_id, key)]
            row[f"best.{key}"] = min(values) if how == "min" else max(values)
    return row


# --------------------------------------------------------------------------- typing
def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    for key, kind in DESIGN.items():
        if key in frame:
            frame[key] = _cast(frame[key], kind)
    for col in [c for c in frame.columns if c.startswith("params.")]:
        frame[col] = _infer(frame[col])
    if S.TOKENIZER_KIND in frame and S.GENERATOR_KIND in frame:
        frame["pipeline"] = frame[S.TOKENIZER_KIND] + "+" + frame[S.GENERATOR_KIND]
    return frame


_BOOLS = {"true": True, "false": False}


def _cast(col: pd.Series, kind: type) -> pd.Series:
    if kind is bool:
        return col.map(lambda v: _BOOLS.get(str(v).lower()) if pd.notna(v) else None).astype("boolean")
    if kind is int:
        return pd.to_numeric(col, errors="coerce").astype("Int64")
    return col.astype("string")


def _infer(col: pd.Series) -> pd.Series:
    """MLflow params are strings: give a column back the type all its values agree on."""
    values = col.dropna().astype(str)
    if len(values) and values.str.lower().isin(_BOOLS).all():
        return _cast(col, bool)
    numbers = pd.to_numeric(values, errors="coerce")
    if len(values) and numbers.notna().all():
        if values.str.fullmatch(r"[+-]?\d+").all():
            return _cast(col, int)
        return pd.to_numeric(col, errors="coerce")
    return col.where(col.isna(), col.astype(str)).astype("string")


# --------------------------------------------------------------------------- histories, artifacts
def histories(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Long frame (run_id, step, value + the runs' design columns) of `metric` over steps."""
    client = client_for(runs.attrs["tracking_uri"])
    rows = [{"run_id": rid, "step": m.step, "value": m.value}
            for rid in runs["run_id"] for m in client.get_metric_history(rid, metric)]
    long = pd.DataFrame(rows, columns=["run_id", "step", "value"])
    design = [c for c in ("run_id", *DESIGN, "pipeline") if c in runs]
    return long.merge(runs[design], on="run_id", how="left").sort_values(["run_id", "step"], ignore_index=True)


def artifact(runs: pd.DataFrame, run_id: str, path: str, dst: Optional[Path] = None) -> Optional[Path]:
    """Local copy of one run artifact (e.g. grids/samples.png), None when the run has none."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    dst = Path(dst or tempfile.mkdtemp(prefix="vfmstudy-artifacts-")) / run_id
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst),
                                                    tracking_uri=runs.attrs["tracking_uri"])
    except (MlflowException, OSError):
        return None
    return Path(local) if Path(local).is_file() else None


def describe(runs: pd.DataFrame) -> str:
    """One line saying what was loaded (for CLIs and notebooks)."""
    design = {k: sorted(map(str, runs[k].dropna().unique())) for k in DESIGN if k in runs and k != S.SEED}
    return f"{len(runs)} cell runs from {runs.attrs.get('experiment')}: {json.dumps(design)}"
