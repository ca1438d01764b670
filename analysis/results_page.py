"""The committed results page: docs/results.md, its figures under docs/results/, and
docs/results/results.json holding every number the page shows.

    python -m analysis.results_page STUDY_DIR --out docs [--command "..."] [--commit SHA]

The command and commit are the latest run's in the study's manifest (the sweep records them
when it starts work); the flags replace them.

The page is rendered from results.json alone (`render_page`), so a test can check that every
number on the committed page is the one in the committed file.  It opens with the study's answer
(`analysis.evidence`), then the one table, the comparison with the paper's claim, the
between-objective tests, the predictor table and the figures with their takeaways.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from analysis import evidence
from analysis.figures import SERIES
from analysis.report import ReportConfig, build_sections, latest_run, markdown_table, scale_notes
from analysis.results import direction, load_sweep
from study import schema as S
from study.config import ConfigError, cli_errors
from study.provenance import Provenance

PAGE = "results.md"
FOLDER = "results"  # next to the page: figures and the results file
RESULTS_FILE = "results.json"
# the paper's claim: backbones pretrained with a global contrastive (self-distillation) objective
# plus latent masked modelling make the best tokenizers; in the objective registry that is this family
PAPER_FAMILY = "self-distillation+latent-mim"
PAPER_CLAIM = ("The paper finds that backbones pretrained with a global contrastive objective plus latent masked "
               "image modelling make the best tokenizers.")


# --------------------------------------------------------------------------- collecting
def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-ready rows: numpy scalars as Python numbers, nan as None."""
    return json.loads(frame.to_json(orient="records", force_ascii=False)) if len(frame) else []


def paper_comparison(runs: pd.DataFrame, ev: evidence.Evidence, alpha: float) -> list[str]:
    """Per pipeline: the family of the backbone with the best tokenizer quality, against the claim."""
    if not ev.metrics or S.FAMILY not in runs:
        return ["The claim cannot be checked: no run has a tokenizer quality metric and a backbone family."]
    metric = ev.metrics[0]
    families = runs.dropna(subset=[S.BACKBONE]).groupby(S.BACKBONE)[S.FAMILY].first().astype(str)
    out = []
    for (series, _), test in _by_pipeline(ev, metric).items():
        groups = ev.groups[(ev.groups[SERIES] == series) & (ev.groups["metric"] == metric)]
        best = groups.sort_values("mean", ascending=direction(metric) == "min").iloc[0]
        family = families.get(best[S.BACKBONE], "?")
        resolved = test["kruskal_p"] < alpha and test["anova_p"] < alpha
        present = PAPER_FAMILY in families.values
        tied = f"{best[S.BACKBONE]} is not distinguishable from the runner-up {test['runner_up']} " \
               f"(Welch p = {test['top_two_p']:.3g})"
        if not present:
            verdict = "cannot test it (no such backbone)"
        elif not resolved:
            verdict = "cannot confirm or refute it: the backbones are not distinguishable at this budget"
        elif not test["top_two_p"] < alpha:
            paper_close = family == PAPER_FAMILY or families.get(test["runner_up"]) == PAPER_FAMILY
            verdict = (f"is consistent with it but cannot confirm it: {tied}" if paper_close
                       else f"disagrees with it: neither {best[S.BACKBONE]} nor the runner-up is of that family")
        else:
            verdict = "agrees with it" if family == PAPER_FAMILY else "disagrees with it"
        out.append(f"{series}: the best {metric} is {best[S.BACKBONE]} (family {family}, mean {best['mean']:.4g}); "
                   f"this run {verdict}.")
    return out or ["The claim cannot be checked: no between-objective test could run (see below)."]


def _by_pipeline(ev: evidence.Evidence, metric: str) -> dict[tuple[str, str], pd.Series]:
    tests = ev.tests[ev.tests["metric"] == metric]
    return {(row[SERIES], metric): row for _, row in tests.iterrows()}


def produced_by(runs: pd.DataFrame, command: Optional[str], commit: Optional[str]) -> Optional[Provenance]:
    """The latest run the manifest records, with `command` / `commit` replacing its own when given
    (a commit given by hand says nothing of uncommitted changes)."""
    run = latest_run(runs)
    if command is None and commit is None:
        return run
    base = run or Provenance(command="(not recorded)", commit=None, dirty=None, started=None, cpu_count=None)
    return dataclasses.replace(base, command=command or base.command, commit=commit or base.commit,
                               dirty=None if commit else base.dirty)


def collect(runs: pd.DataFrame, fig_dir: Path, *, command: Optional[str] = None, commit: Optional[str] = None,
            cfg: ReportConfig) -> dict[str, Any]:
    """Every number and sentence of the page, and the figures drawn into `fig_dir`."""
    run = produced_by(runs, command, commit)
    ev = evidence.gather(runs, confidence=cfg.confidence, n_boot=cfg.n_boot, seed=cfg.seed)
    figures = []
    with tempfile.TemporaryDirectory(prefix="vfmstudy-results-") as tmp:  # artifacts downloaded there stay out of docs
        for sec in build_sections(runs, Path(tmp), cfg):
            entry = {"title": sec.title, "takeaway": sec.takeaway, "file": None}
            if sec.plot.path is not None:
                fig_dir.mkdir(parents=True, exist_ok=True)
                entry["file"] = sec.plot.path.name
                shutil.copyfile(sec.plot.path, fig_dir / sec.plot.path.name)
            figures.append(entry)
    return {"study": runs.attrs.get("experiment"), "provenance": dataclasses.asdict(run) if run else None,
            "confidence": cfg.confidence, "level": f"{cfg.confidence:.0%}", "answer": ev.answer,
            "notes": scale_notes(runs, ev, cfg, run),
            "floors": _records(ev.floors), "floor_sentences": ev.floor_sentences,
            "table": _records(ev.table), "paper_claim": PAPER_CLAIM, "comparison": paper_comparison(runs, ev, 1 - cfg.confidence),
            "tests": _records(ev.tests), "groups": _records(ev.groups),
            "untested": [f"{series}, {metric}: {why}." for (series, metric), why in ev.untested.items()],
            "predictors": _records(ev.predictors), "verdict": ev.verdict, "figures": figures}


# --------------------------------------------------------------------------- rendering
def fmt(value: Any) -> str:
    """How the page writes a number of the results file (and how the test reads it back)."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4g}"


def _table(rows: list[dict[str, Any]], columns: Optional[list[str]] = None) -> str:
    if not rows:
        return "*(none)*"
    columns = columns or list(rows[0])
    return markdown_table(pd.DataFrame([[fmt(r.get(c)) for c in columns] for r in rows], columns=columns))


TEST_SHOWN = [SERIES, "metric", "kruskal_h", "kruskal_p", "anova_f", "anova_p"]
PREDICTOR_SHOWN = [SERIES, "property", "metric", "rho", "low", "high", "n_runs", "n_backbones", "resolved"]


def render_page(results: dict[str, Any]) -> str:
    """The Markdown page, from the results file's content only."""
    pct = results["level"]
    lines = [f"# Results: {results['study']}", "",
             f"Every number on this page is in [`{FOLDER}/{RESULTS_FILE}`]({FOLDER}/{RESULTS_FILE}); the command "
             "and commit that produced them are stated with the run's scale.", "",
             "## Answer", "", *results["answer"], "",
             "## Scale and how to read it", "", *[f"- {n}" for n in results["notes"]], "",
             "## Results", "", _table(results["table"]), "",
             "## Comparison with the paper", "", results["paper_claim"], "", *[f"- {c}" for c in results["comparison"]],
             "",
             "## Above the floors: chance and the class-mean image", "", *results["floor_sentences"], "",
             _table(results["floors"]), "",
             "## Between-objective tests", "", *[f"- {t[SERIES]}: {t['sentence']}" for t in results["tests"]],
             *[f"- {u}" for u in results["untested"]], "", _table(results["tests"], TEST_SHOWN), "",
             f"Per-backbone means with {pct} Student-t intervals over seeds:", "", _table(results["groups"]), "",
             "## What predicts quality", "", results["verdict"], "",
             f"Spearman ρ with a {pct} backbone-bootstrap interval:", "",
             _table(results["predictors"], PREDICTOR_SHOWN), "",
             "## Figures", ""]
    for fig in results["figures"]:
        lines += [f"### {fig['title']}", ""]
        if fig["file"]:
            lines += [f"![{fig['title']}]({FOLDER}/{fig['file']})", ""]
        lines += [f"Takeaway: {fig['takeaway']}", ""]
    return "\n".join(lines)


def write_page(study: str | Path, out: Path, *, command: Optional[str] = None, commit: Optional[str] = None,
               cfg: Optional[ReportConfig] = None) -> Path:
    """Write <out>/results.md, <out>/results/*.png and <out>/results/results.json; return the page."""
    cfg = cfg or ReportConfig()
    out = Path(out)
    fig_dir = out / FOLDER
    results = collect(load_sweep(study), fig_dir, command=command, commit=commit, cfg=cfg)
    fig_dir.mkdir(parents=True, exist_ok=True)
    (fig_dir / RESULTS_FILE).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    page = out / PAGE
    page.write_text(render_page(results) + "\n")
    return page


@cli_errors(ConfigError, FileNotFoundError, LookupError, ValueError)
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.results_page", description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="study folder (or sweep spec) of the finished run")
    parser.add_argument("--out", default="docs", help="folder of results.md (default: docs)")
    parser.add_argument("--command", help="the command that produced the study (default: the latest run's, "
                                          "from the study's manifest)")
    parser.add_argument("--commit", help="the commit the study ran at (default: the latest run's, from the manifest)")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the predictor table")
    args = parser.parse_args(argv)
    page = write_page(args.study, Path(args.out), command=args.command, commit=args.commit,
                      cfg=ReportConfig(n_boot=args.n_boot))
    print(f"results page: {page.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
